// StoreTimelines: strict index validation (PS_INDEX_CORRUPT naming the key), the per-timeline
// lock of update, tenants and timelines created/listed/deleted, children and their branch points.
import t from 'tap';
import { LocalObjectStore } from '../../pageserver/objectstore.ts';
import { newIndex, StoreTimelines, validateIndex } from '../../pageserver/timelines.ts';
import { keys } from '../../pageserver/types.ts';
import { rejectsCode, tempDir } from './core-helpers.ts';

t.test('tenants and timelines: create, list, read, children, delete', async (t) => {
  const store = new LocalObjectStore(tempDir(t));
  const tls = new StoreTimelines(store);
  t.equal(await tls.createTenant('p1'), true);
  t.equal(await tls.createTenant('p1'), false, 'idempotent');
  await tls.createTimeline(newIndex('p1', 'main', null));
  await tls.createTimeline(newIndex('p1', 'br', { timeline_id: 'main', lsn: '0/3000000' }));
  await tls.createTimeline(newIndex('p1', 'br2', { timeline_id: 'br', lsn: '0/3000100' }));
  await rejectsCode(t, tls.createTimeline(newIndex('p1', 'main', null)), 'PS_TIMELINE_EXISTS');
  await rejectsCode(t, tls.createTimeline(newIndex('nope', 'x', null)), 'PS_TIMELINE_NOT_FOUND', 'unknown tenant');
  t.same(await tls.list(), [{ tenantId: 'p1', timelineId: 'br' }, { tenantId: 'p1', timelineId: 'br2' }, { tenantId: 'p1', timelineId: 'main' }]);
  t.same(await tls.children('p1', 'main'), [{ timelineId: 'br', lsn: 0x3000000n }]);
  const br = await tls.read('p1', 'br');
  t.equal(br.gc_cutoff_lsn, '0/3000000', 'a branch starts with its cutoff at the branch point');
  t.equal(br.last_record_lsn, '0/3000000');
  await rejectsCode(t, tls.read('p1', 'zzz'), 'PS_TIMELINE_NOT_FOUND');
  await rejectsCode(t, tls.deleteTimeline('p1', 'main'), 'PS_TIMELINE_HAS_CHILDREN');
  await rejectsCode(t, tls.deleteTimeline('p1', 'br'), 'PS_TIMELINE_HAS_CHILDREN');
  await tls.deleteTimeline('p1', 'br2');
  await tls.deleteTimeline('p1', 'br');
  t.same(await store.list(keys.timeline('p1', 'br')), [], 'objects gone');
  // A fresh instance over the same store sees the same (the map is rebuilt from the store).
  const again = new StoreTimelines(store);
  t.same(await again.list(), [{ tenantId: 'p1', timelineId: 'main' }]);
  t.equal(await again.tenantExists('p1'), true);
  await again.deleteTenant('p1');
  t.same(await store.list(''), []);
  t.equal(await again.tenantExists('p1'), false);
});

t.test('update is serialised per timeline and validated', async (t) => {
  const tls = new StoreTimelines(new LocalObjectStore(tempDir(t)));
  await tls.createTenant('p');
  await tls.createTimeline(newIndex('p', 'main', null));
  await Promise.all(Array.from({ length: 50 }, (_, i) => tls.update('p', 'main', async (idx) => {
    const n = idx.lsn_samples.length;
    await new Promise((r) => setTimeout(r, Math.random() * 3));
    idx.lsn_samples.push([new Date(0).toISOString(), `0/${(n + 1).toString(16)}`]);
    idx.last_record_lsn = `0/${(i + 1).toString(16)}`;
  })));
  const idx = await tls.read('p', 'main');
  t.equal(idx.lsn_samples.length, 50, 'no lost update');
  t.same(idx.lsn_samples.map((s) => s[1]), Array.from({ length: 50 }, (_, i) => `0/${(i + 1).toString(16)}`));
  await rejectsCode(t, tls.update('p', 'main', (idx) => { idx.last_record_lsn = 'garbage'; }), 'PS_INDEX_CORRUPT', 'a bad write is refused');
  t.equal((await tls.read('p', 'main')).lsn_samples.length, 50, 'and nothing written');
});

t.test('corrupt index: read and update refuse, naming the key; delete refuses; children refuse', async (t) => {
  const store = new LocalObjectStore(tempDir(t));
  const tls = new StoreTimelines(store);
  await tls.createTenant('p');
  await tls.createTimeline(newIndex('p', 'main', null));
  await tls.createTimeline(newIndex('p', 'br', { timeline_id: 'main', lsn: '0/100' }));
  await store.put(keys.index('p', 'br'), Buffer.from('{"version": 1, "tenant_id": "p"'));
  const e = await rejectsCode(t, tls.read('p', 'br'), 'PS_INDEX_CORRUPT');
  t.match(e?.message, /tenants\/p\/timelines\/br\/index\.json: not valid JSON/);
  await rejectsCode(t, tls.update('p', 'br', () => {}), 'PS_INDEX_CORRUPT');
  await rejectsCode(t, tls.deleteTimeline('p', 'br'), 'PS_INDEX_CORRUPT');
  t.ok(await store.head(keys.index('p', 'br')), 'nothing deleted');
  // A new instance: the corrupt timeline is known as such; the tenant's children are unknowable.
  const fresh = new StoreTimelines(store);
  await rejectsCode(t, fresh.children('p', 'main'), 'PS_INDEX_CORRUPT');
  t.same(await fresh.children('p', 'main', { lenient: true }), []);
  await rejectsCode(t, fresh.deleteTimeline('p', 'main'), 'PS_INDEX_CORRUPT', 'a parent of a corrupt timeline may not be deleted either');
});

t.test('validateIndex rejects every malformed field', async (t) => {
  const good = (): Record<string, unknown> => JSON.parse(JSON.stringify({
    ...newIndex('p', 'tl', { timeline_id: 'main', lsn: '0/10' }),
    pg_history: [{ pg_timeline: 2, begin_lsn: '0/10' }],
    images: [{ id: '0000000000000010-abcdef', lsn: '0/10', end_lsn: '0/20', pg_timeline: 1, kind: 'backup', size: 5, created_at: new Date().toISOString() }],
    wal: [{ name: '000000020000000000000001', kind: 'segment', pg_timeline: 2, start_lsn: '0/1000000', end_lsn: '0/2000000', size: 16777216 }],
    lsn_samples: [[new Date().toISOString(), '0/10']],
    leases: [{ lsn: '0/10', until: new Date().toISOString() }],
  }));
  t.doesNotThrow(() => validateIndex(good(), 'k', 'p', 'tl'));
  const cases: [string, (i: Record<string, any>) => void][] = [
    ['version', (i) => { i.version = 2; }],
    ['tenant', (i) => { i.tenant_id = 'q'; }],
    ['timeline', (i) => { i.timeline_id = 'x'; }],
    ['created_at', (i) => { i.created_at = 'yesterday'; }],
    ['ancestor id', (i) => { i.ancestor.timeline_id = 'Bad!'; }],
    ['ancestor self', (i) => { i.ancestor.timeline_id = 'tl'; }],
    ['ancestor lsn', (i) => { i.ancestor.lsn = 12; }],
    ['history tli', (i) => { i.pg_history[0].pg_timeline = 0; }],
    ['history order', (i) => { i.pg_history.push({ pg_timeline: 1, begin_lsn: '0/20' }); }],
    ['history lsn', (i) => { i.pg_history[0].begin_lsn = 'x/y'; }],
    ['image id', (i) => { i.images[0].id = '../x'; }],
    ['image dup', (i) => { i.images.push({ ...i.images[0] }); }],
    ['image end', (i) => { i.images[0].end_lsn = '0/1'; }],
    ['image kind', (i) => { i.images[0].kind = 'snapshot'; }],
    ['image size', (i) => { i.images[0].size = -1; }],
    ['wal name', (i) => { i.wal[0].name = 'x'; }],
    ['wal kind', (i) => { i.wal[0].kind = 'other'; }],
    ['wal lsn', (i) => { i.wal[0].end_lsn = '0/zz'; }],
    ['last_record_lsn', (i) => { delete i.last_record_lsn; }],
    ['gc_cutoff_lsn', (i) => { i.gc_cutoff_lsn = null; }],
    ['samples', (i) => { i.lsn_samples = [['x', '0/1']]; }],
    ['sample pair', (i) => { i.lsn_samples = [[new Date().toISOString()]]; }],
    ['leases', (i) => { i.leases = {}; }],
    ['lease until', (i) => { i.leases[0].until = 'never'; }],
    ['images', (i) => { i.images = null; }],
    ['not an object', (i) => { Object.setPrototypeOf(i, Array.prototype); }],
  ];
  for (const [what, mutate] of cases) {
    const i = good();
    mutate(i);
    try {
      validateIndex(what === 'not an object' ? [] : i, 'tenants/p/timelines/tl/index.json', 'p', 'tl');
      t.fail(`${what}: accepted`);
    } catch (err) {
      t.match(err, { code: 'PS_INDEX_CORRUPT', message: /^tenants\/p\/timelines\/tl\/index\.json: / }, what);
    }
  }
});
