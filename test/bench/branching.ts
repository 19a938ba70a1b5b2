/**
 * Branching and stateless-start benchmark (issue 6; not a tap test):
 *   node --import tsx test/bench/branching.ts [sizes MB=10,1024] [runs=3] [data roots=ext4,xfs]
 * Per data root one `xenon up` stack: `ext4` — the data root in the temp dir (this machine's
 * ext4: no image cache, each start streams the image into tar); `xfs` — a loop-mounted XFS with
 * reflink (root only): the compute host's image cache, warmed before the branch rows.
 * Per size a project whose table holds about that much data, an image made after loading it.
 * Measures: branch creation (API round trip: control plane + pageserver), branch creation →
 * first answered query on the branch (through the proxy, TLS), and compute start → first query
 * from the kept data directory vs from the pageserver (data directory deleted). Medians
 * (min–max) over `runs`.
 */
import { existsSync, mkdirSync, readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import pg from 'pg';
import { PageserverClient } from '../../pageserver/client.ts';
import { startTestStack, type TestStack } from '../helpers/stack.ts';
import { mountXfs, xfsUnavailable } from '../helpers/xfs.ts';
import { spread } from './harness.ts';

const sizes = (process.argv[2] ?? '10,1024').split(',').map(Number);
const runs = Number(process.argv[3] ?? 3);
const roots = (process.argv[4] ?? 'ext4,xfs').split(',').filter((r) => {
  if (r !== 'xfs' || !xfsUnavailable()) return true;
  console.log(`skipping the XFS data root: ${xfsUnavailable()}`);
  return false;
});
const teardowns: (() => unknown)[] = [];
let stack!: TestStack;
let ps!: PageserverClient;

async function firstQuery(endpoint: string, password: string, role: string, database: string): Promise<number> {
  const t0 = performance.now();
  const c = new pg.Client({ ...stack.pgConfig({ endpoint, password, user: role, database }), connectionTimeoutMillis: 300_000 });
  await c.connect();
  await c.query('SELECT 1');
  const ms = performance.now() - t0;
  await c.end();
  return ms;
}

let data = '';
const dataDir = (branch: string): string => join(data, 'computes', branch, 'pgdata');
const rows: string[][] = [];
const delay = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Until the control plane's warm-up has the image and every whole segment after it cached. */
async function waitWarm(branch: string, imageId: string): Promise<number> {
  const t0 = performance.now();
  const cache = join(data, 'image-cache');
  while (!existsSync(join(cache, `${branch}.${imageId}.json`))) await delay(100);
  // The WAL of the same pass follows the image; then one more whole pass (1 s) to be sure.
  await delay(300);
  while (readdirSync(join(cache, 'wal')).some((n) => n.startsWith('.fetch-'))) await delay(100);
  await delay(1500);
  return performance.now() - t0;
}

try {
  for (const root of roots) {
    for (const fn of teardowns.splice(0).reverse()) await fn();
    let extra: Record<string, string> = {};
    if (root === 'xfs') {
      const xfs = mountXfs(40);
      teardowns.push(() => xfs.close());
      data = join(xfs.dir, 'data');
      mkdirSync(data, { mode: 0o755 });
      extra = { XENON_DATA_DIR: data, XENON_IMAGE_CACHE_WARM_MS: '1000' };
    }
    stack = await startTestStack({ teardown: (fn) => void teardowns.push(fn) }, { XENON_SUSPEND_TIMEOUT_SECONDS: '0', XENON_STOP_TIMEOUT_SECONDS: '0', XENON_PAGESERVER_IMAGE_WAL_BYTES: String(1024 ** 4), ...extra });
    if (root !== 'xfs') data = stack.dirs.data;
    ps = new PageserverClient(stack.info.pageserver_url);
    for (const mb of sizes) {
      const p = await stack.api.createProject({ name: `bench-${mb}mb` });
      const conn = { endpoint: p.endpoint.id, password: p.password, user: p.role.name, database: p.database.name };
      const c = new pg.Client({ ...stack.pgConfig(conn), connectionTimeoutMillis: 120_000 });
      c.on('error', (err) => console.error(`load connection: ${err.message}`));
      await c.connect();
      const t0 = performance.now();
      // ~250 bytes per row on disk
      await c.query(`CREATE TABLE big AS SELECT g AS id, repeat(md5(g::text), 6) AS v FROM generate_series(1, ${Math.round((mb * 1024 * 1024) / 260)}) g`);
      const size = Number((await c.query<{ s: string }>(`SELECT pg_database_size(current_database()) AS s`)).rows[0]!.s);
      console.log(`${mb} MB: loaded ${(size / 1048576).toFixed(0)} MB in ${((performance.now() - t0) / 1000).toFixed(1)} s; making an image…`);
      await c.end();
      const t1 = performance.now();
      const img = await ps.makeImage(p.project.id, p.branch.id);
      console.log(`  image ${img.id}: ${(img.size / 1048576).toFixed(0)} MB in ${((performance.now() - t1) / 1000).toFixed(1)} s`);

      // Let the ingest catch up with the load's WAL first (it shares the pageserver's event loop
      // with the requests measured below): until its WAL file count is stable for 3 s.
      const t2 = performance.now();
      for (let last = -1, stableSince = performance.now(); performance.now() - stableSince < 3000;) {
        const n = (await ps.timeline(p.project.id, p.branch.id))!.wal_files;
        if (n !== last) { last = n; stableSince = performance.now(); }
        await new Promise((r) => setTimeout(r, 250));
      }
      console.log(`  ingest settled after ${((performance.now() - t2) / 1000).toFixed(1)} s: ${(await ps.timeline(p.project.id, p.branch.id))!.wal_files} WAL files`);
      if (root === 'xfs') console.log(`  image cache warm after ${((await waitWarm(p.branch.id, img.id)) / 1000).toFixed(1)} s`);
      // The pageserver alone: the metadata write of a branch (no control plane, no endpoint).
      const psCreate: number[] = [];
      for (let i = 0; i < 10; i++) {
        const t1 = performance.now();
        await ps.createTimeline(p.project.id, { new_timeline_id: `br-bench-${i}`, ancestor_timeline_id: p.branch.id });
        psCreate.push(performance.now() - t1);
        await ps.deleteTimeline(p.project.id, `br-bench-${i}`);
      }
      const create: number[] = [];
      const first: number[] = [];
      for (let i = 0; i < runs; i++) {
        const t1 = performance.now();
        const b = await stack.api.createBranch(p.project.id, { name: `b${i}` });
        create.push(performance.now() - t1);
        first.push(await firstQuery(b.endpoint!.id, p.password, p.role.name, p.database.name) + create[i]!);
        await stack.api.endpointAction(b.endpoint!.id, 'stop');
        await delay(2000); // what the start set going in the background (ingest, warm-up) settles
      }
      const kept: number[] = [];
      const fromPs: number[] = [];
      for (let i = 0; i < runs; i++) {
        await stack.api.endpointAction(p.endpoint.id, 'stop');
        kept.push(await firstQuery(p.endpoint.id, p.password, p.role.name, p.database.name));
        await stack.api.endpointAction(p.endpoint.id, 'stop');
        rmSync(dataDir(p.branch.id), { recursive: true, force: true });
        fromPs.push(await firstQuery(p.endpoint.id, p.password, p.role.name, p.database.name));
      }
      rows.push([root === 'xfs' ? 'XFS, image cache' : 'ext4, no cache', `${(size / 1048576).toFixed(0)} MB`, spread(psCreate), spread(create), spread(first), spread(kept), spread(fromPs)]);
      console.log(`  ${rows.at(-1)!.join(' | ')}`);
    }
  }
  console.log('\n| data root | database | pageserver timeline creation, ms | branch creation (API), ms | creation → first query on the branch, ms | start from kept data dir → first query, ms | start from the pageserver → first query, ms |');
  console.log('|---|---|---|---|---|---|---|');
  for (const r of rows) console.log(`| ${r.join(' | ')} |`);
} finally {
  for (const fn of teardowns.reverse()) await fn();
}
