/**
 * Generation history and fence-before-read, against real parts: safekeepers (processes, or
 * in-process where none is restarted), real Postgres 15 computes, and the control plane's
 * SafekeeperSet. Every compute after the first is started *diskless*: from a base backup taken
 * early plus the WAL the start point names, fetched from the safekeepers (`vm/wal-restore.ts`,
 * what the vm driver does) — so a start point that misses acknowledged WAL loses rows.
 */
import { chmodSync } from 'node:fs';
import { join } from 'node:path';
import pg from 'pg';
import t from 'tap';
import { createLogger, silentLogger } from '../../lib/logger.ts';
import { formatLsn, parseLsn } from '../../lib/lsn.ts';
import { ensureOwnedDir, findFreePort, findPgBin, pgRunAs, PostgresProcess } from '../../lib/postgres.ts';
import { SafekeeperClient } from '../../safekeeper/client.ts';
import { checkpointRecordEnd, readControlData } from '../../vm/pg-control.ts';
import { restoreWal } from '../../vm/wal-restore.ts';
import { SafekeeperSet, type StartPoint } from '../../wake-compute/safekeepers.ts';
import { startTestPostgres } from '../helpers/postgres.ts';
import { freePort } from '../helpers/stack.ts';
import {
  compareSegments, computeOf, delay, PG_BIN, replicationFlush, runTool, spawnSafekeeper, startTestSafekeeper, tempDir, waitFor, withClient, type SafekeeperProcess,
} from '../safekeeper/helpers.ts';

const logger = createLogger({ level: 'silent' });
const runAs = pgRunAs(process.env);
const bin = findPgBin(process.env);

type Teardown = { teardown(fn: () => unknown): void };
interface Compute { port: number; admin(): pg.ClientConfig; proc: PostgresProcess; dataDir: string }

async function flushLsnOf(c: { admin(): pg.ClientConfig }): Promise<bigint> {
  return withClient(c.admin(), async (x) => parseLsn((await x.query<{ l: string }>('SELECT pg_current_wal_flush_lsn()::text AS l')).rows[0]!.l));
}

/** A base backup of `pgc` (not started): what a diskless compute starts from. */
async function baseBackup(pgc: { port: number }, dir: string): Promise<string> {
  await ensureOwnedDir(dir, runAs, 0o700);
  await runTool(join(PG_BIN, 'pg_basebackup'), ['-D', dir, '-X', 'stream', '-c', 'fast', '--no-sync', '-d', `host=127.0.0.1 port=${pgc.port} user=admin password=admin-pw`], { uid: runAs?.uid, gid: runAs?.gid });
  return dir;
}

/** A compute started from a copy of `base` plus the WAL up to the start point, fetched from the safekeepers. */
async function startDiskless(t: Teardown, base: string, root: string, name: string, timelineId: string, sp: StartPoint, settings: Record<string, string | number>): Promise<Compute> {
  const dataDir = join(root, name);
  await runTool('cp', ['-a', base, dataDir]);
  const r = await restoreWal(dataDir, { timelineId, upTo: sp.upTo, safekeepers: sp.order }, runAs, silentLogger);
  const proc = await PostgresProcess.start({ bin, dataDir, port: await findFreePort(30000, 39999), runAs, logFile: join(root, `${name}.log`), settings: { ...settings, ...r.settings } });
  t.teardown(() => proc.stop('immediate'));
  return { port: proc.port, proc, dataDir, admin: () => ({ host: '127.0.0.1', port: proc.port, user: 'admin', password: 'admin-pw', database: 'postgres' }) };
}

async function rowsByGeneration(c: { admin(): pg.ClientConfig }, table: string): Promise<Record<string, string>> {
  return withClient(c.admin(), async (x) => {
    const r = await x.query<{ gen: number; n: string; lo: number; hi: number }>(`SELECT gen, count(*) AS n, min(id) AS lo, max(id) AS hi FROM ${table} GROUP BY gen ORDER BY gen`);
    return Object.fromEntries(r.rows.map((row) => [String(row.gen), `${row.n} rows ${row.lo}..${row.hi}`]));
  });
}

t.test('a safekeeper with a longer WAL of a generation that lost does not win, and its stale tail is cut', async (t) => {
  const TL = 'br-genhist';
  const root = tempDir(t, 'xenon-genhist-');
  chmodSync(root, 0o755); // computes run as `postgres` when we are root
  const ids = ['sk1', 'sk2', 'sk3'];
  const ports = [await freePort(), await freePort(), await freePort()];
  const urls = ports.map((p) => `http://127.0.0.1:${p}`);
  const procs: (SafekeeperProcess | null)[] = [null, null, null];
  const startSk = async (i: number): Promise<void> => { procs[i] = await spawnSafekeeper(t, ids[i]!, join(root, ids[i]!), ports[i]!); };
  const stopSk = async (i: number): Promise<void> => { await procs[i]!.kill('SIGTERM'); procs[i] = null; };
  const api = (i: number): SafekeeperClient => new SafekeeperClient(urls[i]!);
  const flushOf = async (i: number): Promise<bigint> => parseLsn((await api(i).status(TL))!.flush_lsn);
  const t0 = Date.now();
  const mark = (what: string): void => { t.comment(`${((Date.now() - t0) / 1000).toFixed(1)} s: ${what}`); };
  await Promise.all([startSk(0), startSk(1), startSk(2)]);
  mark('safekeepers up');
  const set = new SafekeeperSet(ids.map((id, i) => ({ id, url: urls[i]! })), logger, { maxSlotWalKeepSize: '1GB', stopWaitMs: 5000, requestTimeoutMs: 3000 });
  t.teardown(() => set.close());

  // ---- generation 1 on sk1, sk2, sk3
  const sp1 = await set.startPoint(TL, 1);
  t.equal(sp1.upTo, '0/0', 'a new timeline starts from nothing');
  t.same(sp1.history, [{ generation: 1, start_lsn: '0/0' }]);
  mark('fenced');
  const a = await startTestPostgres(t, 'xenon-genhist-a-', set.computeSettings(1));
  mark('compute A up');
  await set.follow(TL, 1, computeOf(a), sp1);
  mark('A followed');
  await withClient(a.admin(), async (c) => {
    await c.query('CREATE TABLE t (id int PRIMARY KEY, gen int NOT NULL, pad text)');
    await c.query("INSERT INTO t SELECT g, 1, 'a' FROM generate_series(1, 100) g");
  });
  const base = await baseBackup(a, join(root, 'base'));
  mark('generation 1 running, base taken');
  await withClient(a.admin(), (c) => c.query("INSERT INTO t SELECT g, 1, 'a' FROM generate_series(101, 200) g"));
  const fAck = await flushLsnOf(a);
  await waitFor('every safekeeper has generation 1\'s acknowledged WAL', async () => (await flushOf(0)) >= fAck && (await flushOf(1)) >= fAck && (await flushOf(2)) >= fAck);

  // sk1 and sk2 go away; only sk3 receives what comes now: a large transaction whose commit
  // then waits for a quorum that never comes (it is never acknowledged).
  await Promise.all([stopSk(0), stopSk(1)]);
  const w = new pg.Client(a.admin());
  w.on('error', () => {});
  await w.connect();
  const waiting = w.query("INSERT INTO t SELECT g, 1, repeat('x', 400) FROM generate_series(1000, 9000) g").then(() => 'acknowledged', () => 'failed');
  await waitFor('the commit waits for the quorum', async () =>
    withClient(a.admin(), async (c) => Number((await c.query<{ n: string }>("SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event = 'SyncRep'")).rows[0]!.n) > 0));
  const tailEnd = await flushLsnOf(a);
  await waitFor('sk3 has the unacknowledged tail', async () => (await flushOf(2)) >= tailEnd);
  t.equal(await Promise.race([waiting, delay(300).then(() => 'waiting')]), 'waiting', 'the commit is not acknowledged (only sk3 has it)');
  await a.stop(); // its shutdown checkpoint too reaches sk3 only
  mark('generation 1 stopped');
  const aEnd = checkpointRecordEnd((await readControlData(a.dataDir)).checkpoint);
  await waitFor('sk3 has the shutdown checkpoint', async () => (await flushOf(2)) >= aEnd);
  t.not(await waiting, 'acknowledged', 'the large transaction was never acknowledged');
  await w.end().catch(() => {});
  const f3 = await flushOf(2);

  // ---- generation 2 on sk1 and sk2 (sk3 down): less WAL than sk3's stale tail
  await stopSk(2);
  await Promise.all([startSk(0), startSk(1)]);
  const sp2 = await set.startPoint(TL, 2);
  t.ok(parseLsn(sp2.upTo) >= fAck && parseLsn(sp2.upTo) < tailEnd, `generation 2 starts at sk1/sk2's end ${sp2.upTo} (sk3 unreachable)`);
  t.equal(sp2.statuses.sk3, 'unreachable');
  const b = await startDiskless(t, base, root, 'b', TL, sp2, set.computeSettings(2));
  await set.follow(TL, 2, computeOf(b), sp2);
  mark('generation 2 streams');
  await withClient(b.admin(), (c) => c.query("INSERT INTO t SELECT g, 2, 'b' FROM generate_series(201, 300) g"));
  t.same(await rowsByGeneration(b, 't'), { 1: '200 rows 1..200', 2: '100 rows 201..300' }, 'generation 2 has every acknowledged row of generation 1');
  const f2 = await flushLsnOf(b);
  t.ok(f2 < f3, `generation 2 acknowledged less WAL (${formatLsn(f2)}) than sk3's stale tail ends at (${formatLsn(f3)})`);
  await waitFor('sk1 and sk2 have generation 2\'s WAL', async () => (await flushOf(0)) >= f2 && (await flushOf(1)) >= f2);
  await b.proc.stop('immediate'); // a crash
  mark('generation 2 crashed');

  // ---- generation 3 with sk2 and sk3 (sk1 down)
  await Promise.all([stopSk(0), startSk(2)]);
  const before3 = (await api(2).status(TL))!;
  t.equal(before3.last_generation, 1, 'sk3 holds WAL of generation 1');
  t.ok(parseLsn(before3.flush_lsn) > f2, `sk3 has more WAL (${before3.flush_lsn}) than generation 2 wrote (${formatLsn(f2)})`);
  const sp3 = await set.startPoint(TL, 3);
  t.equal(sp3.donor, 'sk2', 'the start point is sk2\'s: its WAL is of a newer generation');
  t.equal(sp3.upTo, formatLsn(await flushOf(1)), 'the start point is sk2\'s flush LSN');
  t.ok(parseLsn(sp3.upTo) >= f2, 'it includes everything generation 2 acknowledged');
  t.same(sp3.order, [urls[1]], 'WAL is read only from safekeepers of the donor\'s generation');
  t.same(sp3.history, [{ generation: 1, start_lsn: '0/0' }, { generation: 2, start_lsn: sp2.upTo }, { generation: 3, start_lsn: sp3.upTo }], 'history: sk2\'s, then generation 3');
  const c3 = await startDiskless(t, base, root, 'c', TL, sp3, set.computeSettings(3));
  await set.follow(TL, 3, computeOf(c3), sp3);
  mark('generation 3 streams');
  t.same(await rowsByGeneration(c3, 't'), { 1: '200 rows 1..200', 2: '100 rows 201..300' }, 'every acknowledged commit survived; the unacknowledged tail did not come back');
  // A commit needs sk2 and sk3 now: sk3 streams from generation 3 after cutting its tail.
  const committed = await Promise.race([
    withClient(c3.admin(), (c) => c.query("INSERT INTO t VALUES (301, 3, 'c')")).then(() => true),
    delay(20_000).then(() => false),
  ]);
  t.ok(committed, 'a commit of generation 3 is acknowledged by sk2 + sk3');
  const end3 = await flushLsnOf(c3);
  await waitFor('sk3 has generation 3\'s WAL', async () => (await flushOf(2)) >= end3);
  const st3 = (await api(2).status(TL))!;
  t.same(st3.history, sp3.history, 'sk3 adopted the new history');
  t.equal(st3.last_generation, 3);
  const cmp = compareSegments(join(root, 'sk3', 'timelines', TL, 'wal'), join(root, 'sk2', 'timelines', TL, 'wal'), end3);
  t.same(cmp.diffs, [], `sk3's WAL is sk2's, byte for byte (${cmp.compared.join(' ')}): its stale tail was cut at the divergence and streamed again`);
  const cmpCompute = compareSegments(join(root, 'sk3', 'timelines', TL, 'wal'), join(c3.dataDir, 'pg_wal'), end3);
  t.same(cmpCompute.diffs, [], 'and the compute\'s');
});

t.test('the start point is read after fencing: an old compute cannot get a commit acknowledged past it', async (t) => {
  const TL = 'br-fencefirst';
  const root = tempDir(t, 'xenon-fencefirst-');
  chmodSync(root, 0o755);
  const sks = await Promise.all(['sk1', 'sk2', 'sk3'].map((id) => startTestSafekeeper(t, id, join(root, id))));
  const set = new SafekeeperSet(sks.map((s, i) => ({ id: `sk${i + 1}`, url: s.url })), logger, { maxSlotWalKeepSize: '1GB', stopWaitMs: 5000 });
  t.teardown(() => set.close());
  const sp1 = await set.startPoint(TL, 1);
  const a = await startTestPostgres(t, 'xenon-fencefirst-a-', set.computeSettings(1));
  await set.follow(TL, 1, computeOf(a), sp1);
  await withClient(a.admin(), (c) => c.query('CREATE TABLE f (id int PRIMARY KEY)'));
  const base = await baseBackup(a, join(root, 'base'));

  // The old compute keeps committing, one row per transaction, while the next start happens.
  const acked: number[] = [];
  const w = new pg.Client(a.admin());
  w.on('error', () => {});
  await w.connect();
  let stop = false;
  const writer = (async () => {
    for (let i = 1; !stop; i++) {
      await w.query('INSERT INTO f VALUES ($1)', [i]);
      acked.push(i);
    }
  })().catch(() => {});
  await waitFor('commits on the old compute', () => acked.length >= 50);
  const sp2 = await set.startPoint(TL, 2);
  for (const [id, s] of Object.entries(sp2.statuses)) {
    t.ok(s && s !== 'unreachable' && s.generation === 2 && !s.streaming && s.compute === null, `${id} answered the fence: generation 2, no longer streaming`);
  }
  await delay(300); // an acknowledgement already on its way when the fence answered
  const atFence = acked.length;
  await delay(2000);
  t.equal(acked.length, atFence, `no commit acknowledged after the fence (${atFence} before it)`);
  await waitFor('no safekeeper streams from the old compute', async () => (await replicationFlush(a)).size === 0);
  for (const sk of sks) {
    t.equal((await new SafekeeperClient(sk.url).status(TL))!.flush_lsn, (sp2.statuses[`sk${sks.indexOf(sk) + 1}`] as { flush_lsn: string }).flush_lsn, `sk${sks.indexOf(sk) + 1}'s flush LSN did not move after its answer`);
  }
  const fenced = Object.values(sp2.statuses).map((s) => parseLsn((s as { flush_lsn: string }).flush_lsn));
  t.equal(sp2.upTo, formatLsn(fenced.reduce((x, y) => (x > y ? x : y))), 'the start point is the highest fenced flush LSN');
  // A late follow of the old generation is refused.
  await t.rejects(new SafekeeperClient(sks[0]!.url).follow(TL, { generation: 1, compute: computeOf(a) }), { code: 'SK_GENERATION_FENCED' });

  stop = true;
  await a.stop(); // the waiting commit is cut off, never acknowledged
  await writer;
  await w.end().catch(() => {});
  const b = await startDiskless(t, base, root, 'b', TL, sp2, set.computeSettings(2));
  await set.follow(TL, 2, computeOf(b), sp2);
  const have = await withClient(b.admin(), async (c) => (await c.query<{ id: number }>('SELECT id FROM f ORDER BY id')).rows.map((r) => r.id));
  const missing = acked.filter((id) => !have.includes(id));
  t.same(missing, [], `every one of the ${acked.length} acknowledged commits is in the new generation (${have.length} rows)`);
  await withClient(b.admin(), (c) => c.query('INSERT INTO f VALUES (-1)'));
  t.pass('the new generation commits');
});
