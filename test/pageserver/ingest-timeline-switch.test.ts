// A Postgres timeline switch under ingest: safekeepers follow a standby that is then promoted
// (TLI 1 → 2). The root timeline's pg_history gains TLI 2 at the switch point of 00000002.history;
// a branch whose safekeeper only saw the promoted compute starts its pg_history at that switch
// point; LSN-by-time reads across the switch (TLI-2 files for the switch segment on).
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';
import { silentLogger } from '../../lib/logger.ts';
import { formatLsn, parseLsn, WAL_SEGMENT_SIZE } from '../../lib/lsn.ts';
import { historySwitchPoint, startIngest } from '../../pageserver/ingest.ts';
import { lsnByTime } from '../../pageserver/lsn-by-time.ts';
import { keys } from '../../pageserver/types.ts';
import { SafekeeperClient } from '../../safekeeper/client.ts';
import { startTestPostgres } from '../helpers/postgres.ts';
import {
  cloneCompute, computeOf, currentLsn, delay, PG_BIN, REPL_SETTINGS, startTestSafekeeper, tempDir, waitFor, waitReplicated, withClient,
} from '../safekeeper/helpers.ts';
import { testTimelines } from './ps-test-helpers.ts';

const TENANT = 'tenant-switch';
const ROOT_TL = 'br-switch-root';
const BRANCH_TL = 'br-switch-branch';

t.test('pg_history across a promotion, for the timeline and for a branch; LSN-by-time across it', async (t) => {
  const a = await startTestPostgres(t, 'xenon-ps-switch-', { ...REPL_SETTINGS, autovacuum: 'off' });
  const timelines = testTimelines(t);
  await timelines.create(TENANT, ROOT_TL);
  const sql = (cfg: { admin(): import('pg').ClientConfig }, q: string) => withClient(cfg.admin(), (c) => c.query(q));
  const insertLsn = async (cfg: { admin(): import('pg').ClientConfig }): Promise<bigint> =>
    parseLsn((await sql(cfg, 'SELECT pg_current_wal_insert_lsn()::text AS l')).rows[0].l);
  const clock = async (cfg: { admin(): import('pg').ClientConfig }): Promise<Date> =>
    new Date((await sql(cfg, "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS t")).rows[0].t);

  await sql(a, "CREATE TABLE t AS SELECT g AS id, repeat('p', 100) AS pad FROM generate_series(1, 10000) g");
  const s = await cloneCompute(t, a, 'standby', { standby: true, settings: { autovacuum: 'off' } });
  const root = tempDir(t, 'xenon-ps-switch-sk-');
  const sk = await startTestSafekeeper(t, 'sk1', join(root, 'sk1'));
  const api = new SafekeeperClient(sk.url);
  await api.follow(ROOT_TL, { generation: 1, compute: computeOf(s) });
  await waitFor('streaming from the standby', async () => (await api.status(ROOT_TL))?.streaming);
  const ingest = startIngest({ timelines, safekeepers: [{ id: 'sk1', url: sk.url }], intervalMs: 60_000, logger: silentLogger });
  t.teardown(() => ingest.close());

  // TLI 1 (written on A, streamed through the standby).
  await sql(a, "INSERT INTO t SELECT g, repeat('q', 100) FROM generate_series(10001, 80000) g"); // > 16 MB with the above
  await sql(a, 'SELECT pg_switch_wal()');
  await sql(a, 'INSERT INTO t VALUES (-1)');
  await delay(300);
  const T0 = await clock(a);
  await delay(300);
  const before0 = await insertLsn(a);
  await sql(a, 'INSERT INTO t VALUES (-2)');
  const after0 = await insertLsn(a);
  await delay(300);
  const T1 = await clock(a);
  const aEnd = await currentLsn(a);
  await waitFor('standby replay', async () => parseLsn((await sql(s, 'SELECT pg_last_wal_replay_lsn()::text AS l')).rows[0].l) >= aEnd);
  await waitReplicated(s, ['sk1'], aEnd);
  await ingest.pollNow(TENANT, ROOT_TL);
  const ix0 = await timelines.read(TENANT, ROOT_TL);
  t.equal(ix0.pg_history.length, 1);
  t.equal(ix0.pg_history[0]!.pg_timeline, 1);

  // Promote: TLI 2; a branch's own safekeeper joins only now.
  await sql(s, 'SELECT pg_promote(true, 30)');
  await delay(300);
  const before1 = await insertLsn(s);
  await sql(s, 'INSERT INTO t VALUES (-3)');
  const after1 = await insertLsn(s);
  const hist = readFileSync(join(s.dataDir, 'pg_wal', '00000002.history'), 'utf8');
  const switchPoint = historySwitchPoint(hist)!.lsn;
  t.equal(historySwitchPoint(hist)!.parentTli, 1);
  await timelines.create(TENANT, BRANCH_TL, { ancestor: { timeline_id: ROOT_TL, lsn: formatLsn(switchPoint) }, last_record_lsn: formatLsn(switchPoint), gc_cutoff_lsn: formatLsn(switchPoint) });
  const skb = await startTestSafekeeper(t, 'skb', join(root, 'skb'));
  const apib = new SafekeeperClient(skb.url);
  await apib.follow(BRANCH_TL, { generation: 1, compute: computeOf(s) });
  const ingestB = startIngest({ timelines, safekeepers: [{ id: 'skb', url: skb.url }], intervalMs: 60_000, logger: silentLogger });
  t.teardown(() => ingestB.close());

  // A little WAL on TLI 2: the piece appears before any TLI-2 segment is complete.
  let sEnd = await currentLsn(s);
  await waitReplicated(s, ['sk1', 'skb'], sEnd);
  await ingest.pollNow(TENANT, ROOT_TL);
  const ix1 = await timelines.read(TENANT, ROOT_TL);
  t.same(ix1.pg_history, [ix0.pg_history[0], { pg_timeline: 2, begin_lsn: formatLsn(switchPoint) }], `TLI 2 begins at the switch point ${formatLsn(switchPoint)}`);
  t.ok(ix1.wal.some((w) => w.name === '00000002.history'), 'the history file is stored');
  t.equal((await timelines.store.getBuffer(keys.wal(TENANT, ROOT_TL, '00000002.history'))).toString('utf8'), hist, 'byte-identical history file');

  // More WAL on TLI 2: its segments complete and are ingested; the old TLI's last (partial) segment is not.
  await sql(s, "INSERT INTO t SELECT g, repeat('s', 100) FROM generate_series(80001, 150000) g");
  await sql(s, 'SELECT pg_switch_wal()');
  await sql(s, 'INSERT INTO t VALUES (-4)');
  sEnd = await currentLsn(s);
  await waitReplicated(s, ['sk1', 'skb'], sEnd);
  await ingest.pollNow(TENANT, ROOT_TL);
  await ingestB.pollNow(TENANT, BRANCH_TL);
  const ix2 = await timelines.read(TENANT, ROOT_TL);
  t.same(ix2.pg_history, ix1.pg_history, 'pg_history unchanged');
  const tli2 = ix2.wal.filter((w) => w.kind === 'segment' && w.pg_timeline === 2);
  t.ok(tli2.length >= 1, `TLI-2 segments: ${tli2.map((w) => w.name).join(', ')}`);
  t.notOk(ix2.wal.some((w) => w.kind === 'segment' && w.pg_timeline === 1 && parseLsn(w.end_lsn!) > switchPoint), 'no TLI-1 segment past the switch point');
  t.ok(parseLsn(ix2.last_record_lsn) >= sEnd);

  const ixb = await timelines.read(TENANT, BRANCH_TL);
  t.same(ixb.pg_history, [{ pg_timeline: 2, begin_lsn: formatLsn(switchPoint) }], 'the branch begins at its history file\'s switch point');
  t.ok(ixb.wal.some((w) => w.name === '00000002.history'));
  t.ok(parseLsn(ixb.last_record_lsn) >= sEnd, 'the branch tip');
  for (const w of ixb.wal.filter((x) => x.kind === 'segment')) {
    t.ok((await timelines.store.getBuffer(keys.wal(TENANT, BRANCH_TL, w.name))).equals(await apib.readWal(BRANCH_TL, w.name)), `${w.name} as skb has it`);
  }

  // LSN by time across the switch (no samples between: scans from the first WAL).
  const fetchSegment = async (name: string): Promise<Buffer> => {
    const ix = await timelines.read(TENANT, ROOT_TL);
    if (ix.wal.some((w) => w.name === name)) return timelines.store.getBuffer(keys.wal(TENANT, ROOT_TL, name));
    const b = await api.readWal(ROOT_TL, name);
    if (b.length !== WAL_SEGMENT_SIZE) throw new Error(`short ${name}`);
    return b;
  };
  const scratch = tempDir(t, 'xenon-ps-switch-lbt-');
  const run = (time: Date): Promise<bigint> => lsnByTime({ timelines, tenantId: TENANT, timelineId: ROOT_TL, time, pgBin: PG_BIN, tmpDir: scratch, fetchSegment, chunkSegments: 2 });
  const r0 = await run(T0);
  t.ok(r0 >= before0 && r0 < after0, `T0 (TLI 1) → ${formatLsn(r0)} in [${formatLsn(before0)}, ${formatLsn(after0)})`);
  const r1 = await run(T1);
  t.ok(r1 >= before1 && r1 < after1 && r1 > switchPoint, `T1 (before the promotion) → ${formatLsn(r1)}, the first commit on TLI 2 in [${formatLsn(before1)}, ${formatLsn(after1)})`);
});
