/**
 * Acceptance (issue 6): GC with a short PITR window removes old images and WAL while every
 * branch and every LSN inside the window can still be started; bad input (a branch point before
 * the GC cutoff or past the tip, an unknown parent, a corrupted index.json, a missing image)
 * gets clear errors and deletes nothing. Real `xenon up` stack, clients through the proxy.
 */
import { copyFileSync, existsSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import pg from 'pg';
import t from 'tap';
import { formatLsn, parseLsn } from '../../lib/lsn.ts';
import { PageserverClient } from '../../pageserver/client.ts';
import { startTestStack, waitFor, type TestStack } from '../helpers/stack.ts';

const delay = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function withClient<T>(stack: TestStack, endpoint: string | undefined, fn: (c: pg.Client) => Promise<T>): Promise<T> {
  const c = new pg.Client({ ...stack.pgConfig(endpoint ? { endpoint } : {}), connectionTimeoutMillis: 120_000 });
  await c.connect();
  try {
    return await fn(c);
  } finally {
    await c.end().catch(() => {});
  }
}

const checksum = async (c: pg.Client): Promise<string> =>
  (await c.query<{ s: string }>(`SELECT count(*) || ':' || md5(coalesce(string_agg(id || ':' || v, ',' ORDER BY id), '')) AS s FROM items`)).rows[0]!.s;

/** Every object in the pageserver's store (relative keys), to show nothing was deleted. */
function listObjects(dir: string, prefix = ''): string[] {
  if (!existsSync(dir)) return [];
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? listObjects(join(dir, e.name), `${prefix}${e.name}/`) : [`${prefix}${e.name}`])).sort();
}

t.test('GC with a short window, and bad input', async (t) => {
  const WINDOW = 6;
  const stack = await startTestStack(t, { XENON_PAGESERVER_PITR_WINDOW_SECONDS: String(WINDOW), XENON_PAGESERVER_GC_INTERVAL_SECONDS: '0' });
  const project = stack.info.project_id;
  const ps = new PageserverClient(stack.info.pageserver_url);
  const main = (await stack.api.getEndpoint(stack.info.endpoint_id)).endpoint.branch_id;
  const objects = join(stack.dirs.state, 'pageserver', 'objects');

  // Three rounds of writes, each more than a WAL segment, an image after each.
  const rounds: { lsn: string; sum: string }[] = [];
  await withClient(stack, undefined, async (c) => {
    await c.query('CREATE TABLE items (id int PRIMARY KEY, v text NOT NULL)');
    for (let round = 0; round < 3; round++) {
      if (round === 2) await delay((WINDOW + 1) * 1000); // rounds 0 and 1 fall out of the window
      await c.query(`INSERT INTO items SELECT g, repeat(md5(g::text), 12) FROM generate_series(${round * 50_000 + 1}, ${(round + 1) * 50_000}) g`);
      await ps.makeImage(project, main);
      // Noted after the image: the image serves this point, so older images and WAL can go.
      const { rows: [r] } = await c.query<{ lsn: string }>('SELECT pg_current_wal_lsn()::text AS lsn');
      rounds.push({ lsn: r!.lsn, sum: await checksum(c) });
    }
  });
  // A branch at round 0: its branch point is protected whatever the window says.
  const keep = await stack.api.createBranch(project, { name: 'keep', parent_lsn: rounds[0]!.lsn, endpoint: true });
  t.ok(await waitFor(async () => parseLsn((await ps.timeline(project, main))!.last_record_lsn) >= parseLsn(rounds[2]!.lsn), 30_000), 'the pageserver has the WAL of every round');

  const before = await ps.timeline(project, main);
  const gc = await ps.gc(project, main);
  t.ok(gc.removed_images.length >= 1, `GC removed images: ${gc.removed_images.join(', ')}`);
  t.ok(gc.removed_wal.length >= 1, `GC removed WAL: ${gc.removed_wal.join(', ')}`);
  t.ok(parseLsn(gc.gc_cutoff_lsn) >= parseLsn(rounds[1]!.lsn), `the cutoff ${gc.gc_cutoff_lsn} is at or past round 1 (${rounds[1]!.lsn})`);
  t.ok(parseLsn(gc.gc_cutoff_lsn) <= parseLsn(rounds[2]!.lsn), 'and not past the last round');
  const after = await ps.timeline(project, main);
  t.ok(after!.images.length < before!.images.length, `images ${before!.images.length} → ${after!.images.length}`);

  // Everything protected still starts: the old branch, a branch inside the window, the tip.
  t.equal(await withClient(stack, keep.endpoint!.id, checksum), rounds[0]!.sum, 'the branch at round 0 (a protected branch point) still starts, with round 0\'s rows');
  const inWindow = await stack.api.createBranch(project, { name: 'in-window', parent_lsn: rounds[2]!.lsn });
  t.equal(await withClient(stack, inWindow.endpoint!.id, checksum), rounds[2]!.sum, 'a branch at an LSN inside the window starts');
  await stack.api.endpointAction(stack.info.endpoint_id, 'stop');
  rmSync(join(stack.dirs.data, 'computes', main, 'pgdata'), { recursive: true, force: true });
  t.equal(await withClient(stack, undefined, checksum), rounds[2]!.sum, 'the parent at its tip starts from what GC kept');

  // ---- bad input: clear errors
  await t.rejects(stack.api.createBranch(project, { name: 'too-old', parent_lsn: formatLsn(parseLsn(gc.gc_cutoff_lsn) - 0x1000n) }), { code: 'PS_LSN_BEFORE_GC_CUTOFF' }, 'a branch point before the GC cutoff');
  await t.rejects(stack.api.createBranch(project, { name: 'future', parent_lsn: 'FF/0' }), { code: 'PS_LSN_PAST_TIP' }, 'a branch point past the tip');
  await t.rejects(stack.api.createBranch(project, { name: 'orphan', parent: 'no-such-branch' }), { code: 'CP_NOT_FOUND' }, 'an unknown parent');
  await t.rejects(stack.api.createBranch(project, { name: 'bad', parent_lsn: 'yesterday' }), { code: 'CP_BAD_REQUEST' }, 'a malformed LSN');
  await t.rejects(stack.api.createBranch(project, { name: 'both', parent_lsn: rounds[2]!.lsn, parent_timestamp: new Date().toISOString() }), { code: 'CP_BAD_REQUEST' });
  await t.rejects(stack.api.createBranch(project, { name: 'keep' }), { code: 'CP_CONFLICT' }, 'a name in use');
  const names = (await stack.api.listBranches(project)).branches.map((b) => b.name);
  t.same(names, ['main', 'keep', 'in-window'], 'no branch was made by a refused request');

  // A corrupted index.json: clear errors, and nothing is deleted or rewritten.
  await stack.api.endpointAction(keep.endpoint!.id, 'stop');
  rmSync(join(stack.dirs.data, 'computes', keep.branch.id, 'pgdata'), { recursive: true, force: true });
  const indexPath = join(objects, 'tenants', project, 'timelines', keep.branch.id, 'index.json');
  copyFileSync(indexPath, `${indexPath}.good`);
  writeFileSync(indexPath, '{"version": 1, "tenant_id": ');
  const snapshot = listObjects(objects).filter((k) => !k.endsWith('.good'));
  await t.rejects(ps.timeline(project, keep.branch.id), { code: 'PS_INDEX_CORRUPT' });
  const err = await withClient(stack, keep.endpoint!.id, checksum).then(() => null, (e: Error) => e);
  t.ok(err, 'the branch with a corrupted index does not start');
  t.match((await stack.api.endpointEvents(keep.endpoint!.id)).events.filter((e) => e.event === 'start_failed').map((e) => e.detail).join('\n'), /PS_INDEX_CORRUPT|corrupt/);
  const gc2 = await ps.gc(project, main).catch((e: Error & { code?: string }) => e);
  t.ok(gc2 instanceof Error ? gc2.code === 'PS_INDEX_CORRUPT' : gc2.removed_images.length === 0 && gc2.removed_wal.length === 0,
    `GC of the parent refuses or removes nothing while a child's index is unreadable (${gc2 instanceof Error ? gc2.code : 'ran'})`);
  t.same(listObjects(objects).filter((k) => !k.endsWith('.good')), snapshot, 'nothing was deleted or rewritten');
  t.equal(readFileSync(indexPath, 'utf8'), '{"version": 1, "tenant_id": ', 'the corrupted file is left for an operator');
  copyFileSync(`${indexPath}.good`, indexPath);
  rmSync(`${indexPath}.good`);
  t.equal(await withClient(stack, keep.endpoint!.id, checksum), rounds[0]!.sum, 'repaired, the branch starts again');

  // A missing image: a clear error, nothing substituted.
  await stack.api.endpointAction(keep.endpoint!.id, 'stop');
  rmSync(join(stack.dirs.data, 'computes', keep.branch.id, 'pgdata'), { recursive: true, force: true });
  const plan = await ps.startPlan(project, keep.branch.id);
  const imagePath = join(objects, 'tenants', project, 'timelines', plan.image.timeline_id, 'images', `${plan.image.id}.tar`);
  copyFileSync(imagePath, `${imagePath}.saved`);
  rmSync(imagePath);
  await t.rejects(ps.startPlan(project, keep.branch.id), { code: 'PS_IMAGE_MISSING' });
  const err2 = await withClient(stack, keep.endpoint!.id, checksum).then(() => null, (e: Error) => e);
  t.ok(err2, 'no start without the image');
  copyFileSync(`${imagePath}.saved`, imagePath);
  rmSync(`${imagePath}.saved`);
  t.equal(await withClient(stack, keep.endpoint!.id, checksum), rounds[0]!.sum, 'the image back, the branch starts');
});
