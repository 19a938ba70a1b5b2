/**
 * Garbage collection of a timeline's images and WAL (DESIGN §4 "Images and GC").
 *
 * Protected LSNs: the tip, the PITR-window cutoff (the LSN of the newest `lsn_samples` entry at or
 * before now − window; never lower than the previous cutoff), every child's branch point and every
 * unexpired lease. For each, the newest image of this timeline with `end_lsn` ≤ it is kept, and all
 * WAL from that image's redo segment on. A protected LSN with no such image (a branch served by its
 * ancestor's image) keeps all of the timeline's WAL. Other images go, and WAL segments wholly
 * before the oldest kept image's redo segment; history files stay. The index is rewritten first
 * (entries removed), then the objects deleted. A timeline whose index — or any index of its
 * tenant, which might be a child — is corrupt is not touched (PS_INDEX_CORRUPT).
 */
import type { Logger } from '../lib/logger.ts';
import { formatLsn, parseLsn, parseSegmentFileName, segmentOf } from '../lib/lsn.ts';
import type { GcResult, ImageInfo } from './api.ts';
import { maxLsn } from './resolver.ts';
import type { StoreTimelines } from './timelines.ts';
import { keys } from './types.ts';

export interface GcOptions {
  timelines: StoreTimelines;
  /** The PITR window: starts and branches stay possible this far back. */
  pitrWindowSeconds: number;
  logger: Logger;
  now?: () => Date;
  /** Called with what was removed (metrics). */
  onRemoved?: (r: GcResult) => void;
}

const byLsnDesc = (a: ImageInfo, b: ImageInfo): number => {
  const la = parseLsn(a.lsn), lb = parseLsn(b.lsn);
  if (la !== lb) return la > lb ? -1 : 1;
  const ea = parseLsn(a.end_lsn), eb = parseLsn(b.end_lsn);
  return ea > eb ? -1 : ea < eb ? 1 : 0;
};

/** Runs GC on one timeline now. */
export async function gcTimeline(o: GcOptions, t: string, tl: string): Promise<GcResult> {
  const now = (o.now ?? (() => new Date()))();
  let removedImages: ImageInfo[] = [];
  let minKeepSeg = -1n;
  let removedWalNames: string[] = [];
  let kept: string[] = [];
  const idx = await o.timelines.update(t, tl, async (idx) => {
    // Under the timeline's lock, which branch creation holds while it checks and writes a child.
    // Throws PS_INDEX_CORRUPT when any index of the tenant is unreadable (it might be a child).
    const children = await o.timelines.children(t, tl);
    // The cached map above was read at start; an index damaged since (by hand, by a disk) must
    // stop GC as well: read every other index of the tenant afresh.
    for (const id of (await o.timelines.tenantTimelines(t)).keys()) if (id !== tl) await o.timelines.read(t, id);
    const tip = parseLsn(idx.last_record_lsn);
    const oldCutoff = parseLsn(idx.gc_cutoff_lsn);
    const horizon = now.getTime() - o.pitrWindowSeconds * 1000;
    let sampleCutoff: bigint | undefined;
    let sampleAt = -1;
    idx.lsn_samples.forEach(([time, lsn], i) => {
      const ts = Date.parse(time);
      if (ts <= horizon && (sampleAt < 0 || ts >= Date.parse(idx.lsn_samples[sampleAt]![0]))) {
        sampleAt = i;
        sampleCutoff = parseLsn(lsn);
      }
    });
    let cutoff = sampleCutoff === undefined ? oldCutoff : maxLsn(oldCutoff, sampleCutoff);
    if (cutoff > tip) cutoff = maxLsn(oldCutoff, tip);
    const leases = idx.leases.filter((l) => Date.parse(l.until) > now.getTime());
    const protectedLsns = [tip, cutoff, ...children.map((c) => c.lsn), ...leases.map((l) => parseLsn(l.lsn))];

    const images = [...idx.images].sort(byLsnDesc);
    const keep = new Set<string>();
    let keepAllWal = false;
    for (const p of protectedLsns) {
      const im = images.find((i) => parseLsn(i.end_lsn) <= p);
      if (im) keep.add(im.id);
      else {
        keepAllWal = true;
        const after = images.filter((i) => parseLsn(i.end_lsn) > p);
        if (after.length > 0) keep.add(after[after.length - 1]!.id);
      }
    }
    const keptImages = images.filter((i) => keep.has(i.id));
    minKeepSeg = keepAllWal || keptImages.length === 0 ? -1n : keptImages.map((i) => segmentOf(parseLsn(i.lsn))).reduce((a, b) => (b < a ? b : a));
    removedImages = idx.images.filter((i) => !keep.has(i.id));
    removedWalNames = idx.wal.filter((w) => isRemovableSegment(w.name, minKeepSeg)).map((w) => w.name);
    kept = keptImages.map((i) => i.id);

    idx.images = idx.images.filter((i) => keep.has(i.id));
    idx.wal = idx.wal.filter((w) => !isRemovableSegment(w.name, minKeepSeg));
    idx.gc_cutoff_lsn = formatLsn(cutoff);
    idx.leases = leases;
    // Samples older than the one the cutoff came from are of no use any more.
    if (sampleAt >= 0) {
      const at = Date.parse(idx.lsn_samples[sampleAt]![0]);
      idx.lsn_samples = idx.lsn_samples.filter(([time]) => Date.parse(time) >= at);
    }
  });
  // Objects after the index: a crash in between leaves unlisted objects, never listed-but-gone ones.
  for (const im of removedImages) await o.timelines.store.delete(keys.image(t, tl, im.id));
  const removedWal = new Set(removedWalNames);
  if (minKeepSeg >= 0n) {
    for (const obj of await o.timelines.store.list(keys.wal(t, tl, ''))) {
      const name = obj.key.slice(obj.key.lastIndexOf('/') + 1);
      if (isRemovableSegment(name, minKeepSeg)) {
        await o.timelines.store.delete(obj.key);
        removedWal.add(name);
      }
    }
  }
  const result: GcResult = {
    timeline_id: tl,
    gc_cutoff_lsn: idx.gc_cutoff_lsn,
    removed_images: removedImages.map((i) => i.id),
    removed_wal: [...removedWal].sort(),
    kept_images: kept,
  };
  if (result.removed_images.length > 0 || result.removed_wal.length > 0) {
    o.logger.info('gc removed files', { tenantId: t, timelineId: tl, gcCutoff: idx.gc_cutoff_lsn, images: result.removed_images.length, wal: result.removed_wal.length });
  }
  o.onRemoved?.(result);
  return result;
}

function isRemovableSegment(name: string, minKeepSeg: bigint): boolean {
  const seg = parseSegmentFileName(name);
  return seg !== undefined && seg.segno < minKeepSeg;
}

/** Runs GC over every timeline every `intervalSeconds` (0: never). */
export function startGc(o: GcOptions & { intervalSeconds: number }): { runOnce(): Promise<void>; close(): Promise<void> } {
  let running: Promise<void> | undefined;
  let closed = false;
  const runOnce = (): Promise<void> => {
    running ??= (async () => {
      try {
        for (const ref of await o.timelines.list()) {
          if (closed) return;
          try {
            await gcTimeline(o, ref.tenantId, ref.timelineId);
          } catch (err) {
            o.logger.error('gc of a timeline failed', { tenantId: ref.tenantId, timelineId: ref.timelineId, err });
          }
        }
      } catch (err) {
        o.logger.error('gc run failed', { err });
      } finally {
        running = undefined;
      }
    })();
    return running;
  };
  const timer = o.intervalSeconds > 0 ? setInterval(() => void runOnce(), o.intervalSeconds * 1000) : undefined;
  timer?.unref();
  return {
    runOnce,
    async close() {
      closed = true;
      if (timer) clearInterval(timer);
      await running;
    },
  };
}
