/**
 * The compute host's image cache (DESIGN §4 "Compute start (stateless)"): pageserver images kept
 * unpacked under `<dataRoot>/image-cache/`, each data directory made from one by a reflink copy
 * (`cp -a --reflink=always`): the copy shares every block with the cache until Postgres writes
 * to it, so starting a 1 GB branch costs a metadata copy of ~1,000 files instead of streaming
 * and unpacking 1 GB.
 *
 * Only where the file system clones files (XFS with reflink, btrfs): the cache probes it when it
 * opens and is off otherwise (ext4, tmpfs), so a data root there keeps the plain path — a tar
 * stream per start, and no second copy of every image on disk.
 *
 * Entries are immutable: `<key>/` (the image's files, owned by the compute's user) next to
 * `<key>.json` (what it is, and its size). An entry is unpacked under a temporary name and
 * renamed into place, so a half-made one never looks like data; leftovers are removed when the
 * cache opens. The least recently used entries are removed past `maxBytes` (blocks still shared
 * with a data directory stay in use until that is gone too).
 *
 * Each entry warmed ahead also gets one spare clone (`spare/`), made before any start needs it: a
 * start renames it into place (~1 ms against ~0.1 s of `cp` for a 1 GB image), and a new spare
 * is made a few seconds later. Spares are dropped when the cache opens.
 *
 * WAL files of start plans are kept too (`wal/<owner>.<name>`): a history file, or a segment the
 * plan names whole (`valid_to` at its end): the same owner and name are then always the same
 * bytes. A start clones them into place instead of an HTTP download (16 MiB took 0.1–0.5 s
 * through Node.js on a busy 2-core machine, against ~10 ms for a clone). They are not fsync'd
 * (each start's Postgres syncs its file system first); instead they are dropped whenever the
 * cache opens, so none survives a crash of the host.
 */
import { randomBytes } from 'node:crypto';
import { constants } from 'node:fs';
import { chown, copyFile, mkdir, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { XenonError } from '../lib/errors.ts';
import type { Logger } from '../lib/logger.ts';
import { ensureOwnedDir, runCommand, type RunAs } from '../lib/postgres.ts';
import { parseLsn, parseSegmentFileName, segmentStart, WAL_SEGMENT_SIZE } from '../lib/lsn.ts';
import type { StartPlan, StartPlanWal } from '../pageserver/api.ts';
import { downloadOne, extractImage } from './materialise.ts';

export type CachedImage = StartPlan['image'];

export interface ImageCacheOptions {
  /** On the same file system as the data directories (a reflink cannot cross file systems). */
  dir: string;
  runAs: RunAs | undefined;
  logger: Logger;
  /** Entries beyond this many bytes (by image size) are evicted, least recently used first. */
  maxBytes: number;
  /** Longest wait for a response's headers, or between two chunks of a body (default 60 s). */
  fetchTimeoutMs?: number;
  /** A spare clone taken by a start is made again this much later (default 3 s: not during that start). */
  spareRefillDelayMs?: number;
}

interface Entry {
  key: string;
  bytes: number;
  usedAt: number;
}

const KEY_PART = /^[A-Za-z0-9_-]{1,128}$/;
const WAL_DIR = 'wal';
const SPARE_DIR = 'spare';
const WAL_NAME = /^(?:[0-9A-F]{24}|[0-9A-F]{8}\.history)$/;

/** The cache key of a plan's WAL file, when it names bytes that never change (else undefined). */
export function walKey(f: StartPlanWal): string | undefined {
  if (!f.owner || !KEY_PART.test(f.owner) || !WAL_NAME.test(f.name)) return undefined;
  if (f.name.endsWith('.history')) return `${WAL_DIR}/${f.owner}.${f.name}`;
  const seg = parseSegmentFileName(f.name);
  if (!seg || f.valid_to === undefined) return undefined;
  try {
    // Only whole segments: a masked tail changes with every target.
    if (parseLsn(f.valid_to) !== segmentStart(seg.segno + 1n)) return undefined;
  } catch {
    return undefined;
  }
  return `${WAL_DIR}/${f.owner}.${f.name}`;
}

/** The cache key of an image: its timeline and id (both ids are safe path parts, checked). */
export function imageKey(image: Pick<CachedImage, 'timeline_id' | 'id'>): string {
  if (!KEY_PART.test(image.timeline_id) || !KEY_PART.test(image.id)) {
    throw new XenonError('CP_BAD_REQUEST', `unsafe image reference ${JSON.stringify(`${image.timeline_id}/${image.id}`)}`);
  }
  return `${image.timeline_id}.${image.id}`;
}

/** Whether `dir`'s file system clones files (FICLONE): one small probe file. */
export async function canReflink(dir: string): Promise<boolean> {
  const src = join(dir, `.reflink-probe-${randomBytes(4).toString('hex')}`);
  const dst = `${src}.clone`;
  try {
    await writeFile(src, 'xenon reflink probe\n');
    await copyFile(src, dst, constants.COPYFILE_FICLONE_FORCE);
    return true;
  } catch {
    return false; // EOPNOTSUPP, EXDEV, ENOSYS, EINVAL: no cloning here
  } finally {
    await rm(src, { force: true });
    await rm(dst, { force: true });
  }
}

export class ImageCache {
  private readonly entries = new Map<string, Entry>();
  private readonly inflight = new Map<string, Promise<{ dir: string; fetched: number }>>();
  /** Entries being cloned from right now: never evicted under a running `cp`. */
  private readonly pins = new Map<string, number>();
  /** Per entry, one clone made ahead (`spare/<key>.<random>`): a start renames it into place. */
  private readonly spares = new Map<string, string>();
  private readonly sparing = new Map<string, Promise<void>>();
  private readonly timers = new Set<NodeJS.Timeout>();
  private closed = false;

  private constructor(
    private readonly o: ImageCacheOptions,
    /** False where the file system cannot clone: the cache then holds nothing. */
    readonly enabled: boolean,
  ) {}

  /** Opens (or creates) the cache; removes half-made entries; probes for reflink support. */
  static async open(o: ImageCacheOptions): Promise<ImageCache> {
    await ensureOwnedDir(o.dir, o.runAs, 0o700);
    const enabled = await canReflink(o.dir);
    const cache = new ImageCache(o, enabled);
    if (!enabled) {
      o.logger.info('image cache off: the data root\'s file system does not clone files (use XFS with reflink or btrfs for fast starts from images)', { dir: o.dir });
      await rm(o.dir, { recursive: true, force: true });
      return cache;
    }
    const names = await readdir(o.dir);
    const metas = new Set(names.filter((n) => n.endsWith('.json')).map((n) => n.slice(0, -5)));
    for (const name of names) {
      if (name.endsWith('.json')) continue;
      if (!metas.has(name)) { await rm(join(o.dir, name), { recursive: true, force: true }); continue; }
      try {
        const meta = JSON.parse(await readFile(join(o.dir, `${name}.json`), 'utf8')) as { bytes?: unknown; used_at?: unknown };
        if (typeof meta.bytes !== 'number') throw new Error('no size');
        cache.entries.set(name, { key: name, bytes: meta.bytes, usedAt: typeof meta.used_at === 'number' ? meta.used_at : 0 });
      } catch {
        await rm(join(o.dir, name), { recursive: true, force: true });
        await rm(join(o.dir, `${name}.json`), { force: true });
      }
      metas.delete(name);
    }
    for (const orphan of metas) await rm(join(o.dir, `${orphan}.json`), { force: true });
    await mkdir(join(o.dir, WAL_DIR), { mode: 0o700 }); // emptied above: WAL copies never outlive a restart
    await ensureOwnedDir(join(o.dir, SPARE_DIR), o.runAs, 0o700); // emptied above too
    o.logger.info('image cache ready', { dir: o.dir, entries: cache.entries.size, bytes: cache.bytes(), maxBytes: o.maxBytes });
    return cache;
  }

  /** Starts and warm-ups that found their image here, and those that fetched it. */
  readonly counts = { hits: 0, misses: 0, walHits: 0, walMisses: 0 };

  stats(): { enabled: boolean; entries: number; bytes: number; spares: number; hits: number; misses: number; walHits: number; walMisses: number } {
    return { enabled: this.enabled, entries: this.entries.size, bytes: this.bytes(), spares: this.spares.size, ...this.counts };
  }

  /** Clones the cached copy of `f` to `dest` (owned by `runAs`); false when there is none. */
  async copyWal(f: StartPlanWal, dest: string, runAs: RunAs | undefined): Promise<boolean> {
    const key = this.enabled ? walKey(f) : undefined;
    const e = key ? this.entries.get(key) : undefined;
    if (!key || !e) {
      if (key) this.counts.walMisses++;
      return false;
    }
    const tmp = `${dest}.xenon-tmp`;
    try {
      await copyFile(join(this.o.dir, key), tmp, constants.COPYFILE_FICLONE_FORCE);
      if (runAs) await chown(tmp, runAs.uid, runAs.gid);
      await rename(tmp, dest);
    } catch (err) {
      await rm(tmp, { force: true });
      this.o.logger.warn('could not clone a cached WAL file; downloading it', { key, err });
      return false;
    }
    e.usedAt = Date.now();
    this.counts.walHits++;
    return true;
  }

  /** Keeps a clone of the downloaded `path` as the copy of `f` (when its bytes never change). */
  async keepWal(f: StartPlanWal, path: string): Promise<void> {
    const key = this.enabled ? walKey(f) : undefined;
    if (!key || this.entries.has(key)) return;
    const dest = join(this.o.dir, key);
    const tmp = `${dest}.tmp-${randomBytes(4).toString('hex')}`;
    try {
      await copyFile(path, tmp, constants.COPYFILE_FICLONE_FORCE);
      await rename(tmp, dest);
      this.entries.set(key, { key, bytes: (await stat(dest)).size, usedAt: Date.now() });
    } catch (err) {
      await rm(tmp, { force: true });
      this.o.logger.warn('could not keep a WAL file in the cache', { key, err });
      return;
    }
    await this.evict(key);
  }

  /** Bytes held (by image size). */
  bytes(): number {
    let n = 0;
    for (const e of this.entries.values()) n += e.bytes;
    return n;
  }

  has(image: Pick<CachedImage, 'timeline_id' | 'id'>): boolean {
    return this.entries.has(imageKey(image));
  }

  /**
   * The unpacked image, fetched and unpacked now if the cache lacks it (one download per image,
   * however many starts ask at once). `hit`: it was there; `fetched`: bytes this call downloaded
   * (0 on a hit, and for callers that waited for another's download).
   */
  async ensure(image: CachedImage): Promise<{ dir: string; fetched: number; hit: boolean }> {
    if (!this.enabled) throw new XenonError('CP_COMPUTE_START_FAILED', 'the image cache is off on this file system');
    const key = imageKey(image);
    const hit = this.entries.get(key);
    if (hit) {
      this.counts.hits++;
      hit.usedAt = Date.now();
      await this.writeMeta(hit).catch(() => {});
      return { dir: join(this.o.dir, key), fetched: 0, hit: true };
    }
    this.counts.misses++;
    const joined = this.inflight.get(key);
    if (joined) return { ...(await joined), fetched: 0, hit: false };
    const p = this.fetch(key, image).finally(() => this.inflight.delete(key));
    this.inflight.set(key, p);
    return { ...(await p), hit: false };
  }

  /** Makes `dataDir` (which must exist, empty, owned by the compute's user) a clone of the image. */
  async cloneInto(image: CachedImage, dataDir: string): Promise<{ fetched: number; hit: boolean }> {
    const key = imageKey(image);
    const unpin = this.pin(key);
    try {
      const { dir, fetched, hit } = await this.ensure(image);
      const spare = this.spares.get(key);
      if (spare) {
        // Made ahead: a rename (onto the empty data directory) instead of ~0.1 s of `cp`.
        this.spares.delete(key);
        try {
          await rename(spare, dataDir);
          this.refillLater(image);
          return { fetched, hit };
        } catch (err) {
          this.o.logger.warn('could not use a spare clone; cloning', { key, err });
          await rm(spare, { recursive: true, force: true }).catch(() => {});
        }
      }
      await run('cp', ['-a', '--reflink=always', '--', `${dir}/.`, `${dataDir}/`], this.o.runAs, `cloning image ${key} into ${dataDir}`);
      this.refillLater(image);
      return { fetched, hit };
    } finally {
      unpin();
    }
  }

  /**
   * Makes the entry's spare clone (no-op when it has one, or one is being made). Blocks are
   * shared: a spare costs the metadata of the image's files only.
   */
  async prepareSpare(image: Pick<CachedImage, 'timeline_id' | 'id'>): Promise<void> {
    const key = imageKey(image);
    if (!this.enabled || this.closed || !this.entries.has(key) || this.spares.has(key)) return;
    let p = this.sparing.get(key);
    if (!p) {
      p = (async () => {
        const dir = join(this.o.dir, SPARE_DIR, `${key}.${randomBytes(4).toString('hex')}`);
        const unpin = this.pin(key);
        try {
          await ensureOwnedDir(dir, this.o.runAs, 0o700);
          await run('cp', ['-a', '--reflink=always', '--', `${join(this.o.dir, key)}/.`, `${dir}/`], this.o.runAs, `a spare clone of image ${key}`);
          if (this.entries.has(key) && !this.closed) this.spares.set(key, dir);
          else await rm(dir, { recursive: true, force: true });
        } catch (err) {
          await rm(dir, { recursive: true, force: true }).catch(() => {});
          this.o.logger.warn('could not make a spare clone', { key, err });
        } finally {
          unpin();
        }
      })().finally(() => this.sparing.delete(key));
      this.sparing.set(key, p);
    }
    return p;
  }

  /** Keeps entry `key` from eviction until the returned function is called. */
  private pin(key: string): () => void {
    this.pins.set(key, (this.pins.get(key) ?? 0) + 1);
    return () => {
      const n = (this.pins.get(key) ?? 1) - 1;
      if (n > 0) this.pins.set(key, n);
      else this.pins.delete(key);
    };
  }

  private refillLater(image: Pick<CachedImage, 'timeline_id' | 'id'>): void {
    if (this.closed) return;
    const timer = setTimeout(() => {
      this.timers.delete(timer);
      void this.prepareSpare(image);
    }, this.o.spareRefillDelayMs ?? 3000);
    timer.unref();
    this.timers.add(timer);
  }

  /** Stops making spares (the driver is closing); waits for one being made. */
  async close(): Promise<void> {
    this.closed = true;
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
    await Promise.all([...this.sparing.values()]);
  }

  /**
   * Fetches what a start from `plan` needs (its image, and the WAL files the cache keeps) ahead
   * of the start; failures are only logged. False when the cache is off or something failed.
   */
  async warm(plan: Pick<StartPlan, 'image' | 'wal'>): Promise<boolean> {
    if (!this.enabled) return false;
    try {
      await this.ensure(plan.image);
      await this.prepareSpare(plan.image);
      for (const f of plan.wal) {
        const key = walKey(f);
        if (!key || this.entries.has(key)) continue;
        const tmp = join(this.o.dir, `${WAL_DIR}/.fetch-${randomBytes(4).toString('hex')}`);
        try {
          await downloadOne(tmp, f.url, undefined, this.o.fetchTimeoutMs ?? 60_000, f.name.endsWith('.history') ? undefined : WAL_SEGMENT_SIZE);
          await this.keepWal(f, tmp);
        } finally {
          await rm(tmp, { force: true });
        }
      }
      return true;
    } catch (err) {
      this.o.logger.warn('could not warm the image cache', { image: plan.image.id, timeline: plan.image.timeline_id, err });
      return false;
    }
  }

  private async fetch(key: string, image: CachedImage): Promise<{ dir: string; fetched: number }> {
    const started = Date.now();
    const tmp = join(this.o.dir, `.tmp-${key}-${randomBytes(4).toString('hex')}`);
    await ensureOwnedDir(tmp, this.o.runAs, 0o700);
    let fetched: number;
    try {
      fetched = await extractImage(tmp, image.url, this.o.runAs, this.o.fetchTimeoutMs ?? 60_000, this.o.logger);
      if (image.size > 0 && fetched !== image.size) throw new XenonError('PS_UNAVAILABLE', `image ${image.url}: ${fetched} bytes, the plan says ${image.size}`);
      // Durable before it is an entry: data directories cloned from it share its blocks.
      await run('sync', ['-f', tmp], undefined, `syncing image ${key}`);
      const entry: Entry = { key, bytes: fetched, usedAt: Date.now() };
      await this.writeMeta(entry);
      await rename(tmp, join(this.o.dir, key));
      this.entries.set(key, entry);
    } catch (err) {
      await rm(tmp, { recursive: true, force: true }).catch(() => {});
      throw err;
    }
    this.o.logger.info('image cached', { key, bytes: fetched, ms: Date.now() - started });
    await this.evict(key);
    return { dir: join(this.o.dir, key), fetched };
  }

  private async writeMeta(e: Entry): Promise<void> {
    const path = join(this.o.dir, `${e.key}.json`);
    await writeFile(`${path}.tmp`, JSON.stringify({ bytes: e.bytes, used_at: e.usedAt }));
    await rename(`${path}.tmp`, path);
  }

  /** Removes the least recently used entries (never `keep`) until within `maxBytes`. */
  private async evict(keep: string): Promise<void> {
    const victims = [...this.entries.values()].filter((e) => e.key !== keep).sort((a, b) => a.usedAt - b.usedAt);
    let total = this.bytes();
    for (const v of victims) {
      if (total <= this.o.maxBytes) break;
      if (this.inflight.has(v.key) || this.pins.has(v.key)) continue;
      this.entries.delete(v.key);
      total -= v.bytes;
      await rm(join(this.o.dir, `${v.key}.json`), { force: true });
      await rm(join(this.o.dir, v.key), { recursive: true, force: true });
      const spare = this.spares.get(v.key);
      this.spares.delete(v.key);
      if (spare) await rm(spare, { recursive: true, force: true });
      this.o.logger.info('image evicted from the cache', { key: v.key, bytes: v.bytes });
    }
  }
}

/** `runCommand` with the failure as the start's error. */
async function run(cmd: string, args: string[], runAs: RunAs | undefined, what: string): Promise<void> {
  try {
    await runCommand(cmd, args, runAs);
  } catch (err) {
    throw new XenonError('CP_COMPUTE_START_FAILED', `${what}: ${(err as Error).message}`, { cause: err });
  }
}
