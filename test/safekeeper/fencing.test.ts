// Generations: a lower one is fenced (409), an equal one is idempotent, a higher one persists the
// new generation, truncates WAL past start_lsn and follows the new compute — whose WAL then sits
// in the safekeeper's files byte for byte. A compute of another cluster is refused without writes.
import t from 'tap';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { formatLsn, parseLsn, segmentOf } from '../../lib/lsn.ts';
import { SafekeeperClient } from '../../safekeeper/client.ts';
import { startTestPostgres } from '../helpers/postgres.ts';
import {
  cloneCompute, compareSegments, computeOf, currentLsn, delay, REPL_SETTINGS, replicationFlush, segmentsIn, startTestSafekeeper, tempDir, waitFor, withClient,
} from './helpers.ts';

const TL = 'br-fence';

t.test('generations fence old computes and truncate divergent WAL', async (t) => {
  const a = await startTestPostgres(t, 'xenon-sk-fence-', REPL_SETTINGS);
  const root = tempDir(t, 'xenon-sk-fence-');
  const sk = await startTestSafekeeper(t, 'sk1', join(root, 'sk1'));
  const api = new SafekeeperClient(sk.url);
  await api.follow(TL, { generation: 1, compute: computeOf(a) });
  const waitFlush = async (lsn: bigint): Promise<void> => {
    await waitFor(`flush ${formatLsn(lsn)}`, async () => parseLsn((await api.status(TL))!.flush_lsn) >= lsn);
  };
  await withClient(a.admin(), async (c) => {
    await c.query('CREATE TABLE t (id int, pad text)');
    await c.query("INSERT INTO t SELECT g, repeat('a', 100) FROM generate_series(1, 20000) g");
  });
  await waitFlush(await currentLsn(a));

  // B: a copy of A at its backup start; A then writes WAL that B will never have.
  const b = await cloneCompute(t, a, 'b');
  // B's own WAL begins with its end-of-recovery checkpoint: before that it agrees with A. Its WAL
  // page holding that REDO point is where the new generation starts (B still has that segment).
  const redo = await withClient(b.admin(), async (c) => parseLsn((await c.query<{ l: string }>('SELECT redo_lsn::text AS l FROM pg_control_checkpoint()')).rows[0]!.l));
  const L = redo - (redo % 8192n);
  t.ok(L >= b.backupStartLsn, 'start LSN after the backup start');
  await withClient(a.admin(), (c) => c.query("INSERT INTO t SELECT g, repeat('z', 100) FROM generate_series(1, 30000) g"));
  const x = await currentLsn(a);
  await waitFlush(x);
  t.ok(x > L, `A is ahead of B's start (${formatLsn(x)} > ${formatLsn(L)})`);

  // Lower generation: 409. Equal: idempotent.
  await t.rejects(api.follow(TL, { generation: 0, compute: computeOf(b) }), { code: 'SK_GENERATION_FENCED' }, 'lower generation is fenced');
  await t.rejects(api.unfollow(TL, 0), { code: 'SK_GENERATION_FENCED' }, 'lower generation cannot unfollow');
  const same = await api.follow(TL, { generation: 1, compute: computeOf(a) });
  t.equal(same.generation, 1, 'equal generation is idempotent');
  t.same(same.compute, { host: '127.0.0.1', port: a.port, user: 'admin' }, 'still following A (no password in the status)');

  // B writes its own WAL after L.
  await withClient(b.admin(), async (c) => {
    await c.query('CREATE TABLE b_only (id int)');
    await c.query('INSERT INTO b_only SELECT generate_series(1, 5000)');
  });
  const st2 = await api.follow(TL, { generation: 2, compute: computeOf(b), start_lsn: formatLsn(L) });
  t.equal(st2.generation, 2);
  t.ok(parseLsn(st2.flush_lsn) <= L, `flush cut back to the start LSN (${st2.flush_lsn} <= ${formatLsn(L)})`);
  const control = JSON.parse(readFileSync(join(root, 'sk1', 'timelines', TL, 'control.json'), 'utf8')) as { generation: number; compute: { port: number } };
  t.equal(control.generation, 2, 'new generation persisted');
  t.equal(control.compute.port, b.port);
  const files = segmentsIn(join(root, 'sk1', 'timelines', TL, 'wal'));
  t.ok([...files.values()].every((f) => f.segno <= segmentOf(L)), 'no segment past the start LSN is left');
  await waitFor('A no longer streams to sk1', async () => !(await replicationFlush(a)).has('sk1'));

  const bEnd = await currentLsn(b);
  await waitFlush(bEnd);
  const { compared, diffs } = compareSegments(join(root, 'sk1', 'timelines', TL, 'wal'), join(b.dataDir, 'pg_wal'), bEnd);
  t.comment(`compared with B's pg_wal: ${compared.join(' ')}`);
  t.ok(compared.length >= 1, 'segments compared');
  t.same(diffs, [], 'the safekeeper holds exactly B\'s WAL after the truncation');

  // A truncation in the middle of a segment (a restart of B at an earlier LSN): the tail is zeroed
  // and streamed again — still B's bytes.
  const mid = bEnd - 0x8000n;
  const st3 = await api.follow(TL, { generation: 3, compute: computeOf(b), start_lsn: formatLsn(mid) });
  t.equal(st3.flush_lsn, formatLsn(mid), 'cut in the middle of a segment');
  await withClient(b.admin(), (c) => c.query('INSERT INTO b_only SELECT generate_series(1, 1000)'));
  const bEnd2 = await currentLsn(b);
  await waitFlush(bEnd2);
  const again = compareSegments(join(root, 'sk1', 'timelines', TL, 'wal'), join(b.dataDir, 'pg_wal'), bEnd2);
  t.same(again.diffs, [], `identical to B's pg_wal after a mid-segment truncation (${again.compared.join(' ')})`);

  // Unfollow: lower generation fenced; current stops streaming and keeps data.
  const un = await api.unfollow(TL, 3);
  t.equal(un.streaming, false);
  t.equal(un.compute, null);
  await delay(300);
  t.notOk((await replicationFlush(b)).has('sk1'), 'B no longer has sk1 streaming');
  t.ok((await api.listWal(TL)).files.length > 0, 'data kept');
  const back = await api.follow(TL, { generation: 3, compute: computeOf(b) });
  t.equal(back.generation, 3);
  await waitFor('streaming again', async () => (await api.status(TL))?.streaming);

  // Another cluster is refused: clear last_error, nothing written.
  const other = await startTestPostgres(t, 'xenon-sk-other-', REPL_SETTINGS);
  const before = (await api.status(TL))!;
  await api.follow(TL, { generation: 4, compute: computeOf(other) });
  const refused = await waitFor('a refusal', async () => {
    const s = await api.status(TL);
    return s?.last_error ? s : undefined;
  });
  t.match(refused.last_error, /another cluster/, `last_error: ${refused.last_error}`);
  t.equal(refused.streaming, false);
  t.equal(refused.flush_lsn, before.flush_lsn, 'nothing written from the other cluster');
  t.equal(refused.system_id, before.system_id);
  t.notOk((await replicationFlush(other)).has('sk1'), 'never streamed from it');
  await t.rejects(new SafekeeperClient(sk.url).follow(TL, { generation: 3, compute: computeOf(b) }), { code: 'SK_GENERATION_FENCED' }, 'generation 3 is fenced now');
});
