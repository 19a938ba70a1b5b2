// End to end with real components: a PG 15 compute streaming to three in-process safekeepers, a
// pageserver (real ingest and imager) over a LocalObjectStore. A BASE_BACKUP image, WAL past it,
// a branch at a mid-stream LSN: the branch's archive start (vm/materialise.ts + restore-wal.js
// against the WAL resolver) has exactly the rows committed before the branch point, on a new
// Postgres timeline; the branch restarted from its own WAL (on its safekeepers) has its rows and
// none of the parent's later ones; the root's own restart (crash mode) has every row.
import t from 'tap';
import { chmodSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { silentLogger } from '../../lib/logger.ts';
import { parseLsn } from '../../lib/lsn.ts';
import { findFreePort, findPgBin, pgRunAs, PostgresProcess } from '../../lib/postgres.ts';
import { PageserverClient } from '../../pageserver/client.ts';
import { loadPageserverConfig, startPageserver } from '../../pageserver/index.ts';
import { SafekeeperClient } from '../../safekeeper/client.ts';
import { materialise } from '../../vm/materialise.ts';
import { waitFor, withClient } from '../safekeeper/helpers.ts';
import { tempDir } from './core-helpers.ts';
import { streamingCompute } from './ps-test-helpers.ts';

const bin = findPgBin(process.env);
const runAs = pgRunAs(process.env);

function computeRoot(t: { teardown(fn: () => unknown): void }): string {
  const dir = mkdtempSync(join(tmpdir(), 'ps-compute-'));
  chmodSync(dir, 0o755);
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** Materialises `plan` into a fresh data dir and starts Postgres on it; stopped at teardown. */
async function startFromPlan(t: { teardown(fn: () => unknown): void }, plan: Parameters<typeof materialise>[0]['plan']): Promise<pg.ClientConfig & { proc: PostgresProcess }> {
  const root = computeRoot(t);
  const dataDir = join(root, 'pgdata');
  const { settings } = await materialise({ dataDir, plan, runAs, logger: silentLogger });
  const proc = await PostgresProcess.start({ bin, dataDir, port: await findFreePort(40000, 49999), runAs, logFile: join(root, 'pg.log'), settings, readyTimeoutMs: 60_000 });
  t.teardown(() => proc.stop('immediate'));
  return { host: '127.0.0.1', port: proc.port, user: 'admin', password: 'admin-pw', database: 'postgres', proc };
}

/** Waits until the timeline's tip is past `after` and has stopped moving (a stopped compute, ingested). */
async function settled(c: PageserverClient, tl: string, after: bigint): Promise<void> {
  const tipOf = async (): Promise<string> => (await c.timeline('p1', tl))!.last_record_lsn;
  let last = await tipOf();
  await waitFor(`ingest of ${tl} to settle`, async () => {
    await new Promise((r) => setTimeout(r, 600));
    const now = await tipOf();
    const done = now === last && parseLsn(now) > after;
    last = now;
    return done;
  }, 60_000, 0);
}

t.test('branch at an LSN and restart of the root, from images and the resolver', async (t) => {
  const sc = await streamingCompute(t, 'main');
  const ps = await startPageserver(loadPageserverConfig({
    XENON_PAGESERVER_PORT: '0',
    XENON_PAGESERVER_STORAGE: tempDir(t, 'ps-objects-'),
    XENON_PAGESERVER_DIR: tempDir(t, 'ps-dir-'),
    XENON_SAFEKEEPERS: sc.members.map((m) => `${m.id}=${m.url}`).join(','),
    XENON_PAGESERVER_INGEST_INTERVAL_MS: '200',
    XENON_PAGESERVER_GC_INTERVAL_SECONDS: '0',
  }, []), { logger: silentLogger, startImager: null });
  t.teardown(() => ps.close());
  const c = new PageserverClient(ps.url);
  await c.createTenant('p1');
  await c.createTimeline('p1', { new_timeline_id: 'main' });
  await c.attachCompute('p1', 'main', { host: '127.0.0.1', port: sc.pgc.port, user: 'admin', password: 'admin-pw' });

  await sc.sql('CREATE TABLE ledger (id int PRIMARY KEY, note text)');
  const img = await c.makeImage('p1', 'main');
  t.equal(img.kind, 'backup');
  await sc.sql("INSERT INTO ledger SELECT g, repeat('x', 200) FROM generate_series(1, 100) g");
  const x = (await sc.sql<{ l: string }>('SELECT pg_current_wal_lsn()::text AS l')).rows[0]!.l;
  // After the branch point: more rows, across a segment switch.
  await sc.sql("INSERT INTO ledger SELECT g, repeat('y', 200) FROM generate_series(101, 150) g");
  await sc.sql('SELECT pg_switch_wal()');
  await sc.sql("INSERT INTO ledger SELECT g, repeat('z', 200) FROM generate_series(151, 200) g");
  const tip = parseLsn((await sc.sql<{ l: string }>('SELECT pg_current_wal_lsn()::text AS l')).rows[0]!.l);
  await waitFor('ingest to reach the tip', async () => parseLsn((await c.timeline('p1', 'main'))!.last_record_lsn) >= tip, 60_000, 100);

  const br = await c.createTimeline('p1', { new_timeline_id: 'br', ancestor_timeline_id: 'main', ancestor_start_lsn: x });
  t.equal(br.ancestor_lsn, x);
  const plan = await c.startPlan('p1', 'br');
  t.match(plan, { mode: 'archive', lsn: x, image: { id: img.id, timeline_id: 'main' } });
  const brConn = await startFromPlan(t, plan);
  await withClient({ ...brConn, proc: undefined } as pg.ClientConfig, async (db) => {
    const r = await db.query<{ n: string; m: number }>('SELECT count(*) AS n, max(id) AS m FROM ledger');
    t.same([Number(r.rows[0]!.n), r.rows[0]!.m], [100, 100], 'exactly the rows committed before the branch point');
    const tli = await db.query<{ timeline_id: number }>('SELECT timeline_id FROM pg_control_checkpoint()');
    t.ok(tli.rows[0]!.timeline_id >= 2, 'promoted onto a new Postgres timeline');
    t.equal((await db.query<{ r: boolean }>('SELECT pg_is_in_recovery() AS r')).rows[0]!.r, false);
  });

  // The branch's compute streams to the safekeepers (as the control plane has it do), writes and
  // stops; its restart replays main's WAL to the branch point, then its own (a newer Postgres
  // timeline, served from the branch, never main's same-numbered segments).
  const { proc: brProc, ...brPg } = brConn;
  for (const sk of sc.sks) await new SafekeeperClient(sk.url).follow('br', { generation: 1, compute: { host: '127.0.0.1', port: brPg.port!, user: 'admin', password: 'admin-pw' } });
  await withClient(brPg, async (db) => {
    await waitFor('safekeepers streaming from the branch', async () => Number((await db.query<{ n: string }>("SELECT count(*) AS n FROM pg_stat_replication WHERE state = 'streaming'")).rows[0]!.n) === 3);
    await db.query("INSERT INTO ledger SELECT g, repeat('b', 200) FROM generate_series(1001, 1050) g");
    await db.query('SELECT pg_switch_wal()');
    await db.query("INSERT INTO ledger SELECT g, repeat('b', 200) FROM generate_series(1051, 1060) g");
  });
  await brProc.stop('fast');
  await settled(c, 'br', parseLsn(x));
  const brStatus = (await c.timeline('p1', 'br'))!;
  t.ok(brStatus.pg_timeline !== null && brStatus.pg_timeline >= 2, `the branch's own WAL is on Postgres timeline ${brStatus.pg_timeline}`);
  const brPlan = await c.startPlan('p1', 'br');
  t.match(brPlan, { mode: 'archive', image: { timeline_id: 'main' } });
  const { proc: _brProc2, ...brAgain } = await startFromPlan(t, brPlan);
  await withClient(brAgain, async (db) => {
    const r = await db.query<{ n: string; low: string; high: string }>('SELECT count(*) AS n, count(*) FILTER (WHERE id <= 100) AS low, count(*) FILTER (WHERE id > 1000) AS high FROM ledger');
    t.same([r.rows[0]!.n, r.rows[0]!.low, r.rows[0]!.high].map(Number), [160, 100, 60], 'main\'s rows before the branch point and every branch row, none of main\'s later ones');
    const tli = await db.query<{ timeline_id: number }>('SELECT timeline_id FROM pg_control_checkpoint()');
    t.ok(tli.rows[0]!.timeline_id > brStatus.pg_timeline!, 'promoted onto a newer Postgres timeline');
  });

  // The root stops; its restart at the tip is a crash-mode start from its own image.
  await sc.pgc.stop();
  await settled(c, 'main', tip);
  const rootPlan = await c.startPlan('p1', 'main');
  t.equal(rootPlan.mode, 'crash');
  t.ok(rootPlan.wal.length >= 2, `WAL files for pg_wal: ${rootPlan.wal.map((w) => w.name).join(', ')}`);
  const { proc: _rootProc, ...rootConn } = await startFromPlan(t, rootPlan);
  await withClient(rootConn, async (db) => {
    const r = await db.query<{ n: string; m: number }>('SELECT count(*) AS n, max(id) AS m FROM ledger');
    t.same([Number(r.rows[0]!.n), r.rows[0]!.m], [200, 200], 'every committed row');
    const tli = await db.query<{ timeline_id: number }>('SELECT timeline_id FROM pg_control_checkpoint()');
    t.equal(tli.rows[0]!.timeline_id, 1, 'same Postgres timeline');
  });
});
