// The safekeeper's HTTP API: status, listings with LSN ranges, WAL downloads (full, Range/206,
// partial segments masked past the flush LSN), history, metrics, delete — and hostile input
// (path tricks, bad ids, bad JSON, absurd ranges) answered with JSON errors while it keeps serving.
import t from 'tap';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseLsn, segmentStart, WAL_SEGMENT_SIZE } from '../../lib/lsn.ts';
import { SafekeeperClient } from '../../safekeeper/client.ts';
import { startTestPostgres } from '../helpers/postgres.ts';
import { computeOf, currentLsn, REPL_SETTINGS, startTestSafekeeper, tempDir, waitFor, withClient } from './helpers.ts';

const TL = 'br-http';

async function req(url: string, init: RequestInit = {}): Promise<{ status: number; headers: Headers; body: Buffer; json: unknown }> {
  const res = await fetch(url, init);
  const body = Buffer.from(await res.arrayBuffer());
  let json: unknown;
  if ((res.headers.get('content-type') ?? '').includes('json')) json = JSON.parse(body.toString('utf8'));
  return { status: res.status, headers: res.headers, body, json };
}

t.test('HTTP API', async (t) => {
  const pgc = await startTestPostgres(t, 'xenon-sk-http-', REPL_SETTINGS);
  const root = tempDir(t, 'xenon-sk-http-');
  const sk = await startTestSafekeeper(t, 'sk1', join(root, 'sk1'));
  const api = new SafekeeperClient(sk.url);
  await api.follow(TL, { generation: 5, compute: computeOf(pgc) });
  await withClient(pgc.admin(), async (c) => {
    await c.query("CREATE TABLE t AS SELECT g AS id, repeat('h', 100) AS pad FROM generate_series(1, 20000) g");
    await c.query('SELECT pg_switch_wal()');
    await c.query("INSERT INTO t SELECT g, 'tail' FROM generate_series(1, 500) g");
  });
  const end = await currentLsn(pgc);
  await waitFor('caught up', async () => parseLsn((await api.status(TL))!.flush_lsn) >= end);
  const walDir = join(root, 'sk1', 'timelines', TL, 'wal');

  t.test('status and listings', async (t) => {
    const all = await api.listTimelines();
    t.same(all.map((s) => s.timeline_id), [TL]);
    const st = (await api.status(TL))!;
    t.equal(st.generation, 5);
    t.equal(st.streaming, true);
    t.equal(st.lag_bytes, 0);
    t.equal(st.start_lsn, '0/1000000', 'oldest segment start');
    t.equal(await api.status('br-nope'), null, 'unknown timeline: null from the client (404)');
    const listing = await api.listWal(TL);
    const segs = listing.files.filter((f) => f.kind === 'segment');
    t.ok(segs.length >= 2);
    for (const f of segs) {
      t.equal(f.size, WAL_SEGMENT_SIZE, `${f.name} full size`);
      if (!f.partial) t.equal(parseLsn(f.end_lsn!) - parseLsn(f.start_lsn!), BigInt(WAL_SEGMENT_SIZE), `${f.name} covers a whole segment`);
    }
    t.equal(segs.at(-1)!.partial, true);
    t.equal(segs.at(-1)!.end_lsn, listing.flush_lsn);
  });

  t.test('WAL downloads', async (t) => {
    const listing = await api.listWal(TL);
    const complete = listing.files.find((f) => f.kind === 'segment' && !f.partial)!;
    const onDisk = readFileSync(join(walDir, complete.name));
    t.ok((await api.readWal(TL, complete.name)).equals(onDisk), 'complete segment, full read');
    const r = await req(`${sk.url}/v1/timeline/${TL}/wal/${complete.name}`, { headers: { range: 'bytes=100-4195' } });
    t.equal(r.status, 206);
    t.equal(r.headers.get('content-range'), `bytes 100-4195/${WAL_SEGMENT_SIZE}`);
    t.ok(r.body.equals(onDisk.subarray(100, 4196)), 'range bytes');
    t.ok((await api.readWal(TL, complete.name, { start: 8192, end: 16384 })).equals(onDisk.subarray(8192, 16384)), 'client range');
    const suffix = await req(`${sk.url}/v1/timeline/${TL}/wal/${complete.name}`, { headers: { range: 'bytes=-10' } });
    t.equal(suffix.status, 206);
    t.ok(suffix.body.equals(onDisk.subarray(WAL_SEGMENT_SIZE - 10)), 'suffix range');
    const clamp = await req(`${sk.url}/v1/timeline/${TL}/wal/${complete.name}`, { headers: { range: 'bytes=16777000-99999999999999' } });
    t.equal(clamp.status, 206, 'an end past the file is clamped');
    t.equal(clamp.body.length, WAL_SEGMENT_SIZE - 16777000);
    for (const bad of ['bytes=99999999999-', 'bytes=abc', 'bytes=0-1,5-9', 'items=0-1', 'bytes=10-5', `bytes=${WAL_SEGMENT_SIZE}-`, 'bytes=' + '9'.repeat(5000) + '-']) {
      const b = await req(`${sk.url}/v1/timeline/${TL}/wal/${complete.name}`, { headers: { range: bad } });
      t.equal(b.status, 416, `Range ${bad.slice(0, 30)} → 416`);
      t.match(b.json, { error: { code: 'SK_RANGE_NOT_SATISFIABLE' } });
    }

    // The partial segment: by its .partial name or the plain one; zeros past the flush LSN.
    const partial = listing.files.find((f) => f.partial)!;
    const base = partial.name.replace('.partial', '');
    const a = await api.readWal(TL, partial.name);
    const b = await api.readWal(TL, base);
    t.equal(a.length, WAL_SEGMENT_SIZE);
    const flushOff = Number(parseLsn(partial.end_lsn!) - parseLsn(partial.start_lsn!));
    t.ok(a.subarray(0, flushOff).equals(b.subarray(0, flushOff)), 'same bytes by either name');
    t.ok(a.subarray(flushOff).every((x) => x === 0), 'nothing past the flush LSN is served');
    t.ok(a.subarray(0, flushOff).some((x) => x !== 0), 'data before it is');
    t.equal(segmentStart(BigInt(parseInt(base.slice(16), 16))), parseLsn(partial.start_lsn!));
  });

  t.test('hostile input gets JSON errors, never a crash', async (t) => {
    const cases: [string, string, RequestInit, number, string][] = [
      ['GET', '/v1/timeline/..%2Fx', {}, 400, 'CP_BAD_REQUEST'],
      ['GET', '/v1/timeline/..%2F..%2Fetc/wal', {}, 400, 'CP_BAD_REQUEST'],
      ['GET', '/v1/timeline/%E0%A4%A', {}, 404, 'HTTP_NOT_FOUND'],
      ['GET', '/v1/timeline/BR-UPPER', {}, 400, 'CP_BAD_REQUEST'],
      ['GET', '/v1/timeline/br-unknown', {}, 404, 'SK_TIMELINE_NOT_FOUND'],
      ['GET', `/v1/timeline/${'a'.repeat(64)}`, {}, 400, 'CP_BAD_REQUEST'],
      ['GET', `/v1/timeline/${TL}/wal/..%2Fcontrol.json`, {}, 404, 'SK_WAL_NOT_FOUND'],
      ['GET', `/v1/timeline/${TL}/wal/control.json`, {}, 404, 'SK_WAL_NOT_FOUND'],
      ['GET', `/v1/timeline/${TL}/wal/00000001000000000000000G`, {}, 404, 'SK_WAL_NOT_FOUND'],
      ['GET', `/v1/timeline/${TL}/wal/0000000100000000000000FF`, {}, 404, 'SK_WAL_NOT_FOUND'],
      ['GET', `/v1/timeline/${TL}/wal/00000009.history`, {}, 404, 'SK_WAL_NOT_FOUND'],
      ['PUT', `/v1/timeline/${TL}/compute`, { body: '{"generation": 5,', headers: { 'content-type': 'application/json' } }, 400, 'CP_BAD_REQUEST'],
      ['PUT', `/v1/timeline/${TL}/compute`, { body: '[1,2]' }, 400, 'CP_BAD_REQUEST'],
      ['PUT', `/v1/timeline/${TL}/compute`, { body: '' }, 400, 'CP_BAD_REQUEST'],
      ['PUT', `/v1/timeline/${TL}/compute`, { body: JSON.stringify({ generation: -1, compute: computeOf(pgc) }) }, 400, 'CP_BAD_REQUEST'],
      ['PUT', `/v1/timeline/${TL}/compute`, { body: JSON.stringify({ generation: 1.5, compute: computeOf(pgc) }) }, 400, 'CP_BAD_REQUEST'],
      ['PUT', `/v1/timeline/${TL}/compute`, { body: JSON.stringify({ generation: '6', compute: computeOf(pgc) }) }, 400, 'CP_BAD_REQUEST'],
      ['PUT', `/v1/timeline/${TL}/compute`, { body: JSON.stringify({ generation: 6, compute: { ...computeOf(pgc), port: 0 } }) }, 400, 'CP_BAD_REQUEST'],
      ['PUT', `/v1/timeline/${TL}/compute`, { body: JSON.stringify({ generation: 6, compute: { ...computeOf(pgc), user: 'a\u0000b' } }) }, 400, 'CP_BAD_REQUEST'],
      ['PUT', `/v1/timeline/${TL}/compute`, { body: JSON.stringify({ generation: 6, compute: computeOf(pgc), start_lsn: 'zz' }) }, 400, 'CP_BAD_REQUEST'],
      ['PUT', `/v1/timeline/${TL}/compute`, { body: JSON.stringify({ generation: 6, compute: computeOf(pgc), start_lsn: 7 }) }, 400, 'CP_BAD_REQUEST'],
      ['PUT', `/v1/timeline/${TL}/compute`, { body: JSON.stringify({ generation: 4, compute: computeOf(pgc) }) }, 409, 'SK_GENERATION_FENCED'],
      ['PUT', `/v1/timeline/${TL}/compute`, { body: 'x'.repeat(100_000) }, 413, 'CP_PAYLOAD_TOO_LARGE'],
      ['PUT', '/v1/timeline/..%2Fevil/compute', { body: JSON.stringify({ generation: 1, compute: computeOf(pgc) }) }, 400, 'CP_BAD_REQUEST'],
      ['DELETE', `/v1/timeline/${TL}/compute`, {}, 400, 'CP_BAD_REQUEST'],
      ['DELETE', `/v1/timeline/${TL}/compute?generation=abc`, {}, 400, 'CP_BAD_REQUEST'],
      ['DELETE', `/v1/timeline/${TL}/compute?generation=1`, {}, 409, 'SK_GENERATION_FENCED'],
      ['DELETE', '/v1/timeline/br-unknown', {}, 404, 'SK_TIMELINE_NOT_FOUND'],
      ['POST', `/v1/timeline/${TL}`, {}, 405, 'HTTP_METHOD_NOT_ALLOWED'],
      ['GET', '/v1/nothing', {}, 404, 'HTTP_NOT_FOUND'],
    ];
    for (const [method, path, init, status, code] of cases) {
      const r = await req(sk.url + path, { method, ...init });
      t.equal(r.status, status, `${method} ${path.slice(0, 60)} → ${status}`);
      t.match(r.json, { error: { code } }, `… ${code}`);
    }
    t.notOk(existsSync(join(root, 'sk1', 'evil')) || existsSync(join(root, 'evil')), 'nothing created outside the data dir');
    t.equal((await req(`${sk.url}/healthz`)).status, 200, 'still healthy');
    const st = (await api.status(TL))!;
    t.equal(st.generation, 5, 'generation untouched by rejected requests');
    t.equal(st.streaming, true, 'still streaming');
  });

  t.test('metrics', async (t) => {
    const text = (await req(`${sk.url}/metrics`)).body.toString();
    t.match(text, new RegExp(`xenon_safekeeper_flush_lsn\\{timeline_id="${TL}"\\} \\d+`));
    t.match(text, new RegExp(`xenon_safekeeper_lag_bytes\\{timeline_id="${TL}"\\} \\d+`));
    t.match(text, new RegExp(`xenon_safekeeper_streaming\\{timeline_id="${TL}"\\} 1`));
    t.match(text, /xenon_safekeeper_fsync_seconds_count [1-9]/);
    t.match(text, new RegExp(`xenon_safekeeper_wal_bytes_written_total\\{timeline_id="${TL}"\\} [1-9]`));
    t.match(text, /xenon_safekeeper_reconnects_total/);
  });

  t.test('delete a timeline', async (t) => {
    const r = await req(`${sk.url}/v1/timeline/${TL}`, { method: 'DELETE' });
    t.equal(r.status, 200);
    t.equal(await api.status(TL), null, 'gone');
    t.notOk(existsSync(join(root, 'sk1', 'timelines', TL)), 'its directory is removed');
    await waitFor('slot no longer streaming', async () => {
      const rows = await withClient(pgc.admin(), async (c) => (await c.query("SELECT 1 FROM pg_stat_replication WHERE application_name = 'sk1'")).rowCount);
      return rows === 0;
    });
  });
});
