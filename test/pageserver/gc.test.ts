// GC over synthetic timelines: with a small PITR window it removes old images and WAL, while
// every protected LSN (tip, window cutoff, child branch points, leases) still plans; the cutoff
// never goes back; a corrupt index stops GC with nothing deleted.
import t from 'tap';
import { silentLogger } from '../../lib/logger.ts';
import { segmentFileName } from '../../lib/lsn.ts';
import { gcTimeline, startGc, type GcOptions } from '../../pageserver/gc.ts';
import { WalResolver } from '../../pageserver/resolver.ts';
import { StoreTimelines } from '../../pageserver/timelines.ts';
import { keys } from '../../pageserver/types.ts';
import { at, FakePeer, L, makeTimeline, putSegment, rejectsCode, segment, synth, type Synth } from './core-helpers.ts';

const NOW = new Date('2026-06-01T00:00:00Z');
const ago = (h: number): Date => new Date(NOW.getTime() - h * 3600_000);
const BASE = 'http://ps';
const name = (segno: number, tli = 1): string => segmentFileName(tli, BigInt(segno));

async function world(t: Parameters<typeof synth>[0]): Promise<{ s: Synth; r: WalResolver; o: GcOptions }> {
  const s = await synth(t);
  await makeTimeline(s, 'main', {
    history: [[1, at(1)]],
    last: at(8, 500),
    images: [
      { lsn: at(1, 100), end: at(1, 200), id: 'A' },
      { lsn: at(3, 0), end: at(3, 100), id: 'B' },
      { lsn: at(5, 0), end: at(5, 100), id: 'C' },
      { lsn: at(7, 0), end: at(7, 100), id: 'D' },
    ],
    samples: [[ago(240), at(2)], [ago(72), at(4)], [ago(1), at(6)]],
  });
  for (let n = 1; n <= 7; n++) await putSegment(s, 'main', 1, n, n);
  const peer = new FakePeer();
  peer.add('main', `${name(8)}.partial`, segment(8), at(8, 500));
  await makeTimeline(s, 'br', { ancestor: { id: 'main', lsn: at(6, 10) }, last: at(6, 10) });
  const r = new WalResolver({ timelines: s.timelines, peers: [peer], logger: silentLogger });
  const o: GcOptions = { timelines: s.timelines, pitrWindowSeconds: 48 * 3600, logger: silentLogger, now: () => NOW };
  return { s, r, o };
}

const listed = async (s: Synth, tl: string): Promise<string[]> => (await s.store.list(keys.timeline('tn', tl))).map((o) => o.key.slice(keys.timeline('tn', tl).length));

t.test('a small window: old images and WAL go, every protected LSN still plans', async (t) => {
  const { s, r, o } = await world(t);
  const res = await gcTimeline(o, 'tn', 'main');
  t.equal(res.gc_cutoff_lsn, L(at(4)), 'cutoff: the newest sample at or before now - window');
  t.same(res.removed_images, ['A']);
  t.same(res.kept_images.sort(), ['B', 'C', 'D'], 'B for the cutoff, C for br\'s branch point, D for the tip');
  t.same(res.removed_wal, [name(1), name(2)], 'segments before B\'s redo segment');
  t.same(await listed(s, 'main'), ['images/B.tar', 'images/C.tar', 'images/D.tar', 'index.json', ...[3, 4, 5, 6, 7].map((n) => `wal/${name(n)}`)]);
  const idx = await s.timelines.read('tn', 'main');
  t.same(idx.images.map((i) => i.id), ['B', 'C', 'D']);
  t.same(idx.wal.map((w) => w.name), [3, 4, 5, 6, 7].map((n) => name(n)));
  t.same(idx.lsn_samples.map((x) => x[1]), [L(at(4)), L(at(6))], 'samples older than the cutoff one are dropped');
  // Every protected LSN plans; so does any point of the window.
  t.equal((await r.plan('tn', 'main', undefined, BASE)).image.id, 'D');
  t.equal((await r.plan('tn', 'main', at(4), BASE)).image.id, 'B');
  t.equal((await r.plan('tn', 'main', at(6, 10), BASE)).image.id, 'C');
  t.equal((await r.plan('tn', 'br', undefined, BASE)).image.id, 'C');
  t.equal((await r.plan('tn', 'main', at(3, 200), BASE).catch((e) => e.code)), 'PS_LSN_BEFORE_GC_CUTOFF');
  for (const l of [at(4), at(4, 1), at(5, 50), at(6), at(7, 99), at(8, 499)]) await r.plan('tn', 'main', l, BASE);
  t.pass('every LSN of the window plans');
  // Again: nothing more to do; a wider window does not move the cutoff back.
  const again = await gcTimeline({ ...o, pitrWindowSeconds: 3600 * 24 * 30 }, 'tn', 'main');
  t.same([again.removed_images, again.removed_wal, again.gc_cutoff_lsn], [[], [], L(at(4))]);
});

t.test('a lease keeps its image and WAL; an expired one does not', async (t) => {
  const { s, r, o } = await world(t);
  await s.timelines.update('tn', 'main', (idx) => {
    idx.leases.push({ lsn: L(at(2, 5)), until: new Date(NOW.getTime() + 60_000).toISOString() });
    idx.leases.push({ lsn: L(at(1, 300)), until: new Date(NOW.getTime() - 60_000).toISOString() });
  });
  const res = await gcTimeline(o, 'tn', 'main');
  t.same(res.removed_images, []);
  t.same(res.removed_wal, []);
  t.same((await s.timelines.read('tn', 'main')).leases.map((l) => l.lsn), [L(at(2, 5))], 'the expired lease is dropped');
  t.equal((await r.plan('tn', 'main', at(2, 5), BASE, NOW)).image.id, 'A', 'the leased LSN plans below the cutoff');
});

t.test('a branch without images of its own keeps all its WAL; its ancestor keeps the branch point', async (t) => {
  const { s, r, o } = await world(t);
  await s.timelines.update('tn', 'br', (idx) => {
    idx.pg_history = [{ pg_timeline: 2, begin_lsn: L(at(6, 10)) }];
    idx.last_record_lsn = L(at(9, 10));
    idx.lsn_samples = [[ago(100).toISOString(), L(at(7))]];
  });
  for (const n of [6, 7, 8, 9]) await putSegment(s, 'br', 2, n, 60 + n);
  await s.store.put(keys.wal('tn', 'br', '00000002.history'), Buffer.from('1\t0/600000A\tbranch\n'));
  const res = await gcTimeline(o, 'tn', 'br');
  t.same(res.removed_wal, []);
  t.equal(res.gc_cutoff_lsn, L(at(7)));
  await gcTimeline(o, 'tn', 'main');
  t.equal((await r.plan('tn', 'br', undefined, BASE)).image.id, 'C');
  t.equal((await r.plan('tn', 'br', at(7), BASE)).image.id, 'C');
});

t.test('a corrupt index: GC refuses and deletes nothing', async (t) => {
  const { s, o } = await world(t);
  await s.store.put(keys.index('tn', 'br'), Buffer.from('{ nope'));
  const before = await listed(s, 'br');
  await rejectsCode(t, gcTimeline(o, 'tn', 'br'), 'PS_INDEX_CORRUPT');
  t.same(await listed(s, 'br'), before);
  // Another pageserver process (a fresh map): the parent's children are unknowable → refuse.
  const fresh = new StoreTimelines(s.store);
  const mainBefore = await listed(s, 'main');
  await rejectsCode(t, gcTimeline({ ...o, timelines: fresh }, 'tn', 'main'), 'PS_INDEX_CORRUPT');
  t.same(await listed(s, 'main'), mainBefore, 'the parent keeps everything');
  // The periodic task logs and goes on.
  const gc = startGc({ ...o, timelines: fresh, intervalSeconds: 0 });
  await gc.runOnce();
  await gc.close();
  t.same(await listed(s, 'main'), mainBefore);
});

t.test('the periodic task runs GC over every timeline', async (t) => {
  const { s, o } = await world(t);
  const removed: string[] = [];
  const gc = startGc({ ...o, intervalSeconds: 0, onRemoved: (r) => removed.push(...r.removed_images) });
  await gc.runOnce();
  await gc.close();
  t.same(removed, ['A']);
  t.equal((await s.timelines.read('tn', 'main')).gc_cutoff_lsn, L(at(4)));
});
