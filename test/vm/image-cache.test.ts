/**
 * vm/image-cache.ts on a real XFS with reflink (loop-mounted) and on this machine's ext4:
 * data directories cloned from one cached image share its blocks, start as real Postgres, and
 * writes in one never reach the cache or another; one download per image however many ask;
 * a broken download leaves nothing; LRU eviction; reopening drops half-made entries; ext4 turns
 * the cache off and materialise() keeps its tar path.
 */
import { execFileSync } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statfsSync, statSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createHash, randomBytes } from 'node:crypto';
import pg from 'pg';
import t from 'tap';
import { silentLogger } from '../../lib/logger.ts';
import { findFreePort, findPgBin, initdb, pgRunAs, PostgresProcess } from '../../lib/postgres.ts';
import type { StartPlan } from '../../pageserver/api.ts';
import { canReflink, ImageCache, imageKey, walKey } from '../../vm/image-cache.ts';
import { materialise } from '../../vm/materialise.ts';
import { mountXfs, xfsUnavailable } from '../helpers/xfs.ts';
import { waitFor } from '../helpers/stack.ts';

const bin = findPgBin(process.env);
const runAs = pgRunAs(process.env);
const ADMIN = { user: 'admin', password: 'admin-pw' };

const root = mkdtempSync(join(tmpdir(), 'xenon-image-cache-'));
chmodSync(root, 0o755);
t.teardown(() => rmSync(root, { recursive: true, force: true }));
const procs: PostgresProcess[] = [];
t.teardown(async () => { for (const p of procs) await p.stop('immediate'); });

// ---- images served over HTTP, counting requests per path; /cut/* drops mid-body
const served = new Map<string, Buffer>();
const hits = new Map<string, number>();
const server = createServer((req, res) => {
  const path = new URL(req.url ?? '/', 'http://x').pathname;
  hits.set(path, (hits.get(path) ?? 0) + 1);
  const body = served.get(path.replace(/^\/cut/, ''));
  if (!body) { res.writeHead(404); res.end(); return; }
  res.writeHead(200, { 'content-length': String(body.length) });
  if (path.startsWith('/cut/')) {
    res.write(body.subarray(0, 256 * 1024));
    setTimeout(() => res.socket?.destroy(), 30);
    return;
  }
  // slowly enough that concurrent callers overlap
  setTimeout(() => res.end(body), 100);
});
await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
t.teardown(() => new Promise<void>((r) => { server.closeAllConnections(); server.close(() => r()); }));
const base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;

/** A shut-down cluster with table t (n rows) as a tar image. */
async function makeImage(name: string, rows: number): Promise<StartPlan['image']> {
  const dataDir = join(root, 'src', name);
  await initdb({ bin, dataDir, superuser: ADMIN.user, password: ADMIN.password, runAs, noSync: true });
  const p = await PostgresProcess.start({ bin, dataDir, port: await findFreePort(30000, 39999), runAs, logFile: `${dataDir}.log`, readyTimeoutMs: 60_000 });
  await sql(p.port, `CREATE TABLE t AS SELECT g AS x, repeat('y', 200) AS pad FROM generate_series(1, ${rows}) g`);
  await p.stop('fast');
  const tar = execFileSync('tar', ['-c', '-f', '-', '-C', dataDir, '.'], { maxBuffer: 1 << 30 });
  served.set(`/${name}.tar`, tar);
  return { id: `img-${name}`, timeline_id: 'br-src', url: `${base}/${name}.tar`, lsn: '0/0', end_lsn: '0/0', pg_timeline: 1, kind: 'shutdown', size: tar.length, created_at: new Date().toISOString() };
}

async function sql<R extends pg.QueryResultRow>(port: number, text: string): Promise<R[]> {
  const c = new pg.Client({ host: '127.0.0.1', port, ...ADMIN, database: 'postgres' });
  await c.connect();
  try { return (await c.query<R>(text)).rows; } finally { await c.end(); }
}

function crashPlan(image: StartPlan['image']): StartPlan {
  return { tenant_id: 'tn-test', timeline_id: 'br-test', lsn: '0/0', mode: 'crash', image, wal: [], restore_url: '' };
}

const sha = (path: string): string => createHash('sha256').update(readFileSync(path)).digest('hex');
const usedBytes = (dir: string): number => { const s = statfsSync(dir); return (s.blocks - s.bfree) * s.bsize; };

const big = await makeImage('big', 60_000); // ~16 MB of table

t.test('ext4 (this machine\'s disk): no reflink, the cache is off and materialise() extracts as before', async (t) => {
  const dir = join(root, 'ext4-cache');
  t.equal(await canReflink(root), false, 'ext4 does not clone files');
  const cache = await ImageCache.open({ dir, runAs, logger: silentLogger, maxBytes: 1 << 30 });
  t.equal(cache.enabled, false);
  t.equal(existsSync(dir), false, 'nothing kept on a file system where it would be a second full copy');
  await t.rejects(cache.ensure(big), { code: 'CP_COMPUTE_START_FAILED' });
  t.equal(await cache.warm({ image: big, wal: [] }), false);
  mkdirSync(join(root, 'ext4-computes'), { mode: 0o755 });
  const dataDir = join(root, 'ext4-computes', 'a', 'pgdata');
  const r = await materialise({ dataDir, plan: crashPlan(big), runAs, logger: silentLogger, cache });
  t.equal(r.cache, 'off');
  t.equal(r.bytes, big.size, 'the image was streamed');
  t.ok(existsSync(join(dataDir, 'PG_VERSION')));
});

t.test('XFS with reflink', { skip: xfsUnavailable() }, async (t) => {
  const xfs = mountXfs(4);
  t.teardown(() => xfs.close());
  const cacheDir = join(xfs.dir, 'image-cache');
  const computes = join(xfs.dir, 'computes');
  mkdirSync(computes, { mode: 0o755 });
  t.equal(await canReflink(xfs.dir), true);

  let cache = await ImageCache.open({ dir: cacheDir, runAs, logger: silentLogger, maxBytes: 1 << 30 });
  t.equal(cache.enabled, true);

  t.test('two clones of one image: one download, shared blocks, independent data', async (t) => {
    hits.clear();
    const before = usedBytes(xfs.dir);
    const [a, b] = await Promise.all([
      materialise({ dataDir: join(computes, 'a', 'pgdata'), plan: crashPlan(big), runAs, logger: silentLogger, cache }),
      materialise({ dataDir: join(computes, 'b', 'pgdata'), plan: crashPlan(big), runAs, logger: silentLogger, cache }),
    ]);
    t.equal(hits.get('/big.tar'), 1, 'the image was downloaded once for both');
    t.same([a.cache, b.cache], ['miss', 'miss'], 'neither found it cached: one fetched it, the other waited for that download');
    t.equal(a.bytes + b.bytes, big.size, 'one of them fetched it, the other waited for the same download');
    t.ok(cache.has(big));
    const grown = usedBytes(xfs.dir) - before;
    t.ok(grown < big.size * 1.5, `cache + two data directories take ${(grown / 1048576).toFixed(1)} MB for a ${(big.size / 1048576).toFixed(1)} MB image (blocks shared)`);

    const c = await materialise({ dataDir: join(computes, 'c', 'pgdata'), plan: crashPlan(big), runAs, logger: silentLogger, cache });
    t.equal(c.cache, 'hit');
    t.equal(c.bytes, 0);
    t.equal(hits.get('/big.tar'), 1, 'no download on a hit');

    const cached = join(cacheDir, imageKey(big));
    const controlBefore = sha(join(cached, 'global', 'pg_control'));
    for (const f of ['postmaster.pid', 'recovery.signal']) t.notOk(existsSync(join(cached, f)), `the cache entry has no ${f}`);
    const pa = await PostgresProcess.start({ bin, dataDir: join(computes, 'a', 'pgdata'), port: await findFreePort(30000, 39999), runAs, logFile: join(root, 'a.log'), readyTimeoutMs: 60_000 });
    procs.push(pa);
    t.same(await sql(pa.port, 'SELECT count(*)::int AS n FROM t'), [{ n: 60_000 }], 'every row of the image');
    await sql(pa.port, 'UPDATE t SET pad = \'changed\'; CHECKPOINT');
    await pa.stop('fast');
    const pb = await PostgresProcess.start({ bin, dataDir: join(computes, 'b', 'pgdata'), port: await findFreePort(30000, 39999), runAs, logFile: join(root, 'b.log'), readyTimeoutMs: 60_000 });
    procs.push(pb);
    t.same(await sql(pb.port, `SELECT count(*)::int AS n FROM t WHERE pad = 'changed'`), [{ n: 0 }], 'writes in one clone are not in another');
    await pb.stop('fast');
    t.equal(sha(join(cached, 'global', 'pg_control')), controlBefore, 'the cached image is untouched');
    t.notOk(readdirSync(cached).includes('postmaster.pid'));
  });

  t.test('a spare clone made ahead is renamed into place, and made again', async (t) => {
    const spared = await ImageCache.open({ dir: cacheDir, runAs, logger: silentLogger, maxBytes: 1 << 30, spareRefillDelayMs: 50 });
    t.equal(spared.stats().spares, 0, 'none after opening');
    t.equal(await spared.warm({ image: big, wal: [] }), true);
    t.equal(spared.stats().spares, 1, 'the warm-up made one');
    const dataDir = join(computes, 'spare', 'pgdata');
    const r = await materialise({ dataDir, plan: crashPlan(big), runAs, logger: silentLogger, cache: spared });
    t.equal(r.cache, 'hit');
    t.equal(spared.stats().spares, 0, 'taken by the start');
    t.ok(existsSync(join(dataDir, 'PG_VERSION')) && existsSync(join(dataDir, 'base')), 'the image\'s files');
    t.equal(statSync(dataDir).mode & 0o777, 0o700);
    t.ok(await waitFor(() => spared.stats().spares === 1, 10_000), 'a new spare is made a little later');
    await spared.close();
    cache = spared;
  });

  t.test('a download that breaks leaves nothing behind', async (t) => {
    const cut = { ...big, id: 'img-cut', url: `${base}/cut/big.tar` };
    const dataDir = join(computes, 'cut', 'pgdata');
    await t.rejects(materialise({ dataDir, plan: crashPlan(cut), runAs, logger: silentLogger, cache }), { code: 'PS_UNAVAILABLE' });
    t.notOk(cache.has(cut));
    t.same(readdirSync(cacheDir).filter((n) => n.includes('img-cut')), [], 'no entry, no temporary directory');
    t.notOk(existsSync(dataDir), 'no half-made data directory');
  });

  t.test('least recently used entries go past the bound', async (t) => {
    const small1 = await makeImage('small1', 10);
    const small2 = await makeImage('small2', 10);
    const bounded = await ImageCache.open({ dir: cacheDir, runAs, logger: silentLogger, maxBytes: big.size + small1.size + 1024 });
    t.ok(bounded.has(big), 'reopened: the entry from before is there');
    await bounded.ensure(small1);
    t.ok(bounded.has(big) && bounded.has(small1), 'within the bound');
    await bounded.ensure(small2);
    t.notOk(bounded.has(big), 'the least recently used one went');
    t.ok(bounded.has(small1) && bounded.has(small2));
    t.notOk(existsSync(join(cacheDir, imageKey(big))), 'and its files');
    t.ok(bounded.stats().bytes <= big.size + small1.size + 1024);
    cache = bounded;
  });

  t.test('reopening drops half-made entries', async (t) => {
    mkdirSync(join(cacheDir, '.tmp-br-x.img-y-0000'));
    mkdirSync(join(cacheDir, 'br-x.img-nometa'));
    writeFileSync(join(cacheDir, 'br-x.img-orphan.json'), '{"bytes":1}');
    writeFileSync(join(cacheDir, 'br-x.img-badmeta.json'), 'not json');
    mkdirSync(join(cacheDir, 'br-x.img-badmeta'));
    const reopened = await ImageCache.open({ dir: cacheDir, runAs, logger: silentLogger, maxBytes: 1 << 30 });
    t.same(readdirSync(cacheDir).filter((n) => n.includes('br-x')), [], 'all removed');
    t.equal(reopened.stats().entries, 2, 'the complete entries stay');
  });

  t.test('WAL files that never change are kept and cloned; masked ones are not; none outlives a reopen', async (t) => {
    const segName = '000000010000000000000002';
    const seg = randomBytes(16 * 1024 * 1024);
    served.set(`/wal/${segName}`, seg);
    served.set('/wal/00000002.history', Buffer.from('1\t0/3000000\tno recovery target specified\n'));
    const whole = { name: segName, url: `${base}/wal/${segName}`, owner: 'br-src', valid_to: '0/3000000' };
    const masked = { ...whole, valid_to: '0/2800000' };
    const history = { name: '00000002.history', url: `${base}/wal/00000002.history`, owner: 'br-src' };
    t.equal(walKey(whole), `wal/br-src.${segName}`);
    t.equal(walKey(history), 'wal/br-src.00000002.history');
    t.equal(walKey(masked), undefined, 'a masked segment changes with the target');
    t.equal(walKey({ name: segName, url: whole.url, valid_to: '0/3000000' }), undefined, 'no owner: no identity');
    t.equal(walKey({ ...whole, owner: '../x' }), undefined);
    t.equal(walKey({ ...whole, name: 'backup_label' }), undefined);

    hits.clear();
    t.equal(await cache.warm({ image: big, wal: [whole, masked, history] }), true);
    t.equal(hits.get(`/wal/${segName}`), 1, 'the whole segment was fetched ahead (the masked one is left for the start)');
    t.equal(hits.get('/wal/00000002.history'), 1);

    // A crash-mode start whose WAL is cached: cloned into pg_wal, nothing downloaded.
    const dataDir = join(computes, 'walhit', 'pgdata');
    const r = await materialise({ dataDir, plan: { ...crashPlan(big), wal: [history, whole] }, runAs, logger: silentLogger, cache });
    t.equal(r.bytes, 0, 'no byte downloaded: image and WAL came from the cache');
    t.equal(hits.get(`/wal/${segName}`), 1);
    t.ok(readFileSync(join(dataDir, 'pg_wal', segName)).equals(seg), 'the very bytes');
    const st = statSync(join(dataDir, 'pg_wal', segName));
    t.equal(st.uid, runAs?.uid ?? process.getuid!(), 'owned by the compute\'s user');
    t.ok(cache.stats().walHits >= 2);

    const reopened = await ImageCache.open({ dir: cacheDir, runAs, logger: silentLogger, maxBytes: 1 << 30 });
    t.notOk(await reopened.copyWal(whole, join(root, 'nope'), runAs), 'WAL copies are dropped when the cache opens');
    t.same(readdirSync(join(cacheDir, 'wal')), []);
    cache = reopened;
  });

  t.test('unsafe image references are refused', async (t) => {
    await t.rejects(cache.ensure({ ...big, id: '../../etc' }), { code: 'CP_BAD_REQUEST' });
    await t.rejects(cache.ensure({ ...big, timeline_id: 'a/b' }), { code: 'CP_BAD_REQUEST' });
  });
});
