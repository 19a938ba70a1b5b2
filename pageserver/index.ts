/**
 * The pageserver (DESIGN §4 "Compute start (stateless)", "Branching", "Images and GC"): per
 * timeline, images and WAL in an object store; branches as metadata; start plans and the WAL
 * resolver behind `restore_command`; GC within a PITR window. The HTTP contract is `api.ts`.
 */
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { Registry } from 'prom-client';
import { XenonError } from '../lib/errors.ts';
import { HttpReply, Router, startHttpServer, type HttpServerHandle } from '../lib/http.ts';
import type { Logger } from '../lib/logger.ts';
import { formatLsn, parseLsn } from '../lib/lsn.ts';
import { SafekeeperClient } from '../safekeeper/client.ts';
import {
  IMAGE_KINDS,
  type AttachComputeRequest,
  type ImageInfo,
  type ImageKind,
  type TimelineIndex,
  type TimelineStatus,
} from './api.ts';
import type { PageserverConfig } from './config.ts';
import { gcTimeline, startGc } from './gc.ts';
import { imageId, makeImage as realMakeImage, makeScratchImage, startImager as realStartImager } from './imager.ts';
import { startIngest as realStartIngest } from './ingest.ts';
import { lsnByTime as realLsnByTime } from './lsn-by-time.ts';
import { createPageserverMetrics, type PageserverMetrics } from './metrics.ts';
import { createObjectStore, isObjectNotFound } from './objectstore.ts';
import { buildChain, checkTarget, ownStart, pickImage, WalResolver, type WalPeer } from './resolver.ts';
import { checkId, newIndex, StoreTimelines } from './timelines.ts';
import { keys, type ObjectStore } from './types.ts';

export { loadPageserverConfig, type PageserverConfig } from './config.ts';
export { LocalObjectStore, createObjectStore } from './objectstore.ts';
export { StoreTimelines } from './timelines.ts';

/** The other modules' entry points, injected so that tests can run without them (or with doubles). */
export type StartIngest = typeof realStartIngest;
export type MakeImage = typeof realMakeImage;
export type StartImager = typeof realStartImager;
export type LsnByTime = typeof realLsnByTime;

export interface PageserverDeps {
  logger: Logger;
  registry?: Registry;
  /** Default: `createObjectStore(config.storage)`. */
  store?: ObjectStore;
  /** Default: `SafekeeperClient`s of `config.safekeepers`. */
  peers?: WalPeer[];
  now?: () => Date;
  /** Defaults: the exports of ./ingest.ts, ./imager.ts, ./lsn-by-time.ts; `null` turns one off (tests). */
  startIngest?: StartIngest | null;
  makeImage?: MakeImage | null;
  startImager?: StartImager | null;
  lsnByTime?: LsnByTime | null;
}

export interface PageserverHandle {
  url: string;
  address: HttpServerHandle['address'];
  timelines: StoreTimelines;
  resolver: WalResolver;
  metrics: PageserverMetrics;
  close(): Promise<void>;
}

function badRequest(msg: string): XenonError {
  return new XenonError('CP_BAD_REQUEST', msg, { userMessage: msg });
}

function lsnParam(raw: string | null | undefined, what: string): bigint | undefined {
  if (raw === null || raw === undefined) return undefined;
  try {
    return parseLsn(raw);
  } catch {
    throw badRequest(`${what} must be an LSN like "0/16B3748"`);
  }
}

function requiredLsn(raw: string | null | undefined, what: string): bigint {
  const v = lsnParam(raw, what);
  if (v === undefined) throw badRequest(`${what} is required (an LSN like "0/16B3748")`);
  return v;
}

function objectBody(body: unknown): Record<string, unknown> {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) throw badRequest('request body must be a JSON object');
  return body as Record<string, unknown>;
}

/** Validates an {@link AttachComputeRequest}. */
export function parseAttachCompute(body: unknown): AttachComputeRequest {
  const c = objectBody(body);
  if (typeof c.host !== 'string' || c.host.length === 0 || c.host.length > 255 || /[\s\0]/.test(c.host)) throw badRequest('host must be a host name or address');
  if (typeof c.port !== 'number' || !Number.isInteger(c.port) || c.port < 1 || c.port > 65535) throw badRequest('port must be an integer 1-65535');
  if (typeof c.user !== 'string' || c.user.length === 0 || c.user.length > 63 || c.user.includes('\0')) throw badRequest('user must be a role name');
  if (typeof c.password !== 'string' || c.password.length > 1024 || c.password.includes('\0')) throw badRequest('password must be a string');
  return { host: c.host, port: c.port, user: c.user, password: c.password };
}

/** Image id: the zero-padded hex LSN, so ids sort by LSN, and 6 random hex digits. */
export { imageId };

export async function startPageserver(config: PageserverConfig, deps: PageserverDeps): Promise<PageserverHandle> {
  const log = deps.logger;
  const now = deps.now ?? (() => new Date());
  const startIngest = deps.startIngest === undefined ? realStartIngest : deps.startIngest;
  const makeImage = deps.makeImage === undefined ? realMakeImage : deps.makeImage;
  const startImager = deps.startImager === undefined ? realStartImager : deps.startImager;
  const lsnByTime = deps.lsnByTime === undefined ? realLsnByTime : deps.lsnByTime;
  const store = deps.store ?? createObjectStore(config.storage);
  const timelines = new StoreTimelines(store);
  const tmpDir = join(config.dir, 'tmp');
  await mkdir(tmpDir, { recursive: true, mode: 0o700 });
  const registry = deps.registry ?? new Registry();
  const metrics = createPageserverMetrics(registry, async () => {
    let bytes = 0;
    const refs = await timelines.list();
    for (const r of refs) {
      try {
        const idx = await timelines.read(r.tenantId, r.timelineId);
        bytes += idx.images.reduce((a, i) => a + i.size, 0) + idx.wal.reduce((a, w) => a + w.size, 0);
      } catch { /* corrupt: reported by its routes */ }
    }
    return { timelines: refs.length, bytes };
  });
  const peers = deps.peers ?? config.safekeepers.map((s) => new SafekeeperClient(s.url));
  const ingest = startIngest?.({ timelines, safekeepers: [...config.safekeepers], intervalMs: config.ingestIntervalMs, logger: log.child({ component: 'ingest' }), now });
  const resolver = new WalResolver({
    timelines,
    peers,
    logger: log.child({ component: 'resolver' }),
    quorumTip: ingest ? (tl) => ingest.quorumTip(tl) : undefined,
    pollNow: ingest ? (t, tl) => ingest.pollNow(t, tl) : undefined,
  });
  const gcOpts = {
    timelines,
    pitrWindowSeconds: config.pitrWindowSeconds,
    logger: log.child({ component: 'gc' }),
    now,
    onRemoved: (r: { removed_images: string[]; removed_wal: string[] }) => {
      if (r.removed_images.length) metrics.gcRemovals.inc({ kind: 'image' }, r.removed_images.length);
      if (r.removed_wal.length) metrics.gcRemovals.inc({ kind: 'wal' }, r.removed_wal.length);
    },
  };
  const gc = startGc({ ...gcOpts, intervalSeconds: config.gcIntervalSeconds });
  const computes = new Map<string, AttachComputeRequest>();
  let baseUrl = config.publicUrl ?? '';
  let localUrl = '';
  const imager = startImager?.({
    timelines,
    computes,
    imageWalBytes: config.imageWalBytes,
    intervalMs: Math.max(config.ingestIntervalMs, 1000),
    pgBin: config.pgBin,
    tmpDir,
    logger: log.child({ component: 'imager' }),
    // Scratch images of stopped timelines: the plan's URLs point at this very server.
    plan: (t, tl) => resolver.plan(t, tl, undefined, localUrl || baseUrl, now()),
    runAs: config.runAs,
    scratchDir: config.scratchDataDir,
  });

  const tenantParam = (raw: string | undefined): string => checkId(raw, 'tenant id');
  const tlParam = (raw: string | undefined): string => checkId(raw, 'timeline id');
  const requireTenant = async (t: string): Promise<void> => {
    if (!(await timelines.tenantExists(t))) throw new XenonError('PS_TIMELINE_NOT_FOUND', `tenant ${t} not found`, { userMessage: `tenant ${t} not found` });
  };

  const statusOf = async (idx: TimelineIndex): Promise<TimelineStatus> => {
    const t = idx.tenant_id;
    const tl = idx.timeline_id;
    const kids = await timelines.children(t, tl, { lenient: true });
    const leases = idx.leases.filter((l) => Date.parse(l.until) > now().getTime()).map((l) => parseLsn(l.lsn));
    const retained = [...new Set([...kids.map((k) => k.lsn), ...leases])].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
    const last = idx.pg_history[idx.pg_history.length - 1];
    return {
      tenant_id: t,
      timeline_id: tl,
      ancestor_timeline_id: idx.ancestor?.timeline_id ?? null,
      ancestor_lsn: idx.ancestor?.lsn ?? null,
      last_record_lsn: idx.last_record_lsn,
      gc_cutoff_lsn: idx.gc_cutoff_lsn,
      pg_timeline: last?.pg_timeline ?? null,
      images: idx.images,
      wal_range: idx.pg_history.length > 0 ? { start_lsn: idx.pg_history[0]!.begin_lsn, end_lsn: idx.last_record_lsn } : null,
      wal_files: idx.wal.length,
      size_bytes: idx.images.reduce((a, i) => a + i.size, 0) + idx.wal.reduce((a, w) => a + w.size, 0),
      retained_lsns: retained.map(formatLsn),
      created_at: idx.created_at,
      compute_attached: computes.has(`${t}/${tl}`),
    };
  };

  /** The branch point of a new branch of `anc` (all the checks of api.ts CreateTimelineRequest). */
  const branchPoint = async (t: string, anc: string, lsn: bigint | undefined, time: Date | undefined): Promise<bigint> => {
    let ancIdx: TimelineIndex;
    try {
      ancIdx = await timelines.read(t, anc);
    } catch (err) {
      if (err instanceof XenonError && err.code === 'PS_TIMELINE_NOT_FOUND') {
        throw new XenonError('PS_ANCESTOR_NOT_FOUND', `ancestor ${t}/${anc} not found`, { userMessage: `the parent branch ${anc} was not found` });
      }
      throw err;
    }
    let x = lsn;
    if (time !== undefined) {
      if (!lsnByTime) throw new XenonError('PS_UNAVAILABLE', 'LSN-by-time is not available in this pageserver', { userMessage: 'branching at a time is not available' });
      const tip = await resolver.tip(ancIdx);
      x = await lsnByTime({
        timelines, tenantId: t, timelineId: anc, time, pgBin: config.pgBin, tmpDir, tip,
        fetchSegment: async (name) => (await resolver.readFile(t, anc, name, tip)).data,
      });
    }
    const last = parseLsn(ancIdx.last_record_lsn);
    const tip = x === undefined || x > last ? await resolver.tip(ancIdx) : last;
    x ??= tip;
    const start = ownStart(ancIdx);
    if (x < start) {
      throw new XenonError('PS_LSN_BEFORE_GC_CUTOFF', `${t}/${anc}: ${formatLsn(x)} is before the timeline's start ${formatLsn(start)}`, {
        userMessage: `LSN ${formatLsn(x)} is before the start of branch ${anc} (${formatLsn(start)})`,
      });
    }
    checkTarget(ancIdx, x, tip, now());
    const checkImage = async (): Promise<void> => {
      const chain = await buildChain(timelines, t, anc, x);
      if (!pickImage(chain, x)) {
        throw new XenonError('PS_NO_IMAGE', `${t}/${anc}: no image at or before ${formatLsn(x)} on the chain`, {
          userMessage: `branch ${anc} has no stored data at or before ${formatLsn(x)} yet`,
        });
      }
    };
    await checkImage();
    return x;
  };

  const router = new Router({ maxBody: 64 * 1024 });

  router.post('/v1/tenant', async ({ body }) => {
    const t = tenantParam(objectBody(body).tenant_id as string | undefined);
    const created = await timelines.createTenant(t);
    if (created) log.info('tenant created', { tenantId: t });
    return new HttpReply(created ? 201 : 200, { tenant_id: t });
  });
  router.delete('/v1/tenant/:t', async ({ params }) => {
    const t = tenantParam(params.t);
    await requireTenant(t);
    await timelines.deleteTenant(t);
    for (const k of [...computes.keys()]) if (k.startsWith(`${t}/`)) computes.delete(k);
    log.info('tenant deleted', { tenantId: t });
    return {};
  });
  router.get('/v1/tenant/:t/timeline', async ({ params }) => {
    const t = tenantParam(params.t);
    const out: TimelineStatus[] = [];
    for (const tl of [...(await timelines.tenantTimelines(t)).keys()].sort()) out.push(await statusOf(await timelines.read(t, tl)));
    return { timelines: out };
  });
  router.post('/v1/tenant/:t/timeline', async ({ params, body }) => {
    const t = tenantParam(params.t);
    const b = objectBody(body);
    const tl = checkId(b.new_timeline_id, 'new_timeline_id');
    const anc = b.ancestor_timeline_id === undefined || b.ancestor_timeline_id === null ? undefined : checkId(b.ancestor_timeline_id, 'ancestor_timeline_id');
    if (b.ancestor_start_lsn !== undefined && b.ancestor_start_lsn !== null && typeof b.ancestor_start_lsn !== 'string') throw badRequest('ancestor_start_lsn must be an LSN like "0/16B3748"');
    const lsn = lsnParam(b.ancestor_start_lsn as string | null | undefined, 'ancestor_start_lsn');
    let time: Date | undefined;
    if (b.ancestor_start_time !== undefined && b.ancestor_start_time !== null) {
      if (typeof b.ancestor_start_time !== 'string' || Number.isNaN(Date.parse(b.ancestor_start_time))) throw badRequest('ancestor_start_time must be an ISO 8601 time');
      time = new Date(b.ancestor_start_time);
    }
    if (lsn !== undefined && time !== undefined) throw badRequest('give ancestor_start_lsn or ancestor_start_time, not both');
    if (anc === undefined && (lsn !== undefined || time !== undefined)) throw badRequest('ancestor_start_lsn/ancestor_start_time need ancestor_timeline_id');
    if (anc === tl) throw badRequest('a timeline cannot be its own ancestor');
    await requireTenant(t);
    if (await store.head(keys.index(t, tl))) throw new XenonError('PS_TIMELINE_EXISTS', `timeline ${t}/${tl} exists`, { userMessage: `timeline ${tl} already exists` });
    let index: TimelineIndex;
    if (anc === undefined) {
      index = newIndex(t, tl, null, now());
      await timelines.createTimeline(index);
    } else {
      const x = await branchPoint(t, anc, lsn, time);
      index = newIndex(t, tl, { timeline_id: anc, lsn: formatLsn(x) }, now());
      // Again under the ancestor's lock: its GC may have moved meanwhile.
      await timelines.createTimeline(index, async () => {
        const ancIdx = await timelines.read(t, anc);
        checkTarget(ancIdx, x, parseLsn(ancIdx.last_record_lsn) > x ? parseLsn(ancIdx.last_record_lsn) : x, now());
        if (!pickImage(await buildChain(timelines, t, anc, x), x)) throw new XenonError('PS_NO_IMAGE', `${t}/${anc}: the image at ${formatLsn(x)} is gone`);
      });
    }
    log.info('timeline created', { tenantId: t, timelineId: tl, ancestor: index.ancestor });
    return new HttpReply(201, await statusOf(index));
  });
  router.get('/v1/tenant/:t/timeline/:tl', async ({ params }) => statusOf(await timelines.read(tenantParam(params.t), tlParam(params.tl))));
  router.delete('/v1/tenant/:t/timeline/:tl', async ({ params }) => {
    const t = tenantParam(params.t);
    const tl = tlParam(params.tl);
    await timelines.deleteTimeline(t, tl);
    computes.delete(`${t}/${tl}`);
    log.info('timeline deleted', { tenantId: t, timelineId: tl });
    return {};
  });

  router.put('/v1/tenant/:t/timeline/:tl/image', async ({ req, params, query }) => {
    const t = tenantParam(params.t);
    const tl = tlParam(params.tl);
    const lsn = requiredLsn(query.get('lsn'), 'lsn');
    const end = requiredLsn(query.get('end_lsn'), 'end_lsn');
    if (end < lsn) throw badRequest('end_lsn must not be before lsn');
    const tliRaw = query.get('pg_timeline');
    if (tliRaw === null || !/^[1-9]\d{0,9}$/.test(tliRaw) || Number(tliRaw) > 0xffffffff) throw badRequest('pg_timeline must be a positive integer');
    const kind = query.get('kind');
    if (!(IMAGE_KINDS as readonly (string | null)[]).includes(kind)) throw badRequest(`kind must be one of ${IMAGE_KINDS.join(', ')}`);
    await timelines.read(t, tl);
    const id = imageId(lsn);
    const key = keys.image(t, tl, id);
    const { size } = await store.put(key, req);
    const info: ImageInfo = { id, lsn: formatLsn(lsn), end_lsn: formatLsn(end), pg_timeline: Number(tliRaw), kind: kind as ImageKind, size, created_at: now().toISOString() };
    try {
      if (size === 0) throw badRequest('the image body (a tar) is empty');
      await timelines.update(t, tl, (idx) => {
        idx.images.push(info);
        if (parseLsn(idx.last_record_lsn) < end) idx.last_record_lsn = formatLsn(end);
      });
    } catch (err) {
      await store.delete(key);
      throw err;
    }
    log.info('image uploaded', { tenantId: t, timelineId: tl, imageId: id, lsn: info.lsn, size });
    return new HttpReply(201, info);
  }, { rawBody: true });
  router.post('/v1/tenant/:t/timeline/:tl/image', async ({ params }) => {
    const t = tenantParam(params.t);
    const tl = tlParam(params.tl);
    await timelines.read(t, tl);
    const compute = computes.get(`${t}/${tl}`);
    if (!compute) {
      // A stopped timeline: recover its newest image to its last checkpoint in a scratch Postgres.
      if (!makeImage) throw new XenonError('PS_UNAVAILABLE', 'imaging is not available in this pageserver');
      const plan = await resolver.plan(t, tl, undefined, localUrl || baseUrl, now());
      const info = await makeScratchImage({
        timelines, tenantId: t, timelineId: tl, plan, pgBin: config.pgBin, tmpDir: config.scratchDataDir, runAs: config.runAs,
        logger: log.child({ component: 'imager', tenantId: t, timelineId: tl }),
      });
      return new HttpReply(201, info);
    }
    if (!makeImage) throw new XenonError('PS_UNAVAILABLE', 'imaging is not available in this pageserver');
    const info = await makeImage({ timelines, tenantId: t, timelineId: tl, compute, pgBin: config.pgBin, tmpDir, logger: log.child({ component: 'imager', tenantId: t, timelineId: tl }) });
    return new HttpReply(201, info);
  });
  router.get('/v1/tenant/:t/timeline/:tl/image/:id', async ({ res, params }) => {
    const t = tenantParam(params.t);
    const tl = tlParam(params.tl);
    const idx = await timelines.read(t, tl);
    const image = idx.images.find((i) => i.id === params.id);
    if (!image) throw new XenonError('PS_IMAGE_NOT_FOUND', `${t}/${tl}: no image ${JSON.stringify(String(params.id).slice(0, 100))}`);
    const key = keys.image(t, tl, image.id);
    const head = await store.head(key);
    let stream;
    try {
      if (!head) throw new XenonError('PS_IMAGE_MISSING', `${t}/${tl}: image ${image.id} is listed but ${key} is missing`);
      stream = await store.get(key);
    } catch (err) {
      if (isObjectNotFound(err)) throw new XenonError('PS_IMAGE_MISSING', `${t}/${tl}: image ${image.id} is listed but ${key} is missing`);
      throw err;
    }
    res.writeHead(200, { 'content-type': 'application/x-tar', 'content-length': head.size, 'x-image-lsn': image.lsn, 'x-image-end-lsn': image.end_lsn });
    await pipeline(stream, res);
    return undefined;
  });

  router.put('/v1/tenant/:t/timeline/:tl/compute', async ({ params, body }) => {
    const t = tenantParam(params.t);
    const tl = tlParam(params.tl);
    const c = parseAttachCompute(body);
    await timelines.read(t, tl);
    computes.set(`${t}/${tl}`, c);
    log.info('compute attached', { tenantId: t, timelineId: tl, host: c.host, port: c.port });
    return {};
  });
  router.delete('/v1/tenant/:t/timeline/:tl/compute', async ({ params }) => {
    const t = tenantParam(params.t);
    const tl = tlParam(params.tl);
    await timelines.read(t, tl);
    computes.delete(`${t}/${tl}`);
    return {};
  });

  router.get('/v1/tenant/:t/timeline/:tl/start', async ({ params, query }) => {
    const t = tenantParam(params.t);
    const tl = tlParam(params.tl);
    const lsn = lsnParam(query.get('lsn'), 'lsn');
    try {
      const plan = await resolver.plan(t, tl, lsn, baseUrl, now());
      metrics.planRequests.inc({ outcome: plan.mode });
      log.info('start plan', { tenantId: t, timelineId: tl, lsn: plan.lsn, mode: plan.mode, image: plan.image.id, imageTimeline: plan.image.timeline_id, walFiles: plan.wal.length });
      return plan;
    } catch (err) {
      metrics.planRequests.inc({ outcome: err instanceof XenonError ? err.code : 'INTERNAL' });
      throw err;
    }
  });
  router.get('/v1/tenant/:t/timeline/:tl/wal/:file', async ({ res, params, query }) => {
    const t = tenantParam(params.t);
    const tl = tlParam(params.tl);
    const upto = lsnParam(query.get('upto'), 'upto');
    const file = params.file ?? '';
    try {
      const { data, outcome, owner, valid } = await resolver.readFile(t, tl, file, upto);
      metrics.resolverRequests.inc({ outcome });
      // `compact=1`: a segment without its zero tail (the client restores the file's size): a
      // segment masked at a branch point is mostly zeros, not worth 16 MiB on the wire.
      const body = query.get('compact') === '1' && valid < data.length ? data.subarray(0, valid) : data;
      res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': body.length, 'x-wal-owner': owner, 'x-wal-file-size': data.length });
      res.end(body);
      return undefined;
    } catch (err) {
      const code = err instanceof XenonError ? err.code : 'INTERNAL';
      metrics.resolverRequests.inc({ outcome: code === 'PS_WAL_NOT_FOUND' ? 'not_found' : code === 'PS_WAL_MISSING' ? 'missing' : 'error' });
      if (code === 'PS_WAL_MISSING') log.error('WAL a timeline needs is missing', { tenantId: t, timelineId: tl, file, err });
      throw err;
    }
  });
  router.post('/v1/tenant/:t/timeline/:tl/lease', async ({ params, body }) => {
    const t = tenantParam(params.t);
    const tl = tlParam(params.tl);
    const b = objectBody(body);
    if (typeof b.lsn !== 'string') throw badRequest('lsn must be an LSN like "0/16B3748"');
    const lsn = requiredLsn(b.lsn, 'lsn');
    const ttl = b.ttl_seconds;
    if (typeof ttl !== 'number' || !Number.isInteger(ttl) || ttl < 1 || ttl > 366 * 86400) throw badRequest('ttl_seconds must be an integer from 1 to 31622400');
    const idx = await timelines.read(t, tl);
    checkTarget(idx, lsn, await resolver.tip(idx), now());
    const until = new Date(now().getTime() + ttl * 1000);
    let out = { lsn: formatLsn(lsn), until: until.toISOString() };
    await timelines.update(t, tl, (idx) => {
      const n = now().getTime();
      checkTarget(idx, lsn, lsn, now()); // GC may have moved meanwhile
      idx.leases = idx.leases.filter((l) => Date.parse(l.until) > n);
      const same = idx.leases.find((l) => parseLsn(l.lsn) === lsn);
      if (same) {
        if (Date.parse(same.until) < until.getTime()) same.until = until.toISOString();
        out = { lsn: formatLsn(lsn), until: same.until };
      } else idx.leases.push(out);
    });
    return out;
  });
  router.post('/v1/tenant/:t/timeline/:tl/gc', async ({ params }) => gcTimeline(gcOpts, tenantParam(params.t), tlParam(params.tl)));
  router.get('/v1/lsn_by_time', async ({ query }) => {
    const t = tenantParam(query.get('tenant') ?? undefined);
    const tl = checkId(query.get('timeline') ?? undefined, 'timeline');
    const raw = query.get('time');
    if (raw === null || Number.isNaN(Date.parse(raw))) throw badRequest('time must be an ISO 8601 time');
    const idx = await timelines.read(t, tl);
    if (!lsnByTime) throw new XenonError('PS_UNAVAILABLE', 'LSN-by-time is not available in this pageserver');
    const tip = await resolver.tip(idx);
    const lsn = await lsnByTime({
      timelines, tenantId: t, timelineId: tl, time: new Date(raw), pgBin: config.pgBin, tmpDir, tip,
      fetchSegment: async (name) => (await resolver.readFile(t, tl, name, tip)).data,
    });
    return { lsn: formatLsn(lsn) };
  });

  const http = await startHttpServer({ host: config.host, port: config.port, router, logger: log, registry });
  baseUrl ||= http.url;
  localUrl = http.url;
  log.info('pageserver started', { url: http.url, storage: store.kind, safekeepers: config.safekeepers.length });
  let closing: Promise<void> | null = null;
  return {
    url: http.url,
    address: http.address,
    timelines,
    resolver,
    metrics,
    close() {
      closing ??= (async () => {
        await http.close();
        await gc.close();
        await imager?.close().catch((err: Error) => log.error('closing the imager failed', { err }));
        await ingest?.close().catch((err: Error) => log.error('closing ingest failed', { err }));
        log.info('pageserver stopped');
      })();
      return closing;
    },
  };
}
