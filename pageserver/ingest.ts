/**
 * WAL ingest (DESIGN §4 "WAL and durability", "Images and GC"): every `intervalMs` the pageserver
 * asks each safekeeper for its WAL listing of every timeline it knows, works out what a majority
 * has committed, copies the quorum-committed complete segments and the `<TLI>.history` files into
 * the object store, and records them in the timeline's `index.json` together with the tip
 * (`last_record_lsn`), a time sample of the tip (`lsn_samples`, for LSN-by-time and the PITR
 * window) and the Postgres timeline history (`pg_history`).
 *
 * A segment is ingestible when it is complete (not `.partial`) on at least `quorum` safekeepers,
 * or complete on one and its end is at or before the quorum tip (the `quorum`-th highest flush
 * LSN): then every byte of it was acknowledged by a majority and can never be truncated.
 */
import { XenonError } from '../lib/errors.ts';
import type { Logger } from '../lib/logger.ts';
import { formatLsn, parseLsn, parseSegmentFileName, segmentStart, WAL_SEGMENT_SIZE } from '../lib/lsn.ts';
import type { WalFile, WalListing } from '../safekeeper/api.ts';
import { SafekeeperClient } from '../safekeeper/client.ts';
import type { PgTimelinePiece, TimelineIndex, WalFileInfo } from './api.ts';
import { keys, type Timelines } from './types.ts';

/** `lsn_samples` is kept at most this long; older samples are thinned first. */
export const MAX_LSN_SAMPLES = 10_000;

export interface IngestOptions {
  timelines: Timelines;
  safekeepers: { id: string; url: string }[];
  intervalMs: number;
  logger: Logger;
  /** Clock for `lsn_samples` (tests). */
  now?: () => Date;
}

export interface IngestHandle {
  /** Stops the loop and waits for polls in flight. */
  close(): Promise<void>;
  /** One poll of one timeline now (after the one in flight, if any); resolves when it is done. */
  pollNow(tenantId: string, timelineId: string): Promise<void>;
  /** The LSN a majority of the configured safekeepers has flushed; undefined when fewer than a majority answer. */
  quorumTip(timelineId: string): Promise<bigint | undefined>;
}

/** What one safekeeper said about one timeline this round. */
interface SkView {
  id: string;
  client: SafekeeperClient;
  flush: bigint;
  files: WalFile[];
}

/** The quorum-th highest of `flushes` (undefined when fewer than `quorum` values). */
export function quorumLsn(flushes: bigint[], quorum: number): bigint | undefined {
  if (flushes.length < quorum || quorum < 1) return undefined;
  const sorted = [...flushes].sort((a, b) => (a > b ? -1 : a < b ? 1 : 0));
  return sorted[quorum - 1];
}

/**
 * The switch point into a timeline from a Postgres `<TLI>.history` file: its last line is
 * `<parentTLI>\t<switchpoint>\t<reason>`. Undefined when the file has no entry.
 */
export function historySwitchPoint(text: string): { parentTli: number; lsn: bigint } | undefined {
  let last: { parentTli: number; lsn: bigint } | undefined;
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (!line || line.startsWith('#')) continue;
    const m = /^(\d+)\s+([0-9A-Fa-f]{1,8}\/[0-9A-Fa-f]{1,8})/.exec(line);
    if (!m) continue;
    last = { parentTli: Number(m[1]), lsn: parseLsn(m[2]!) };
  }
  return last;
}

/**
 * Keeps `samples` at most {@link MAX_LSN_SAMPLES} long: when over, every second sample of the
 * older half is dropped (recent history stays dense, old history gets sparser).
 */
export function boundSamples(samples: [string, string][], max = MAX_LSN_SAMPLES): [string, string][] {
  let out = samples;
  while (out.length > max) {
    const half = Math.floor(out.length / 2);
    const older = out.slice(0, half).filter((_, i) => i % 2 === 0);
    out = [...older, ...out.slice(half)];
  }
  return out;
}

/**
 * Sanity check of a downloaded segment: 16 MiB, and its first page is a long page header
 * (magic ≥ 0xD000 as every supported Postgres) addressed at the segment's own start.
 */
function checkSegment(buf: Buffer, name: string, start: bigint): void {
  if (buf.length !== WAL_SEGMENT_SIZE) throw new XenonError('PS_WAL_MISSING', `segment ${name}: ${buf.length} bytes, expected ${WAL_SEGMENT_SIZE}`);
  const magic = buf.readUInt16LE(0);
  const info = buf.readUInt16LE(2);
  const pageaddr = buf.readBigUInt64LE(8);
  const segSize = buf.readUInt32LE(24 + 8);
  if (magic < 0xd000 || (info & 0x0002) === 0 || pageaddr !== start || segSize !== WAL_SEGMENT_SIZE) {
    throw new XenonError('PS_WAL_MISSING', `segment ${name}: not a WAL segment starting at ${formatLsn(start)} (magic ${magic.toString(16)}, pageaddr ${formatLsn(pageaddr)})`);
  }
}

/** Starts the ingest loop. */
export function startIngest(o: IngestOptions): IngestHandle {
  const log = o.logger.child({ component: 'ingest' });
  const now = o.now ?? (() => new Date());
  const members = o.safekeepers.map((s) => ({ id: s.id, client: new SafekeeperClient(s.url, { timeoutMs: 10_000 }) }));
  const quorum = Math.floor(members.length / 2) + 1;
  const inFlight = new Map<string, Promise<void>>();
  let closed = false;
  let timer: NodeJS.Timeout | undefined;

  /** Every safekeeper's listing of `timelineId`; unreachable ones are left out. */
  async function views(timelineId: string): Promise<SkView[]> {
    const out = await Promise.all(members.map(async (m): Promise<SkView | undefined> => {
      let listing: WalListing;
      try {
        listing = await m.client.listWal(timelineId);
      } catch (err) {
        if (err instanceof XenonError && err.code === 'SK_TIMELINE_NOT_FOUND') return { id: m.id, client: m.client, flush: 0n, files: [] };
        log.debug('safekeeper unreachable', { safekeeper: m.id, timeline_id: timelineId, err });
        return undefined;
      }
      return { id: m.id, client: m.client, flush: parseLsn(listing.flush_lsn), files: listing.files };
    }));
    return out.filter((v): v is SkView => v !== undefined);
  }

  async function download(sources: SkView[], timelineId: string, name: string): Promise<Buffer> {
    let last: unknown;
    for (const s of sources) {
      try {
        return await s.client.readWal(timelineId, name);
      } catch (err) {
        last = err;
        log.warn('WAL download failed', { safekeeper: s.id, timeline_id: timelineId, file: name, err });
      }
    }
    throw last instanceof Error ? last : new XenonError('SK_UNAVAILABLE', `no safekeeper served ${name}`);
  }

  async function pollTimeline(tenantId: string, timelineId: string): Promise<void> {
    const tlog = log.child({ tenant_id: tenantId, timeline_id: timelineId });
    let index: TimelineIndex;
    try {
      index = await o.timelines.read(tenantId, timelineId);
    } catch (err) {
      if (err instanceof XenonError && err.code === 'PS_INDEX_CORRUPT') tlog.warn('skipping a timeline whose index is corrupt', { err });
      else if (!(err instanceof XenonError && err.code === 'PS_TIMELINE_NOT_FOUND')) tlog.warn('cannot read the timeline index', { err });
      return;
    }
    const vs = await views(timelineId);
    if (vs.length === 0) return;
    const tip = vs.length >= quorum ? quorumLsn(vs.map((v) => v.flush), quorum) : undefined;
    const known = index.wal.map((w) => w.name);
    const have = new Set(known);
    const lastRecord = parseLsn(index.last_record_lsn);
    const committed = tip !== undefined && tip > lastRecord ? tip : lastRecord;

    // History files: any safekeeper's copy.
    const historyNames = new Map<string, SkView[]>();
    // Complete segments: which safekeepers hold each.
    const complete = new Map<string, { tli: number; segno: bigint; on: SkView[] }>();
    for (const v of vs) {
      for (const f of v.files) {
        if (f.kind === 'history') {
          if (!/^[0-9A-F]{8}\.history$/.test(f.name)) continue;
          historyNames.set(f.name, [...(historyNames.get(f.name) ?? []), v]);
          continue;
        }
        const seg = parseSegmentFileName(f.name);
        if (!seg || seg.partial || f.partial) continue;
        const c = complete.get(f.name) ?? { tli: seg.tli, segno: seg.segno, on: [] };
        c.on.push(v);
        complete.set(f.name, c);
      }
    }
    // Segments GC removed (ending at or before the cutoff) are never fetched again.
    const gcCutoff = parseLsn(index.gc_cutoff_lsn);
    const ingestible = [...complete.entries()]
      .filter(([name, c]) => !have.has(name) && segmentStart(c.segno + 1n) > gcCutoff)
      .filter(([, c]) => c.on.length >= quorum || segmentStart(c.segno + 1n) <= committed)
      .sort(([, a], [, b]) => (a.segno !== b.segno ? (a.segno < b.segno ? -1 : 1) : a.tli - b.tli));

    // Switch points of every TLI we can see a history file for (stored or on a safekeeper).
    const switchPoints = new Map<number, bigint>();
    const histories = [...historyNames.keys()].sort();
    for (const name of histories) {
      const tli = parseInt(name.slice(0, 8), 16);
      let text: string;
      const stored = have.has(name);
      let body: Buffer | undefined;
      try {
        if (stored) body = await o.timelines.store.getBuffer(keys.wal(tenantId, timelineId, name));
        else body = await download(historyNames.get(name)!, timelineId, name);
        text = body.toString('utf8');
      } catch (err) {
        tlog.warn('cannot read a history file', { file: name, err });
        continue;
      }
      const sp = historySwitchPoint(text);
      if (sp) switchPoints.set(tli, sp.lsn);
      if (!stored) {
        await o.timelines.store.put(keys.wal(tenantId, timelineId, name), body);
        await o.timelines.update(tenantId, timelineId, (ix) => {
          if (!ix.wal.some((w) => w.name === name)) ix.wal.push({ name, kind: 'history', pg_timeline: tli, size: body.length });
        });
        have.add(name);
        tlog.info('ingested a history file', { file: name });
      }
    }
    // Stored history files the safekeepers no longer list.
    for (const w of index.wal) {
      if (w.kind !== 'history' || switchPoints.has(w.pg_timeline)) continue;
      try {
        const sp = historySwitchPoint((await o.timelines.store.getBuffer(keys.wal(tenantId, timelineId, w.name))).toString('utf8'));
        if (sp) switchPoints.set(w.pg_timeline, sp.lsn);
      } catch (err) {
        tlog.warn('cannot read a stored history file', { file: w.name, err });
      }
    }

    for (const [name, c] of ingestible) {
      if (closed) return;
      const start = segmentStart(c.segno);
      let buf: Buffer;
      try {
        buf = await download(c.on, timelineId, name);
        checkSegment(buf, name, start);
      } catch (err) {
        tlog.warn('segment not ingested this round', { file: name, err });
        break; // keep the stored WAL contiguous: retry from here next round
      }
      await o.timelines.store.put(keys.wal(tenantId, timelineId, name), buf);
      const info: WalFileInfo = {
        name, kind: 'segment', pg_timeline: c.tli,
        start_lsn: formatLsn(start), end_lsn: formatLsn(start + BigInt(WAL_SEGMENT_SIZE)), size: buf.length,
      };
      await o.timelines.update(tenantId, timelineId, (ix) => {
        if (!ix.wal.some((w) => w.name === name)) ix.wal.push(info);
        addPieces(ix, [{ tli: c.tli, start }], switchPoints, tlog);
      });
      tlog.info('ingested a segment', { file: name, start_lsn: info.start_lsn });
    }

    // The tip, its sample, and Postgres timelines that have committed WAL but no complete segment yet.
    const seen: { tli: number; start: bigint }[] = [];
    if (tip !== undefined) {
      for (const v of vs) {
        for (const f of v.files) {
          if (f.kind !== 'segment' || f.pg_timeline === undefined || f.start_lsn === undefined || f.end_lsn === undefined) continue;
          const s = parseLsn(f.start_lsn);
          const e = parseLsn(f.end_lsn);
          if (e > s && s < tip) seen.push({ tli: f.pg_timeline, start: s });
        }
      }
      seen.sort((a, b) => (a.start !== b.start ? (a.start < b.start ? -1 : 1) : a.tli - b.tli));
    }
    if (tip === undefined || (tip <= lastRecord && !needsPieces(index, seen))) return;
    await o.timelines.update(tenantId, timelineId, (ix) => {
      addPieces(ix, seen, switchPoints, tlog);
      const cur = parseLsn(ix.last_record_lsn);
      if (tip > cur) {
        ix.last_record_lsn = formatLsn(tip);
        ix.lsn_samples = boundSamples([...ix.lsn_samples, [now().toISOString(), formatLsn(tip)]]);
      }
    });
  }

  function needsPieces(index: TimelineIndex, seen: { tli: number }[]): boolean {
    const lastTli = index.pg_history.at(-1)?.pg_timeline ?? 0;
    return seen.some((s) => s.tli > lastTli);
  }

  /**
   * Appends a `pg_history` piece for every Postgres timeline newer than the last one known:
   * the first piece of a root timeline begins at its first segment; of a branch, and every later
   * one, at the switch point of the TLI's history file (without one yet, the piece waits).
   */
  function addPieces(ix: TimelineIndex, segs: { tli: number; start: bigint }[], switchPoints: Map<number, bigint>, tlog: Logger): void {
    for (const s of segs) {
      const lastTli = ix.pg_history.at(-1)?.pg_timeline ?? 0;
      if (s.tli <= lastTli) continue;
      let begin: bigint | undefined;
      if (ix.pg_history.length === 0 && ix.ancestor === null) begin = s.start;
      else begin = switchPoints.get(s.tli);
      if (begin === undefined) {
        tlog.debug('new Postgres timeline without its history file yet', { pg_timeline: s.tli });
        continue;
      }
      const piece: PgTimelinePiece = { pg_timeline: s.tli, begin_lsn: formatLsn(begin) };
      ix.pg_history.push(piece);
      tlog.info('Postgres timeline begins', { ...piece });
    }
  }

  function schedule(key: string, run: () => Promise<void>): Promise<void> {
    const prev = inFlight.get(key) ?? Promise.resolve();
    const next = prev.then(run).catch((err: unknown) => log.error('WAL ingest poll failed', { key, err }));
    inFlight.set(key, next);
    void next.finally(() => { if (inFlight.get(key) === next) inFlight.delete(key); });
    return next;
  }

  async function round(): Promise<void> {
    let refs;
    try {
      refs = await o.timelines.list();
    } catch (err) {
      log.warn('cannot list timelines', { err });
      return;
    }
    for (const r of refs) {
      const key = `${r.tenantId}/${r.timelineId}`;
      if (inFlight.has(key)) continue; // one poll per timeline at a time (a slow one does not hold up the others)
      void schedule(key, () => pollTimeline(r.tenantId, r.timelineId));
    }
  }

  const loop = (): void => {
    timer = setTimeout(() => {
      void round().finally(() => { if (!closed) loop(); });
    }, o.intervalMs);
    timer.unref?.();
  };
  loop();

  return {
    async close() {
      closed = true;
      if (timer) clearTimeout(timer);
      await Promise.all([...inFlight.values()]);
    },
    pollNow(tenantId, timelineId) {
      return schedule(`${tenantId}/${timelineId}`, () => pollTimeline(tenantId, timelineId));
    },
    async quorumTip(timelineId) {
      // Only the flush LSNs (a status call each), not the WAL listings: branch creation at the
      // tip asks for this, and a listing grows with the WAL a safekeeper holds.
      const flushes = (await Promise.all(members.map(async (m): Promise<bigint | undefined> => {
        try {
          const st = await m.client.status(timelineId);
          return st ? parseLsn(st.flush_lsn) : 0n;
        } catch (err) {
          log.debug('safekeeper unreachable', { safekeeper: m.id, timeline_id: timelineId, err });
          return undefined;
        }
      }))).filter((f): f is bigint => f !== undefined);
      return flushes.length >= quorum ? quorumLsn(flushes, quorum) : undefined;
    },
  };
}
