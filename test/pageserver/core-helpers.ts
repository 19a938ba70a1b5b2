/**
 * Helpers of the pageserver core tests: temp dirs, error-code assertions, and synthetic
 * timelines (indexes, images, WAL segments filled with a recognisable byte) in a real
 * LocalObjectStore — no Postgres needed.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import type { Test } from 'tap';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { XenonError } from '../../lib/errors.ts';
import { formatLsn, segmentFileName, segmentStart, WAL_SEGMENT_SIZE } from '../../lib/lsn.ts';
import type { WalFile, WalListing } from '../../safekeeper/api.ts';
import type { ImageInfo, TimelineIndex } from '../../pageserver/api.ts';
import { LocalObjectStore } from '../../pageserver/objectstore.ts';
import type { WalPeer } from '../../pageserver/resolver.ts';
import { newIndex, StoreTimelines } from '../../pageserver/timelines.ts';
import { keys } from '../../pageserver/types.ts';

type Teardown = { teardown(fn: () => unknown): void };
type Asserts = Pick<Test, 'ok' | 'fail'>;

export function tempDir(t: Teardown, prefix = 'ps-core-'): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** Asserts that `p` rejects with a XenonError of `code`; returns it. */
export async function rejectsCode(t: Asserts, p: Promise<unknown>, code: string, msg?: string): Promise<XenonError | undefined> {
  try {
    await p;
  } catch (err) {
    t.ok(err instanceof XenonError && err.code === code, `${msg ?? 'rejects'}: ${code} (got ${(err as XenonError).code ?? (err as Error).message})`);
    return err as XenonError;
  }
  t.fail(`${msg ?? 'rejects'}: expected ${code}, resolved`);
  return undefined;
}

export const MiB = 1024 * 1024;
export const SEG = BigInt(WAL_SEGMENT_SIZE);
/** LSN of byte `off` of segment `segno`. */
export const at = (segno: number, off = 0): bigint => segmentStart(BigInt(segno)) + BigInt(off);
export const L = formatLsn;

/** A 16 MiB segment filled with `fill` (never 0). */
export function segment(fill: number): Buffer {
  return Buffer.alloc(WAL_SEGMENT_SIZE, fill);
}

export interface Synth {
  store: LocalObjectStore;
  timelines: StoreTimelines;
  tenant: string;
}

export async function synth(t: Teardown, tenant = 'tn'): Promise<Synth> {
  const store = new LocalObjectStore(tempDir(t, 'ps-store-'));
  const timelines = new StoreTimelines(store);
  await timelines.createTenant(tenant);
  return { store, timelines, tenant };
}

export interface TimelineSpec {
  ancestor?: { id: string; lsn: bigint };
  /** [pg timeline, begin] pieces of the timeline's own WAL. */
  history?: [number, bigint][];
  last: bigint;
  cutoff?: bigint;
  images?: { lsn: bigint; end?: bigint; tli?: number; kind?: 'shutdown' | 'backup'; id?: string }[];
  samples?: [Date, bigint][];
}

/** Writes a timeline's index (and one small object per image). */
export async function makeTimeline(s: Synth, id: string, spec: TimelineSpec): Promise<TimelineIndex> {
  const idx = newIndex(s.tenant, id, spec.ancestor ? { timeline_id: spec.ancestor.id, lsn: L(spec.ancestor.lsn) } : null);
  idx.pg_history = (spec.history ?? []).map(([tli, b]) => ({ pg_timeline: tli, begin_lsn: L(b) }));
  idx.last_record_lsn = L(spec.last);
  if (spec.cutoff !== undefined) idx.gc_cutoff_lsn = L(spec.cutoff);
  idx.lsn_samples = (spec.samples ?? []).map(([d, l]) => [d.toISOString(), L(l)]);
  idx.images = (spec.images ?? []).map((im, i): ImageInfo => ({
    id: im.id ?? `${im.lsn.toString(16).toUpperCase().padStart(16, '0')}-${id.slice(0, 3)}${i}`.replace(/[^A-Za-z0-9-]/g, 'x'),
    lsn: L(im.lsn),
    end_lsn: L(im.end ?? im.lsn + 100n),
    pg_timeline: im.tli ?? 1,
    kind: im.kind ?? 'backup',
    size: 3,
    created_at: new Date().toISOString(),
  }));
  for (const im of idx.images) await s.store.put(keys.image(s.tenant, id, im.id), Buffer.from('tar'));
  await s.timelines.createTimeline(idx);
  return idx;
}

/** Stores segment (tli, segno) of timeline `id`, filled with `fill`, listed in its index. */
export async function putSegment(s: Synth, id: string, tli: number, segno: number, fill: number): Promise<string> {
  const name = segmentFileName(tli, BigInt(segno));
  await s.store.put(keys.wal(s.tenant, id, name), segment(fill));
  await s.timelines.update(s.tenant, id, (idx) => {
    idx.wal.push({ name, kind: 'segment', pg_timeline: tli, start_lsn: L(at(segno)), end_lsn: L(at(segno + 1)), size: WAL_SEGMENT_SIZE });
  });
  return name;
}

export async function putHistory(s: Synth, id: string, tli: number, text: string): Promise<void> {
  const name = `${tli.toString(16).toUpperCase().padStart(8, '0')}.history`;
  await s.store.put(keys.wal(s.tenant, id, name), Buffer.from(text));
}

/**
 * A stand-in for the safekeepers of the resolver tests (the safekeeper protocol itself is tested
 * in test/safekeeper; ingest tests use real ones): files per timeline, a partial one with its
 * flush LSN, served masked past the flush as a safekeeper does.
 */
export class FakePeer implements WalPeer {
  readonly files = new Map<string, Map<string, { data: Buffer; end?: bigint }>>();
  reads: string[] = [];

  add(timelineId: string, name: string, data: Buffer, end?: bigint): void {
    let m = this.files.get(timelineId);
    if (!m) this.files.set(timelineId, (m = new Map()));
    m.set(name, { data, end });
  }

  async listWal(timelineId: string): Promise<WalListing> {
    const m = this.files.get(timelineId);
    if (!m) throw new XenonError('SK_TIMELINE_NOT_FOUND');
    const files: WalFile[] = [...m].map(([name, f]) => {
      if (name.endsWith('.history')) return { name, kind: 'history', size: f.data.length };
      const segno = BigInt('0x' + name.slice(8, 16)) * 256n + BigInt('0x' + name.slice(16, 24));
      return { name, kind: 'segment', pg_timeline: parseInt(name.slice(0, 8), 16), start_lsn: L(segmentStart(segno)), end_lsn: L(f.end ?? segmentStart(segno + 1n)), partial: name.endsWith('.partial'), size: f.data.length };
    });
    return { timeline_id: timelineId, flush_lsn: '0/0', pg_timeline: 1, files };
  }

  /** As the safekeeper's `GET …/wal/:file` (with a `Range` when `range` is given). */
  async readWal(timelineId: string, file: string, range?: { start: number; end: number }): Promise<Buffer> {
    const f = this.files.get(timelineId)?.get(file);
    if (!f) throw new XenonError('SK_WAL_NOT_FOUND');
    this.reads.push(`${timelineId}/${file}`);
    let out = f.data;
    if (f.end !== undefined) {
      const segno = BigInt('0x' + file.slice(8, 16)) * 256n + BigInt('0x' + file.slice(16, 24));
      out = Buffer.from(f.data);
      out.fill(0, Number(f.end - segmentStart(segno)));
    }
    return range ? out.subarray(range.start, Math.min(range.end, out.length)) : out;
  }
}
