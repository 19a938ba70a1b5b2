// Images from a real compute: pg_basebackup → tar in the store → extracted, with the ingested WAL
// from the image's LSN on in pg_wal, a real Postgres recovers it and has the rows written before
// (and after) the backup. The periodic imager makes a first image and a new one once enough WAL
// has passed, and survives a compute it cannot reach.
import { createWriteStream, existsSync, mkdirSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import pg from 'pg';
import t from 'tap';
import { silentLogger } from '../../lib/logger.ts';
import { formatLsn, parseLsn, segmentOf } from '../../lib/lsn.ts';
import type { StartPlan } from '../../pageserver/api.ts';
import { findFreePort, findPgBin, pgRunAs, PostgresProcess } from '../../lib/postgres.ts';
import { imageId, makeImage, parseBackupManifest, startImager } from '../../pageserver/imager.ts';
import { startIngest } from '../../pageserver/ingest.ts';
import { keys } from '../../pageserver/types.ts';
import { currentLsn, PG_BIN, runTool, tempDir, waitFor, waitReplicated } from '../safekeeper/helpers.ts';
import { streamingCompute, testTimelines } from './ps-test-helpers.ts';

const TENANT = 'tenant-imager';

t.test('manifest parsing and ids', async (t) => {
  const r = parseBackupManifest(JSON.stringify({ 'PostgreSQL-Backup-Manifest-Version': 1, Files: [], 'WAL-Ranges': [{ Timeline: 3, 'Start-LSN': '0/2000028', 'End-LSN': '0/2000138' }] }));
  t.same(r, { startLsn: 0x2000028n, endLsn: 0x2000138n, pgTimeline: 3 });
  t.throws(() => parseBackupManifest('{'), { code: 'INTERNAL' });
  t.throws(() => parseBackupManifest('{"WAL-Ranges": []}'), { code: 'INTERNAL' });
  t.match(imageId(0x2000028n), /^0000000002000028-[0-9a-f]{6}$/);
});

t.test('makeImage: a base backup that a real Postgres recovers with the ingested WAL', async (t) => {
  const TL = 'br-imager';
  const c = await streamingCompute(t, TL);
  const timelines = testTimelines(t);
  await timelines.create(TENANT, TL);
  const ingest = startIngest({ timelines, safekeepers: c.members, intervalMs: 60_000, logger: silentLogger });
  t.teardown(() => ingest.close());
  const scratch = tempDir(t, 'xenon-ps-img-');
  const logs: string[] = [];
  const logger = { ...silentLogger, info: (m: string, f?: object) => logs.push(m + JSON.stringify(f ?? {})), warn: (m: string, f?: object) => logs.push(m + JSON.stringify(f ?? {})) };
  (logger as { child: unknown }).child = () => logger;

  await c.sql("CREATE TABLE before_backup AS SELECT g AS id, repeat('b', 100) AS pad FROM generate_series(1, 20000) g");
  const compute = { host: '127.0.0.1', port: c.pgc.port, user: 'admin', password: 'admin-pw' };
  const [img, img2] = await Promise.all([
    makeImage({ timelines, tenantId: TENANT, timelineId: TL, compute, pgBin: PG_BIN, tmpDir: join(scratch, 'tmp'), logger: logger as typeof silentLogger }),
    makeImage({ timelines, tenantId: TENANT, timelineId: TL, compute, pgBin: PG_BIN, tmpDir: join(scratch, 'tmp'), logger: logger as typeof silentLogger }),
  ]);
  t.equal(img.kind, 'backup');
  t.equal(img.pg_timeline, 1);
  t.ok(parseLsn(img.end_lsn) > parseLsn(img.lsn), `lsn ${img.lsn} < end ${img.end_lsn}`);
  t.match(img.id, new RegExp(`^${parseLsn(img.lsn).toString(16).toUpperCase().padStart(16, '0')}-[0-9a-f]{6}$`));
  t.ok(parseLsn(img2.lsn) > parseLsn(img.lsn), 'two calls: one after the other, two images');
  t.same(readdirSync(join(scratch, 'tmp')), [], 'temp dirs removed');
  t.notOk(logs.some((l) => l.includes('admin-pw')), 'the password is never logged');
  const ix = await timelines.read(TENANT, TL);
  t.same(ix.images.map((i) => i.id), [img.id, img2.id]);
  const head = await timelines.store.head(keys.image(TENANT, TL, img.id));
  t.equal(head?.size, img.size);

  await c.sql("CREATE TABLE after_backup AS SELECT g AS id FROM generate_series(1, 500) g");
  await c.sql('SELECT pg_switch_wal()');
  const end = await currentLsn(c.pgc);
  await waitReplicated(c.pgc, ['sk1', 'sk2', 'sk3'], end);
  await ingest.pollNow(TENANT, TL);
  const ix2 = await timelines.read(TENANT, TL);

  // Extract the image as the postgres user would own it, add the WAL from the image's segment on.
  const runAs = pgRunAs(process.env);
  const root = tempDir(t, 'xenon-ps-img-restore-');
  const tarPath = join(root, 'image.tar');
  await pipeline(await timelines.store.get(keys.image(TENANT, TL, img.id)), createWriteStream(tarPath));
  t.equal(statSync(tarPath).size, img.size);
  const dataDir = join(root, 'pgdata');
  mkdirSync(dataDir, { mode: 0o700 });
  await runTool('tar', ['-xf', tarPath, '-C', dataDir]);
  t.ok(existsSync(join(dataDir, 'backup_label')), 'the image holds backup_label');
  t.match(readFileSync(join(dataDir, 'backup_label'), 'utf8'), new RegExp(`START WAL LOCATION: ${img.lsn} `));
  const walDir = join(dataDir, 'pg_wal');
  mkdirSync(walDir, { recursive: true });
  t.same(readdirSync(walDir).filter((n) => /^[0-9A-F]{24}$/.test(n)), [], 'a backup image has an empty pg_wal');
  const first = segmentOf(parseLsn(img.lsn));
  const copied: string[] = [];
  for (const w of ix2.wal) {
    if (w.kind !== 'segment' || segmentOf(parseLsn(w.start_lsn!)) < first) continue;
    await pipeline(await timelines.store.get(keys.wal(TENANT, TL, w.name)), createWriteStream(join(walDir, w.name)));
    copied.push(w.name);
  }
  t.ok(copied.length >= 1, `WAL copied: ${copied.join(', ')}`);
  t.ok(ix2.wal.some((w) => w.kind === 'segment' && parseLsn(w.end_lsn!) >= parseLsn(img.end_lsn)), 'the store has WAL past the image end');
  if (runAs) await runTool('chown', ['-R', `${runAs.uid}:${runAs.gid}`, root]);
  const proc = await PostgresProcess.start({ bin: findPgBin(process.env), dataDir, port: await findFreePort(30000, 39999), runAs, logFile: join(root, 'restore.log') });
  t.teardown(() => proc.stop('immediate'));
  const db = new pg.Client({ host: '127.0.0.1', port: proc.port, user: 'admin', password: 'admin-pw', database: 'postgres' });
  await db.connect();
  t.teardown(() => db.end().catch(() => {}));
  t.equal((await db.query('SELECT count(*)::int AS n FROM before_backup')).rows[0].n, 20000, 'rows written before the backup');
  t.equal((await db.query('SELECT count(*)::int AS n FROM after_backup')).rows[0].n, 500, 'rows written after it (replayed from the ingested WAL)');
});

t.test('startImager: a first image, a new one after imageWalBytes of WAL, backoff on an unreachable compute', async (t) => {
  const TL = 'br-imager-loop';
  const c = await streamingCompute(t, TL);
  const timelines = testTimelines(t);
  await timelines.create(TENANT, TL);
  await timelines.create(TENANT, 'br-imager-dead');
  const ingest = startIngest({ timelines, safekeepers: c.members, intervalMs: 100, logger: silentLogger });
  t.teardown(() => ingest.close());
  const scratch = tempDir(t, 'xenon-ps-imgloop-');
  const infos: string[] = [];
  const logger = { ...silentLogger, info: (m: string) => infos.push(m), warn: (m: string) => infos.push(m) };
  (logger as { child: unknown }).child = () => logger;
  const computes = new Map([
    [`${TENANT}/${TL}`, { host: '127.0.0.1', port: c.pgc.port, user: 'admin', password: 'admin-pw' }],
    [`${TENANT}/br-imager-dead`, { host: '127.0.0.1', port: 1, user: 'admin', password: 'x' }],
  ]);
  const imager = startImager({ timelines, computes, imageWalBytes: 4 * 1024 * 1024, intervalMs: 150, pgBin: PG_BIN, tmpDir: scratch, logger: logger as typeof silentLogger });
  t.teardown(() => imager.close());
  const first = await waitFor('a first image', async () => (await timelines.read(TENANT, TL)).images[0]);
  await new Promise((r) => setTimeout(r, 800));
  t.equal((await timelines.read(TENANT, TL)).images.length, 1, 'no new image while little WAL passed');
  await c.sql("CREATE TABLE w AS SELECT g AS id, repeat('w', 200) AS pad FROM generate_series(1, 30000) g"); // ~8 MB
  const second = await waitFor('a second image', async () => (await timelines.read(TENANT, TL)).images[1], 60_000);
  t.ok(parseLsn(second.lsn) - parseLsn(first.lsn) > 4 * 1024 * 1024, `second image ${second.lsn} well after the first ${first.lsn}`);
  t.ok(infos.filter((m) => m === 'image not made').length >= 1, 'the unreachable compute is logged');
  t.same((await timelines.read(TENANT, 'br-imager-dead')).images, []);
  await imager.close();
  t.same(readdirSync(scratch), [], 'no temp dirs left');
});

t.test('startImager with a start plan: a branch gets its first image only once enough WAL passed since the image its start uses', async (t) => {
  const TL = 'br-imager-branch';
  const c = await streamingCompute(t, TL);
  const timelines = testTimelines(t);
  await timelines.create(TENANT, TL);
  const ingest = startIngest({ timelines, safekeepers: c.members, intervalMs: 100, logger: silentLogger });
  t.teardown(() => ingest.close());
  await waitFor('the ingested tip', async () => parseLsn((await timelines.read(TENANT, TL)).last_record_lsn) > 0n || undefined);
  // The ancestor image a start of this branch uses (what the resolver's plan names): at the tip now.
  const ancestorImageLsn = await currentLsn(c.pgc);
  const plans: string[] = [];
  const plan = async (tenant: string, tl: string): Promise<StartPlan> => {
    plans.push(`${tenant}/${tl}`);
    return { image: { lsn: formatLsn(ancestorImageLsn) } } as StartPlan; // only the field the imager reads
  };
  const imager = startImager({
    timelines, computes: new Map([[`${TENANT}/${TL}`, { host: '127.0.0.1', port: c.pgc.port, user: 'admin', password: 'admin-pw' }]]),
    imageWalBytes: 4 * 1024 * 1024, intervalMs: 150, pgBin: PG_BIN, tmpDir: tempDir(t, 'xenon-ps-imgbranch-'), logger: silentLogger, plan,
  });
  t.teardown(() => imager.close());
  await new Promise((r) => setTimeout(r, 1000));
  t.ok(plans.length >= 2, `the imager asked for the start plan (${plans.length} times)`);
  t.same((await timelines.read(TENANT, TL)).images, [], 'no copy of the database for a new branch with little WAL of its own');
  await c.sql("CREATE TABLE w AS SELECT g AS id, repeat('w', 200) AS pad FROM generate_series(1, 30000) g"); // ~8 MB
  const first = await waitFor('a first image of its own', async () => (await timelines.read(TENANT, TL)).images[0], 60_000);
  t.ok(parseLsn(first.lsn) - ancestorImageLsn > 4 * 1024 * 1024, `made after ${first.lsn}, more than 4 MiB past the ancestor's image`);
});
