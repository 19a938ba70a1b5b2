// Scratch images of a stopped timeline, with real processes: a PG 15 compute streaming to three
// in-process safekeepers, a pageserver (real ingest) over a LocalObjectStore. After a BASE_BACKUP
// image, more than a segment of WAL, a CHECKPOINT, more rows and a stop, makeScratchImage recovers
// the image in a scratch standby to the compute's shutdown checkpoint: a `shutdown` image at a real
// checkpoint record of the timeline (lsn = its redo, end_lsn = its end = the tip). A compute
// started from the crash plan the resolver then makes (that image + the timeline's WAL copied over
// its pg_wal) has every row. The periodic imager makes such an image for a stopped timeline past
// imageWalBytes and leaves a branch without an image of its own alone.
import t from 'tap';
import { chmodSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { silentLogger, type Logger } from '../../lib/logger.ts';
import { formatLsn, parseLsn, segmentOf } from '../../lib/lsn.ts';
import { findFreePort, findPgBin, pgRunAs, PostgresProcess } from '../../lib/postgres.ts';
import type { StartPlan } from '../../pageserver/api.ts';
import { PageserverClient } from '../../pageserver/client.ts';
import { makeScratchImage, parseCheckpointRecords, startImager } from '../../pageserver/imager.ts';
import { loadPageserverConfig, startPageserver } from '../../pageserver/index.ts';
import { materialise } from '../../vm/materialise.ts';
import { checkpointRecordEnd } from '../../vm/pg-control.ts';
import { waitFor, withClient } from '../safekeeper/helpers.ts';
import { rejectsCode, tempDir } from './core-helpers.ts';
import { streamingCompute } from './ps-test-helpers.ts';

const bin = findPgBin(process.env);
const runAs = pgRunAs(process.env);

/** A temp dir the postgres user can reach (as root). */
function reachableDir(t: { teardown(fn: () => unknown): void }, prefix: string): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  chmodSync(dir, 0o755);
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

async function rowsFrom(t: { teardown(fn: () => unknown): void }, plan: StartPlan): Promise<{ n: number; sum: number }> {
  const root = reachableDir(t, 'ps-scratch-start-');
  const dataDir = join(root, 'pgdata');
  const { settings } = await materialise({ dataDir, plan, runAs, logger: silentLogger });
  const proc = await PostgresProcess.start({ bin, dataDir, port: await findFreePort(40000, 49999), runAs, logFile: join(root, 'pg.log'), settings, readyTimeoutMs: 60_000 });
  try {
    return await withClient({ host: '127.0.0.1', port: proc.port, user: 'admin', password: 'admin-pw', database: 'postgres' }, async (db) => {
      const r = await db.query<{ n: string; s: string }>('SELECT count(*) AS n, sum(id) AS s FROM ledger');
      return { n: Number(r.rows[0]!.n), sum: Number(r.rows[0]!.s) };
    });
  } finally {
    await proc.stop('immediate');
  }
}

t.test('parseCheckpointRecords', async (t) => {
  const out = [
    'rmgr: XLOG        len (rec/tot):    114/   114, tx:          0, lsn: 0/01000028, prev 0/00000000, desc: CHECKPOINT_SHUTDOWN redo 0/1000028; tli 1; prev tli 1; fpw true; xid 0:3; oid 10000',
    'rmgr: XLOG        len (rec/tot):     30/    30, tx:          0, lsn: 0/010000A0, prev 0/01000028, desc: NEXTOID 13000',
    'rmgr: XLOG        len (rec/tot):    114/   114, tx:          0, lsn: 0/03000090, prev 0/03000058, desc: CHECKPOINT_ONLINE redo 0/3000058; tli 2; prev tli 2; fpw true',
  ].join('\n');
  t.same(parseCheckpointRecords(out), [
    { lsn: 0x1000028n, redo: 0x1000028n, tli: 1, shutdown: true },
    { lsn: 0x3000090n, redo: 0x3000058n, tli: 2, shutdown: false },
  ]);
});

t.test('a scratch image of a stopped timeline, and a start from it', async (t) => {
  const sc = await streamingCompute(t, 'main');
  const scratch = reachableDir(t, 'ps-scratch-');
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
  await sc.sql('CREATE TABLE ledger (id int PRIMARY KEY, pad text)');
  const img = await c.makeImage('p1', 'main');
  t.equal(img.kind, 'backup');

  // More than a segment of WAL after the image, a checkpoint, more rows, a clean stop.
  await sc.sql("INSERT INTO ledger SELECT g, repeat('x', 200) FROM generate_series(1, 80000) g");
  await sc.sql('CHECKPOINT');
  await sc.sql("INSERT INTO ledger SELECT g, repeat('y', 200) FROM generate_series(80001, 81000) g");
  const expected = { n: 81000, sum: (81000 * 81001) / 2 };
  await c.detachCompute('p1', 'main');
  await sc.pgc.stop();
  let tip = '';
  await waitFor('ingest of the stopped compute to settle', async () => {
    await new Promise((r) => setTimeout(r, 600));
    const now = (await c.timeline('p1', 'main'))!.last_record_lsn;
    const done = now === tip;
    tip = now;
    return done;
  }, 60_000, 0);
  t.ok(parseLsn(tip) - parseLsn(img.lsn) > 16n * 1024n * 1024n, `more than a segment of WAL after the image (${img.lsn} → ${tip})`);

  const plan = await ps.resolver.plan('p1', 'main', undefined, ps.url);
  t.match(plan, { mode: 'crash', lsn: tip, image: { id: img.id } });
  const logs: string[] = [];
  const logger: Logger = { ...silentLogger, info: (m: string, f?: object) => logs.push(m + JSON.stringify(f ?? {})) };
  (logger as { child: unknown }).child = () => logger;
  const t0 = Date.now();
  const info = await makeScratchImage({ timelines: ps.timelines, tenantId: 'p1', timelineId: 'main', plan, pgBin: bin, tmpDir: join(scratch, 'tmp'), runAs, logger });
  t.comment(`scratch image in ${Date.now() - t0} ms: ${JSON.stringify(info)}`);
  t.equal(info.kind, 'shutdown');
  t.equal(info.pg_timeline, 1);
  t.ok(parseLsn(info.lsn) > parseLsn(img.lsn), `image lsn ${info.lsn} after the previous image's ${img.lsn}`);
  // The compute's own shutdown checkpoint is the timeline's last record: redo = its start, and
  // the image is consistent exactly at its end, the tip — a real record of the timeline's WAL.
  t.equal(info.end_lsn, tip, 'end_lsn is the end of the compute\'s shutdown checkpoint (the tip)');
  t.equal(formatLsn(checkpointRecordEnd(parseLsn(info.lsn))), tip, 'lsn is that checkpoint record\'s redo (= its start)');
  t.ok(logs.some((l) => l.startsWith('scratch image made')), 'logged');
  t.same(readdirSync(join(scratch, 'tmp')), [], 'scratch dir removed');
  t.equal((await ps.timelines.read('p1', 'main')).images.at(-1)?.id, info.id, 'appended to the index');

  // Nothing newer to gain: refused.
  await rejectsCode(t, makeScratchImage({ timelines: ps.timelines, tenantId: 'p1', timelineId: 'main', plan: await ps.resolver.plan('p1', 'main', undefined, ps.url), pgBin: bin, tmpDir: join(scratch, 'tmp'), runAs, logger: silentLogger }), 'CP_CONFLICT');

  // A start from it: the crash plan copies the timeline's segments over the image's pg_wal.
  const plan2 = await ps.resolver.plan('p1', 'main', undefined, ps.url);
  t.match(plan2, { mode: 'crash', lsn: tip, image: { id: info.id, kind: 'shutdown' } });
  t.ok(plan2.wal.length >= 1 && plan2.wal[0]!.name.endsWith(segmentOf(parseLsn(info.lsn)).toString(16).toUpperCase().padStart(8, '0')), `WAL from the image's redo segment: ${plan2.wal.map((w) => w.name).join(',')}`);
  t.same(await rowsFrom(t, plan2), expected, 'every row, from the scratch image');

  // The periodic imager: the same image again once it is gone from the index; a branch without
  // an image of its own (its start is an archive recovery from main's image) is left alone.
  await c.createTimeline('p1', { new_timeline_id: 'br', ancestor_timeline_id: 'main' });
  await ps.timelines.update('p1', 'main', (ix) => { ix.images = ix.images.filter((i) => i.id !== info.id); });
  const seen: string[] = [];
  const loopLogger: Logger = { ...silentLogger, info: (m: string, f?: object) => seen.push(m + JSON.stringify(f ?? {})), warn: (m: string, f?: object) => seen.push(m + JSON.stringify(f ?? {})) };
  (loopLogger as { child: unknown }).child = () => loopLogger;
  const imager = startImager({
    timelines: ps.timelines, computes: new Map(), imageWalBytes: 1024 * 1024, intervalMs: 200, pgBin: bin, tmpDir: join(scratch, 'tmp'), logger: loopLogger,
    plan: (tn, tl) => ps.resolver.plan(tn, tl, undefined, ps.url), runAs, scratchDir: join(scratch, 'loop'),
  });
  t.teardown(() => imager.close());
  const again = await waitFor('a scratch image from the imager', async () => (await ps.timelines.read('p1', 'main')).images.find((i) => i.kind === 'shutdown'), 60_000);
  t.equal(again.lsn, info.lsn);
  t.equal(again.end_lsn, info.end_lsn);
  await new Promise((r) => setTimeout(r, 600));
  await imager.close();
  t.same((await ps.timelines.read('p1', 'br')).images, [], 'no image for a branch without one of its own');
  t.notOk(seen.some((l) => l.includes('image not made') && l.includes('"br"')), 'the branch is not tried');
  t.equal((await ps.timelines.read('p1', 'main')).images.filter((i) => i.kind === 'shutdown').length, 1, 'one scratch image, no repeats');
});
