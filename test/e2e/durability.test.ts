/**
 * Acceptance (issue 5): every acknowledged commit is on two of three safekeepers before the
 * client hears "COMMIT". Real stack (`xenon up`: metadata cluster, control plane, proxy, three
 * safekeepers), real computes, clients through the proxy with TLS, kill -9 of real processes.
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, readdirSync, rmSync, chmodSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import t from 'tap';
import { createLogger } from '../../lib/logger.ts';
import { parseLsn } from '../../lib/lsn.ts';
import { findPgBin, findFreePort, pgRunAs, PostgresProcess } from '../../lib/postgres.ts';
import { SafekeeperClient } from '../../safekeeper/client.ts';
import { readControlData } from '../../vm/pg-control.ts';
import { restoreWal } from '../../vm/wal-restore.ts';
import { prng } from '../helpers/prng.ts';
import { safekeeperList, startSafekeeperByHand, startTestStack, waitFor, type TestStack } from '../helpers/stack.ts';

const delay = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function postmasterPid(stack: TestStack, branchId: string): number | undefined {
  try {
    return Number(readFileSync(join(stack.dirs.data, 'computes', branchId, 'pgdata', 'postmaster.pid'), 'utf8').split('\n')[0]);
  } catch {
    return undefined;
  }
}

/** `cp -a`: ownership kept (the data belongs to the `postgres` user when we are root). */
function copyDir(from: string, to: string): void {
  execFileSync('cp', ['-a', from, to]);
}

async function branchOf(stack: TestStack): Promise<string> {
  return (await stack.api.getEndpoint(stack.info.endpoint_id)).endpoint.branch_id;
}

t.test('one safekeeper down: no errors; two down: commits wait; one back: they complete at once', async (t) => {
  const stack = await startTestStack(t, { XENON_SAFEKEEPER_RESTART_MS: '0' });
  t.equal(stack.info.safekeepers.length, 3, 'xenon up runs three safekeepers');
  const admin = new pg.Client(stack.pgConfig());
  await admin.connect();
  await admin.query('CREATE TABLE ledger (id int PRIMARY KEY)');
  const settings = await admin.query<{ name: string; setting: string }>(
    `SELECT name, setting FROM pg_settings WHERE name IN ('synchronous_standby_names', 'synchronous_commit', 'wal_level')`);
  t.same(Object.fromEntries(settings.rows.map((r) => [r.name, r.setting])), {
    synchronous_commit: 'on', synchronous_standby_names: 'ANY 2 (sk1, sk2, sk3)', wal_level: 'replica',
  }, 'the compute commits on a quorum of 2 of the 3 safekeepers');

  const wal = await stack.api.endpointWal(stack.info.endpoint_id);
  t.equal(wal.quorum, 2, 'the API reports a quorum of 2');
  t.ok(wal.generation >= 1, `generation ${wal.generation}`);
  t.same(wal.safekeepers.map((k) => [k.id, k.reachable, k.streaming, k.generation]), [
    ['sk1', true, true, wal.generation], ['sk2', true, true, wal.generation], ['sk3', true, true, wal.generation],
  ], 'every safekeeper streams from the compute of the current generation');

  const w = new pg.Client(stack.pgConfig());
  await w.connect();
  let next = 0;
  const acked: number[] = [];
  const errors: string[] = [];
  let running = true;
  const workload = (async () => {
    while (running) {
      const id = ++next;
      try {
        await w.query('INSERT INTO ledger (id) VALUES ($1)', [id]);
        acked.push(id);
      } catch (err) {
        errors.push((err as Error).message);
      }
    }
  })();
  t.ok(await waitFor(() => acked.length > 20, 20_000), 'the workload commits');

  const sks = safekeeperList(stack);
  process.kill(sks[0]!.pid!, 'SIGKILL');
  const before = acked.length;
  await delay(1500);
  t.same(errors, [], 'no errors with one safekeeper killed');
  t.ok(acked.length > before + 20, `the workload went on (${acked.length - before} commits in 1.5 s)`);

  process.kill(sks[1]!.pid!, 'SIGKILL');
  await delay(500); // commits already flushed by the dying one may still return
  const stalled = acked.length;
  const waiting = admin.query('INSERT INTO ledger (id) VALUES (-1)');
  let returned = false;
  void waiting.then(() => { returned = true; }, () => { returned = true; });
  await delay(2000);
  t.equal(acked.length, stalled, 'no commit returns while only one safekeeper is up');
  t.notOk(returned, 'a new commit waits too');

  const back = await startSafekeeperByHand(t, stack, 'sk2');
  await waiting;
  const ms = Date.now() - back.readyAt;
  t.ok(ms < 1000, `the waiting commit completed ${ms} ms after sk2 was back`);
  t.ok(await waitFor(() => acked.length > stalled + 20, 10_000), 'the workload goes on');
  running = false;
  await workload;
  t.same(errors, [], 'the workload saw no errors at all');
  const { rows } = await admin.query<{ id: number }>('SELECT id FROM ledger');
  const present = new Set(rows.map((r) => r.id));
  t.equal(acked.filter((id) => !present.has(id)).length, 0, `all ${acked.length} acknowledged rows are there`);
  t.ok(present.has(-1), 'and the commit that waited');
  await w.end();
  await admin.end();
  await stack.stop();
  await back.stop();
});

t.test('ledger: kill -9 computes and safekeepers at random moments; no acknowledged commit is lost, and the safekeepers alone hold them all', async (t) => {
  const stack = await startTestStack(t, { XENON_SAFEKEEPER_RESTART_MS: '300' });
  const branch = await branchOf(stack);
  const setup = new pg.Client(stack.pgConfig());
  await setup.connect();
  await setup.query('CREATE TABLE ledger (id int PRIMARY KEY, payload text)');
  await setup.end();
  // A cold copy of the compute's data (a base image), taken while it is stopped.
  await stack.api.endpointAction(stack.info.endpoint_id, 'stop');
  const work = mkdtempSync(join(tmpdir(), 'xenon-ledger-'));
  chmodSync(work, 0o755);
  t.teardown(() => { if (!process.env.XENON_TEST_KEEP) rmSync(work, { recursive: true, force: true }); else t.comment(`kept ${work}`); });
  const base = join(work, 'base');
  copyDir(join(stack.dirs.data, 'computes', branch, 'pgdata'), base);

  const rand = prng(5);
  let next = 0;
  const acked: number[] = [];
  let failures = 0;
  let running = true;
  const ledger = (async () => {
    let c: pg.Client | undefined;
    while (running) {
      try {
        if (!c) {
          c = new pg.Client({ ...stack.pgConfig(), connectionTimeoutMillis: 20_000 });
          c.on('error', () => {});
          await c.connect();
        }
        const id = ++next;
        // ~6 kB of poorly compressible text: the WAL runs over several 16 MiB segments.
        await c.query(`INSERT INTO ledger (id, payload) SELECT $1, string_agg(md5(random()::text), '') FROM generate_series(1, 200)`, [id]);
        acked.push(id);
      } catch {
        failures++; // an unacknowledged insert may or may not have committed: only acked ones count
        await c?.end().catch(() => {});
        c = undefined;
        await delay(50);
      }
    }
    await c?.end().catch(() => {});
  })();

  const kills = { compute: 0, safekeeper: 0 };
  for (let round = 0; round < 8; round++) {
    await waitFor(() => acked.length > 0, 30_000);
    await delay(400 + Math.floor(rand() * 1200));
    if (round % 2 === 0) {
      const pid = postmasterPid(stack, branch);
      if (pid) { try { process.kill(pid, 'SIGKILL'); kills.compute++; } catch { /* just exited */ } }
    } else {
      const live = safekeeperList(stack).filter((s) => s.pid);
      const victim = live[Math.floor(rand() * live.length)];
      if (victim) { try { process.kill(victim.pid!, 'SIGKILL'); kills.safekeeper++; } catch { /* gone */ } }
    }
    const before = acked.length;
    t.ok(await waitFor(() => acked.length > before + 5, 60_000), `round ${round}: commits go on after the kill`);
  }
  // Whatever the machine's speed: the WAL since the base must run over several segments, so
  // that the recovery below stitches segments together. The ledger alone writes WAL slowly (one
  // small commit at a time, ~2 MB/s here): bulk inserts into another table, while the ledger goes
  // on, write the rest at once.
  const probe = new pg.Client(stack.pgConfig());
  await probe.connect();
  const baseCheckpoint = (await readControlData(base)).checkpoint;
  const walTarget = baseCheckpoint + 2n * 16n * 1024n * 1024n;
  const walNow = async (): Promise<bigint> => parseLsn((await probe.query<{ l: string }>('SELECT pg_current_wal_lsn()::text AS l')).rows[0]!.l);
  await probe.query('CREATE TABLE wal_filler (id int, v text)');
  // ~8 MB of WAL per insert (rows of ~1 kB, below the TOAST threshold: not compressed).
  for (let i = 0; i < 8 && (await walNow()) < walTarget; i++) {
    await probe.query(`INSERT INTO wal_filler SELECT g, repeat(md5(g::text), 30) FROM generate_series(1, 8000) g`);
  }
  t.ok(await waitFor(async () => (await walNow()) >= walTarget, 180_000, 500), 'the WAL since the base runs over at least three segments');
  await probe.end();
  running = false;
  await ledger;

  // 1. Through the proxy, after all that.
  const check = new pg.Client(stack.pgConfig());
  await check.connect();
  const present = new Set((await check.query<{ id: number }>('SELECT id FROM ledger')).rows.map((r) => r.id));
  const digest = `SELECT md5(string_agg(id || ':' || payload, ',' ORDER BY id)) AS d FROM ledger WHERE id = ANY($1::int[])`;
  const viaCompute = (await check.query<{ d: string }>(digest, [acked])).rows[0]!.d;
  await check.end();
  const lostViaCompute = acked.filter((id) => !present.has(id));

  // 2. From the safekeepers alone: the base image plus WAL fetched from them, recovered in a
  //    scratch Postgres that has never seen the compute's own pg_wal.
  await stack.api.endpointAction(stack.info.endpoint_id, 'stop');
  t.ok(await waitFor(() => safekeeperList(stack).every((s) => s.pid), 30_000), 'the killed safekeepers were restarted by xenon up');
  const sks = safekeeperList(stack);
  const flush: { url: string; lsn: string }[] = [];
  for (const s of sks) {
    const st = await waitFor(async () => (await new SafekeeperClient(s.url).status(branch).catch(() => null)) !== null, 30_000);
    if (st) flush.push({ url: s.url, lsn: (await new SafekeeperClient(s.url).status(branch))!.flush_lsn });
  }
  t.ok(flush.length >= 2, 'a majority of safekeepers answers');
  flush.sort((a, b) => (parseLsn(b.lsn) > parseLsn(a.lsn) ? 1 : -1));
  const scratch = join(work, 'scratch');
  copyDir(base, scratch);
  for (const f of readdirSync(join(scratch, 'pg_wal'))) if (/^[0-9A-F]{24}/.test(f)) rmSync(join(scratch, 'pg_wal', f));
  const runAs = pgRunAs(process.env);
  const restored = await restoreWal(scratch, { timelineId: branch, upTo: flush[1]!.lsn, safekeepers: flush.map((f) => f.url) }, runAs, createLogger({ level: 'error' }));
  t.ok(restored.restored.length >= 3, `restored ${restored.restored.length} WAL segments from the safekeepers`);
  t.same(restored.settings, {}, 'a cleanly shut down base needs no recovery settings: it is marked for crash recovery, which replays the WAL on the same timeline');
  t.equal((await readControlData(scratch)).state, 'in production', 'pg_control says "in production" (crash recovery at the next start)');
  const pgp = await PostgresProcess.start({
    bin: findPgBin(process.env), dataDir: scratch, port: await findFreePort(40000, 49999), runAs, logFile: join(work, 'scratch.log'),
    settings: { synchronous_standby_names: '', ...restored.settings },
  });
  t.teardown(() => pgp.stop('immediate'));
  const sc = new pg.Client({ host: '127.0.0.1', port: pgp.port, user: stack.info.role, password: stack.info.password, database: stack.info.database });
  await sc.connect();
  const fromSk = new Set((await sc.query<{ id: number }>('SELECT id FROM ledger')).rows.map((r) => r.id));
  const viaSafekeepers = (await sc.query<{ d: string }>(digest, [acked])).rows[0]!.d;
  await sc.end();
  await pgp.stop('fast');
  const lostViaSafekeepers = acked.filter((id) => !fromSk.has(id));

  t.comment(`ledger: ${acked.length} acknowledged commits, ${failures} failed attempts; kills: ${kills.compute} compute, ${kills.safekeeper} safekeeper`);
  t.comment(`  present through the proxy: ${acked.length - lostViaCompute.length}/${acked.length} (lost ${lostViaCompute.length})`);
  t.comment(`  present after recovery from base + safekeeper WAL only: ${acked.length - lostViaSafekeepers.length}/${acked.length} (lost ${lostViaSafekeepers.length})`);
  t.ok(kills.compute >= 3 && kills.safekeeper >= 3, 'computes and safekeepers were killed');
  t.ok(acked.length > 100, 'the ledger committed a meaningful number of rows');
  t.same(lostViaCompute, [], 'no acknowledged row is lost');
  t.same(lostViaSafekeepers, [], 'the safekeepers alone hold every acknowledged row');
  t.equal(viaSafekeepers, viaCompute, 'with the same contents (md5 over every acknowledged row)');
});
