/**
 * Images from running computes (DESIGN §4 "Images and GC"): `pg_basebackup -Ft -X none` of the
 * attached compute gives a tar of its data directory (with `backup_label`, empty `pg_wal`) and a
 * `backup_manifest` naming the WAL range the backup needs; the tar goes to the object store as
 * a `backup` image whose `lsn` is the backup's start (redo) LSN and `end_lsn` the point from which
 * it is consistent. The WAL itself comes from the safekeepers through the ingest.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { XenonError } from '../lib/errors.ts';
import type { Logger } from '../lib/logger.ts';
import { formatLsn, parseLsn } from '../lib/lsn.ts';
import type { AttachComputeRequest, ImageInfo } from './api.ts';
import { keys, type Timelines } from './types.ts';

export interface MakeImageOptions {
  timelines: Timelines;
  tenantId: string;
  timelineId: string;
  compute: AttachComputeRequest;
  /** Directory of `pg_basebackup`. */
  pgBin: string;
  /** A scratch directory; each image works in its own subdirectory, removed afterwards. */
  tmpDir: string;
  logger: Logger;
}

/** The parts of `backup_manifest` an image needs. */
export interface BackupWalRange {
  startLsn: bigint;
  endLsn: bigint;
  pgTimeline: number;
}

/** Reads `WAL-Ranges` of a `backup_manifest` (JSON): the first range's start and TLI, the last one's end. */
export function parseBackupManifest(text: string): BackupWalRange {
  let m: unknown;
  try {
    m = JSON.parse(text);
  } catch (err) {
    throw new XenonError('INTERNAL', `backup_manifest is not JSON: ${(err as Error).message}`);
  }
  const ranges = (m as { 'WAL-Ranges'?: unknown })['WAL-Ranges'];
  if (!Array.isArray(ranges) || ranges.length === 0) throw new XenonError('INTERNAL', 'backup_manifest has no WAL-Ranges');
  const first = ranges[0] as Record<string, unknown>;
  const last = ranges[ranges.length - 1] as Record<string, unknown>;
  if (typeof first['Start-LSN'] !== 'string' || typeof last['End-LSN'] !== 'string' || typeof first.Timeline !== 'number') {
    throw new XenonError('INTERNAL', 'backup_manifest WAL-Ranges lack Start-LSN / End-LSN / Timeline');
  }
  return { startLsn: parseLsn(first['Start-LSN']), endLsn: parseLsn(last['End-LSN']), pgTimeline: first.Timeline };
}

/** `0000000002000028-a1b2c3`: sorts by LSN, unique. */
export function imageId(lsn: bigint): string {
  return lsn.toString(16).toUpperCase().padStart(16, '0') + '-' + randomBytes(3).toString('hex');
}

function runTool(cmd: string, args: string[], env: NodeJS.ProcessEnv): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { PATH: process.env.PATH, LANG: 'C', LC_ALL: 'C', ...env } });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out = (out + d.toString()).slice(-4000)));
    child.stderr.on('data', (d: Buffer) => (out = (out + d.toString()).slice(-4000)));
    child.on('error', (err) => reject(new XenonError('INTERNAL', `spawn ${cmd}: ${err.message}`, { cause: err })));
    child.on('exit', (code, sig) => {
      if (code === 0) resolve();
      else reject(new XenonError('PS_UNAVAILABLE', `${cmd.split('/').pop()} exited with ${code ?? sig}: ${out.trim().slice(-1500)}`));
    });
  });
}

/** Per `Timelines` and timeline: the image being made (one at a time). */
const running = new WeakMap<Timelines, Map<string, Promise<unknown>>>();

/**
 * Makes a `backup` image of the timeline from its running compute and records it in the index.
 * One image at a time per timeline (a second call waits for the first). The temp dir is always
 * removed; the password goes to `pg_basebackup` through `PGPASSWORD` only, never to a log.
 */
export function makeImage(o: MakeImageOptions): Promise<ImageInfo> {
  let perStore = running.get(o.timelines);
  if (!perStore) running.set(o.timelines, (perStore = new Map()));
  const key = `${o.tenantId}/${o.timelineId}`;
  const prev = perStore.get(key) ?? Promise.resolve();
  const next = prev.catch(() => {}).then(() => makeImageNow(o));
  perStore.set(key, next);
  void next.catch(() => {}).finally(() => { if (perStore.get(key) === next) perStore.delete(key); });
  return next;
}

async function makeImageNow(o: MakeImageOptions): Promise<ImageInfo> {
  const log = o.logger.child({ component: 'imager', tenant_id: o.tenantId, timeline_id: o.timelineId });
  await o.timelines.read(o.tenantId, o.timelineId); // PS_TIMELINE_NOT_FOUND / PS_INDEX_CORRUPT first
  await mkdir(o.tmpDir, { recursive: true });
  const dir = await mkdtemp(join(o.tmpDir, 'image-'));
  const t0 = Date.now();
  try {
    const out = join(dir, 'backup');
    log.info('making an image', { host: o.compute.host, port: o.compute.port, user: o.compute.user });
    await runTool(
      join(o.pgBin, 'pg_basebackup'),
      ['-h', o.compute.host, '-p', String(o.compute.port), '-U', o.compute.user, '-D', out, '-Ft', '-X', 'none', '-c', 'fast', '--no-sync', '-w', '-l', `xenon image ${o.timelineId}`],
      { PGPASSWORD: o.compute.password, PGCONNECT_TIMEOUT: '10', PGAPPNAME: 'xenon-imager' },
    );
    const range = parseBackupManifest(await readFile(join(out, 'backup_manifest'), 'utf8'));
    const id = imageId(range.startLsn);
    const { size } = await o.timelines.store.put(keys.image(o.tenantId, o.timelineId, id), createReadStream(join(out, 'base.tar')));
    const info: ImageInfo = {
      id, kind: 'backup', lsn: formatLsn(range.startLsn), end_lsn: formatLsn(range.endLsn), pg_timeline: range.pgTimeline,
      size, created_at: new Date().toISOString(),
    };
    await o.timelines.update(o.tenantId, o.timelineId, (ix) => {
      ix.images.push(info);
    });
    log.info('image made', { image_id: id, lsn: info.lsn, end_lsn: info.end_lsn, size, ms: Date.now() - t0 });
    return info;
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

export interface ImagerOptions {
  timelines: Timelines;
  /** Attached computes by `${tenantId}/${timelineId}`. */
  computes: Map<string, AttachComputeRequest>;
  /** Make a new image once the tip is this many bytes of WAL past the newest image. */
  imageWalBytes: number;
  intervalMs: number;
  pgBin: string;
  tmpDir: string;
  logger: Logger;
}

/**
 * Every `intervalMs`, for each attached compute: an image when the timeline has none of its own,
 * or when `last_record_lsn` is more than `imageWalBytes` past the newest one. A failure (the
 * compute stopping is normal) backs that timeline off exponentially, up to 32 intervals.
 */
export function startImager(o: ImagerOptions): { close(): Promise<void> } {
  const log = o.logger.child({ component: 'imager' });
  const backoff = new Map<string, { failures: number; until: number }>();
  const busy = new Map<string, Promise<void>>();
  let closed = false;
  let timer: NodeJS.Timeout | undefined;

  async function consider(key: string, compute: AttachComputeRequest): Promise<void> {
    const slash = key.indexOf('/');
    const tenantId = key.slice(0, slash);
    const timelineId = key.slice(slash + 1);
    try {
      const ix = await o.timelines.read(tenantId, timelineId);
      const newest = ix.images.reduce<bigint | undefined>((m, i) => {
        const l = parseLsn(i.lsn);
        return m === undefined || l > m ? l : m;
      }, undefined);
      const tip = parseLsn(ix.last_record_lsn);
      if (newest !== undefined && tip - newest <= BigInt(o.imageWalBytes)) return;
      await makeImage({ timelines: o.timelines, tenantId, timelineId, compute, pgBin: o.pgBin, tmpDir: o.tmpDir, logger: o.logger });
      backoff.delete(key);
    } catch (err) {
      const b = backoff.get(key) ?? { failures: 0, until: 0 };
      b.failures++;
      b.until = Date.now() + o.intervalMs * Math.min(32, 2 ** (b.failures - 1));
      backoff.set(key, b);
      const level = b.failures === 1 ? 'info' : 'warn';
      log[level]('image not made', { tenant_id: tenantId, timeline_id: timelineId, failures: b.failures, retry_in_ms: b.until - Date.now(), err });
    }
  }

  function round(): void {
    const nowMs = Date.now();
    for (const k of backoff.keys()) if (!o.computes.has(k)) backoff.delete(k);
    for (const [key, compute] of o.computes) {
      if (busy.has(key) || (backoff.get(key)?.until ?? 0) > nowMs) continue;
      const p = consider(key, compute).finally(() => busy.delete(key));
      busy.set(key, p);
    }
  }

  const loop = (): void => {
    timer = setTimeout(() => {
      if (closed) return;
      round();
      loop();
    }, o.intervalMs);
    timer.unref?.();
  };
  loop();

  return {
    async close() {
      closed = true;
      if (timer) clearTimeout(timer);
      await Promise.all([...busy.values()]);
    },
  };
}
