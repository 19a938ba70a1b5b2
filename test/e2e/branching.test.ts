/**
 * Acceptance (issue 6): stateless computes, branches at an LSN and at a time, branches of
 * branches, a compute whose data directory is gone, the ancestor-segment hazard, and adoption of a
 * project the pageserver never saw. Real stack
 * (`xenon up`: metadata, control plane, proxy, three safekeepers, pageserver), real computes,
 * clients through the proxy with TLS.
 */
import { existsSync, readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import pg from 'pg';
import t from 'tap';
import { parseLsn, segmentFileName, segmentOf } from '../../lib/lsn.ts';
import { startTestStack, waitFor, type TestStack } from '../helpers/stack.ts';
import { PageserverClient } from '../../pageserver/client.ts';

const delay = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

interface Snapshot { count: number; md5: string }

async function snapshot(c: pg.Client): Promise<Snapshot> {
  const r = await c.query<{ count: string; md5: string | null }>(`SELECT count(*), md5(coalesce(string_agg(id || ':' || v, ',' ORDER BY id), '')) FROM items`);
  return { count: Number(r.rows[0]!.count), md5: r.rows[0]!.md5 ?? '' };
}

async function connect(stack: TestStack, endpoint?: string): Promise<pg.Client> {
  const c = new pg.Client({ ...stack.pgConfig(endpoint ? { endpoint } : {}), connectionTimeoutMillis: 120_000 });
  const t0 = Date.now();
  await c.connect();
  t.comment(`connected to ${endpoint ?? 'the default endpoint'} in ${Date.now() - t0} ms`);
  return c;
}

async function withClient<T>(stack: TestStack, endpoint: string | undefined, fn: (c: pg.Client) => Promise<T>): Promise<T> {
  const c = await connect(stack, endpoint);
  try {
    return await fn(c);
  } finally {
    await c.end().catch(() => {});
  }
}

const dataDirOf = (stack: TestStack, branchId: string): string => join(stack.dirs.data, 'computes', branchId, 'pgdata');

// One stack for the file. The second test branches the same default project's main branch (its own
// table, a branch of its own) after the first one is done with it.
const stack = await startTestStack(t);

t.test('branches at an LSN and at a time, isolation both ways, branch of a branch, a compute without its data directory', async (t) => {
  const project = stack.info.project_id;
  const main = await connect(stack);
  t.teardown(() => main.end().catch(() => {}));
  const mainBranch = (await stack.api.getEndpoint(stack.info.endpoint_id)).endpoint.branch_id;
  await main.query('CREATE TABLE items (id int PRIMARY KEY, v text NOT NULL)');
  await main.query(`INSERT INTO items SELECT g, md5(g::text) FROM generate_series(1, 2000) g`);
  const early = await snapshot(main);
  const { rows: [mark] } = await main.query<{ lsn: string; at: Date }>('SELECT pg_current_wal_lsn()::text AS lsn, clock_timestamp() AS at');
  await delay(300);
  await main.query(`INSERT INTO items SELECT g, 'later-' || g FROM generate_series(2001, 3000) g`);
  await main.query(`UPDATE items SET v = 'changed' WHERE id <= 10`);
  const late = await snapshot(main);
  t.not(late.md5, early.md5);

  // ---- a branch at the LSN and one at the time: exactly the early rows
  const t0 = Date.now();
  const atLsn = await stack.api.createBranch(project, { name: 'at-lsn', parent_lsn: mark!.lsn });
  const createMs = Date.now() - t0;
  t.equal(atLsn.branch.parent_id, mainBranch);
  t.equal(atLsn.branch.parent_lsn, mark!.lsn);
  t.ok(atLsn.endpoint, 'the branch has an endpoint');
  t.ok(createMs < 2000, `branch creation took ${createMs} ms`);
  const atTime = await stack.api.createBranch(project, { name: 'at-time', parent_timestamp: mark!.at.toISOString() });
  t.equal(atTime.branch.parent_time, mark!.at.toISOString());
  t.ok(parseLsn(atTime.branch.parent_lsn!) >= parseLsn(mark!.lsn) - 8192n, `time ${mark!.at.toISOString()} → ${atTime.branch.parent_lsn} (noted LSN ${mark!.lsn})`);

  const b1 = await connect(stack, atLsn.endpoint!.id);
  t.teardown(() => b1.end().catch(() => {}));
  t.same(await snapshot(b1), early, 'the branch at the noted LSN has exactly the rows of that moment');
  t.same(await withClient(stack, atTime.endpoint!.id, snapshot), early, 'the branch at the noted time has exactly the rows of that moment');
  const tl = await b1.query<{ timeline_id: number }>('SELECT timeline_id FROM pg_control_checkpoint()');
  t.ok(tl.rows[0]!.timeline_id >= 2, `the branch runs on its own Postgres timeline (${tl.rows[0]!.timeline_id})`);

  // ---- isolation both ways
  await b1.query(`INSERT INTO items VALUES (100001, 'branch only')`);
  await main.query(`INSERT INTO items VALUES (200001, 'parent only')`);
  t.equal((await b1.query(`SELECT count(*)::int AS n FROM items WHERE id = 200001`)).rows[0]!.n, 0, 'a parent write is invisible on the branch');
  t.equal((await main.query(`SELECT count(*)::int AS n FROM items WHERE id = 100001`)).rows[0]!.n, 0, 'a branch write is invisible on the parent');
  const b1Snap = await snapshot(b1);

  // ---- a branch of the branch (at its latest state)
  const child = await stack.api.createBranch(project, { name: 'child', parent: 'at-lsn' });
  t.equal(child.branch.parent_id, atLsn.branch.id);
  t.same(await withClient(stack, child.endpoint!.id, snapshot), b1Snap, 'a branch of a branch sees the branch\'s rows, including its own write');

  // ---- the parent's compute loses its data directory while stopped
  const mainSnap = await snapshot(main);
  await main.end();
  await stack.api.endpointAction(stack.info.endpoint_id, 'stop');
  t.ok(existsSync(dataDirOf(stack, mainBranch)), 'a stopped compute keeps its data directory as a cache');
  rmSync(dataDirOf(stack, mainBranch), { recursive: true, force: true });
  const again = await withClient(stack, undefined, async (c) => ({ snap: await snapshot(c), tli: (await c.query<{ timeline_id: number }>('SELECT timeline_id FROM pg_control_checkpoint()')).rows[0]!.timeline_id }));
  t.same(again.snap, mainSnap, 'started from the pageserver: every row is there');
  t.equal(again.tli, 1, 'a restart from the pageserver stays on the same Postgres timeline (crash recovery)');
  const events = (await stack.api.endpointEvents(stack.info.endpoint_id)).events.map((e) => e.event);
  t.ok(events.includes('started'), 'the endpoint started again');

  const branches = (await stack.api.listBranches(project)).branches.map((b) => [b.name, b.parent_id]);
  t.same(branches, [['main', null], ['at-lsn', mainBranch], ['at-time', mainBranch], ['child', atLsn.branch.id]], 'the branch tree');
});

t.test('the ancestor-segment hazard: a branch whose own WAL is gone fails loudly instead of replaying its parent; adoption of a project the pageserver never saw', async (t) => {
  const project = stack.info.project_id;
  const ps = new PageserverClient(stack.info.pageserver_url);
  // `items` on main belongs to the test above: this one has its own table.
  await withClient(stack, undefined, async (c) => {
    await c.query('CREATE TABLE hazard (id int PRIMARY KEY, v text NOT NULL)');
    await c.query(`INSERT INTO hazard SELECT g, 'parent' FROM generate_series(1, 100) g`);
  });
  const br = await stack.api.createBranch(project, { name: 'b' });
  // The branch writes past a segment boundary: its own first segments are complete.
  const own = await withClient(stack, br.endpoint!.id, async (c) => {
    await c.query(`INSERT INTO hazard SELECT g, 'branch' FROM generate_series(101, 200) g`);
    const { rows: [r] } = await c.query<{ lsn: string; tli: number }>(`SELECT pg_current_wal_lsn()::text AS lsn, (SELECT timeline_id FROM pg_control_checkpoint()) AS tli`);
    // More than a segment of WAL (the role may not call pg_switch_wal()).
    await c.query(`CREATE TABLE filler AS SELECT g, repeat(md5(g::text), 16) AS v FROM generate_series(1, 40000) g`);
    await c.query(`INSERT INTO hazard VALUES (201, 'after a segment')`);
    return r!;
  });
  await stack.api.endpointAction(br.endpoint!.id, 'stop');
  // Less WAL than XENON_PAGESERVER_IMAGE_WAL_BYTES since the parent's image: no copy of the
  // database was made for the branch; its next start is an archive recovery from that image.
  t.same((await ps.timeline(project, br.branch.id))!.images, [], 'no image of its own');
  const tlDir = (id: string): string => join(stack.dirs.state, 'pageserver', 'objects', 'tenants', project, 'timelines', id);
  // The segment of the branch's own WAL that its next start needs: the first one of its own
  // Postgres timeline in the plan (crash recovery from an image of its own), else the one
  // holding the branch point (archive recovery from the parent's image).
  const plan = await ps.startPlan(project, br.branch.id);
  const needed = plan.mode === 'crash'
    ? plan.wal.map((w) => w.name).find((n) => /^[0-9A-F]{24}$/.test(n) && parseInt(n.slice(0, 8), 16) === own.tli)
    : segmentFileName(own.tli, segmentOf(parseLsn(br.branch.parent_lsn!)));
  t.ok(needed, `the plan (${plan.mode}) needs a segment of the branch's own timeline ${own.tli}`);
  const seg = needed!;
  const tip = (await ps.timeline(project, br.branch.id))!.last_record_lsn;

  // Its own segment disappears everywhere (object store and every safekeeper); the parent's
  // segment of the same number exists.
  rmSync(join(tlDir(br.branch.id), 'wal', seg), { force: true });
  for (const k of stack.info.safekeepers) {
    const dir = join(k.data_dir, 'timelines', br.branch.id, 'wal');
    for (const f of readdirSync(dir)) if (f.startsWith(seg)) rmSync(join(dir, f));
  }
  const parentSeg = `00000001${seg.slice(8)}`;
  const res = await fetch(`${stack.info.pageserver_url}/v1/tenant/${project}/timeline/${br.branch.id}/wal/${parentSeg}?upto=${tip}`);
  t.not(res.status, 200, `the resolver does not serve the parent's ${parentSeg} to the branch (${res.status})`);
  const own2 = await fetch(`${stack.info.pageserver_url}/v1/tenant/${project}/timeline/${br.branch.id}/wal/${seg}?upto=${tip}`);
  t.equal(own2.status, 500, 'the branch\'s own missing segment is an error, not "not found"');
  t.match(await own2.text(), /PS_WAL_MISSING/);

  // A compute of the branch (no data directory) and a branch of it: both refuse to start.
  rmSync(dataDirOf(stack, br.branch.id), { recursive: true, force: true });
  const err = await connect(stack, br.endpoint!.id).then(async (c) => { await c.end(); return null; }, (e: Error) => e);
  t.ok(err, 'the branch does not start');
  const ev = (await stack.api.endpointEvents(br.endpoint!.id)).events.filter((e) => e.event === 'start_failed').map((e) => e.detail ?? '');
  t.match(ev.join('\n'), new RegExp(seg), 'the start failure names the missing segment');
  t.notOk(existsSync(join(dataDirOf(stack, br.branch.id), 'PG_VERSION')) && existsSync(join(dataDirOf(stack, br.branch.id), 'postmaster.pid')), 'no compute runs on partial data');

  // (Same stack, to save a stack's start.) A project the pageserver never saw — made before it
  // existed — is adopted at its next start, then branches.
  const p = await stack.api.createProject({ name: 'old' });
  const cfg = { endpoint: p.endpoint.id, user: p.role.name, password: p.password, database: p.database.name };
  const sql = async <R extends pg.QueryResultRow>(endpoint: string, text: string): Promise<R[]> => {
    const c = new pg.Client({ ...stack.pgConfig({ ...cfg, endpoint }), connectionTimeoutMillis: 120_000 });
    await c.connect();
    try { return (await c.query<R>(text)).rows; } finally { await c.end().catch(() => {}); }
  };
  await sql(p.endpoint.id, `CREATE TABLE items (id int PRIMARY KEY, v text NOT NULL); INSERT INTO items SELECT g, md5(g::text) FROM generate_series(1, 500) g`);
  const before = await sql<{ n: number; md5: string }>(p.endpoint.id, `SELECT count(*)::int AS n, md5(string_agg(v, ',' ORDER BY id)) AS md5 FROM items`);
  await stack.api.endpointAction(p.endpoint.id, 'stop');
  // What a state directory from before the pageserver looks like to it: no tenant at all.
  await ps.deleteTenant(p.project.id);
  t.equal(await ps.timeline(p.project.id, p.branch.id), null, 'the pageserver does not know the project');

  t.same(await sql(p.endpoint.id, `SELECT count(*)::int AS n, md5(string_agg(v, ',' ORDER BY id)) AS md5 FROM items`), before, 'the compute starts from its data directory');
  const st = await ps.timeline(p.project.id, p.branch.id);
  t.equal(st?.images.length, 1, 'adopted: its data directory is the timeline\'s first image');
  t.equal(st?.images[0]?.kind, 'shutdown');
  const b = await stack.api.createBranch(p.project.id, { name: 'after-adoption' });
  t.same(await sql(b.endpoint!.id, `SELECT count(*)::int AS n, md5(string_agg(v, ',' ORDER BY id)) AS md5 FROM items`), before, 'a branch of it has every row');
});
