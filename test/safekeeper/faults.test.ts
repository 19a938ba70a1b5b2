// Bad situations: wrong credentials, a server that is not Postgres, a corrupted control file, a
// disk that fails writes (injected), and a compute connection cut in the middle of messages. The
// safekeeper reports a clear error, keeps serving, and never acknowledges a flush it did not make.
import t from 'tap';
import { mkdirSync, writeFileSync } from 'node:fs';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import pg from 'pg';
import { formatLsn, parseLsn } from '../../lib/lsn.ts';
import { SafekeeperClient } from '../../safekeeper/client.ts';
import { startTestPostgres } from '../helpers/postgres.ts';
import {
  compareSegments, computeOf, currentLsn, delay, REPL_SETTINGS, replicationFlush, startReceivewal, startTestSafekeeper, tempDir, waitFor, waitReplicated, withClient,
} from './helpers.ts';

t.test('wrong password, not-Postgres servers, corrupted control file', async (t) => {
  const pgc = await startTestPostgres(t, 'xenon-sk-bad-', REPL_SETTINGS);
  const root = tempDir(t, 'xenon-sk-bad-');
  // A timeline whose control file got corrupted while the safekeeper was down.
  mkdirSync(join(root, 'sk1', 'timelines', 'br-corrupt', 'wal'), { recursive: true });
  writeFileSync(join(root, 'sk1', 'timelines', 'br-corrupt', 'control.json'), '{"version": 1, "timeline_id": "br-corr');
  const sk = await startTestSafekeeper(t, 'sk1', join(root, 'sk1'));
  const api = new SafekeeperClient(sk.url);

  const corrupt = (await api.status('br-corrupt'))!;
  t.match(corrupt.last_error, /control file .* is corrupted: not JSON/, 'corrupted control file reported');
  t.equal(corrupt.streaming, false);
  await t.rejects(api.follow('br-corrupt', { generation: 9, compute: computeOf(pgc) }), { code: 'SK_CONTROL_FILE_CORRUPT' }, 'and never followed or written');

  await api.follow('br-badpw', { generation: 1, compute: { ...computeOf(pgc), password: 'wrong' } });
  const badpw = await waitFor('an error', async () => (await api.status('br-badpw'))?.last_error ?? undefined);
  t.match(badpw, /password authentication failed/, `wrong password: ${badpw}`);

  // An HTTP server (this safekeeper's own port) and a TCP server that hangs up at once.
  await api.follow('br-http', { generation: 1, compute: { ...computeOf(pgc), port: sk.address.port } });
  const hangup: Server = createServer((s) => s.destroy());
  await new Promise<void>((r) => hangup.listen(0, '127.0.0.1', () => r()));
  t.teardown(() => new Promise<void>((r) => hangup.close(() => r())));
  await api.follow('br-hangup', { generation: 1, compute: { ...computeOf(pgc), port: (hangup.address() as { port: number }).port } });
  for (const id of ['br-http', 'br-hangup']) {
    const err = await waitFor(`an error for ${id}`, async () => (await api.status(id))?.last_error ?? undefined);
    t.ok(err.length > 0, `${id}: ${err}`);
    const st = (await api.status(id))!;
    t.equal(st.flush_lsn, '0/0', `${id}: nothing flushed`);
    t.equal(st.streaming, false);
  }
  // Other timelines are unaffected.
  await api.follow('br-good', { generation: 1, compute: computeOf(pgc) });
  await waitFor('br-good streaming', async () => (await api.status('br-good'))?.streaming);
  t.equal((await fetch(`${sk.url}/healthz`)).status, 200);
  t.same((await api.listTimelines()).map((s) => s.timeline_id).sort(), ['br-badpw', 'br-corrupt', 'br-good', 'br-hangup', 'br-http']);
  await api.deleteTimeline('br-corrupt');
  t.equal(await api.status('br-corrupt'), null, 'a corrupted timeline can be deleted');
});

t.test('a failing disk: no flush is acknowledged, commits wait, and recover when the disk does', async (t) => {
  const pgc = await startTestPostgres(t, 'xenon-sk-disk-', { ...REPL_SETTINGS, synchronous_commit: 'on', synchronous_standby_names: 'ANY 1 (skf)' });
  const root = tempDir(t, 'xenon-sk-disk-');
  let failing = false;
  const sk = await startTestSafekeeper(t, 'skf', join(root, 'skf'), {
    beforeWrite: () => {
      if (failing) throw Object.assign(new Error('ENOSPC: no space left on device, write (injected)'), { code: 'ENOSPC' });
    },
  });
  const api = new SafekeeperClient(sk.url);
  await api.follow('br-disk', { generation: 1, compute: computeOf(pgc) });
  const db = new pg.Client(pgc.admin());
  await db.connect();
  t.teardown(() => db.end().catch(() => {}));
  await db.query('CREATE TABLE d (id int)');
  await db.query('INSERT INTO d VALUES (1)');
  const before = parseLsn((await api.status('br-disk'))!.flush_lsn);

  failing = true;
  let done = false;
  const pending = db.query('INSERT INTO d VALUES (2)').then(() => (done = true));
  const err = await waitFor('the write error', async () => {
    const s = await api.status('br-disk');
    return s?.last_error?.includes('ENOSPC') ? s.last_error : undefined;
  });
  t.match(err, /WAL write failed: ENOSPC/, `reported: ${err}`);
  await delay(1_000);
  t.equal(done, false, 'the commit is not acknowledged while the disk fails');
  const st = (await api.status('br-disk'))!;
  t.equal(parseLsn(st.flush_lsn), before, 'flush LSN did not move');
  const reported = await withClient(pgc.admin(), async (c) => (await c.query<{ f: string | null }>("SELECT flush_lsn::text AS f FROM pg_stat_replication WHERE application_name = 'skf'")).rows[0]?.f ?? null);
  t.ok(reported === null || parseLsn(reported) <= before, `the compute heard at most ${formatLsn(before)} (got ${reported})`);

  failing = false;
  await Promise.race([pending, delay(10_000)]);
  t.equal(done, true, 'the commit completes once writes succeed again');
  const ok = await waitFor('error cleared', async () => {
    const s = await api.status('br-disk');
    return s?.streaming && s.last_error === null ? s : undefined;
  });
  t.ok(parseLsn(ok.flush_lsn) > before, 'flushing again');
  t.equal((await db.query<{ n: string }>('SELECT count(*) AS n FROM d')).rows[0]!.n, '2');
});

/** A TCP proxy that can cut the server→client direction after a given number of bytes. */
function cuttingProxy(targetPort: number): Promise<{ port: number; cutAfter(n: number): void; cuts: () => number; close(): Promise<void> }> {
  let cutAt: number | null = null;
  let cuts = 0;
  const socks = new Set<Socket>();
  const server = createServer((client) => {
    const up = connect(targetPort, '127.0.0.1');
    socks.add(client).add(up);
    let seen = 0;
    const kill = (): void => { client.destroy(); up.destroy(); };
    client.on('error', kill).on('close', kill);
    up.on('error', kill).on('close', kill);
    client.pipe(up);
    up.on('data', (d: Buffer) => {
      if (cutAt !== null && seen + d.length >= cutAt) {
        const keep = Math.max(0, cutAt - seen);
        client.write(d.subarray(0, keep), () => kill());
        cutAt = null;
        cuts++;
        return;
      }
      seen += d.length;
      client.write(d);
    });
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve({
    port: (server.address() as { port: number }).port,
    cutAfter(n) { cutAt = n; },
    cuts: () => cuts,
    close: () => new Promise<void>((r) => { for (const s of socks) s.destroy(); server.close(() => r()); }),
  })));
}

t.test('a compute connection cut in the middle of messages: reconnects, no gap', async (t) => {
  const pgc = await startTestPostgres(t, 'xenon-sk-cut-', REPL_SETTINGS);
  const root = tempDir(t, 'xenon-sk-cut-');
  const proxy = await cuttingProxy(pgc.port);
  t.teardown(() => proxy.close());
  const sk = await startTestSafekeeper(t, 'sk1', join(root, 'sk1'));
  const api = new SafekeeperClient(sk.url);
  await api.follow('br-cut', { generation: 1, compute: { ...computeOf(pgc), port: proxy.port } });
  await waitFor('streaming', async () => (await api.status('br-cut'))?.streaming);
  const rw = await startReceivewal(t, pgc, join(root, 'recv'), 'recv');
  await withClient(pgc.admin(), (c) => c.query('CREATE TABLE c (id int, pad text)'));
  for (let round = 0; round < 4; round++) {
    // Cut somewhere inside the next ~100 kB the compute sends (XLogData messages are up to 128 kB).
    proxy.cutAfter(2_000 + Math.floor(Math.random() * 100_000));
    await withClient(pgc.admin(), (c) => c.query(`INSERT INTO c SELECT g, repeat('c', 300) FROM generate_series(1, 3000) g`));
    await delay(200);
  }
  await withClient(pgc.admin(), (c) => c.query('SELECT pg_switch_wal()'));
  const end = await currentLsn(pgc);
  await waitReplicated(pgc, ['sk1', 'recv'], end);
  t.ok(proxy.cuts() >= 1, `connection cut ${proxy.cuts()} times mid-stream`);
  const metrics = await sk.metrics.registry.getSingleMetric('xenon_safekeeper_reconnects_total')!.get();
  const reconnects = metrics.values.reduce((a, v) => a + v.value, 0);
  t.ok(reconnects >= proxy.cuts(), `reconnects counted (${reconnects})`);
  const st = (await api.status('br-cut'))!;
  const { compared, diffs } = compareSegments(join(root, 'sk1', 'timelines', 'br-cut', 'wal'), rw.dir, parseLsn(st.flush_lsn) < end ? parseLsn(st.flush_lsn) : end);
  t.same(diffs, [], `identical to pg_receivewal (${compared.join(' ')})`);
  t.ok((await replicationFlush(pgc)).has('sk1'));
  await rw.stop();
});
