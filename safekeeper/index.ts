/**
 * The safekeeper (DESIGN §4 "WAL and durability"): for every timeline it is told to follow, it
 * streams WAL from the compute of the newest generation over physical replication, keeps it in
 * 16 MiB segment files (byte-identical to `pg_receivewal`'s), fdatasyncs with group commit and
 * reports its flush LSN — so that `synchronous_standby_names = 'ANY 2 (sk1, sk2, sk3)'` makes every
 * acknowledged commit durable on two of three safekeepers. It serves the WAL over HTTP (`api.ts`).
 */
import { open, mkdir, readdir, readFile, writeFile, rm } from 'node:fs/promises';
import type { ServerResponse } from 'node:http';
import { join } from 'node:path';
import { Registry } from 'prom-client';
import { XenonError } from '../lib/errors.ts';
import { Router, startHttpServer, type HttpServerHandle } from '../lib/http.ts';
import type { Logger } from '../lib/logger.ts';
import { formatLsn, parseLsn, parseSegmentFileName, WAL_SEGMENT_SIZE } from '../lib/lsn.ts';
import { MAX_GENERATION_HISTORY, type ComputeTarget, type FollowRequest, type TimelineStatus } from './api.ts';
import { isOrderedHistory, type GenerationStart } from './control.ts';
import type { SafekeeperConfig } from './config.ts';
import { createSafekeeperMetrics, type SafekeeperMetrics } from './metrics.ts';
import { Timeline, type SegmentCompleteEvent, type TimelineDeps } from './timeline.ts';

export type { SegmentCompleteEvent } from './timeline.ts';

export { loadSafekeeperConfig, type SafekeeperConfig } from './config.ts';

/** A timeline id is a branch id. */
export const TIMELINE_ID_RE = /^[a-z0-9][a-z0-9-]{0,62}$/;

export interface SafekeeperDeps {
  logger: Logger;
  registry?: Registry;
  /** Test hook: called before every WAL data write (throw to simulate a failing disk). */
  beforeWrite?: () => void;
  /** Called when a segment becomes complete here (the future object-store offload plugs in here). */
  onSegmentComplete?: (e: SegmentCompleteEvent) => void;
}

export interface SafekeeperHandle {
  id: string;
  url: string;
  address: HttpServerHandle['address'];
  metrics: SafekeeperMetrics;
  /** The timeline object (tests and in-process callers). */
  timeline(id: string): Timeline | undefined;
  close(): Promise<void>;
}

function badRequest(msg: string): XenonError {
  return new XenonError('CP_BAD_REQUEST', msg, { userMessage: msg });
}

function timelineIdParam(raw: string | undefined): string {
  if (raw === undefined || !TIMELINE_ID_RE.test(raw)) throw badRequest('timeline_id must match ^[a-z0-9][a-z0-9-]{0,62}$');
  return raw;
}

function generationOf(v: unknown, what: string): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) throw badRequest(`${what} must be a non-negative integer`);
  return v;
}

/** Validates a {@link FollowRequest} body field by field. */
export function parseFollowRequest(body: unknown): FollowRequest & { startLsn?: bigint; generationHistory?: GenerationStart[] } {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) throw badRequest('request body must be a JSON object');
  const b = body as Record<string, unknown>;
  const generation = generationOf(b.generation, 'generation');
  const c = b.compute;
  if (typeof c !== 'object' || c === null || Array.isArray(c)) throw badRequest('compute must be an object {host, port, user, password}');
  const cc = c as Record<string, unknown>;
  if (typeof cc.host !== 'string' || cc.host.length === 0 || cc.host.length > 255 || /[\s\0]/.test(cc.host)) throw badRequest('compute.host must be a host name or address');
  if (typeof cc.port !== 'number' || !Number.isInteger(cc.port) || cc.port < 1 || cc.port > 65535) throw badRequest('compute.port must be an integer 1-65535');
  if (typeof cc.user !== 'string' || cc.user.length === 0 || cc.user.length > 63 || cc.user.includes('\0')) throw badRequest('compute.user must be a role name');
  if (typeof cc.password !== 'string' || cc.password.length > 1024 || cc.password.includes('\0')) throw badRequest('compute.password must be a string');
  const compute: ComputeTarget = { host: cc.host, port: cc.port, user: cc.user, password: cc.password };
  let startLsn: bigint | undefined;
  if (b.start_lsn !== undefined && b.start_lsn !== null) {
    if (typeof b.start_lsn !== 'string') throw badRequest('start_lsn must be an LSN like "0/16B3748"');
    try {
      startLsn = parseLsn(b.start_lsn);
    } catch {
      throw badRequest('start_lsn must be an LSN like "0/16B3748"');
    }
  }
  let peers: string[] | undefined;
  if (b.peers !== undefined && b.peers !== null) {
    const bad = (): XenonError => badRequest('peers must be a list of at most 64 http(s) base URLs');
    if (!Array.isArray(b.peers) || b.peers.length > 64) throw bad();
    peers = b.peers.map((u: unknown) => {
      if (typeof u !== 'string' || u.length > 2048) throw bad();
      let url: URL;
      try {
        url = new URL(u);
      } catch {
        throw bad();
      }
      if (url.protocol !== 'http:' && url.protocol !== 'https:') throw bad();
      return u.replace(/\/+$/, '');
    });
  }
  let generationHistory: GenerationStart[] | undefined;
  if (b.history !== undefined && b.history !== null) {
    const bad = (why: string): XenonError => badRequest(`history must be a list of at most ${MAX_GENERATION_HISTORY} {generation, start_lsn}, generations increasing, start LSNs not decreasing, the last one this request's generation and start_lsn: ${why}`);
    if (!Array.isArray(b.history) || b.history.length === 0 || b.history.length > MAX_GENERATION_HISTORY) throw bad('not a non-empty list of allowed length');
    generationHistory = b.history.map((e: unknown) => {
      const ee = e as Record<string, unknown> | null;
      if (typeof ee !== 'object' || ee === null || typeof ee.generation !== 'number' || !Number.isSafeInteger(ee.generation) || ee.generation < 0 || typeof ee.start_lsn !== 'string') throw bad('an entry is malformed');
      try {
        return { generation: ee.generation, startLsn: parseLsn(ee.start_lsn) };
      } catch {
        throw bad(`${JSON.stringify(ee.start_lsn.slice(0, 40))} is not an LSN`);
      }
    });
    if (!isOrderedHistory(generationHistory)) throw bad('not ordered');
    const last = generationHistory[generationHistory.length - 1]!;
    if (last.generation !== generation) throw bad(`the last entry is generation ${last.generation}, the request's ${generation}`);
    if (startLsn !== undefined && startLsn !== last.startLsn) throw bad(`the last entry starts at ${formatLsn(last.startLsn)}, start_lsn is ${formatLsn(startLsn)}`);
    startLsn = last.startLsn;
  }
  return {
    generation, compute, start_lsn: (b.start_lsn as string | undefined) ?? (generationHistory ? (b.history as { start_lsn: string }[]).at(-1)!.start_lsn : undefined), startLsn,
    ...(peers ? { peers } : {}),
    ...(generationHistory ? { history: b.history as FollowRequest['history'], generationHistory } : {}),
  };
}

/** `Range: bytes=a-b | a- | -n` against a file of `size` bytes; one range only. */
export function parseRange(header: string, size: number): { start: number; end: number } {
  const unsatisfiable = (why: string): XenonError =>
    new XenonError('SK_RANGE_NOT_SATISFIABLE', `Range ${JSON.stringify(header.slice(0, 100))}: ${why}`, { userMessage: `the requested byte range is not satisfiable: ${why}` });
  const m = /^bytes=(\d{0,16})-(\d{0,16})$/.exec(header.trim());
  if (!m || (m[1] === '' && m[2] === '')) throw unsatisfiable('expected a single range bytes=start-end');
  if (m[1] === '') {
    const n = Number(m[2]);
    if (n === 0) throw unsatisfiable('empty suffix range');
    return { start: Math.max(0, size - n), end: size };
  }
  const start = Number(m[1]);
  const last = m[2] === '' ? size - 1 : Number(m[2]);
  if (last < start) throw unsatisfiable('end before start');
  if (start >= size) throw unsatisfiable(`start beyond the file size ${size}`);
  return { start, end: Math.min(last + 1, size) };
}

/** Refuses a data dir another live safekeeper process uses. */
async function lockDataDir(dir: string): Promise<() => Promise<void>> {
  const path = join(dir, 'safekeeper.pid');
  try {
    const pid = Number((await readFile(path, 'utf8')).trim());
    if (Number.isInteger(pid) && pid > 0 && pid !== process.pid) {
      let alive = true;
      try { process.kill(pid, 0); } catch (err) { alive = (err as NodeJS.ErrnoException).code === 'EPERM'; }
      if (alive) throw new XenonError('SK_UNAVAILABLE', `data dir ${dir} is in use by safekeeper process ${pid}`);
    }
  } catch (err) {
    if (err instanceof XenonError) throw err;
  }
  await writeFile(path, `${process.pid}\n`, { mode: 0o600 });
  return async () => {
    try {
      if ((await readFile(path, 'utf8')).trim() === String(process.pid)) await rm(path, { force: true });
    } catch { /* gone */ }
  };
}

export async function startSafekeeper(config: SafekeeperConfig, deps: SafekeeperDeps): Promise<SafekeeperHandle> {
  const log = deps.logger;
  const timelinesDir = join(config.dataDir, 'timelines');
  await mkdir(timelinesDir, { recursive: true, mode: 0o700 });
  const unlock = await lockDataDir(config.dataDir);
  const registry = deps.registry ?? new Registry();
  const timelines = new Map<string, Timeline>();
  const metrics = createSafekeeperMetrics(registry, () =>
    [...timelines.values()].map((t) => ({ timelineId: t.id, flushLsn: () => t.flush, lagBytes: () => t.lagBytes(), streaming: () => t.streaming })),
  );
  const tlDeps: TimelineDeps = {
    safekeeperId: config.id,
    logger: log,
    metrics,
    storeHooks: deps.beforeWrite || config.testWriteMsPerMiB ? { beforeWrite: deps.beforeWrite, writeMsPerMiB: config.testWriteMsPerMiB || undefined } : undefined,
    onSegmentComplete: deps.onSegmentComplete,
    syncMethod: config.syncMethod,
  };

  for (const name of (await readdir(timelinesDir)).sort()) {
    if (!TIMELINE_ID_RE.test(name)) continue;
    const tl = await Timeline.load(name, join(timelinesDir, name), tlDeps);
    timelines.set(name, tl);
  }
  for (const tl of timelines.values()) tl.resume();
  log.info('safekeeper started', { id: config.id, dataDir: config.dataDir, timelines: timelines.size });

  // Creating and deleting timelines is serialised (two PUTs for a new timeline create it once).
  let registryOps: Promise<unknown> = Promise.resolve();
  const serial = <T>(fn: () => Promise<T>): Promise<T> => {
    const p = registryOps.then(fn, fn);
    registryOps = p.catch(() => {});
    return p;
  };
  const get = (id: string): Timeline => {
    const tl = timelines.get(id);
    if (!tl) throw new XenonError('SK_TIMELINE_NOT_FOUND', `timeline ${id} not found`);
    return tl;
  };

  const router = new Router({ maxBody: 64 * 1024 });
  router.put('/v1/timeline/:timeline_id/compute', async ({ params, body }) => {
    const id = timelineIdParam(params.timeline_id);
    const req = parseFollowRequest(body);
    const tl = await serial(async () => {
      let t = timelines.get(id);
      if (!t) {
        t = await Timeline.create(id, join(timelinesDir, id), req, tlDeps);
        timelines.set(id, t);
        log.info('new timeline', { timelineId: id, generation: req.generation });
      }
      return t;
    });
    return tl.follow(req);
  });
  router.post('/v1/timeline/:timeline_id/fence', async ({ params, body }) => {
    const id = timelineIdParam(params.timeline_id);
    if (typeof body !== 'object' || body === null || Array.isArray(body)) throw badRequest('request body must be a JSON object {generation}');
    const generation = generationOf((body as Record<string, unknown>).generation, 'generation');
    const tl = await serial(async () => {
      let t = timelines.get(id);
      if (!t) {
        // Fenced before it holds anything: the fence must hold for a follow that comes later too.
        t = await Timeline.create(id, join(timelinesDir, id), { generation, compute: null }, tlDeps);
        timelines.set(id, t);
        log.info('new timeline (fenced)', { timelineId: id, generation });
      }
      return t;
    });
    return tl.fence(generation);
  });
  router.delete('/v1/timeline/:timeline_id/compute', async ({ params, query }) => {
    const id = timelineIdParam(params.timeline_id);
    const g = query.get('generation');
    if (g === null || !/^\d{1,15}$/.test(g)) throw badRequest('?generation=N (a non-negative integer) is required');
    return get(id).unfollow(Number(g));
  });
  router.get('/v1/timeline/:timeline_id', async ({ params }) => get(timelineIdParam(params.timeline_id)).status());
  router.get('/v1/timelines', async () => {
    const out: TimelineStatus[] = [];
    for (const tl of timelines.values()) out.push(await tl.status());
    return { timelines: out };
  });
  router.delete('/v1/timeline/:timeline_id', async ({ params }) => {
    const id = timelineIdParam(params.timeline_id);
    await serial(async () => {
      const tl = get(id);
      await tl.destroy();
      timelines.delete(id);
      log.info('timeline deleted', { timelineId: id });
    });
    return {};
  });
  router.get('/v1/timeline/:timeline_id/wal', async ({ params }) => get(timelineIdParam(params.timeline_id)).listWal());
  router.get('/v1/timeline/:timeline_id/wal/:file', async ({ req, res, params }) => {
    const tl = get(timelineIdParam(params.timeline_id));
    await serveWalFile(tl, params.file ?? '', req.headers.range, res);
    return undefined;
  });

  const http = await startHttpServer({ host: config.host, port: config.port, router, logger: log, registry });
  let closing: Promise<void> | null = null;
  return {
    id: config.id,
    url: http.url,
    address: http.address,
    metrics,
    timeline: (id) => timelines.get(id),
    close() {
      closing ??= (async () => {
        await http.close();
        await Promise.all([...timelines.values()].map((t) => t.close().catch((err: Error) => log.error('closing timeline failed', { timelineId: t.id, err }))));
        await unlock();
        log.info('safekeeper stopped');
      })();
      return closing;
    },
  };
}

async function serveWalFile(tl: Timeline, file: string, rangeHeader: string | undefined, res: ServerResponse): Promise<void> {
  await tl.settled(); // never serve WAL a generation change is cutting off
  const notFound = (): XenonError => new XenonError('SK_WAL_NOT_FOUND', `no WAL file ${JSON.stringify(file.slice(0, 80))} in ${tl.id}`);
  const seg = parseSegmentFileName(file);
  const isHistory = /^[0-9A-F]{8}\.history$/.test(file);
  if (!seg && !isHistory) throw notFound();
  // Candidates in order: a segment asked for without `.partial` may be the partial one, and a
  // partial one may have been completed (renamed) meanwhile.
  const base = seg ? file.replace(/\.partial$/, '') : file;
  const candidates = !seg ? [base] : seg.partial ? [`${base}.partial`, base] : [base, `${base}.partial`];
  for (const name of candidates) {
    let fh;
    try {
      fh = await open(join(tl.walDir, name), 'r');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') continue;
      throw err;
    }
    try {
      const size = (await fh.stat()).size;
      const range = rangeHeader === undefined ? undefined : parseRange(rangeHeader, size);
      const start = range?.start ?? 0;
      const end = range?.end ?? size;
      const buf = Buffer.alloc(end - start);
      if (buf.length > 0) await fh.read(buf, 0, buf.length, start);
      if (seg && name.endsWith('.partial') && size === WAL_SEGMENT_SIZE) {
        // Only durable bytes of a partial segment are served; the rest reads as zeros.
        const readable = tl.readableEnd(seg.tli, seg.segno, true);
        if (readable < end) buf.fill(0, Math.max(0, readable - start));
      }
      const headers: Record<string, string | number> = {
        'content-type': 'application/octet-stream',
        'content-length': buf.length,
        'accept-ranges': 'bytes',
        'x-wal-file': name,
      };
      if (range) headers['content-range'] = `bytes ${start}-${end - 1}/${size}`;
      res.writeHead(range ? 206 : 200, headers);
      res.end(buf);
      return;
    } catch (err) {
      if (err instanceof XenonError && err.code === 'SK_RANGE_NOT_SATISFIABLE') {
        res.setHeader('content-range', `bytes */${(await fh.stat().catch(() => ({ size: 0 }))).size}`);
      }
      throw err;
    } finally {
      await fh.close();
    }
  }
  throw notFound();
}

