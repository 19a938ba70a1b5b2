/**
 * vm/materialise.ts and restore-wal.js with real Postgres: data directories built from a
 * pageserver-like HTTP file server (200 bytes, 404, 500 JSON errors, WAL masked at `upto` as the
 * WAL resolver does), started by ProcessDriver or PostgresProcess:
 * crash mode from a shutdown image and from a base backup, archive mode ending at a mid-segment
 * LSN with promotion, archive mode failing loudly on a 500, and refusals.
 */
import { execFileSync } from 'node:child_process';
import { chmodSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawn } from 'node:child_process';
import pg from 'pg';
import t from 'tap';
import { silentLogger } from '../../lib/logger.ts';
import { formatLsn, parseLsn, parseSegmentFileName, segmentOf, segmentStart, WAL_SEGMENT_SIZE } from '../../lib/lsn.ts';
import { findFreePort, findPgBin, initdb, pgRunAs, PostgresProcess } from '../../lib/postgres.ts';
import type { StartPlan } from '../../pageserver/api.ts';
import { materialise, RESTORE_WAL_SCRIPT } from '../../vm/materialise.ts';
import { readControlData } from '../../vm/pg-control.ts';
import { ProcessDriver } from '../../vm/process.ts';

const bin = findPgBin(process.env);
const runAs = pgRunAs(process.env);
const ADMIN = { user: 'admin', password: 'admin-pw' };

const root = mkdtempSync(join(tmpdir(), 'xenon-materialise-'));
chmodSync(root, 0o755); // clusters run as `postgres` when we are root
const serveRoot = join(root, 'serve');
mkdirSync(serveRoot);
t.teardown(() => rmSync(root, { recursive: true, force: true }));

const procs: PostgresProcess[] = [];
t.teardown(async () => { for (const p of procs) await p.stop('immediate'); });

// ---- a pageserver stand-in: files under serveRoot; `upto` masks WAL as the resolver does
const failing = new Map<string, string>(); // request path → error code answered with 500
const requests: string[] = [];
const server: Server = createServer((req, res) => {
  const url = new URL(req.url ?? '/', 'http://x');
  requests.push(url.pathname + url.search);
  const code = failing.get(url.pathname);
  if (code) {
    res.writeHead(500, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ error: { code, message: 'the branch\'s stored WAL is incomplete', retryable: false } }));
    return;
  }
  if (url.pathname === '/short') {
    res.writeHead(200, { 'content-length': '1000' });
    res.write(Buffer.alloc(100));
    setTimeout(() => res.socket?.destroy(), 50);
    return;
  }
  if (url.pathname === '/cut/image.tar') { // a connection that drops in the middle of an image
    const whole = readFileSync(join(serveRoot, 'a', 'image.tar'));
    res.writeHead(200, { 'content-length': String(whole.length) });
    res.write(whole.subarray(0, 1 << 20));
    setTimeout(() => res.socket?.destroy(), 50);
    return;
  }
  const path = join(serveRoot, ...url.pathname.split('/').filter((p) => p && p !== '..'));
  if (!existsSync(path)) {
    res.writeHead(404, { 'content-type': 'application/json' });
    // As the pageserver: a WAL file the resolver does not have is PS_WAL_NOT_FOUND.
    const code = url.pathname.includes('/wal/') ? 'PS_WAL_NOT_FOUND' : 'HTTP_NOT_FOUND';
    res.end(JSON.stringify({ error: { code, message: 'no such file', retryable: false } }));
    return;
  }
  let body = readFileSync(path);
  const upto = url.searchParams.get('upto');
  const seg = parseSegmentFileName(url.pathname.split('/').pop()!);
  if (upto && seg) {
    const limit = parseLsn(upto);
    if (segmentStart(seg.segno) >= limit) {
      res.writeHead(404, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ error: { code: 'PS_WAL_NOT_FOUND', message: 'past the target', retryable: false } }));
      return;
    }
    if (segmentStart(seg.segno + 1n) > limit) {
      body = Buffer.from(body);
      body.fill(0, Number(limit - segmentStart(seg.segno)));
    }
  }
  res.writeHead(200, { 'content-length': String(body.length) });
  res.end(body);
});
await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
t.teardown(() => new Promise<void>((r) => { server.closeAllConnections(); server.close(() => r()); }));
const base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;

// ---- helpers
async function newCluster(name: string): Promise<string> {
  const dataDir = join(root, name, 'pgdata');
  await initdb({ bin, dataDir, superuser: ADMIN.user, password: ADMIN.password, runAs, noSync: true });
  return dataDir;
}

async function startPg(dataDir: string, settings: Record<string, string | number> = {}): Promise<PostgresProcess> {
  const p = await PostgresProcess.start({ bin, dataDir, port: await findFreePort(30000, 39999), runAs, logFile: `${dataDir}.log`, settings, readyTimeoutMs: 60_000 });
  procs.push(p);
  return p;
}

async function sql<R extends pg.QueryResultRow>(port: number, text: string): Promise<R[]> {
  const c = new pg.Client({ host: '127.0.0.1', port, ...ADMIN, database: 'postgres' });
  await c.connect();
  try {
    return (await c.query<R>(text)).rows;
  } finally {
    await c.end();
  }
}

/** Publishes a tar of `dataDir` as `<dir>/image.tar`; returns its URL. */
function publishImage(dataDir: string, dir: string): string {
  mkdirSync(join(serveRoot, dir), { recursive: true });
  execFileSync('tar', ['-c', '-f', join(serveRoot, dir, 'image.tar'), '-C', dataDir, '.']);
  return `${base}/${dir}/image.tar`;
}

/** Publishes the complete WAL segments `[from, to]` of a stopped cluster under `<dir>/wal/`. */
function publishWal(dataDir: string, dir: string, from: bigint, to: bigint): { name: string; url: string }[] {
  mkdirSync(join(serveRoot, dir, 'wal'), { recursive: true });
  const out: { name: string; url: string }[] = [];
  for (const name of readdirSync(join(dataDir, 'pg_wal')).sort()) {
    const seg = parseSegmentFileName(name);
    if (!seg || seg.partial || seg.segno < segmentOf(from) || seg.segno > segmentOf(to)) continue;
    copyFileSync(join(dataDir, 'pg_wal', name), join(serveRoot, dir, 'wal', name));
    out.push({ name, url: `${base}/${dir}/wal/${name}` });
  }
  return out;
}

function plan(p: Partial<StartPlan> & Pick<StartPlan, 'mode' | 'lsn'> & { imageUrl: string; imageLsn: string; kind: 'shutdown' | 'backup' }): StartPlan {
  return {
    tenant_id: 'tn-test', timeline_id: 'br-test', lsn: p.lsn, mode: p.mode,
    image: { id: 'img-1', timeline_id: 'br-test', url: p.imageUrl, lsn: p.imageLsn, end_lsn: p.imageLsn, pg_timeline: 1, kind: p.kind, size: 0, created_at: new Date().toISOString() },
    wal: p.wal ?? [], restore_url: p.restore_url ?? '',
  };
}

function runScript(args: string[]): Promise<{ code: number | null; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [RESTORE_WAL_SCRIPT, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('close', (code) => resolve({ code, stderr }));
  });
}

// ---- the driver (computes as its own user, like production)
const dataRoot = join(root, 'driver');
mkdirSync(dataRoot, { mode: 0o755 });
const logDir = join(root, 'logs');
const portBase = 20000 + Math.floor(Math.random() * 400) * 100;
const driver = await ProcessDriver.create({
  pgBin: bin, dataRoot, logDir, runAs, portRange: [portBase, portBase + 99], freezer: 'signal', logger: silentLogger, readyTimeoutMs: 60_000,
});
t.teardown(() => driver.close());

// ---- the source histories, built once
/** An initdb image, then 2000 rows with a WAL segment switch among them, then a crash. */
const a = await (async () => {
  const dataDir = await newCluster('src-a');
  const imageUrl = publishImage(dataDir, 'a');
  const imageLsn = formatLsn((await readControlData(dataDir)).redo);
  const p = await startPg(dataDir, { wal_keep_size: '1GB' });
  await sql(p.port, 'CREATE TABLE t AS SELECT g AS x FROM generate_series(1, 1000) g');
  await sql(p.port, 'SELECT pg_switch_wal()');
  await sql(p.port, 'INSERT INTO t SELECT g FROM generate_series(1001, 2000) g');
  const [{ lsn }] = (await sql<{ lsn: string }>(p.port, 'SELECT pg_current_wal_insert_lsn()::text AS lsn')) as [{ lsn: string }];
  await p.stop('immediate');
  return { imageUrl, imageLsn, end: lsn, wal: publishWal(dataDir, 'a', parseLsn(imageLsn), parseLsn(lsn)) };
})();

/** An initdb image; 500 rows; M (mid-segment); a segment switch; 2000 more rows; a crash. */
const c = await (async () => {
  const dataDir = await newCluster('src-c');
  const imageUrl = publishImage(dataDir, 'c');
  const imageLsn = formatLsn((await readControlData(dataDir)).redo);
  const p = await startPg(dataDir, { wal_keep_size: '1GB' });
  await sql(p.port, 'CREATE TABLE t AS SELECT g AS x FROM generate_series(1, 500) g');
  const [{ lsn: mid }] = (await sql<{ lsn: string }>(p.port, 'SELECT pg_current_wal_insert_lsn()::text AS lsn')) as [{ lsn: string }];
  await sql(p.port, 'INSERT INTO t SELECT g FROM generate_series(501, 1500) g');
  await sql(p.port, 'SELECT pg_switch_wal()');
  await sql(p.port, 'INSERT INTO t SELECT g FROM generate_series(1501, 2500) g');
  const [{ lsn: end }] = (await sql<{ lsn: string }>(p.port, 'SELECT pg_current_wal_insert_lsn()::text AS lsn')) as [{ lsn: string }];
  await p.stop('immediate');
  return { imageUrl, imageLsn, mid, end, wal: publishWal(dataDir, 'c', parseLsn(imageLsn), parseLsn(end)) };
})();

t.test('crash mode from a shutdown image + later WAL, through ProcessDriver.start: all rows, same timeline', async (t) => {
  t.ok(a.wal.length >= 2, `${a.wal.length} WAL segments to download`);
  const p = plan({ mode: 'crash', lsn: a.end, imageUrl: a.imageUrl, imageLsn: a.imageLsn, kind: 'shutdown', wal: a.wal });
  t.equal(await driver.hasData('br-a'), false);
  const addr = await driver.start({ computeId: 'ep-a', dataKey: 'br-a', plan: p });
  const [row] = await sql<{ n: string; tli: number; rec: boolean }>(addr.port, 'SELECT (SELECT count(*) FROM t) AS n, (SELECT timeline_id FROM pg_control_checkpoint()) AS tli, pg_is_in_recovery() AS rec');
  t.same(row, { n: '2000', tli: 1, rec: false }, 'every row, timeline 1');

  await driver.stop('ep-a');

  // The data is kept: the next start uses it as it is (no plan needed).
  t.equal(await driver.hasData('br-a'), true);
  const again = await driver.start({ computeId: 'ep-a', dataKey: 'br-a' });
  const [row2] = await sql<{ n: string }>(again.port, 'SELECT count(*) AS n FROM t');
  t.equal(row2!.n, '2000', 'a restart from the local data');
  await driver.stop('ep-a');
});

t.test('crash mode from a base backup (backup_label, empty pg_wal) + its WAL: all rows, end of backup reached', async (t) => {
  const dataDir = await newCluster('src-b');
  const src = await startPg(dataDir, { wal_keep_size: '1GB' });
  await sql(src.port, 'CREATE TABLE t AS SELECT g AS x FROM generate_series(1, 1000) g');
  const out = join(root, 'b-backup');
  execFileSync(join(bin, 'pg_basebackup'), ['-h', '127.0.0.1', '-p', String(src.port), '-U', ADMIN.user, '-D', out, '-Ft', '-X', 'none', '-c', 'fast'], {
    env: { ...process.env, PGPASSWORD: ADMIN.password }, stdio: ['ignore', 'pipe', 'pipe'],
  });
  const label = execFileSync('tar', ['-x', '-O', '-f', join(out, 'base.tar'), 'backup_label'], { encoding: 'utf8' });
  const start = /START WAL LOCATION: ([0-9A-F]+\/[0-9A-F]+)/.exec(label)![1]!;
  await sql(src.port, 'INSERT INTO t SELECT g FROM generate_series(1001, 3000) g');
  const [{ lsn: end }] = (await sql<{ lsn: string }>(src.port, 'SELECT pg_current_wal_insert_lsn()::text AS lsn')) as [{ lsn: string }];
  await src.stop('immediate');
  mkdirSync(join(serveRoot, 'b'));
  copyFileSync(join(out, 'base.tar'), join(serveRoot, 'b', 'image.tar'));
  const wal = publishWal(dataDir, 'b', parseLsn(start), parseLsn(end));

  const target = join(root, 'b-target', 'pgdata');
  const r = await materialise({
    dataDir: target, runAs, logger: silentLogger,
    plan: plan({ mode: 'crash', lsn: end, imageUrl: `${base}/b/image.tar`, imageLsn: start, kind: 'backup', wal }),
  });
  t.same(r.settings, { recovery_init_sync_method: 'syncfs' }, 'crash mode needs no recovery settings: only one syncfs() of the new files before recovery');
  t.ok(r.bytes > WAL_SEGMENT_SIZE, `${r.bytes} bytes downloaded`);
  t.ok(existsSync(join(target, 'backup_label')), 'the backup label is kept');
  t.notOk(existsSync(join(target, 'recovery.signal')));
  const p = await startPg(target);
  const [row] = await sql<{ n: string; rec: boolean; tli: number }>(p.port, 'SELECT (SELECT count(*) FROM t) AS n, pg_is_in_recovery() AS rec, (SELECT timeline_id FROM pg_control_checkpoint()) AS tli');
  t.same(row, { n: '3000', rec: false, tli: 1 }, 'rows from before and after the backup, same timeline');
  t.ok(existsSync(join(target, 'backup_label.old')), 'recovery consumed the backup label');
  const [ctl] = await sql<{ backup_end_lsn: string }>(p.port, 'SELECT backup_end_lsn::text FROM pg_control_recovery()');
  t.equal(ctl!.backup_end_lsn, '0/0', 'end of backup reached');
  await p.stop('fast');
});

t.test('archive mode: recovery ends where the served WAL ends (mid-segment), promotes to timeline 2', async (t) => {
  requests.length = 0;
  const p = plan({ mode: 'archive', lsn: c.mid, imageUrl: c.imageUrl, imageLsn: c.imageLsn, kind: 'shutdown', restore_url: `${base}/c/wal/` });
  // spec.wal must be ignored in archive mode: this source has no safekeeper and would fail.
  const addr = await driver.start({ computeId: 'ep-c', dataKey: 'br-c', plan: p, wal: { timelineId: 'br-c', upTo: c.end, safekeepers: [] } });
  const [row] = await sql<{ n: string; rec: boolean; seg: string }>(addr.port, 'SELECT (SELECT count(*) FROM t) AS n, pg_is_in_recovery() AS rec, pg_walfile_name(pg_current_wal_lsn()) AS seg');
  t.same({ n: row!.n, rec: row!.rec }, { n: '500', rec: false }, 'rows up to the target only, promoted');
  t.equal(row!.seg.slice(0, 8), '00000002', 'writing on timeline 2');
  await sql(addr.port, 'CHECKPOINT');
  const [ck] = await sql<{ tli: number }>(addr.port, 'SELECT timeline_id AS tli FROM pg_control_checkpoint()');
  t.equal(ck!.tli, 2, 'the checkpoint is on timeline 2');
  const dataDir = join(dataRoot, 'computes', 'br-c', 'pgdata');
  t.notOk(existsSync(join(dataDir, 'recovery.signal')), 'recovery finished');
  t.ok(requests.some((r) => r.startsWith('/c/wal/000000010000000000000001?upto=')), 'WAL came through restore_command with upto');
  t.ok(requests.every((r) => !r.startsWith('/c/wal/') || r.endsWith(`upto=${encodeURIComponent(c.mid)}`)), 'every fetch carries the target');
  t.ok(existsSync(join(dataRoot, 'computes', 'br-c', 'restore-wal.js')), 'the script sits next to the data dir');
  // It is writable and stays on timeline 2 after a restart from the local data.
  await sql(addr.port, 'INSERT INTO t VALUES (-1)');
  await driver.stop('ep-c');
  const again = await driver.start({ computeId: 'ep-c', dataKey: 'br-c' });
  const [row2] = await sql<{ n: string }>(again.port, 'SELECT count(*) AS n FROM t');
  t.equal(row2!.n, '501');
  await driver.stop('ep-c');
});

t.test('archive mode: a start cut short before the promotion (host crash) is materialised again, not started as it is', async (t) => {
  const p = plan({ mode: 'archive', lsn: c.mid, imageUrl: c.imageUrl, imageLsn: c.imageLsn, kind: 'shutdown', restore_url: `${base}/c/wal/` });
  // What a crash in the middle of the archive recovery leaves: the materialised directory, with
  // recovery.signal, and none of the recovery settings (they are never persisted).
  const dataDir = join(dataRoot, 'computes', 'br-cut', 'pgdata');
  await materialise({ dataDir, plan: p, runAs, logger: silentLogger });
  t.ok(existsSync(join(dataDir, 'PG_VERSION')) && existsSync(join(dataDir, 'recovery.signal')));
  t.equal(await driver.hasData('br-cut'), false, 'not usable data: the start must be planned again');
  const addr = await driver.start({ computeId: 'ep-cut', dataKey: 'br-cut', plan: p });
  const [row] = await sql<{ n: string; rec: boolean }>(addr.port, 'SELECT (SELECT count(*) FROM t) AS n, pg_is_in_recovery() AS rec');
  t.same(row, { n: '500', rec: false }, 'materialised again and promoted');
  t.equal(await driver.hasData('br-cut'), true, 'a promoted directory is data');
  await driver.stop('ep-cut');
});

t.test('archive mode: a 500 for a needed segment fails the start loudly and leaves no data behind', async (t) => {
  const last = c.wal[c.wal.length - 1]!;
  t.ok(c.wal.length >= 2, 'the failing segment is not the first one');
  failing.set(`/c/wal/${last.name}`, 'PS_WAL_MISSING');
  t.teardown(() => failing.clear());
  const p = plan({ mode: 'archive', lsn: c.end, imageUrl: c.imageUrl, imageLsn: c.imageLsn, kind: 'shutdown', restore_url: `${base}/c/wal/` });
  const logFile = join(logDir, 'ep-d.log');
  await t.rejects(driver.start({ computeId: 'ep-d', dataKey: 'br-d', plan: p }), { code: 'CP_COMPUTE_START_FAILED', message: new RegExp(`compute log: ${logFile.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}`) });
  const log = readFileSync(logFile, 'utf8');
  t.match(log, /xenon restore-wal: GET .* HTTP 500 .*PS_WAL_MISSING/, 'the reason is in the compute log');
  t.match(log, /FATAL/, 'Postgres aborted recovery');
  t.notMatch(log, /database system is ready to accept connections/, 'it never promoted');
  t.equal(await driver.hasData('br-d'), false, 'the half-made data dir was removed');
  t.notOk(existsSync(join(dataRoot, 'computes', 'br-d', 'pgdata')));
  t.equal(driver.status('ep-d'), 'stopped');
});

t.test('refusals and download failures', async (t) => {
  const dir = join(root, 'e', 'pgdata');
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, 'keep-me'), 'x');
  const p = plan({ mode: 'crash', lsn: a.end, imageUrl: a.imageUrl, imageLsn: a.imageLsn, kind: 'shutdown', wal: a.wal });
  await t.rejects(materialise({ dataDir: dir, plan: p, runAs, logger: silentLogger }), { code: 'CP_CONFLICT', message: /not empty/ });
  t.equal(readFileSync(join(dir, 'keep-me'), 'utf8'), 'x', 'the existing directory is untouched');

  const fresh = join(root, 'e2', 'pgdata');
  failing.set('/a/image.tar', 'PS_IMAGE_MISSING');
  await t.rejects(materialise({ dataDir: fresh, plan: p, runAs, logger: silentLogger }), { code: 'PS_IMAGE_MISSING' }, 'the pageserver\'s error code comes through');
  failing.clear();
  t.notOk(existsSync(fresh), 'nothing left behind');
  await t.rejects(
    materialise({ dataDir: fresh, plan: { ...p, wal: [...p.wal, { name: '0000000100000000000000FF', url: `${base}/a/wal/0000000100000000000000FF` }] }, runAs, logger: silentLogger }),
    { code: 'PS_WAL_NOT_FOUND', message: /HTTP 404/ },
    'a WAL file the plan lists and the server lacks',
  );
  t.notOk(existsSync(fresh), 'nothing left behind');
  await t.rejects(materialise({ dataDir: fresh, plan: { ...p, wal: [{ name: '../../etc/passwd', url: a.imageUrl }] }, runAs, logger: silentLogger }), { code: 'CP_BAD_REQUEST' });
  await t.rejects(materialise({ dataDir: fresh, plan: { ...p, image: { ...p.image, url: `${base}/cut/image.tar` } }, runAs, logger: silentLogger }), { code: 'PS_UNAVAILABLE', message: /downloading image .* failed after/ }, 'a connection lost mid-image');
  t.notOk(existsSync(fresh), 'nothing left behind');
  writeFileSync(join(serveRoot, 'not-a-tar'), 'hello, this is not a tar file at all'.repeat(100));
  await t.rejects(materialise({ dataDir: fresh, plan: { ...p, image: { ...p.image, url: `${base}/not-a-tar` } }, runAs, logger: silentLogger }), { code: 'CP_COMPUTE_START_FAILED', message: /tar -x/ });
  t.notOk(existsSync(fresh), 'nothing left behind');
});

t.test('restore-wal.js exit codes: 0 with the file, 1 on 404, 200 on anything else', async (t) => {
  const dest = join(root, 'restore-dest');
  const seg = a.wal[0]!.name;
  const ok = await runScript([`${base}/a/wal/`, seg, dest, a.end]);
  t.equal(ok.code, 0, ok.stderr);
  t.same(readFileSync(dest), readFileSync(join(serveRoot, 'a', 'wal', seg)), 'the bytes as served');
  t.notOk(existsSync(`${dest}.tmp`));
  t.equal((await runScript([`${base}/a/wal/`, '00000002.history', dest, a.end])).code, 1, '404: not in the archive');
  const misrouted = await runScript([`${base}/no-such-timeline/`, '00000002.history', dest, a.end]);
  t.equal(misrouted.code, 200, 'a 404 that is not the resolver\'s "no such file" (unknown timeline, wrong route) aborts recovery');
  t.match(misrouted.stderr, /HTTP 404/);
  failing.set(`/a/wal/${seg}`, 'PS_WAL_MISSING');
  const err = await runScript([`${base}/a/wal/`, seg, dest, a.end]);
  failing.clear();
  t.equal(err.code, 200);
  t.match(err.stderr, /HTTP 500.*PS_WAL_MISSING/);
  const refused = await runScript([`http://127.0.0.1:${await findFreePort(40000, 49999)}/`, seg, dest, a.end]);
  t.equal(refused.code, 200);
  t.match(refused.stderr, /ECONNREFUSED/);
  const short = await runScript([`${base}/`, 'short', dest, a.end]);
  t.equal(short.code, 200, 'a short body');
  const tooSmall = join(serveRoot, 'a', 'wal', '000000010000000000000099');
  writeFileSync(tooSmall, Buffer.alloc(100));
  const small = await runScript([`${base}/a/wal/`, '000000010000000000000099', dest, 'FF/0']);
  t.equal(small.code, 200, 'a segment of the wrong size');
  t.match(small.stderr, /expected 16777216/);
});
