// Every pageserver route over real HTTP (in-process server on port 0, LocalObjectStore in a temp
// dir), through PageserverClient and raw fetch: good paths and bad input (malformed ids/LSNs,
// unknown tenant/timeline/ancestor, LSN checks, a corrupt index.json → 500 PS_INDEX_CORRUPT with
// nothing deleted, a listed image missing → 500 PS_IMAGE_MISSING), /metrics, /healthz, and
// `node pageserver/main.ts` as a process.
import t from 'tap';
import { spawn } from 'node:child_process';
import { join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { Readable } from 'node:stream';
import { silentLogger } from '../../lib/logger.ts';
import { segmentFileName, WAL_SEGMENT_SIZE } from '../../lib/lsn.ts';
import { PageserverClient } from '../../pageserver/client.ts';
import { loadPageserverConfig, startPageserver, type PageserverDeps } from '../../pageserver/index.ts';
import { LocalObjectStore } from '../../pageserver/objectstore.ts';
import { keys } from '../../pageserver/types.ts';
import { at, FakePeer, L, rejectsCode, segment, tempDir } from './core-helpers.ts';

const ROOT = resolve(import.meta.dirname, '..', '..');

async function start(t: Parameters<typeof tempDir>[0], deps: Partial<PageserverDeps> = {}) {
  const objects = tempDir(t, 'ps-objects-');
  const config = loadPageserverConfig({
    XENON_PAGESERVER_PORT: '0',
    XENON_PAGESERVER_STORAGE: objects,
    XENON_PAGESERVER_DIR: tempDir(t, 'ps-dir-'),
    XENON_PAGESERVER_GC_INTERVAL_SECONDS: '0',
    XENON_PAGESERVER_PITR_WINDOW_SECONDS: '60',
  }, []);
  const peer = new FakePeer();
  const ps = await startPageserver(config, { logger: silentLogger, startIngest: null, startImager: null, peers: [peer], ...deps });
  t.teardown(() => ps.close());
  const store = new LocalObjectStore(objects);
  return { ps, peer, store, c: new PageserverClient(ps.url) };
}

async function raw(url: string, init: RequestInit = {}): Promise<{ status: number; json: any }> {
  const res = await fetch(url, init);
  const text = await res.text();
  let json: unknown;
  try { json = JSON.parse(text); } catch { json = text; }
  return { status: res.status, json };
}

const initdbMeta = { lsn: L(at(1, 40)), end_lsn: L(at(1, 140)), pg_timeline: 1, kind: 'shutdown' as const };

t.test('tenants, timelines, images, branches, status, delete', async (t) => {
  const { ps, c, store } = await start(t);
  // Tenants.
  let r = await raw(`${ps.url}/v1/tenant`, { method: 'POST', body: JSON.stringify({ tenant_id: 'p1' }) });
  t.same([r.status, r.json], [201, { tenant_id: 'p1' }]);
  r = await raw(`${ps.url}/v1/tenant`, { method: 'POST', body: JSON.stringify({ tenant_id: 'p1' }) });
  t.equal(r.status, 200, 'existing tenant: 200');
  for (const body of ['{"tenant_id":"Bad_Id"}', '{}', '[]', 'not json', '{"tenant_id":"' + 'a'.repeat(70) + '"}']) {
    r = await raw(`${ps.url}/v1/tenant`, { method: 'POST', body });
    t.same([r.status, r.json.error?.code], [400, 'CP_BAD_REQUEST'], `bad tenant body ${body.slice(0, 30)}`);
  }
  // Root timeline.
  const main = await c.createTimeline('p1', { new_timeline_id: 'main' });
  t.match(main, { tenant_id: 'p1', timeline_id: 'main', ancestor_timeline_id: null, last_record_lsn: '0/0', images: [], wal_range: null, compute_attached: false });
  await rejectsCode(t, c.createTimeline('p1', { new_timeline_id: 'main' }), 'PS_TIMELINE_EXISTS');
  await rejectsCode(t, c.createTimeline('nope', { new_timeline_id: 'main' }), 'PS_TIMELINE_NOT_FOUND', 'unknown tenant');
  await rejectsCode(t, c.createTimeline('p1', { new_timeline_id: '-bad' }), 'CP_BAD_REQUEST');
  await rejectsCode(t, c.createTimeline('p1', { new_timeline_id: 'x', ancestor_start_lsn: '0/1' }), 'CP_BAD_REQUEST', 'an LSN without an ancestor');
  await rejectsCode(t, c.createTimeline('p1', { new_timeline_id: 'x', ancestor_timeline_id: 'main', ancestor_start_lsn: 'zz' }), 'CP_BAD_REQUEST', 'a malformed LSN');
  await rejectsCode(t, c.createTimeline('p1', { new_timeline_id: 'x', ancestor_timeline_id: 'main', ancestor_start_lsn: '0/1', ancestor_start_time: new Date().toISOString() }), 'CP_BAD_REQUEST', 'both lsn and time');
  await rejectsCode(t, c.createTimeline('p1', { new_timeline_id: 'x', ancestor_timeline_id: 'main', ancestor_start_time: 'soon' }), 'CP_BAD_REQUEST', 'a malformed time');
  await rejectsCode(t, c.createTimeline('p1', { new_timeline_id: 'x', ancestor_timeline_id: 'nope' }), 'PS_ANCESTOR_NOT_FOUND');
  await rejectsCode(t, c.createTimeline('p1', { new_timeline_id: 'x', ancestor_timeline_id: 'main' }), 'PS_NO_IMAGE', 'a root before its image');

  // Image upload: bad parameters first.
  const tar = Buffer.alloc(100_000, 7);
  const put = (q: string, body: BodyInit = tar) => raw(`${ps.url}/v1/tenant/p1/timeline/main/image?${q}`, { method: 'PUT', body });
  for (const q of ['end_lsn=0/2&pg_timeline=1&kind=backup', 'lsn=x&end_lsn=0/2&pg_timeline=1&kind=backup', 'lsn=0/3&end_lsn=0/2&pg_timeline=1&kind=backup',
    'lsn=0/1&end_lsn=0/2&pg_timeline=0&kind=backup', 'lsn=0/1&end_lsn=0/2&pg_timeline=1&kind=other', 'lsn=0/1&end_lsn=0/2&pg_timeline=1']) {
    r = await put(q);
    t.same([r.status, r.json.error?.code], [400, 'CP_BAD_REQUEST'], `bad image params ${q}`);
  }
  r = await raw(`${ps.url}/v1/tenant/p1/timeline/nope/image?lsn=0/1&end_lsn=0/2&pg_timeline=1&kind=backup`, { method: 'PUT', body: tar });
  t.same([r.status, r.json.error?.code], [404, 'PS_TIMELINE_NOT_FOUND']);
  r = await put('lsn=0/1&end_lsn=0/2&pg_timeline=1&kind=backup', Buffer.alloc(0));
  t.same([r.status, r.json.error?.code], [400, 'CP_BAD_REQUEST'], 'empty image');
  t.same((await store.list(keys.timeline('p1', 'main') + 'images/')), [], 'nothing left of refused uploads');
  // A streamed upload.
  const img = await c.uploadImage('p1', 'main', Readable.from([tar.subarray(0, 50_000), tar.subarray(50_000)]), initdbMeta);
  t.match(img, { lsn: initdbMeta.lsn, end_lsn: initdbMeta.end_lsn, pg_timeline: 1, kind: 'shutdown', size: tar.length });
  t.match(img.id, /^0000000001000028-[0-9a-f]{6}$/);
  const st = await c.timeline('p1', 'main');
  t.equal(st?.last_record_lsn, initdbMeta.end_lsn, 'a root\'s tip moves to its first image');
  t.equal(st?.size_bytes, tar.length);
  // Download.
  const dl = await c.downloadImage('p1', 'main', img.id);
  t.equal(dl.headers.get('content-type'), 'application/x-tar');
  t.same(Buffer.from(await dl.arrayBuffer()), tar);
  r = await raw(`${ps.url}/v1/tenant/p1/timeline/main/image/nope`);
  t.same([r.status, r.json.error?.code], [404, 'PS_IMAGE_NOT_FOUND']);

  // Branches.
  await rejectsCode(t, c.createTimeline('p1', { new_timeline_id: 'x', ancestor_timeline_id: 'main', ancestor_start_lsn: L(at(1, 141)) }), 'PS_LSN_PAST_TIP');
  await rejectsCode(t, c.createTimeline('p1', { new_timeline_id: 'x', ancestor_timeline_id: 'main', ancestor_start_lsn: L(at(1, 100)) }), 'PS_NO_IMAGE', 'before the image is consistent');
  await rejectsCode(t, c.createTimeline('p1', { new_timeline_id: 'x', ancestor_timeline_id: 'main', ancestor_start_lsn: '0/10' }), 'PS_LSN_BEFORE_GC_CUTOFF', 'before the timeline starts');
  const t0 = performance.now();
  const br = await c.createTimeline('p1', { new_timeline_id: 'br', ancestor_timeline_id: 'main' });
  const ms = performance.now() - t0;
  t.ok(ms < 500, `branch creation is metadata only (${ms.toFixed(1)} ms)`);
  t.match(br, { timeline_id: 'br', ancestor_timeline_id: 'main', ancestor_lsn: initdbMeta.end_lsn, last_record_lsn: initdbMeta.end_lsn, gc_cutoff_lsn: initdbMeta.end_lsn });
  t.same((await store.list(keys.timeline('p1', 'br'))).map((o) => o.key), [keys.index('p1', 'br')], 'only index.json written');
  const br2 = await c.createTimeline('p1', { new_timeline_id: 'br2', ancestor_timeline_id: 'br', ancestor_start_lsn: initdbMeta.end_lsn });
  t.equal(br2.ancestor_lsn, initdbMeta.end_lsn);
  t.same((await c.timeline('p1', 'main'))?.retained_lsns, [initdbMeta.end_lsn], 'the child\'s branch point is retained');
  t.same((await c.listTimelines('p1')).map((s) => s.timeline_id), ['br', 'br2', 'main']);
  t.equal(await c.timeline('p1', 'nope'), null);
  r = await raw(`${ps.url}/v1/tenant/p1/timeline/Bad`);
  t.same([r.status, r.json.error?.code], [400, 'CP_BAD_REQUEST']);
  r = await raw(`${ps.url}/v1/tenant/zz/timeline`);
  t.same([r.status, r.json.error?.code], [404, 'PS_TIMELINE_NOT_FOUND'], 'listing an unknown tenant');

  // Start plans.
  const plan = await c.startPlan('p1', 'main');
  t.match(plan, { mode: 'crash', lsn: initdbMeta.end_lsn, wal: [], image: { id: img.id, timeline_id: 'main', url: `${ps.url}/v1/tenant/p1/timeline/main/image/${img.id}` } });
  const bplan = await c.startPlan('p1', 'br2');
  t.match(bplan, { mode: 'archive', image: { timeline_id: 'main' }, restore_url: `${ps.url}/v1/tenant/p1/timeline/br2/wal/` });
  r = await raw(`${ps.url}/v1/tenant/p1/timeline/main/start?lsn=12`);
  t.same([r.status, r.json.error?.code], [400, 'CP_BAD_REQUEST']);
  await rejectsCode(t, c.startPlan('p1', 'main', L(at(2))), 'PS_LSN_PAST_TIP');
  await rejectsCode(t, c.startPlan('p1', 'nope'), 'PS_TIMELINE_NOT_FOUND');

  // Missing image object → 500 on download and plan.
  await store.delete(keys.image('p1', 'main', img.id));
  r = await raw(`${ps.url}/v1/tenant/p1/timeline/main/image/${img.id}`);
  t.same([r.status, r.json.error?.code], [500, 'PS_IMAGE_MISSING']);
  await rejectsCode(t, c.startPlan('p1', 'br2'), 'PS_IMAGE_MISSING');

  // Deletes.
  await rejectsCode(t, c.deleteTimeline('p1', 'main'), 'PS_TIMELINE_HAS_CHILDREN');
  await c.deleteTimeline('p1', 'br2');
  await c.deleteTimeline('p1', 'br');
  await c.deleteTimeline('p1', 'main');
  await rejectsCode(t, c.deleteTimeline('p1', 'main'), 'PS_TIMELINE_NOT_FOUND');
  await c.deleteTenant('p1');
  await rejectsCode(t, c.deleteTenant('p1'), 'PS_TIMELINE_NOT_FOUND');
  t.same(await store.list(''), []);
});

t.test('WAL resolver route, leases, GC, computes, images made now, LSN by time', async (t) => {
  const made: string[] = [];
  const { ps, c, store, peer } = await start(t, {
    makeImage: async (o) => {
      made.push(`${o.tenantId}/${o.timelineId}@${o.compute.host}:${o.compute.port}`);
      return { id: 'made', lsn: '0/1', end_lsn: '0/1', pg_timeline: 1, kind: 'backup', size: 0, created_at: new Date().toISOString() };
    },
    lsnByTime: async (o) => {
      t.equal(typeof o.fetchSegment, 'function');
      return o.time.getTime() < Date.parse('2000-01-01') ? 0x10n : at(1, 140);
    },
  });
  await c.createTenant('p');
  await c.createTimeline('p', { new_timeline_id: 'main' });
  await c.uploadImage('p', 'main', Buffer.from('tar'), initdbMeta);
  // Give main WAL: segment 1 stored, segment 2 on a safekeeper.
  await store.put(keys.wal('p', 'main', segmentFileName(1, 1n)), segment(1));
  peer.add('main', `${segmentFileName(1, 2n)}.partial`, segment(2), at(2, 1000));
  await ps.timelines.update('p', 'main', (idx) => {
    idx.pg_history = [{ pg_timeline: 1, begin_lsn: L(at(1)) }];
    idx.last_record_lsn = L(at(2, 1000));
  });
  const seg1 = await c.readWal('p', 'main', segmentFileName(1, 1n), L(at(2, 1000)));
  t.equal(seg1.length, WAL_SEGMENT_SIZE);
  const seg2 = await c.readWal('p', 'main', segmentFileName(1, 2n));
  t.ok(seg2.subarray(0, 1000).every((b) => b === 2) && seg2.subarray(1000).every((b) => b === 0), 'partial segment masked at the tip');
  // compact=1: the same segment without its zero tail, and the file's size in a header.
  const compact = await fetch(`${ps.url}/v1/tenant/p/timeline/main/wal/${segmentFileName(1, 2n)}?compact=1`);
  const compactBody = Buffer.from(await compact.arrayBuffer());
  t.equal(compact.headers.get('x-wal-file-size'), String(WAL_SEGMENT_SIZE));
  t.equal(compactBody.length, 1000, 'only the bytes before the mask');
  t.ok(Buffer.concat([compactBody, Buffer.alloc(WAL_SEGMENT_SIZE - 1000)]).equals(seg2), 'padded with zeros: the same file');
  const whole = await fetch(`${ps.url}/v1/tenant/p/timeline/main/wal/${segmentFileName(1, 1n)}?upto=${L(at(2, 1000))}&compact=1`);
  t.equal((await whole.arrayBuffer()).byteLength, WAL_SEGMENT_SIZE, 'a segment without a masked tail is sent whole');
  let r = await raw(`${ps.url}/v1/tenant/p/timeline/main/wal/${segmentFileName(2, 1n)}?upto=${L(at(2, 1000))}`);
  t.same([r.status, r.json.error?.code], [404, 'PS_WAL_NOT_FOUND'], 'what restore_command reads as "no such file"');
  r = await raw(`${ps.url}/v1/tenant/p/timeline/main/wal/${segmentFileName(1, 1n)}?upto=nope`);
  t.same([r.status, r.json.error?.code], [400, 'CP_BAD_REQUEST']);
  await store.delete(keys.wal('p', 'main', segmentFileName(1, 1n)));
  r = await raw(`${ps.url}/v1/tenant/p/timeline/main/wal/${segmentFileName(1, 1n)}`);
  t.same([r.status, r.json.error?.code], [500, 'PS_WAL_MISSING'], 'a needed file nobody has: loud');
  await rejectsCode(t, c.startPlan('p', 'main'), 'PS_WAL_MISSING');
  await store.put(keys.wal('p', 'main', segmentFileName(1, 1n)), segment(1));
  const plan = await c.startPlan('p', 'main');
  t.same(plan.wal.map((w) => w.name), [segmentFileName(1, 1n), segmentFileName(1, 2n)]);
  t.equal((await fetch(plan.wal[1]!.url)).status, 200, 'the plan\'s URLs work');

  // Leases.
  await rejectsCode(t, c.lease('p', 'main', L(at(3)), 60), 'PS_LSN_PAST_TIP');
  for (const body of [{ lsn: '0/1' }, { lsn: '0/1', ttl_seconds: 0 }, { lsn: 5, ttl_seconds: 5 }, { lsn: '0/1', ttl_seconds: 1.5 }]) {
    r = await raw(`${ps.url}/v1/tenant/p/timeline/main/lease`, { method: 'POST', body: JSON.stringify(body) });
    t.same([r.status, r.json.error?.code], [400, 'CP_BAD_REQUEST'], `bad lease ${JSON.stringify(body)}`);
  }
  const lease = await c.lease('p', 'main', initdbMeta.end_lsn, 3600);
  t.equal(lease.lsn, initdbMeta.end_lsn);
  t.ok(Date.parse(lease.until) > Date.now() + 3500_000);
  t.same((await c.timeline('p', 'main'))?.retained_lsns, [initdbMeta.end_lsn]);

  // GC now.
  const gc = await c.gc('p', 'main');
  t.match(gc, { timeline_id: 'main', removed_images: [], removed_wal: [] });
  await rejectsCode(t, c.gc('p', 'nope'), 'PS_TIMELINE_NOT_FOUND');

  // Computes and images made now. Without a compute, a scratch recovery of the newest image is
  // tried (imager-scratch.test.ts does it for real); this synthetic image is no data directory.
  await rejectsCode(t, c.makeImage('p', 'main'), 'CP_COMPUTE_START_FAILED');
  for (const body of [{}, { host: 'h', port: 0, user: 'u', password: 'p' }, { host: 'h', port: 5432, user: '', password: 'p' }, { host: 'h h', port: 5432, user: 'u', password: 'p' }]) {
    r = await raw(`${ps.url}/v1/tenant/p/timeline/main/compute`, { method: 'PUT', body: JSON.stringify(body) });
    t.same([r.status, r.json.error?.code], [400, 'CP_BAD_REQUEST'], `bad compute ${JSON.stringify(body)}`);
  }
  await rejectsCode(t, c.attachCompute('p', 'nope', { host: '127.0.0.1', port: 5432, user: 'u', password: 'p' }), 'PS_TIMELINE_NOT_FOUND');
  await c.attachCompute('p', 'main', { host: '127.0.0.1', port: 5432, user: 'u', password: 'p' });
  t.equal((await c.timeline('p', 'main'))?.compute_attached, true);
  t.equal((await c.makeImage('p', 'main')).id, 'made');
  t.same(made, ['p/main@127.0.0.1:5432']);
  await c.detachCompute('p', 'main');
  await rejectsCode(t, c.makeImage('p', 'main'), 'CP_COMPUTE_START_FAILED', 'detached: a scratch recovery again, not the compute');

  // LSN by time, and a branch at a time.
  t.equal(await c.lsnByTime('p', 'main', new Date()), L(at(1, 140)));
  r = await raw(`${ps.url}/v1/lsn_by_time?tenant=p&timeline=main&time=never`);
  t.same([r.status, r.json.error?.code], [400, 'CP_BAD_REQUEST']);
  const atTime = await c.createTimeline('p', { new_timeline_id: 'then', ancestor_timeline_id: 'main', ancestor_start_time: new Date().toISOString() });
  t.equal(atTime.ancestor_lsn, L(at(1, 140)));
  await rejectsCode(t, c.createTimeline('p', { new_timeline_id: 'old', ancestor_timeline_id: 'main', ancestor_start_time: '1990-01-01T00:00:00Z' }), 'PS_LSN_BEFORE_GC_CUTOFF', 'a time before the timeline');

  // Metrics and health.
  const m = await (await fetch(`${ps.url}/metrics`)).text();
  t.match(m, /xenon_pageserver_timelines 2/);
  t.match(m, /xenon_pageserver_wal_requests_total\{outcome="not_found"\} 1/);
  t.match(m, /xenon_pageserver_wal_requests_total\{outcome="missing"\} 1/);
  t.match(m, /xenon_pageserver_start_plans_total\{outcome="crash"\}/);
  t.match(m, /xenon_pageserver_stored_bytes/);
  t.equal((await fetch(`${ps.url}/healthz`)).status, 200);
  r = await raw(`${ps.url}/v1/nothing`);
  t.equal(r.status, 404);
});

t.test('a corrupt index.json: 500 PS_INDEX_CORRUPT everywhere, nothing deleted', async (t) => {
  const { ps, c, store } = await start(t);
  await c.createTenant('p');
  await c.createTimeline('p', { new_timeline_id: 'main' });
  await c.uploadImage('p', 'main', Buffer.from('tar'), initdbMeta);
  await store.put(keys.index('p', 'main'), Buffer.from(JSON.stringify({ version: 1, tenant_id: 'p', timeline_id: 'main', last_record_lsn: 'bogus' })));
  const before = (await store.list('')).map((o) => `${o.key}:${o.size}`);
  for (const [method, path] of [['GET', ''], ['DELETE', ''], ['POST', '/gc'], ['GET', '/start'], ['GET', `/wal/${segmentFileName(1, 1n)}`], ['POST', '/lease']] as const) {
    const r = await raw(`${ps.url}/v1/tenant/p/timeline/main${path}`, { method, ...(path === '/lease' ? { body: JSON.stringify({ lsn: '0/1', ttl_seconds: 5 }) } : {}) });
    t.same([r.status, r.json.error?.code, r.json.error?.retryable], [500, 'PS_INDEX_CORRUPT', false], `${method} …${path}`);
  }
  const r = await raw(`${ps.url}/v1/tenant/p/timeline/main/image?lsn=0/1&end_lsn=0/2&pg_timeline=1&kind=backup`, { method: 'PUT', body: 'tar' });
  t.same([r.status, r.json.error?.code], [500, 'PS_INDEX_CORRUPT']);
  await rejectsCode(t, c.createTimeline('p', { new_timeline_id: 'br', ancestor_timeline_id: 'main' }), 'PS_INDEX_CORRUPT');
  t.same((await store.list('')).map((o) => `${o.key}:${o.size}`), before, 'every object untouched');
});

t.test('config: defaults, validation, S3 refused', async (t) => {
  const c = loadPageserverConfig({ XENON_STATE_DIR: '/tmp/st' }, []);
  t.same([c.port, c.host, c.storage, c.dir, c.ingestIntervalMs, c.pitrWindowSeconds, c.gcIntervalSeconds, c.imageWalBytes], [9898, '127.0.0.1', '/tmp/st/pageserver/objects', '/tmp/st/pageserver', 1000, 604800, 600, 64 * 1024 * 1024]);
  t.ok(Object.isFrozen(c));
  const s = loadPageserverConfig({ XENON_SAFEKEEPERS: 'sk1=http://127.0.0.1:7676,sk2=http://127.0.0.1:7677/' }, []);
  t.same(s.safekeepers, [{ id: 'sk1', url: 'http://127.0.0.1:7676' }, { id: 'sk2', url: 'http://127.0.0.1:7677' }]);
  t.throws(() => loadPageserverConfig({ XENON_PAGESERVER_STORAGE: 's3://b/p' }, []), /S3 object storage is not supported yet/);
  t.throws(() => loadPageserverConfig({ XENON_SAFEKEEPERS: 'sk1=ftp://x' }, []), /bad safekeeper/);
  t.throws(() => loadPageserverConfig({ XENON_PAGESERVER_PORT: '99999' }, []), /<= 65535/);
  t.throws(() => loadPageserverConfig({ XENON_PAGESERVER_PUBLIC_URL: 'nope' }, []), /PUBLIC_URL/);
});

t.test('node pageserver/main.ts: ready line, serves, stops on SIGTERM', async (t) => {
  const loader = process.execArgv.find((a) => a.includes('@tapjs/typescript'))?.replace(/^--import=/, '');
  const child = spawn(process.execPath, ['--import', loader ?? 'tsx', join(ROOT, 'pageserver', 'main.ts')], {
    cwd: ROOT,
    stdio: ['pipe', 'pipe', 'pipe'],
    env: { ...process.env, XENON_EXIT_WITH_PARENT: '1', XENON_PAGESERVER_PORT: '0', XENON_PAGESERVER_STORAGE: tempDir(t), XENON_PAGESERVER_DIR: tempDir(t), XENON_LOG_LEVEL: 'warn', XENON_SAFEKEEPERS: '' },
  });
  let err = '';
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
  t.teardown(async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await exited;
  });
  const ready = await new Promise<{ ready: string; url: string }>((resolve, reject) => {
    createInterface({ input: child.stdout }).on('line', (line) => {
      try {
        const j = JSON.parse(line);
        if (j.ready === 'pageserver') resolve(j);
      } catch { /* not JSON */ }
    });
    child.once('exit', (code) => reject(new Error(`exited ${code}: ${err}`)));
  });
  t.match(ready.url, /^http:\/\/127\.0\.0\.1:\d+$/);
  const c = new PageserverClient(ready.url);
  await c.createTenant('p');
  t.same(await c.listTimelines('p'), []);
  child.kill('SIGTERM');
  t.equal(await exited, 0);
});
