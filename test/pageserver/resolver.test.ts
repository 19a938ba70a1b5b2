// The chain, WAL resolver and start planner over synthetic indexes and synthetic segment files
// in a real LocalObjectStore (no Postgres): masking at a mid-segment branch point, a branch of a
// branch, the expected-TLI rule, end of WAL, and the ancestor-segment hazard (a branch's own
// missing segment is a loud PS_WAL_MISSING, never the parent's same-numbered segment).
import t, { type Test } from 'tap';
import { silentLogger } from '../../lib/logger.ts';
import { parseLsn, prevSegmentOf, segmentFileName, WAL_SEGMENT_SIZE } from '../../lib/lsn.ts';
import { buildChain, WalResolver } from '../../pageserver/resolver.ts';
import { keys } from '../../pageserver/types.ts';
import { at, FakePeer, L, makeTimeline, putHistory, putSegment, rejectsCode, segment, synth, type Synth } from './core-helpers.ts';

const BASE = 'http://ps.test:9898';
const name = (tli: number, segno: number): string => segmentFileName(tli, BigInt(segno));

/** bytes equal `fill` before `maskAt`, zero from there; always 16 MiB. */
function checkBytes(t: Tap, data: Buffer, fill: number, maskAt: number, msg: string): void {
  t.equal(data.length, WAL_SEGMENT_SIZE, `${msg}: 16 MiB`);
  t.ok(data.subarray(0, maskAt).equals(Buffer.alloc(maskAt, fill)), `${msg}: bytes before ${maskAt} are ${fill}`);
  t.ok(data.subarray(maskAt).equals(Buffer.alloc(WAL_SEGMENT_SIZE - maskAt)), `${msg}: bytes from ${maskAt} are zero`);
}
type Tap = Test;

const X = at(2, 4096); // br's branch point on main, mid-segment 2
const Y = at(3, 200); // br2's branch point on br, mid-segment 3

/** main (TLI 1, segs 1-3 stored, 4 partial on a safekeeper) → br at X (TLI 2) → br2 at Y. */
async function world(t: Parameters<typeof synth>[0]): Promise<{ s: Synth; peer: FakePeer; r: WalResolver }> {
  const s = await synth(t);
  await makeTimeline(s, 'main', {
    history: [[1, at(1)]],
    last: at(4, 500),
    images: [{ lsn: at(1, 100), end: at(1, 200), id: 'img0' }, { lsn: at(3, 0), end: at(3, 100), id: 'img1' }],
  });
  for (const n of [1, 2, 3]) await putSegment(s, 'main', 1, n, 10 + n);
  const peer = new FakePeer();
  peer.add('main', `${name(1, 4)}.partial`, segment(14), at(4, 500));
  await makeTimeline(s, 'br', { ancestor: { id: 'main', lsn: X }, history: [[2, X]], last: at(3, 1000) });
  await putHistory(s, 'br', 2, `1\t${L(X)}\tno recovery target specified\n`);
  await putSegment(s, 'br', 2, 2, 22);
  peer.add('br', `${name(2, 3)}.partial`, segment(23), at(3, 1000));
  await makeTimeline(s, 'br2', { ancestor: { id: 'br', lsn: Y }, last: Y });
  const r = new WalResolver({ timelines: s.timelines, peers: [peer], logger: silentLogger });
  return { s, peer, r };
}

t.test('the chain of a branch of a branch', async (t) => {
  const { s } = await world(t);
  const c = await buildChain(s.timelines, 'tn', 'br2', Y);
  t.same(c.pieces.map((p) => [p.owner, p.pgTimeline, L(p.begin), L(p.end)]), [
    ['main', 1, L(at(1)), L(X)],
    ['br', 2, L(X), L(Y)],
  ]);
  t.same(c.images.map((i) => [i.owner, i.image.id]), [['main', 'img0']], 'main\'s image after the branch point does not count');
  const m = await buildChain(s.timelines, 'tn', 'main', at(4, 500));
  t.same(m.images.map((i) => i.image.id), ['img0', 'img1']);
});

t.test('root timeline: store, safekeeper partial (masked), end of WAL, other TLIs', async (t) => {
  const { r, peer } = await world(t);
  const s1 = await r.readFile('tn', 'main', name(1, 1), at(4, 500));
  t.equal(s1.outcome, 'store');
  checkBytes(t, s1.data, 11, WAL_SEGMENT_SIZE, 'seg 1');
  const s4 = await r.readFile('tn', 'main', name(1, 4), at(4, 500));
  t.equal(s4.outcome, 'safekeeper');
  checkBytes(t, s4.data, 14, 500, 'partial seg 4');
  t.same(peer.reads, ['main/000000010000000000000004.partial']);
  const s4b = await r.readFile('tn', 'main', name(1, 4), at(4, 300));
  checkBytes(t, s4b.data, 14, 300, 'seg 4 at an earlier target');
  const s2 = await r.readFile('tn', 'main', name(1, 2), at(2, 1000));
  checkBytes(t, s2.data, 12, 1000, 'seg 2 masked at the target');
  await rejectsCode(t, r.readFile('tn', 'main', name(1, 3), at(2, 1000)), 'PS_WAL_NOT_FOUND', 'segment past the target');
  await rejectsCode(t, r.readFile('tn', 'main', name(1, 5), at(4, 500)), 'PS_WAL_NOT_FOUND', 'segment past the tip');
  await rejectsCode(t, r.readFile('tn', 'main', name(1, 4), at(4, 0)), 'PS_WAL_NOT_FOUND', 'a segment starting at the target');
  await rejectsCode(t, r.readFile('tn', 'main', name(2, 1), at(4, 500)), 'PS_WAL_NOT_FOUND', 'an unexpected TLI');
  await rejectsCode(t, r.readFile('tn', 'main', name(1, 0), at(4, 500)), 'PS_WAL_NOT_FOUND', 'before the first WAL');
  await rejectsCode(t, r.readFile('tn', 'main', '00000002.history', at(4, 500)), 'PS_WAL_NOT_FOUND', 'history of a TLI not in the chain');
  await rejectsCode(t, r.readFile('tn', 'main', '00000001.history', at(4, 500)), 'PS_WAL_NOT_FOUND', 'TLI 1 has no history');
  await rejectsCode(t, r.readFile('tn', 'main', `${name(1, 1)}.partial`, at(4, 500)), 'PS_WAL_NOT_FOUND', '.partial names');
  await rejectsCode(t, r.readFile('tn', 'main', 'backup_label', at(4, 500)), 'PS_WAL_NOT_FOUND', 'not a WAL name');
  await rejectsCode(t, r.readFile('tn', 'nope', name(1, 1), at(4, 500)), 'PS_TIMELINE_NOT_FOUND', 'unknown timeline');
  await rejectsCode(t, r.readFile('tn', 'nope', 'junk', at(4, 500)), 'PS_TIMELINE_NOT_FOUND', 'unknown timeline, bad name');
  // No upto: the tip.
  checkBytes(t, (await r.readFile('tn', 'main', name(1, 4))).data, 14, 500, 'default target = tip');
  // A target past the tip is clamped to the tip: nothing unacknowledged is served.
  checkBytes(t, (await r.readFile('tn', 'main', name(1, 4), at(4, 9000))).data, 14, 500, 'target clamped to the tip');
});

t.test('branch at a mid-segment point: the parent segment masked at the branch point', async (t) => {
  const { s, r } = await world(t);
  // A fresh branch with no WAL of its own yet.
  await makeTimeline(s, 'fresh', { ancestor: { id: 'main', lsn: X }, last: X });
  const r2 = await r.readFile('tn', 'fresh', name(1, 2), X);
  t.equal(r2.owner, 'main');
  checkBytes(t, r2.data, 12, 4096, 'parent segment masked from the branch point');
  // Asking with a later upto changes nothing: the branch's tip is X.
  checkBytes(t, (await r.readFile('tn', 'fresh', name(1, 2), at(3, 0))).data, 12, 4096, 'clamped to the branch tip');
  checkBytes(t, (await r.readFile('tn', 'fresh', name(1, 1), X)).data, 11, WAL_SEGMENT_SIZE, 'earlier parent segment whole');
  await rejectsCode(t, r.readFile('tn', 'fresh', name(1, 3), X), 'PS_WAL_NOT_FOUND', 'the parent\'s future is not served');
  const plan = await r.plan('tn', 'fresh', undefined, BASE);
  t.equal(plan.mode, 'archive');
  t.equal(plan.lsn, L(X));
  t.equal(plan.image.id, 'img0');
  t.equal(plan.image.timeline_id, 'main');
  t.equal(plan.image.url, `${BASE}/v1/tenant/tn/timeline/main/image/img0`);
  t.equal(plan.restore_url, `${BASE}/v1/tenant/tn/timeline/fresh/wal/`);
  // The files restore_command will ask for, listed so the driver can fetch them ahead: the
  // same resolver URLs, cut at the target.
  t.ok(plan.wal.length > 0, 'archive plans list the WAL they need');
  t.equal(plan.wal.at(-1)!.name, name(1, Number(prevSegmentOf(X))), 'up to the segment holding the byte before the target');
  for (const w of plan.wal) t.equal(w.url, `${plan.restore_url}${w.name}?upto=${L(X)}`);
});

t.test('branch with its own WAL: expected TLI, its own files, history', async (t) => {
  const { r } = await world(t);
  await rejectsCode(t, r.readFile('tn', 'br', name(1, 2), at(3, 1000)), 'PS_WAL_NOT_FOUND', 'the parent TLI of the switch segment');
  const own = await r.readFile('tn', 'br', name(2, 2), at(3, 1000));
  t.equal(own.owner, 'br');
  checkBytes(t, own.data, 22, WAL_SEGMENT_SIZE, 'own switch segment');
  checkBytes(t, (await r.readFile('tn', 'br', name(1, 1), at(3, 1000))).data, 11, WAL_SEGMENT_SIZE, 'parent segment before the switch');
  await rejectsCode(t, r.readFile('tn', 'br', name(2, 1), at(3, 1000)), 'PS_WAL_NOT_FOUND', 'own TLI before the switch segment');
  checkBytes(t, (await r.readFile('tn', 'br', name(2, 3), at(3, 1000))).data, 23, 1000, 'own partial segment');
  await rejectsCode(t, r.readFile('tn', 'br', name(1, 3), at(3, 1000)), 'PS_WAL_NOT_FOUND', 'parent segment after the branch point');
  t.match((await r.readFile('tn', 'br', '00000002.history', at(3, 1000))).data.toString(), /^1\t0\/2001000/);
  await rejectsCode(t, r.readFile('tn', 'br', '00000003.history', at(3, 1000)), 'PS_WAL_NOT_FOUND');
  const plan = await r.plan('tn', 'br', undefined, BASE);
  t.equal(plan.mode, 'archive', 'the image is on another Postgres timeline');
  t.equal(plan.image.id, 'img0');
  t.equal(plan.lsn, L(at(3, 1000)));
});

t.test('branch of a branch', async (t) => {
  const { r } = await world(t);
  checkBytes(t, (await r.readFile('tn', 'br2', name(1, 1), Y)).data, 11, WAL_SEGMENT_SIZE, 'grandparent segment');
  checkBytes(t, (await r.readFile('tn', 'br2', name(2, 2), Y)).data, 22, WAL_SEGMENT_SIZE, 'parent switch segment');
  checkBytes(t, (await r.readFile('tn', 'br2', name(2, 3), Y)).data, 23, 200, 'parent partial segment masked at the branch point');
  await rejectsCode(t, r.readFile('tn', 'br2', name(1, 2), Y), 'PS_WAL_NOT_FOUND', 'grandparent segment superseded by the parent TLI');
  await rejectsCode(t, r.readFile('tn', 'br2', name(2, 4), Y), 'PS_WAL_NOT_FOUND');
  t.match((await r.readFile('tn', 'br2', '00000002.history', Y)).data.toString(), /^1\t/);
  const plan = await r.plan('tn', 'br2', undefined, BASE);
  t.equal(plan.mode, 'archive');
  t.equal(plan.image.timeline_id, 'main');
  t.equal(plan.image.id, 'img0');
});

t.test('hazard: a branch\'s own missing segment fails loudly; the parent\'s is never served instead', async (t) => {
  const { s, r } = await world(t);
  await s.store.delete(keys.wal('tn', 'br', name(2, 2)));
  const e = await rejectsCode(t, r.readFile('tn', 'br', name(2, 2), at(3, 1000)), 'PS_WAL_MISSING', 'own segment missing');
  t.match(e?.message, /000000020000000000000002/);
  await rejectsCode(t, r.readFile('tn', 'br', name(1, 2), at(3, 1000)), 'PS_WAL_NOT_FOUND', 'the parent\'s same-numbered segment is still not served');
  const p = await rejectsCode(t, r.plan('tn', 'br', undefined, BASE), 'PS_WAL_MISSING', 'planning fails loudly');
  t.match(p?.message, /000000020000000000000002/);
  // The child of br sees the same hole.
  await rejectsCode(t, r.readFile('tn', 'br2', name(2, 2), Y), 'PS_WAL_MISSING');
  await rejectsCode(t, r.plan('tn', 'br2', undefined, BASE), 'PS_WAL_MISSING');
  // A missing history file of the chain fails the plan too.
  await putSegment(s, 'br', 2, 2, 22);
  await r.plan('tn', 'br', undefined, BASE);
  await s.store.delete(keys.wal('tn', 'br', '00000002.history'));
  const h = await rejectsCode(t, r.plan('tn', 'br', undefined, BASE), 'PS_WAL_MISSING', 'history file missing');
  t.match(h?.message, /00000002\.history/);
});

t.test('a stored segment that does not reach the target is not used; a safekeeper copy is', async (t) => {
  const { s, r, peer } = await world(t);
  // main's seg 3 listed in the index as ending early (a partial upload).
  await s.timelines.update('tn', 'main', (idx) => {
    idx.wal.find((w) => w.name === name(1, 3))!.end_lsn = L(at(3, 50));
  });
  await rejectsCode(t, r.readFile('tn', 'main', name(1, 3), at(4, 500)), 'PS_WAL_MISSING');
  peer.add('main', name(1, 3), segment(13));
  const got = await r.readFile('tn', 'main', name(1, 3), at(4, 500));
  t.equal(got.outcome, 'safekeeper');
  checkBytes(t, got.data, 13, WAL_SEGMENT_SIZE, 'from the safekeeper');
  checkBytes(t, (await r.readFile('tn', 'main', name(1, 3), at(3, 40))).data, 13, 40, 'the short stored copy suffices for an earlier target');
});

t.test('planner: crash at the tip of a timeline with its own image, archive otherwise, checks', async (t) => {
  const { s, r } = await world(t);
  const plan = await r.plan('tn', 'main', undefined, BASE);
  t.equal(plan.mode, 'crash');
  t.equal(plan.image.id, 'img1');
  t.equal(plan.lsn, L(at(4, 500)));
  t.same(plan.wal.map((w) => w.name), [name(1, 3), name(1, 4)]);
  t.equal(plan.wal[0]!.url, `${BASE}/v1/tenant/tn/timeline/main/wal/${name(1, 3)}?upto=${L(at(4, 500))}`);
  t.equal(plan.restore_url, '');
  const pitr = await r.plan('tn', 'main', at(2, 10), BASE);
  t.equal(pitr.mode, 'archive', 'not the tip');
  t.equal(pitr.image.id, 'img0');
  t.same(pitr.wal.map((w) => w.name), [name(1, 1), name(1, 2)], 'archive: the segments from the image to the target, for fetching ahead');
  await rejectsCode(t, r.plan('tn', 'main', at(5), BASE), 'PS_LSN_PAST_TIP');
  await rejectsCode(t, r.plan('tn', 'main', at(1, 150), BASE), 'PS_NO_IMAGE', 'before the first image is consistent');
  await s.timelines.update('tn', 'main', (idx) => { idx.gc_cutoff_lsn = L(at(2)); });
  await rejectsCode(t, r.plan('tn', 'main', at(1, 300), BASE), 'PS_LSN_BEFORE_GC_CUTOFF');
  await s.timelines.update('tn', 'main', (idx) => { idx.leases.push({ lsn: L(at(1, 300)), until: new Date(Date.now() + 60_000).toISOString() }); });
  t.equal((await r.plan('tn', 'main', at(1, 300), BASE)).lsn, L(at(1, 300)), 'a leased LSN before the cutoff');
  await s.store.delete(keys.image('tn', 'main', 'img1'));
  await rejectsCode(t, r.plan('tn', 'main', undefined, BASE), 'PS_IMAGE_MISSING');
  await rejectsCode(t, r.plan('tn', 'nope', undefined, BASE), 'PS_TIMELINE_NOT_FOUND');
});

t.test('planner: a branch with its own image at its tip restarts in crash mode, history first', async (t) => {
  const { s, r } = await world(t);
  await s.timelines.update('tn', 'br', (idx) => {
    idx.images.push({ id: 'brimg', lsn: L(at(2, 8192)), end_lsn: L(at(2, 9000)), pg_timeline: 2, kind: 'backup', size: 3, created_at: new Date().toISOString() });
  });
  await s.store.put(keys.image('tn', 'br', 'brimg'), Buffer.from('tar'));
  const plan = await r.plan('tn', 'br', undefined, BASE);
  t.equal(plan.mode, 'crash');
  t.equal(plan.image.timeline_id, 'br');
  t.same(plan.wal.map((w) => w.name), ['00000002.history', name(2, 2), name(2, 3)]);
  // br2's branch point Y is after brimg: br2 uses it (archive: a new Postgres timeline).
  const p2 = await r.plan('tn', 'br2', undefined, BASE);
  t.equal(p2.image.id, 'brimg');
  t.equal(p2.mode, 'archive');
  // (owner, name, valid_to) names the bytes: what the branch is served is the owner's copy up to
  // valid_to, so a compute host may keep it for any plan naming the same triple.
  for (const pl of [plan, p2]) {
    for (const w of pl.wal) {
      t.ok(w.owner, `${pl.timeline_id} ${w.name}: owner ${w.owner}`);
      t.equal(w.valid_to === undefined, w.name.endsWith('.history'), 'segments say up to where they are valid');
      const served = await r.readFile('tn', pl.timeline_id, w.name, parseLsn(pl.lsn));
      const owned = await r.readFile('tn', w.owner!, w.name, w.valid_to ? parseLsn(w.valid_to) : undefined);
      t.ok(served.data.equals(owned.data), `${pl.timeline_id} ${w.name}: the same bytes as ${w.owner}'s up to ${w.valid_to ?? 'its end'}`);
    }
  }
  t.ok(p2.wal.every((w) => w.owner === 'br'), 'br2\'s start reads only br\'s WAL (its branch point is in br\'s last segment)');
});

t.test('a fresh root with only its initdb image: crash, no WAL; nothing served', async (t) => {
  const s = await synth(t);
  await makeTimeline(s, 'root', { last: at(1, 140), images: [{ lsn: at(1, 40), end: at(1, 140), kind: 'shutdown', id: 'initdb' }] });
  const r = new WalResolver({ timelines: s.timelines, peers: [], logger: silentLogger });
  const plan = await r.plan('tn', 'root', undefined, BASE);
  t.equal(plan.mode, 'crash');
  t.same(plan.wal, []);
  await rejectsCode(t, r.readFile('tn', 'root', name(1, 1)), 'PS_WAL_NOT_FOUND');
  await makeTimeline(s, 'empty', { last: 0n });
  await rejectsCode(t, r.plan('tn', 'empty', undefined, BASE), 'PS_NO_IMAGE', 'a root before its image');
});

t.test('the quorum tip raises the default target; a failing tip source falls back to last_record_lsn', async (t) => {
  const { s, peer } = await world(t);
  peer.add('main', `${name(1, 4)}.partial`, segment(14), at(4, 800));
  const r = new WalResolver({ timelines: s.timelines, peers: [peer], logger: silentLogger, quorumTip: async () => at(4, 800) });
  const plan = await r.plan('tn', 'main', undefined, BASE);
  t.equal(plan.lsn, L(at(4, 800)));
  checkBytes(t, (await r.readFile('tn', 'main', name(1, 4), at(4, 9000))).data, 14, 800, 'clamped to the quorum tip');
  const r2 = new WalResolver({ timelines: s.timelines, peers: [peer], logger: silentLogger, quorumTip: async () => { throw new Error('down'); } });
  t.equal((await r2.plan('tn', 'main', undefined, BASE)).lsn, L(at(4, 500)));
});

t.test('a tip past the recorded WAL history (pg_history behind the safekeepers) fails loudly, never zeros', async (t) => {
  const { s, peer } = await world(t);
  // br3: a branch whose compute wrote WAL the ingest has not attributed to a Postgres timeline yet.
  await makeTimeline(s, 'br3', { ancestor: { id: 'main', lsn: X }, last: X });
  const r = new WalResolver({ timelines: s.timelines, peers: [peer], logger: silentLogger, quorumTip: async (tl) => (tl === 'br3' ? at(3, 500) : undefined) });
  await rejectsCode(t, r.readFile('tn', 'br3', name(1, 3)), 'PS_WAL_MISSING', 'not an all-zero parent segment');
  await rejectsCode(t, r.plan('tn', 'br3', undefined, BASE), 'PS_WAL_MISSING');
  checkBytes(t, (await r.readFile('tn', 'br3', name(1, 2))).data, 12, 4096, 'the branch point segment is still served masked');
});
