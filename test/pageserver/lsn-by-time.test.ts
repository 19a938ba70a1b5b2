// LSN by time against a real compute's WAL (ingested from real safekeepers): the LSN for time T is
// the first commit after T — never an abort, COMMIT PREPARED counts — narrowed by the ingest's
// samples or scanned from the first WAL; times before the timeline → 409; future → the tip.
import t from 'tap';
import { XenonError } from '../../lib/errors.ts';
import { silentLogger } from '../../lib/logger.ts';
import { formatLsn, parseLsn } from '../../lib/lsn.ts';
import { startIngest } from '../../pageserver/ingest.ts';
import { lsnByTime, parseCommitRecords } from '../../pageserver/lsn-by-time.ts';
import { keys } from '../../pageserver/types.ts';
import { SafekeeperClient } from '../../safekeeper/client.ts';
import { delay, PG_BIN, tempDir, waitFor } from '../safekeeper/helpers.ts';
import { streamingCompute, testTimelines } from './ps-test-helpers.ts';

const TENANT = 'tenant-lbt';

t.test('parsing pg_waldump commit lines', async (t) => {
  const out = [
    'rmgr: Transaction len (rec/tot):     34/    34, tx:        735, lsn: 0/01A3F2D8, prev 0/01A3F2A0, desc: COMMIT 2026-12-02 04:10:01.123456 UTC',
    'rmgr: Transaction len (rec/tot):     34/    34, tx:        736, lsn: 0/01A3F300, prev 0/01A3F2D8, desc: ABORT 2026-12-02 04:10:02.000001 UTC',
    'rmgr: Transaction len (rec/tot):    130/   130, tx:        737, lsn: 0/01A3F340, prev 0/01A3F300, desc: COMMIT 2026-12-02 04:10:03.5 UTC; inval msgs: catcache 7',
    'rmgr: Transaction len (rec/tot):     66/    66, tx:        738, lsn: 0/01A3F400, prev 0/01A3F340, desc: COMMIT_PREPARED 738: 2026-12-02 04:10:04.000002 UTC',
    'rmgr: Transaction len (rec/tot):     66/    66, tx:        739, lsn: 0/01A3F500, prev 0/01A3F400, desc: PREPARE gid x: 2026-12-02 04:10:05.000002 UTC',
    'rmgr: Heap        len (rec/tot):     54/    54, tx:        739, lsn: 0/01A3F600, prev 0/01A3F500, desc: INSERT off 2',
  ].join('\n');
  const base = BigInt(Date.UTC(2026, 11, 2, 4, 10, 0)) * 1000n;
  t.same(parseCommitRecords(out), [
    { lsn: 0x1a3f2d8n, timeUs: base + 1_123_456n },
    { lsn: 0x1a3f340n, timeUs: base + 3_500_000n },
    { lsn: 0x1a3f400n, timeUs: base + 4_000_002n },
  ]);
  t.throws(() => parseCommitRecords('rmgr: Transaction len (rec/tot): 34/34, tx: 1, lsn: 0/1, prev 0/0, desc: COMMIT 2026-12-02 05:10:01.1 CET'), { code: 'INTERNAL' });
});

t.test('the first commit after T, from samples or from the first WAL, across segments', async (t) => {
  const TL = 'br-lbt';
  const c = await streamingCompute(t, TL, { max_prepared_transactions: 5, autovacuum: 'off' });
  const timelines = testTimelines(t);
  await timelines.create(TENANT, TL);
  const ingest = startIngest({ timelines, safekeepers: c.members, intervalMs: 100, logger: silentLogger });
  t.teardown(() => ingest.close());
  const scratch = tempDir(t, 'xenon-ps-lbt-');
  const sk = new SafekeeperClient(c.members[0]!.url);
  const fetched: string[] = [];
  const fetchSegment = async (name: string): Promise<Buffer> => {
    fetched.push(name);
    const ix = await timelines.read(TENANT, TL);
    if (ix.wal.some((w) => w.name === name)) return timelines.store.getBuffer(keys.wal(TENANT, TL, name));
    return sk.readWal(TL, name);
  };
  const insertLsn = async (): Promise<bigint> => parseLsn((await c.sql<{ l: string }>('SELECT pg_current_wal_insert_lsn()::text AS l')).rows[0]!.l);
  const clock = async (): Promise<Date> => new Date((await c.sql<{ t: string }>("SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS t")).rows[0]!.t);

  await c.sql('CREATE TABLE e (id int, pad text)');
  await c.sql('BEGIN');
  await c.sql("INSERT INTO e VALUES (-1, 'prepared')");
  await c.sql("PREPARE TRANSACTION 'p1'");
  // Batches: each ends with a noted time T_i; the first commit after T_i starts after beforeFirst[i].
  const T: Date[] = [];
  const afterLast: bigint[] = []; // insert LSN after the last commit before T_i
  const beforeFirst: bigint[] = []; // insert LSN before the first commit after T_i
  const afterFirst: bigint[] = []; // insert LSN after it
  for (let b = 0; b < 5; b++) {
    if (b > 0) {
      if (b === 2) {
        // An abort first (not a commit), then the first commit.
        await c.sql('BEGIN');
        await c.sql("INSERT INTO e SELECT g, repeat('a', 100) FROM generate_series(1, 100) g");
        await c.sql('ROLLBACK');
      }
      beforeFirst.push(await insertLsn());
      if (b === 3) await c.sql("COMMIT PREPARED 'p1'");
      else await c.sql('INSERT INTO e VALUES ($1, $2)', [b, 'first']);
      afterFirst.push(await insertLsn());
    }
    await c.sql("INSERT INTO e SELECT g, repeat('x', 300) FROM generate_series(1, 20000) g"); // ~8 MB
    if (b % 2 === 1) await c.sql('SELECT pg_switch_wal()');
    await c.sql('INSERT INTO e VALUES (0, $1)', [`last of ${b}`]);
    afterLast.push(await insertLsn());
    await delay(300);
    T.push(await clock());
    await delay(300);
  }
  const end = await insertLsn();
  await waitFor('the ingest to reach the end', async () => parseLsn((await timelines.read(TENANT, TL)).last_record_lsn) >= end, 30_000);
  await ingest.close(); // a stable index from here (background WAL would move the tip)
  const ix = await timelines.read(TENANT, TL);
  t.ok(ix.lsn_samples.length >= 2, `${ix.lsn_samples.length} samples from the ingest`);
  t.ok(ix.wal.filter((w) => w.kind === 'segment').length >= 3, 'several segments');

  const run = (time: Date, extra: { chunkSegments?: number } = {}): Promise<bigint> =>
    lsnByTime({ timelines, tenantId: TENANT, timelineId: TL, time, pgBin: PG_BIN, tmpDir: scratch, fetchSegment, ...extra });
  const check = async (label: string, extra: { chunkSegments?: number } = {}): Promise<void> => {
    for (let i = 0; i < 4; i++) {
      const lsn = await run(T[i]!, extra);
      t.ok(lsn >= afterLast[i]! && lsn >= beforeFirst[i]! && lsn < afterFirst[i]!,
        `${label}: T${i} → ${formatLsn(lsn)} in [${formatLsn(beforeFirst[i]!)}, ${formatLsn(afterFirst[i]!)}) after the last commit before T (${formatLsn(afterLast[i]!)})`);
      // After T2 the first commit is COMMIT PREPARED: its record is the first one written after T2.
      // (Only a background record — running xacts — could come between.)
      if (i === 2) t.ok(lsn - beforeFirst[2]! < 128n, `${label}: T2 → the COMMIT PREPARED record (${formatLsn(lsn)}, ${formatLsn(beforeFirst[2]!)})`);
    }
  };
  await check('with the ingest\'s samples');
  t.equal(await run(T[4]!), parseLsn(ix.last_record_lsn), 'no commit after T: the tip');
  t.equal(await run(new Date(Date.now() + 3_600_000)), parseLsn(ix.last_record_lsn), 'a future time: the tip');
  const err = await run(new Date(Date.parse(ix.created_at) - 60_000)).catch((e: unknown) => e);
  t.ok(err instanceof XenonError && err.code === 'PS_LSN_BEFORE_GC_CUTOFF' && err.httpStatus === 409, 'before the timeline: 409 PS_LSN_BEFORE_GC_CUTOFF');

  // The process' time zone does not matter (pg_waldump runs with TZ=UTC; times are parsed as UTC).
  const tz = process.env.TZ;
  process.env.TZ = 'America/New_York';
  t.teardown(() => { if (tz === undefined) delete process.env.TZ; else process.env.TZ = tz; });
  const ny = await run(T[1]!);
  t.ok(ny >= beforeFirst[1]! && ny < afterFirst[1]!, 'same answer under another local time zone');
  if (tz === undefined) delete process.env.TZ; else process.env.TZ = tz;

  // Exact samples (at T_i the tip was at least afterLast[i]): the scan for T3 starts in T3's segment.
  await timelines.update(TENANT, TL, (x) => { x.lsn_samples = T.map((tt, i) => [tt.toISOString(), formatLsn(afterLast[i]!)]); });
  await check('with exact samples', { chunkSegments: 2 });
  fetched.length = 0;
  t.ok((await run(T[3]!, { chunkSegments: 2 })) >= beforeFirst[3]!);
  const withSamples = fetched.length;

  // Without samples: scanned from the first WAL, in small chunks across the segment switches.
  await timelines.update(TENANT, TL, (x) => { x.lsn_samples = []; });
  await check('from the first WAL, chunks of 2 segments', { chunkSegments: 2 });
  fetched.length = 0;
  t.ok((await run(T[3]!, { chunkSegments: 2 })) >= beforeFirst[3]!);
  t.ok(fetched.length > withSamples, `samples narrow the scan (T3: ${withSamples} segments fetched with samples, ${fetched.length} without)`);

  // The index's tip lags the quorum (the ingest runs every second): with the quorum's tip given,
  // a time after the stale tip still finds the commit after it, not the stale tip.
  const realTip = parseLsn(ix.last_record_lsn);
  await timelines.update(TENANT, TL, (x) => { x.last_record_lsn = formatLsn(afterLast[1]!); x.lsn_samples = []; });
  const stale = await run(T[1]!);
  t.equal(stale, afterLast[1]!, 'without the quorum\'s tip: the stale tip (what a branch at T1 got before the fix)');
  const fresh = await lsnByTime({ timelines, tenantId: TENANT, timelineId: TL, time: T[1]!, pgBin: PG_BIN, tmpDir: scratch, fetchSegment, tip: realTip });
  t.ok(fresh >= beforeFirst[1]! && fresh < afterFirst[1]!, `with it: T1 → ${formatLsn(fresh)}, the first commit after T1`);
  t.same((await import('node:fs')).readdirSync(scratch), [], 'temp dirs removed');
});
