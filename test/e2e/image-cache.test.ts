/**
 * Issue 6, fast branch starts: a stack whose data root is on XFS with reflink (loop-mounted),
 * so the compute host keeps pageserver images unpacked and clones data directories from them.
 * The newest image of a recently active branch is fetched ahead (warmed); a new branch and a
 * start without a data directory then clone it (cache hits in the metrics) and see exactly their
 * rows; writes on the branch stay off the parent although they share blocks.
 */
import { existsSync, mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import pg from 'pg';
import t from 'tap';
import { PageserverClient } from '../../pageserver/client.ts';
import { startTestStack, waitFor, type TestStack } from '../helpers/stack.ts';
import { mountXfs, xfsUnavailable } from '../helpers/xfs.ts';

async function metric(stack: TestStack, name: string, labels = ''): Promise<number> {
  const text = await (await fetch(`${stack.info.api_url}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(`${name}${labels} `));
  return line ? Number(line.split(' ')[1]) : NaN;
}

async function query<R extends pg.QueryResultRow>(stack: TestStack, endpoint: string, text: string): Promise<R[]> {
  const c = new pg.Client({ ...stack.pgConfig({ endpoint }), connectionTimeoutMillis: 120_000 });
  await c.connect();
  try { return (await c.query<R>(text)).rows; } finally { await c.end().catch(() => {}); }
}

const SUM = `SELECT count(*)::int AS n, md5(string_agg(id || ':' || v, ',' ORDER BY id)) AS md5 FROM items`;

t.test('branches and data-less starts clone the warmed image', { skip: xfsUnavailable() }, async (t) => {
  const xfs = mountXfs(4);
  t.teardown(() => xfs.close());
  const data = join(xfs.dir, 'data');
  mkdirSync(data, { mode: 0o755 });
  const stack = await startTestStack(t, {
    XENON_DATA_DIR: data,
    XENON_IMAGE_CACHE_WARM_MS: '1000',
    XENON_PAGESERVER_IMAGE_WAL_BYTES: String(1024 ** 4), // only the image made below
  });
  const ps = new PageserverClient(stack.info.pageserver_url);
  const main = stack.info.endpoint_id;
  const project = stack.info.project_id;
  const mainBranch = (await stack.api.getEndpoint(main)).endpoint.branch_id;

  await query(stack, main, `CREATE TABLE items (id int PRIMARY KEY, v text NOT NULL); INSERT INTO items SELECT g, md5(g::text) FROM generate_series(1, 20000) g`);
  const [before] = await query<{ n: number; md5: string }>(stack, main, SUM);
  const image = await ps.makeImage(project, mainBranch);
  t.comment(`image ${image.id}: ${(image.size / 1048576).toFixed(1)} MB`);

  // The control plane warms the newest image of the recently active branch.
  const entry = join(data, 'image-cache', `${mainBranch}.${image.id}.json`);
  t.ok(await waitFor(() => existsSync(entry), 60_000, 100), 'the image was warmed into the cache');
  t.ok((await metric(stack, 'xenon_image_cache_bytes')) >= image.size, 'counted in the metrics');
  const misses = await metric(stack, 'xenon_image_cache_lookups', '{result="miss"}');
  t.ok(misses >= 1, `the warm-up fetched it (${misses} misses)`);

  // A new branch at the tip: its data directory is a clone of the cached image.
  const hitsBefore = await metric(stack, 'xenon_image_cache_lookups', '{result="hit"}');
  const t0 = Date.now();
  const b = await stack.api.createBranch(project, { name: 'fast' });
  const [onBranch] = await query<{ n: number; md5: string }>(stack, b.endpoint!.id, SUM);
  t.comment(`branch creation → first answer: ${Date.now() - t0} ms`);
  t.same(onBranch, before, 'the branch sees exactly the parent\'s rows');
  t.ok((await metric(stack, 'xenon_image_cache_lookups', '{result="hit"}')) > hitsBefore, 'its start was a cache hit');
  t.equal(await metric(stack, 'xenon_image_cache_lookups', '{result="miss"}'), misses, 'and fetched nothing');

  // Writes on the branch are not on the parent, nor in the image the next start clones.
  await query(stack, b.endpoint!.id, `UPDATE items SET v = 'branch' WHERE id <= 100`);
  t.same(await query(stack, main, SUM), [before], 'the parent is unchanged');

  // The parent, stopped, loses its data directory: it starts from a clone of the same image.
  await stack.api.endpointAction(main, 'stop');
  rmSync(join(data, 'computes', mainBranch), { recursive: true, force: true });
  const hits2 = await metric(stack, 'xenon_image_cache_lookups', '{result="hit"}');
  t.same(await query(stack, main, SUM), [before], 'the parent, started without its data directory, has every row');
  t.ok((await metric(stack, 'xenon_image_cache_lookups', '{result="hit"}')) > hits2, 'from the cache');
  const [{ n }] = await query<{ n: number }>(stack, b.endpoint!.id, `SELECT count(*)::int AS n FROM items WHERE v = 'branch'`) as [{ n: number }];
  t.equal(n, 100, 'the branch kept its own writes');
});
