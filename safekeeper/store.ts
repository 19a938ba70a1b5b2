/**
 * The WAL segment store of one timeline: 16 MiB segment files named as Postgres names them
 * (`%08X%08X%08X`), the one being written named `.partial` and pre-filled with zeros to its full
 * size — the same files `pg_receivewal` writes for the same stream. A completed segment is
 * fdatasync'ed, renamed to its final name, and the directory fsync'ed.
 *
 * The store does not sync on every write: the caller writes a batch ({@link SegmentStore.write})
 * and then syncs once ({@link SegmentStore.sync}) — group commit.
 */
import { constants as fsConstants, fdatasync as fdatasyncCb, writev as writevCb, writeSync, writevSync } from 'node:fs';
import { open, readdir, rename, rm, stat, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { historyFileName, parseSegmentFileName, segmentFileName, segmentOf, segmentStart, WAL_SEGMENT_SIZE } from '../lib/lsn.ts';
import { fsyncDir } from './control.ts';

const SEG = BigInt(WAL_SEGMENT_SIZE);
const XLOG_BLCKSZ = 8192;
const PREALLOC_SUFFIX = '.prealloc';
/** `open_datasync_inline`: batches up to this size are written synchronously; larger ones on the thread pool. */
export const INLINE_WRITE_MAX = 256 * 1024;
/** Reused zero buffer for pre-filling segments and zeroing truncated tails. */
let zeroSegment: Buffer | undefined;
const zeros = (): Buffer => (zeroSegment ??= Buffer.alloc(WAL_SEGMENT_SIZE));

export type SyncMethod = 'fdatasync' | 'open_datasync' | 'open_datasync_inline';
export const SYNC_METHODS: readonly SyncMethod[] = ['fdatasync', 'open_datasync', 'open_datasync_inline'];

export interface StoreHooks {
  /** Seconds one fdatasync took. */
  onSync?(seconds: number): void;
  onBytes?(n: number): void;
  /** Test hook: throw to simulate a failing disk (called before every data write). */
  beforeWrite?(): void;
  /** Test hook: a slow disk — every data write takes this much longer per MiB (inside the write). */
  writeMsPerMiB?: number;
  /** A segment became complete: synced, renamed to its final name, directory synced. */
  onComplete?(e: { tli: number; segno: bigint; path: string }): void;
}

export interface StoredFile {
  name: string;
  kind: 'segment' | 'history';
  tli?: number;
  segno?: bigint;
  partial?: boolean;
  size: number;
}

interface OpenSegment {
  tli: number;
  segno: bigint;
  fh: FileHandle;
  /** Path of the file now (`.partial` until complete). */
  path: string;
  partial: boolean;
  dirty: boolean;
}

export class SegmentStore {
  private cur: OpenSegment | null = null;
  /** The next segment, pre-filled in the background (`<name>.partial.prealloc`). */
  private prealloc: { path: string; ready: Promise<boolean> } | null = null;

  private readonly openFlags: number;

  /**
   * `syncMethod` (as Postgres' `wal_sync_method`): `fdatasync` writes a batch, then fdatasyncs;
   * `open_datasync` opens segments with O_DSYNC so the batch's one `pwritev` is durable when it
   * returns (one thread-pool round trip per batch instead of two).
   */
  constructor(
    readonly dir: string,
    private readonly hooks: StoreHooks = {},
    readonly syncMethod: SyncMethod = 'open_datasync_inline',
  ) {
    this.openFlags = fsConstants.O_RDWR | (syncMethod !== 'fdatasync' ? fsConstants.O_DSYNC : 0);
  }

  private async timedSync(fh: FileHandle): Promise<void> {
    const t0 = performance.now();
    await fdatasyncFd(fh.fd);
    this.hooks.onSync?.((performance.now() - t0) / 1000);
  }

  /** Opens (creating and pre-filling if needed) the segment `segno` of `tli` for writing. */
  private async openSegment(tli: number, segno: bigint): Promise<OpenSegment> {
    if (this.cur && this.cur.tli === tli && this.cur.segno === segno) return this.cur;
    await this.closeCurrent();
    const name = segmentFileName(tli, segno);
    const final = join(this.dir, name);
    const partial = `${final}.partial`;
    // A complete segment being written again (a resend of bytes we hold): overwrite in place.
    const fsz = await sizeOf(final);
    if (fsz === WAL_SEGMENT_SIZE) {
      this.cur = { tli, segno, fh: await open(final, this.openFlags), path: final, partial: false, dirty: false };
      return this.cur;
    }
    const psz = await sizeOf(partial);
    const pre = this.prealloc;
    if (psz !== WAL_SEGMENT_SIZE && pre && pre.path === `${partial}${PREALLOC_SUFFIX}`) {
      // Prepared in the background while the previous segment filled up: just rename it.
      this.prealloc = null;
      if (await pre.ready) {
        await rename(pre.path, partial);
        await fsyncDir(this.dir);
      }
    }
    if ((await sizeOf(partial)) !== WAL_SEGMENT_SIZE) {
      // Pre-fill in a temporary file so a crash never leaves a short `.partial` behind.
      const tmp = `${partial}.tmp`;
      const fh = await open(tmp, 'w', 0o600);
      try {
        await writeAll(fh, [zeros()], 0);
        await this.timedSync(fh);
      } finally {
        await fh.close();
      }
      await rename(tmp, partial);
      await fsyncDir(this.dir);
    }
    this.cur = { tli, segno, fh: await open(partial, this.openFlags), path: partial, partial: true, dirty: false };
    return this.cur;
  }

  /** fdatasync + close the open segment; a complete one gets its final name. */
  private async closeCurrent(): Promise<void> {
    const c = this.cur;
    if (!c) return;
    this.cur = null;
    try {
      if (c.dirty) await this.timedSync(c.fh);
    } finally {
      await c.fh.close();
    }
  }

  private async completeCurrent(): Promise<void> {
    const c = this.cur;
    if (!c) return;
    await this.closeCurrent();
    const path = c.partial ? c.path.slice(0, -'.partial'.length) : c.path;
    if (c.partial) {
      await rename(c.path, path);
      await fsyncDir(this.dir);
    }
    this.hooks.onComplete?.({ tli: c.tli, segno: c.segno, path });
  }

  /**
   * Writes contiguous WAL starting at `lsn` on Postgres timeline `tli` (not synced: call
   * {@link sync}). Segments that become complete are synced, renamed and the directory fsync'ed
   * here. Returns the end LSN.
   */
  async write(tli: number, lsn: bigint, chunks: readonly Buffer[]): Promise<bigint> {
    let total = 0;
    for (const c of chunks) total += c.length;
    // Inline (synchronous on the event loop) only for small batches: a large one (a burst, a
    // 4 MiB piece of peer recovery) would hold up every other timeline and HTTP request.
    const inline = this.syncMethod === 'open_datasync_inline' && total <= INLINE_WRITE_MAX;
    let pos = lsn;
    let pieces: Buffer[] = [];
    let piecesStart = lsn;
    const flushPieces = async (): Promise<void> => {
      if (pieces.length === 0) return;
      const seg = await this.openSegment(tli, segmentOf(piecesStart));
      this.hooks.beforeWrite?.();
      const t0 = performance.now();
      const slow = this.hooks.writeMsPerMiB ? (this.hooks.writeMsPerMiB * pieces.reduce((a, b) => a + b.length, 0)) / (1024 * 1024) : 0;
      let n: number;
      if (inline) {
        if (slow > 0) Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, slow); // a slow synchronous syscall
        n = writeAllSync(seg.fh.fd, pieces, Number(piecesStart % SEG));
      } else {
        if (slow > 0) await new Promise((r) => setTimeout(r, slow)); // the same, on the thread pool
        n = await writeAll(seg.fh, pieces, Number(piecesStart % SEG));
      }
      if (this.syncMethod !== 'fdatasync') this.hooks.onSync?.((performance.now() - t0) / 1000);
      else seg.dirty = true;
      this.hooks.onBytes?.(n);
      // Past the middle of a segment: get the next one ready off the commit path.
      if (Number(pos % SEG) > WAL_SEGMENT_SIZE / 2) this.preallocate(tli, segmentOf(piecesStart) + 1n);
      pieces = [];
    };
    for (let chunk of chunks) {
      while (chunk.length > 0) {
        const room = Number(SEG - (pos % SEG));
        const part = chunk.length <= room ? chunk : chunk.subarray(0, room);
        if (pieces.length === 0) piecesStart = pos;
        pieces.push(part);
        pos += BigInt(part.length);
        chunk = chunk.subarray(part.length);
        if (pos % SEG === 0n) {
          await flushPieces();
          await this.completeCurrent();
        }
      }
    }
    await flushPieces();
    return pos;
  }

  /** Starts pre-filling segment `segno` of `tli` in the background (once). */
  private preallocate(tli: number, segno: bigint): void {
    const path = join(this.dir, `${segmentFileName(tli, segno)}.partial${PREALLOC_SUFFIX}`);
    if (this.prealloc?.path === path) return;
    const previous = this.prealloc;
    const ready = (async (): Promise<boolean> => {
      if (previous) await this.discardPrealloc(previous);
      try {
        if ((await sizeOf(path.slice(0, -PREALLOC_SUFFIX.length))) === WAL_SEGMENT_SIZE) return false; // exists already
        const fh = await open(path, 'w', 0o600);
        try {
          await writeAll(fh, [zeros()], 0);
          await fh.datasync();
        } finally {
          await fh.close();
        }
        return true;
      } catch {
        await rm(path, { force: true }).catch(() => {});
        return false;
      }
    })();
    this.prealloc = { path, ready };
  }

  private async discardPrealloc(p: { path: string; ready: Promise<boolean> }): Promise<void> {
    await p.ready.catch(() => false);
    await rm(p.path, { force: true }).catch(() => {});
  }

  /** fdatasync the segment being written (one per batch). */
  async sync(): Promise<void> {
    const c = this.cur;
    if (c && c.dirty) {
      await this.timedSync(c.fh);
      c.dirty = false;
    }
  }

  /** Closes the open segment; a background pre-fill is finished and removed. */
  async close(): Promise<void> {
    await this.closeCurrent();
    const p = this.prealloc;
    this.prealloc = null;
    if (p) await this.discardPrealloc(p);
  }

  /** The files held, sorted by name (segments then history files). */
  async list(): Promise<StoredFile[]> {
    let names: string[];
    try {
      names = await readdir(this.dir);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
      throw err;
    }
    const out: StoredFile[] = [];
    for (const name of names.sort()) {
      const seg = parseSegmentFileName(name);
      if (seg) {
        const size = await sizeOf(join(this.dir, name));
        if (size !== undefined) out.push({ name, kind: 'segment', tli: seg.tli, segno: seg.segno, partial: seg.partial, size });
      } else if (/^[0-9A-F]{8}\.history$/.test(name)) {
        const size = await sizeOf(join(this.dir, name));
        if (size !== undefined) out.push({ name, kind: 'history', tli: parseInt(name.slice(0, 8), 16), size });
      }
    }
    return out;
  }

  /** The lowest segment number held (any timeline), from names only. */
  async oldestSegment(): Promise<bigint | undefined> {
    let names: string[];
    try {
      names = await readdir(this.dir);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw err;
    }
    let min: bigint | undefined;
    for (const name of names) {
      const seg = parseSegmentFileName(name);
      if (seg && (min === undefined || seg.segno < min)) min = seg.segno;
    }
    return min;
  }

  /** Writes `<TLI>.history` atomically (tmp, fsync, rename, fsync dir). */
  async writeHistory(tli: number, content: Buffer): Promise<void> {
    const path = join(this.dir, historyFileName(tli));
    const tmp = `${path}.tmp`;
    const fh = await open(tmp, 'w', 0o600);
    try {
      await writeAll(fh, [content], 0);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, path);
    await fsyncDir(this.dir);
  }

  async hasHistory(tli: number): Promise<boolean> {
    return (await sizeOf(join(this.dir, historyFileName(tli)))) !== undefined;
  }

  /**
   * The real durable end of WAL on `tli`, from the files, starting at `from` (a position known
   * durable, e.g. the control file's flush LSN). Makes whatever the page cache holds durable
   * (fdatasync), then walks the WAL page headers of the partial segment: a page whose header
   * carries its own address was written; within the last one, the last non-zero byte ends the
   * data. This may under-estimate (trailing zero bytes of a record) but never over-estimates:
   * resuming earlier only makes the compute send those bytes again.
   * A `.partial` that turns out complete (a crash between its last sync and its rename) is renamed.
   */
  async recoverEnd(tli: number, from: bigint): Promise<bigint> {
    let pos = from;
    for (;;) {
      const segno = segmentOf(pos);
      const name = segmentFileName(tli, segno);
      const final = join(this.dir, name);
      const partial = `${final}.partial`;
      if ((await sizeOf(final)) === WAL_SEGMENT_SIZE) {
        pos = segmentStart(segno + 1n);
        continue;
      }
      if ((await sizeOf(partial)) !== WAL_SEGMENT_SIZE) {
        // No file for this segment: what we hold ends at its start at the latest.
        return pos % SEG === 0n ? pos : segmentStart(segno);
      }
      const fh = await open(partial, 'r+');
      let buf: Buffer;
      try {
        await fh.datasync();
        buf = Buffer.alloc(WAL_SEGMENT_SIZE);
        await fh.read(buf, 0, WAL_SEGMENT_SIZE, 0);
      } finally {
        await fh.close();
      }
      const segBase = segmentStart(segno);
      const end = scanWrittenEnd(buf, segBase, Number(pos - segBase));
      if (end === WAL_SEGMENT_SIZE) {
        await rename(partial, final);
        await fsyncDir(this.dir);
        pos = segmentStart(segno + 1n);
        continue;
      }
      const found = segBase + BigInt(end);
      return found > pos ? found : pos;
    }
  }

  /**
   * Cuts WAL off at `lsn` on `tli`: the rest of that segment is zeroed and it becomes `.partial`
   * again; later segments (of any timeline) and segments of newer timelines are removed.
   */
  async truncate(tli: number, lsn: bigint): Promise<void> {
    await this.close();
    for (const name of await readdir(this.dir)) {
      if (name.endsWith(PREALLOC_SUFFIX) || name.endsWith('.tmp')) await rm(join(this.dir, name), { force: true });
    }
    const cut = segmentOf(lsn);
    // Highest first: a crash part-way never leaves a later segment after a gap (which the
    // recovery at load would count as held WAL); the pending cut is redone at load anyway.
    const files = (await this.list()).sort((a, b) => (a.kind !== b.kind ? (a.kind === 'segment' ? -1 : 1) : a.segno! > b.segno! ? -1 : a.segno! < b.segno! ? 1 : b.tli! - a.tli!));
    for (const f of files) {
      if (f.kind !== 'segment') {
        if (f.kind === 'history' && f.tli! > tli) await rm(join(this.dir, f.name), { force: true });
        continue;
      }
      if (f.segno! > cut || (f.segno! === cut && f.tli! > tli) || (f.segno! === cut && f.tli === tli && lsn % SEG === 0n)) {
        await rm(join(this.dir, f.name), { force: true });
      }
    }
    if (lsn % SEG !== 0n) {
      const name = segmentFileName(tli, cut);
      const final = join(this.dir, name);
      const partial = `${final}.partial`;
      let path: string | undefined;
      if ((await sizeOf(final)) === WAL_SEGMENT_SIZE) path = final;
      else if ((await sizeOf(partial)) === WAL_SEGMENT_SIZE) path = partial;
      if (path) {
        const off = Number(lsn % SEG);
        const fh = await open(path, 'r+');
        try {
          await writeAll(fh, [zeros().subarray(off)], off);
          await fh.datasync();
        } finally {
          await fh.close();
        }
        if (path === final) await rename(final, partial);
      }
    }
    await fsyncDir(this.dir);
  }
}

/**
 * Offset just past the written data of a segment image, looking from `from` on: page headers must
 * carry their own address (`xlp_pageaddr`) and a non-zero magic.
 */
export function scanWrittenEnd(buf: Buffer, segBase: bigint, from: number): number {
  let page = Math.floor(from / XLOG_BLCKSZ) * XLOG_BLCKSZ;
  let lastGood = -1;
  for (; page < buf.length; page += XLOG_BLCKSZ) {
    const magic = buf.readUInt16LE(page);
    const addr = buf.readBigUInt64LE(page + 8);
    if (magic === 0 || addr !== segBase + BigInt(page)) break;
    lastGood = page;
  }
  if (lastGood < 0) return from;
  let end = lastGood + XLOG_BLCKSZ;
  while (end > lastGood && buf[end - 1] === 0) end--;
  return Math.max(end, from);
}

async function sizeOf(path: string): Promise<number | undefined> {
  try {
    return (await stat(path)).size;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
}

/** writev at a position, looping over short writes. */
async function writeAll(fh: FileHandle, bufs: Buffer[], position: number): Promise<number> {
  let total = 0;
  for (const b of bufs) total += b.length;
  let done = 0;
  // The callback API on the raw fd: the hot path, lighter than FileHandle's promise machinery.
  let bytesWritten = await writevFd(fh.fd, bufs, position);
  done += bytesWritten;
  while (done < total) {
    // Short write (rare on regular files): write the rest piece by piece.
    let skip = done;
    for (const b of bufs) {
      if (skip >= b.length) { skip -= b.length; continue; }
      const rest = b.subarray(skip);
      skip = 0;
      ({ bytesWritten } = await fh.write(rest, 0, rest.length, position + done));
      if (bytesWritten === 0) throw new Error('write wrote 0 bytes');
      done += bytesWritten;
      if (bytesWritten < rest.length) break;
    }
  }
  return total;
}

/** Synchronous writev at a position (O_DSYNC: durable on return), looping over short writes. */
function writeAllSync(fd: number, bufs: Buffer[], position: number): number {
  let total = 0;
  for (const b of bufs) total += b.length;
  let done = writevSync(fd, bufs, position);
  while (done < total) {
    let skip = done;
    for (const b of bufs) {
      if (skip >= b.length) { skip -= b.length; continue; }
      const rest = b.subarray(skip);
      const n = writeSync(fd, rest, 0, rest.length, position + done);
      if (n === 0) throw new Error('write wrote 0 bytes');
      done += n;
      break;
    }
  }
  return total;
}

function writevFd(fd: number, bufs: Buffer[], position: number): Promise<number> {
  return new Promise((resolve, reject) => writevCb(fd, bufs, position, (err, n) => (err ? reject(err) : resolve(n))));
}

function fdatasyncFd(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fdatasyncCb(fd, (err) => (err ? reject(err) : resolve())));
}
