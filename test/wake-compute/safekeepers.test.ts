/**
 * The control plane's side of the WAL quorum against real parts: three in-process safekeepers
 * and a real Postgres 15 compute started with the settings the control plane gives it.
 */
import { join } from 'node:path';
import pg from 'pg';
import t from 'tap';
import { XenonError } from '../../lib/errors.ts';
import { createLogger } from '../../lib/logger.ts';
import { formatLsn, parseLsn } from '../../lib/lsn.ts';
import { SafekeeperClient } from '../../safekeeper/client.ts';
import { checkpointRecordEnd, readControlData } from '../../vm/pg-control.ts';
import { SafekeeperSet } from '../../wake-compute/safekeepers.ts';
import { startTestPostgres } from '../helpers/postgres.ts';
import { freePort } from '../helpers/stack.ts';
import { computeOf, spawnSafekeeper, startTestSafekeeper, tempDir } from '../safekeeper/helpers.ts';

const logger = createLogger({ level: 'silent' });
const TL = 'br-cp-side';

t.test('settings, start point, follow, and a stop that waits for the shutdown checkpoint on a quorum', async (t) => {
  const root = tempDir(t, 'xenon-cp-sk-');
  const sks = await Promise.all(['sk1', 'sk2', 'sk3'].map((id) => startTestSafekeeper(t, id, join(root, id))));
  const set = new SafekeeperSet(sks.map((s, i) => ({ id: `sk${i + 1}`, url: s.url })), logger, { maxSlotWalKeepSize: '256MB', stopWaitMs: 10_000 });
  t.teardown(() => set.close());
  t.equal(set.quorum, 2);
  const settings = set.computeSettings(7);
  t.match(settings, { synchronous_standby_names: 'ANY 2 (sk1, sk2, sk3)', synchronous_commit: 'on', wal_level: 'replica', max_slot_wal_keep_size: '256MB', 'xenon.generation': 7 });

  const sp0 = await set.startPoint(TL, 7);
  t.equal(sp0.upTo, '0/0', 'a new timeline starts from nothing');
  t.same(sp0.history, [{ generation: 7, start_lsn: '0/0' }], 'its history begins with this generation');

  const compute = await startTestPostgres(t, 'xenon-cp-sk-pg-', settings);
  await set.follow(TL, 7, computeOf(compute), sp0);
  const streaming = await Promise.all(sks.map((s) => new SafekeeperClient(s.url).status(TL)));
  t.ok(streaming.filter((s) => s?.streaming && s.generation === 7).length >= 2, 'follow() returns once a quorum streams');

  const c = new pg.Client(compute.admin());
  await c.connect();
  await c.query('CREATE TABLE t (x int)');
  await c.query('INSERT INTO t SELECT generate_series(1, 1000)');
  await c.end();
  const moved = await Promise.all(sks.map((s) => new SafekeeperClient(s.url).status(TL)));
  t.ok(moved.every((s) => s && parseLsn(s.flush_lsn) > 0n && s.last_generation === 7), 'the safekeepers hold WAL of generation 7');

  await compute.stop();
  const ctl = await readControlData(compute.dataDir);
  t.equal(ctl.state, 'shut down');
  const end = checkpointRecordEnd(ctl.checkpoint);
  const r = await set.stopped(TL, 7, end);
  t.same(r, { flushed: 3, quorum: true }, 'every safekeeper has the shutdown checkpoint');
  for (const s of sks) {
    const st = (await new SafekeeperClient(s.url).status(TL))!;
    t.equal(st.flush_lsn, formatLsn(end), `${st.safekeeper_id} flushed exactly to the end of the shutdown checkpoint`);
    t.equal(st.compute, null, `${st.safekeeper_id} no longer follows the stopped compute`);
  }
  const sp1 = await set.startPoint(TL, 8);
  t.equal(sp1.upTo, formatLsn(end), 'the next start begins at the end of the shutdown checkpoint');
  t.equal(sp1.order.length, 3, 'every safekeeper has that WAL');
  t.same(sp1.history, [{ generation: 7, start_lsn: '0/0' }, { generation: 8, start_lsn: formatLsn(end) }]);
});

t.test('no majority: the start is refused with a clear error', async (t) => {
  const root = tempDir(t, 'xenon-cp-sk-');
  const one = await startTestSafekeeper(t, 'sk1', join(root, 'sk1'));
  const dead = [await freePort(), await freePort()];
  const set = new SafekeeperSet(
    [{ id: 'sk1', url: one.url }, { id: 'sk2', url: `http://127.0.0.1:${dead[0]}` }, { id: 'sk3', url: `http://127.0.0.1:${dead[1]}` }],
    logger, { maxSlotWalKeepSize: '1GB', stopWaitMs: 1000, requestTimeoutMs: 2000 });
  t.teardown(() => set.close());
  const err = await set.startPoint(TL, 1).catch((e: unknown) => e);
  t.ok(err instanceof XenonError && err.code === 'CP_SAFEKEEPERS_UNAVAILABLE', 'CP_SAFEKEEPERS_UNAVAILABLE');
  t.match((err as Error).message, /only 1 of 3 safekeepers answered \(unreachable: sk2, sk3\); 2 are needed/);
});

// The next two use safekeeper processes: they go on retrying a compute they cannot or must not
// stream from, and are stopped as processes at teardown.
t.test('safekeepers that cannot stream from the compute fail the start with their reason', async (t) => {
  const root = tempDir(t, 'xenon-cp-sk-');
  const sks = await Promise.all(['sk1', 'sk2', 'sk3'].map((id) => spawnSafekeeper(t, id, join(root, id))));
  const set = new SafekeeperSet(sks.map((s, i) => ({ id: `sk${i + 1}`, url: s.url })), logger, { maxSlotWalKeepSize: '1GB', stopWaitMs: 1000 });
  t.teardown(() => set.close());
  const compute = await startTestPostgres(t, 'xenon-cp-sk-pg-', set.computeSettings(1));
  const t0 = Date.now();
  const err = await set.follow(TL, 1, { ...computeOf(compute), password: 'wrong' }, '0/0', 3000).catch((e: unknown) => e);
  t.ok(err instanceof XenonError && err.code === 'CP_SAFEKEEPERS_UNAVAILABLE', 'CP_SAFEKEEPERS_UNAVAILABLE');
  t.match((err as Error).message, /fewer than 2 safekeepers stream from the compute.*password authentication failed/);
  t.ok(Date.now() - t0 < 6000, 'within the timeout');
});

t.test('a safekeeper that already follows a newer generation fails the start at once, naming it', async (t) => {
  const root = tempDir(t, 'xenon-cp-sk-');
  const sks = await Promise.all(['sk1', 'sk2', 'sk3'].map((id) => spawnSafekeeper(t, id, join(root, id))));
  const set = new SafekeeperSet(sks.map((s, i) => ({ id: `sk${i + 1}`, url: s.url })), logger, { maxSlotWalKeepSize: '1GB', stopWaitMs: 1000 });
  t.teardown(() => set.close());
  const compute = await startTestPostgres(t, 'xenon-cp-sk-pg-', set.computeSettings(5));
  // sk2 was told about generation 9 (say the metadata database was restored from a backup since).
  await new SafekeeperClient(sks[1]!.url).follow(TL, { generation: 9, compute: computeOf(compute) });
  const t0 = Date.now();
  const err = await set.follow(TL, 5, computeOf(compute), '0/0', 8000).catch((e: unknown) => e);
  t.ok(err instanceof XenonError && err.code === 'CP_SAFEKEEPERS_UNAVAILABLE', 'CP_SAFEKEEPERS_UNAVAILABLE');
  t.match((err as Error).message, /safekeeper sk2 already follows a newer compute generation of br-cp-side than 5/);
  t.ok(Date.now() - t0 < 3000, `at once, not after the timeout (${Date.now() - t0} ms)`);
});
