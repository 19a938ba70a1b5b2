/**
 * The chain, the WAL resolver and the start planner (DESIGN §4 "Compute start (stateless)").
 *
 * The **chain** of timeline T at target L is the list of WAL *pieces* T sees: the ancestor's
 * pieces cut at T's branch point (recursively), then T's own pieces (`pg_history`: each from its
 * `begin_lsn` to the next one's, the last to L). A piece is (Postgres TLI, begin, end, owner).
 *
 * The **resolver** answers `restore_command`: a file is served only when it is exactly the file
 * the chain holds for that segment — the file of the *expected* TLI (the newest piece beginning
 * in or before the segment), owned by that piece's timeline, masked with zeros from min(L, the
 * piece's end) on. Any other TLI or a segment at or past L is "no such file" (404
 * `PS_WAL_NOT_FOUND`); an expected file nobody has is a loud 500 `PS_WAL_MISSING`. It never serves
 * an ancestor's (or another TLI's) segment in place of the timeline's own: Postgres would
 * silently replay the parent's future (the ancestor-segment hazard).
 *
 * The **planner** picks the newest image on the chain at or before L and checks that every file
 * recovery needs from the image's redo segment to L is available.
 */
import type { Logger } from '../lib/logger.ts';
import { XenonError } from '../lib/errors.ts';
import {
  formatLsn,
  historyFileName,
  parseLsn,
  parseSegmentFileName,
  prevSegmentOf,
  segmentFileName,
  segmentOf,
  segmentStart,
  WAL_SEGMENT_SIZE,
} from '../lib/lsn.ts';
import type { WalListing } from '../safekeeper/api.ts';
import type { ImageInfo, StartPlan, StartPlanWal, TimelineIndex } from './api.ts';
import { isObjectNotFound } from './objectstore.ts';
import { keys, type Timelines } from './types.ts';

/** A safekeeper as the resolver sees it (`SafekeeperClient` is one). */
export interface WalPeer {
  listWal(timelineId: string): Promise<WalListing>;
  readWal(timelineId: string, file: string, range?: { start: number; end: number }): Promise<Buffer>;
}

/** One stretch of WAL on one Postgres timeline, owned by one (pageserver) timeline. */
export interface Piece {
  pgTimeline: number;
  begin: bigint;
  /** Exclusive. */
  end: bigint;
  owner: string;
}

export interface ChainImage {
  image: ImageInfo;
  owner: string;
  /** 0: the timeline itself, 1: its ancestor, … */
  depth: number;
}

export interface Chain {
  tenantId: string;
  timelineId: string;
  target: bigint;
  /** Oldest first; non-overlapping. */
  pieces: Piece[];
  /** Images usable at `target` (ancestors' ones at or before the branch point). */
  images: ChainImage[];
  /** Every index read, by timeline id. */
  indexes: Map<string, TimelineIndex>;
}

const SEG = BigInt(WAL_SEGMENT_SIZE);
const min = (...v: bigint[]): bigint => v.reduce((a, b) => (b < a ? b : a));
const max = (...v: bigint[]): bigint => v.reduce((a, b) => (b > a ? b : a));

/** The chain of (t, tl) at `target`. Throws PS_TIMELINE_NOT_FOUND for tl, PS_INDEX_CORRUPT for a broken ancestry. */
export async function buildChain(timelines: Timelines, t: string, tl: string, target: bigint): Promise<Chain> {
  const levels: { pieces: Piece[]; images: ChainImage[] }[] = [];
  const indexes = new Map<string, TimelineIndex>();
  let cur: string | undefined = tl;
  let cut = target;
  for (let depth = 0; cur !== undefined; depth++) {
    if (indexes.has(cur) || depth > 1000) throw new XenonError('PS_INDEX_CORRUPT', `the ancestry of ${t}/${tl} has a cycle at ${cur}`);
    let idx: TimelineIndex;
    try {
      idx = await timelines.read(t, cur);
    } catch (err) {
      if (depth > 0 && err instanceof XenonError && err.code === 'PS_TIMELINE_NOT_FOUND') {
        throw new XenonError('PS_INDEX_CORRUPT', `ancestor ${cur} of ${t}/${tl} is missing`);
      }
      throw err;
    }
    indexes.set(cur, idx);
    const begins = idx.pg_history.map((p) => parseLsn(p.begin_lsn));
    const pieces: Piece[] = [];
    idx.pg_history.forEach((p, i) => {
      const begin = begins[i]!;
      const end = min(i + 1 < begins.length ? begins[i + 1]! : cut, cut);
      if (begin < cut && begin < end) pieces.push({ pgTimeline: p.pg_timeline, begin, end, owner: cur! });
    });
    const owner = cur;
    const images = idx.images.filter((im) => parseLsn(im.end_lsn) <= cut).map((image) => ({ image, owner, depth }));
    levels.push({ pieces, images });
    if (idx.ancestor) {
      const x = parseLsn(idx.ancestor.lsn);
      cut = min(x, cut, ...(begins.length > 0 ? [begins[0]!] : []));
      cur = idx.ancestor.timeline_id;
    } else cur = undefined;
  }
  levels.reverse();
  return { tenantId: t, timelineId: tl, target, pieces: levels.flatMap((l) => l.pieces), images: levels.flatMap((l) => l.images), indexes };
}

/** The piece whose file Postgres reads for `segno`: the newest one beginning in or before it. */
export function expectedPiece(chain: Chain, segno: bigint): Piece | undefined {
  for (let i = chain.pieces.length - 1; i >= 0; i--) {
    const p = chain.pieces[i]!;
    if (segmentOf(p.begin) <= segno) return p;
  }
  return undefined;
}

/** Where a file's bytes can be read. */
export type WalSource = { kind: 'store'; key: string } | { kind: 'safekeeper'; peer: WalPeer; file: string };

/** The newest image on the chain at or before `lsn` (least WAL to replay; the timeline's own wins a tie). */
export function pickImage(chain: Chain, lsn: bigint): ChainImage | undefined {
  const ok = chain.images.filter((c) => parseLsn(c.image.end_lsn) <= lsn);
  ok.sort((a, b) => {
    const la = parseLsn(a.image.lsn), lb = parseLsn(b.image.lsn);
    if (la !== lb) return la > lb ? -1 : 1;
    const ea = parseLsn(a.image.end_lsn), eb = parseLsn(b.image.end_lsn);
    if (ea !== eb) return ea > eb ? -1 : 1;
    return a.depth - b.depth;
  });
  return ok[0];
}

function walNotFound(file: string, why: string): XenonError {
  return new XenonError('PS_WAL_NOT_FOUND', `${file}: ${why}`, { userMessage: `no such WAL file ${file} on this branch (${why})` });
}

function walMissing(t: string, owner: string, file: string, why: string): XenonError {
  return new XenonError('PS_WAL_MISSING', `${t}/${owner}: WAL file ${file} is needed but ${why}`, {
    userMessage: `the branch's stored WAL is incomplete: ${file} of timeline ${owner} is missing`,
  });
}

/** Outcome of a resolver read, for metrics. */
export type ResolveOutcome = 'store' | 'safekeeper';

export interface ResolverOptions {
  timelines: Timelines;
  /** The safekeepers (every timeline's WAL is on the same set). */
  peers: WalPeer[];
  logger: Logger;
  /** Refreshes the quorum tip of a timeline from the safekeepers (ingest). */
  quorumTip?: (timelineId: string) => Promise<bigint | undefined>;
  /** Ingests a timeline's WAL now (ingest), before planning at its tip. */
  pollNow?: (tenantId: string, timelineId: string) => Promise<void>;
}

/** Per-request cache of safekeeper listings. */
type ListingCache = Map<string, Promise<WalListing | undefined>>;

export class WalResolver {
  constructor(private readonly o: ResolverOptions) {}

  /** The tip of a timeline: `last_record_lsn`, raised to the safekeepers' quorum tip when they know more. */
  async tip(idx: TimelineIndex): Promise<bigint> {
    const last = parseLsn(idx.last_record_lsn);
    if (!this.o.quorumTip) return last;
    try {
      const q = await this.o.quorumTip(idx.timeline_id);
      return q !== undefined && q > last ? q : last;
    } catch (err) {
      this.o.logger.warn('quorum tip unavailable; using last_record_lsn', { timelineId: idx.timeline_id, err });
      return last;
    }
  }

  private listing(cache: ListingCache, i: number, owner: string): Promise<WalListing | undefined> {
    const k = `${i}/${owner}`;
    let p = cache.get(k);
    if (!p) {
      p = this.o.peers[i]!.listWal(owner).catch((err: unknown) => {
        this.o.logger.debug('safekeeper listing failed', { owner, peer: i, err });
        return undefined;
      });
      cache.set(k, p);
    }
    return p;
  }

  /**
   * Where the bytes [start of file, needEnd) of `name` owned by `owner` are: the store (a copy
   * covering needEnd), else a safekeeper (a file reaching needEnd); `peers`: the safekeepers
   * only. Empty: nobody has them. The store first: asking every safekeeper for its WAL listing
   * costs three HTTP round trips and grows with the WAL they hold.
   */
  async locate(chain: Chain, owner: string, name: string, needEnd: bigint | undefined, cache: ListingCache = new Map(), from: 'any' | 'peers' = 'any'): Promise<WalSource[]> {
    const t = chain.tenantId;
    const idx = chain.indexes.get(owner);
    const seg = parseSegmentFileName(name);
    const out: WalSource[] = [];
    for (const cand of from === 'peers' ? [] : seg ? [name, `${name}.partial`] : [name]) {
      const key = keys.wal(t, owner, cand);
      const head = await this.o.timelines.store.head(key);
      if (!head) continue;
      if (seg && needEnd !== undefined) {
        const entry = idx?.wal.find((w) => w.name === cand);
        const covered = entry?.end_lsn !== undefined ? parseLsn(entry.end_lsn) : segmentStart(seg.segno) + BigInt(head.size);
        if (covered < needEnd) continue;
      }
      out.push({ kind: 'store', key });
    }
    if (out.length) return out;
    for (let i = 0; i < this.o.peers.length; i++) {
      const l = await this.listing(cache, i, owner);
      const f = l?.files.find((x) => x.name === name || x.name === `${name}.partial`);
      if (!f) continue;
      if (seg && needEnd !== undefined && (f.end_lsn === undefined || parseLsn(f.end_lsn) < needEnd)) continue;
      out.push({ kind: 'safekeeper', peer: this.o.peers[i]!, file: f.name });
    }
    return out;
  }

  /** The bytes of the first source of `name` that reads: the store's, else a safekeeper's. */
  private async readFirst(chain: Chain, owner: string, name: string, needEnd: bigint | undefined, onError: (err: unknown) => void): Promise<{ data: Buffer; kind: WalSource['kind'] } | undefined> {
    const cache: ListingCache = new Map();
    let sources = await this.locate(chain, owner, name, needEnd, cache);
    // A segment: only the bytes before needEnd are served (zeros after), so only those are read.
    const seg = needEnd === undefined ? undefined : parseSegmentFileName(name);
    const range = seg && needEnd !== undefined ? { start: 0, end: Number(needEnd - segmentStart(seg.segno)) } : undefined;
    for (;;) {
      for (const src of sources) {
        try {
          return { data: await this.readSource(chain, owner, src, range), kind: src.kind };
        } catch (err) {
          onError(err);
        }
      }
      // Every store copy failed to read: the safekeepers' copies next (once).
      if (!sources.length || sources.some((s) => s.kind !== 'store')) return undefined;
      sources = await this.locate(chain, owner, name, needEnd, cache, 'peers');
    }
  }

  private async readSource(chain: Chain, owner: string, src: WalSource, range?: { start: number; end: number }): Promise<Buffer> {
    if (src.kind === 'store') return this.o.timelines.store.getBuffer(src.key, range);
    return src.peer.readWal(owner, src.file, range);
  }

  /**
   * The bytes of WAL file `name` as timeline (t, tl) sees it at `upto` (default: its tip):
   * a history file, or a 16 MiB segment masked from min(upto, piece end).
   */
  async readFile(t: string, tl: string, name: string, upto?: bigint): Promise<{ data: Buffer; outcome: ResolveOutcome; owner: string; valid: number }> {
    const seg = parseSegmentFileName(name);
    const hist = /^([0-9A-F]{8})\.history$/.exec(name);
    if ((!seg || seg.partial) && !hist) {
      // Still a 404 for an unknown timeline first.
      await this.o.timelines.read(t, tl);
      throw walNotFound(name, 'not a segment or history file name');
    }
    const idx = await this.o.timelines.read(t, tl);
    let target = upto;
    const last = parseLsn(idx.last_record_lsn);
    if (target === undefined || target > last) {
      const tip = await this.tip(idx);
      target = target === undefined ? tip : min(target, tip);
    }
    const chain = await buildChain(this.o.timelines, t, tl, target);
    if (hist) {
      const tli = parseInt(hist[1]!, 16);
      const piece = chain.pieces.find((p) => p.pgTimeline === tli);
      if (!piece || tli === 1) throw walNotFound(name, `Postgres timeline ${tli} is not in this branch's history at ${formatLsn(target)}`);
      const got = await this.readFirst(chain, piece.owner, name, undefined, (err) => this.o.logger.warn('reading a history file failed; trying the next source', { file: name, owner: piece.owner, err }));
      if (got) return { data: got.data, outcome: got.kind, owner: piece.owner, valid: got.data.length };
      throw walMissing(t, piece.owner, name, 'neither the object store nor a safekeeper has it');
    }
    const { tli, segno } = seg!;
    const start = segmentStart(segno);
    if (start >= target) throw walNotFound(name, `it begins at or after the target ${formatLsn(target)}`);
    const piece = expectedPiece(chain, segno);
    if (!piece) throw walNotFound(name, 'the branch has no WAL in that segment');
    if (start >= piece.end) {
      // The chain's known WAL ends before the target (pg_history behind the safekeepers): loud.
      throw walMissing(t, tl, name, `the branch's WAL history ends at ${formatLsn(piece.end)}, before ${formatLsn(target)}`);
    }
    if (piece.pgTimeline !== tli) throw walNotFound(name, `the branch reads this segment on Postgres timeline ${piece.pgTimeline}`);
    const maskFrom = min(target, piece.end, start + SEG);
    const got = await this.readFirst(chain, piece.owner, name, maskFrom, (err) => {
      if (!isObjectNotFound(err)) this.o.logger.warn('reading a WAL segment failed; trying the next source', { file: name, owner: piece.owner, err });
    });
    if (got) {
      const valid = Number(maskFrom - start);
      return { data: maskSegment(got.data, valid), outcome: got.kind, owner: piece.owner, valid };
    }
    throw walMissing(t, piece.owner, name, `neither the object store nor a safekeeper has it up to ${formatLsn(maskFrom)}`);
  }

  /**
   * The start plan of (t, tl) at `lsn` (default: the tip). `baseUrl` is this pageserver's
   * URL as computes reach it.
   */
  async plan(t: string, tl: string, lsn: bigint | undefined, baseUrl: string, now = new Date()): Promise<StartPlan> {
    let idx = await this.o.timelines.read(t, tl);
    if (this.o.pollNow && (lsn === undefined || lsn > parseLsn(idx.last_record_lsn))) {
      try {
        await this.o.pollNow(t, tl);
        idx = await this.o.timelines.read(t, tl);
      } catch (err) {
        if (err instanceof XenonError && err.code === 'PS_INDEX_CORRUPT') throw err;
        this.o.logger.warn('ingest before planning failed', { tenantId: t, timelineId: tl, err });
      }
    }
    const tip = await this.tip(idx);
    const target = lsn ?? tip;
    checkTarget(idx, target, tip, now);
    const chain = await buildChain(this.o.timelines, t, tl, target);
    const picked = pickImage(chain, target);
    if (!picked) {
      throw new XenonError('PS_NO_IMAGE', `${t}/${tl}: no image at or before ${formatLsn(target)} on the chain`, {
        userMessage: `timeline ${tl} has no stored data at or before ${formatLsn(target)} yet`,
      });
    }
    const { image, owner } = picked;
    if (!(await this.o.timelines.store.head(keys.image(t, owner, image.id)))) {
      throw new XenonError('PS_IMAGE_MISSING', `${t}/${owner}: image ${image.id} is listed but its object is missing`, {
        userMessage: `the branch's stored data is incomplete: image ${image.id} of timeline ${owner} is missing`,
      });
    }
    const imageLsn = parseLsn(image.lsn);
    const imageEnd = parseLsn(image.end_lsn);
    const cache: ListingCache = new Map();
    const q = `?upto=${formatLsn(target)}`;
    const walUrl = `${baseUrl}/v1/tenant/${t}/timeline/${tl}/wal/`;

    // History files of every Postgres timeline of the chain after the first.
    const wal: StartPlanWal[] = [];
    const seen = new Set<number>();
    for (const p of chain.pieces) {
      if (p.pgTimeline === 1 || seen.has(p.pgTimeline)) continue;
      seen.add(p.pgTimeline);
      const name = historyFileName(p.pgTimeline);
      if ((await this.locate(chain, p.owner, name, undefined, cache)).length === 0) {
        throw walMissing(t, p.owner, name, 'neither the object store nor a safekeeper has it');
      }
      wal.push({ name, url: walUrl + name + q, owner: p.owner });
    }
    // Segments from the image's redo segment to the one holding target-1.
    if (target > imageLsn) {
      for (let segno = segmentOf(imageLsn); segno <= prevSegmentOf(target); segno++) {
        const piece = expectedPiece(chain, segno);
        if (!piece) {
          if (image.kind === 'shutdown' && segno <= prevSegmentOf(imageEnd)) continue; // in the image's own pg_wal
          throw walMissing(t, tl, segmentFileName(image.pg_timeline, segno), 'no timeline of the chain holds WAL in that segment');
        }
        const name = segmentFileName(piece.pgTimeline, segno);
        if (segmentStart(segno) >= piece.end) {
          throw walMissing(t, tl, name, `the branch's WAL history ends at ${formatLsn(piece.end)}, before ${formatLsn(target)}`);
        }
        const needEnd = min(target, piece.end, segmentStart(segno) + SEG);
        if ((await this.locate(chain, piece.owner, name, needEnd, cache)).length === 0) {
          throw walMissing(t, piece.owner, name, `neither the object store nor a safekeeper has it up to ${formatLsn(needEnd)}`);
        }
        wal.push({ name, url: walUrl + name + q, owner: piece.owner, valid_to: formatLsn(needEnd) });
      }
    }
    const inRange = chain.pieces.filter((p) => p.end > imageLsn && p.begin < target);
    const noSwitch = inRange.every((p) => p.pgTimeline === image.pg_timeline);
    const last = chain.pieces[chain.pieces.length - 1];
    const continues = owner === tl || (last !== undefined && last.owner === tl && last.pgTimeline === image.pg_timeline);
    const mode = target === tip && noSwitch && continues ? 'crash' : 'archive';
    return {
      tenant_id: t,
      timeline_id: tl,
      lsn: formatLsn(target),
      mode,
      image: { ...image, timeline_id: owner, url: `${baseUrl}/v1/tenant/${t}/timeline/${owner}/image/${image.id}` },
      wal,
      restore_url: mode === 'archive' ? walUrl : '',
    };
  }
}

/** Zeros from `from` (bytes into the segment) on; always 16 MiB. */
export function maskSegment(data: Buffer, from: number): Buffer {
  let out = data;
  if (out.length !== WAL_SEGMENT_SIZE) {
    out = Buffer.alloc(WAL_SEGMENT_SIZE);
    data.copy(out, 0, 0, Math.min(data.length, WAL_SEGMENT_SIZE));
  }
  if (from < WAL_SEGMENT_SIZE) out.fill(0, Math.max(0, from));
  return out;
}

/**
 * The checks of a start or branch point `lsn` on a timeline: not past the tip (409
 * PS_LSN_PAST_TIP), not before the GC cutoff unless a live lease holds it (409
 * PS_LSN_BEFORE_GC_CUTOFF).
 */
export function checkTarget(idx: TimelineIndex, lsn: bigint, tip: bigint, now = new Date()): void {
  if (lsn > tip) {
    throw new XenonError('PS_LSN_PAST_TIP', `${idx.timeline_id}: ${formatLsn(lsn)} is past the tip ${formatLsn(tip)}`, {
      userMessage: `LSN ${formatLsn(lsn)} is after the latest committed WAL of timeline ${idx.timeline_id} (${formatLsn(tip)})`,
    });
  }
  const cutoff = parseLsn(idx.gc_cutoff_lsn);
  if (lsn < cutoff) {
    const leased = idx.leases.some((l) => parseLsn(l.lsn) === lsn && Date.parse(l.until) > now.getTime());
    if (!leased) {
      throw new XenonError('PS_LSN_BEFORE_GC_CUTOFF', `${idx.timeline_id}: ${formatLsn(lsn)} is before the GC cutoff ${formatLsn(cutoff)}`, {
        userMessage: `LSN ${formatLsn(lsn)} is older than the retained history of timeline ${idx.timeline_id} (from ${formatLsn(cutoff)})`,
      });
    }
  }
}

/** Where a timeline's own history begins: its branch point, else its first WAL, else its oldest image. */
export function ownStart(idx: TimelineIndex): bigint {
  if (idx.ancestor) return parseLsn(idx.ancestor.lsn);
  const firsts = [...idx.pg_history.map((p) => parseLsn(p.begin_lsn)), ...idx.images.map((i) => parseLsn(i.lsn))];
  return firsts.length > 0 ? min(...firsts) : 0n;
}

export { max as maxLsn, min as minLsn };
