/**
 * The control plane (`wake-compute`): projects, branches, endpoints, roles and databases in a
 * metadata Postgres; compute lifecycle and the idle policy; the `/v1` API of `api.ts`.
 */
import { randomBytes } from 'node:crypto';
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import { XenonError } from '../lib/errors.ts';
import { HttpReply, Router, startHttpServer, type HttpServerHandle } from '../lib/http.ts';
import type { Logger } from '../lib/logger.ts';
import { formatScramSecret, makeScramSecret } from '../lib/scram.ts';
import { Autoscaler } from './autoscaler.ts';
import { ensureImage, ProcessDriver, QemuDriver, type ComputeDriver } from '../vm/index.ts';
import {
  ENDPOINT_ID_RE,
  ENDPOINT_STATES,
  NAME_RE,
  type ConnectionRateLimit,
  type ConnectionReport,
  type ConnectionReportResponse,
  type CreateBranchRequest,
  type CreateBranchResponse,
  type CreateDatabaseRequest,
  type CreateEndpointRequest,
  type CreateProjectRequest,
  type CreateProjectResponse,
  type CreateRoleRequest,
  type EndpointAccess,
  type UpdateEndpointRequest,
  type WalStatus,
} from './api.ts';
import { computeLogDir, type ControlPlaneConfig } from './config.ts';
import { newBranchId, newEndpointId, newProjectId } from './ids.ts';
import { ADMIN_ROLE, ComputeManager } from './lifecycle.ts';
import { SafekeeperSet } from './safekeepers.ts';
import { Storage } from './storage.ts';
import { parseLsn } from '../lib/lsn.ts';
import { branchOut, endpointOut, MetadataStore, rateLimitOut, type EndpointRow } from './store.ts';
import { validateAllowlist } from '../lib/ip-allowlist.ts';

export interface ControlPlaneDeps {
  logger: Logger;
  /** Defaults to the process driver built from the config. */
  driver?: ComputeDriver;
  registry?: Registry;
}

export interface ControlPlaneHandle {
  url: string;
  address: HttpServerHandle['address'];
  store: MetadataStore;
  manager: ComputeManager;
  driver: ComputeDriver;
  close(): Promise<void>;
}

/** A password users can type: 24 characters of base64url. */
export const generatePassword = (): string => randomBytes(18).toString('base64url');

// ---- request validation: every field checked, clear 400s
function obj(body: unknown): Record<string, unknown> {
  if (body === undefined) return {};
  if (typeof body !== 'object' || body === null || Array.isArray(body)) throw badRequest('request body must be a JSON object');
  return body as Record<string, unknown>;
}
function badRequest(msg: string): XenonError {
  return new XenonError('CP_BAD_REQUEST', msg, { userMessage: msg });
}
/** Names Postgres itself reserves (or the control plane uses), by kind. */
const RESERVED = {
  role: new Set(['public', 'none', 'current_user', 'session_user', 'current_role', ADMIN_ROLE]),
  database: new Set(['postgres', 'template0', 'template1']),
} as const;

function optName(b: Record<string, unknown>, key: string, kind: keyof typeof RESERVED): string | undefined {
  const v = b[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'string' || !NAME_RE.test(v)) throw badRequest(`${key} must be a name of letters, digits, _ or - (at most 63 characters, not starting with a digit)`);
  if (v.startsWith('pg_') || RESERVED[kind].has(v)) throw badRequest(`${key} ${JSON.stringify(v)} is reserved`);
  return v;
}
function reqName(b: Record<string, unknown>, key: string, kind: keyof typeof RESERVED): string {
  const v = optName(b, key, kind);
  if (v === undefined) throw badRequest(`${key} is required`);
  return v;
}
function optBranchName(v: unknown): string {
  if (typeof v !== 'string' || !/^[A-Za-z0-9][A-Za-z0-9_.\/-]{0,62}$/.test(v)) throw badRequest('name must be 1 to 63 letters, digits, _ . / or -, starting with a letter or digit');
  return v;
}
function optSeconds(b: Record<string, unknown>, key: string): number | undefined {
  const v = b[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v > 7 * 24 * 3600) throw badRequest(`${key} must be an integer number of seconds from 0 to 604800`);
  return v;
}
function optRateLimit(b: Record<string, unknown>, key: string): ConnectionRateLimit | null | undefined {
  const v = b[key];
  if (v === undefined) return undefined;
  if (v === null) return null;
  const r = v as Partial<ConnectionRateLimit>;
  if (typeof v !== 'object' || Array.isArray(v) || typeof r.per_second !== 'number' || !(r.per_second > 0) || r.per_second > 1e6
      || typeof r.burst !== 'number' || !Number.isInteger(r.burst) || r.burst < 1 || r.burst > 1e6) {
    throw badRequest(`${key} must be null or { per_second: number > 0, burst: integer >= 1 }`);
  }
  return { per_second: r.per_second, burst: r.burst };
}
function optPoolSize(b: Record<string, unknown>, key: string): number | null | undefined {
  const v = b[key];
  if (v === undefined || v === null) return v;
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 1 || v > 10_000) throw badRequest(`${key} must be null or an integer from 1 to 10000`);
  return v;
}
/** A compute size in CU: 0.25–16 in steps of 0.25 (null only where `nullable`). */
function optCu(b: Record<string, unknown>, key: string, nullable: boolean): number | null | undefined {
  const v = b[key];
  if (v === undefined) return undefined;
  if (v === null && nullable) return null;
  if (typeof v !== 'number' || !Number.isFinite(v) || v < 0.25 || v > 16 || Math.round(v * 4) !== v * 4) {
    throw badRequest(`${key} must be ${nullable ? 'null or ' : ''}a number of compute units from 0.25 to 16 in steps of 0.25`);
  }
  return v;
}
function optAllowedIps(b: Record<string, unknown>, key: string): string[] | undefined {
  const v = b[key];
  if (v === undefined || v === null) return undefined;
  if (!Array.isArray(v) || v.length > 100 || v.some((e) => typeof e !== 'string')) throw badRequest(`${key} must be an array of at most 100 strings`);
  try {
    return validateAllowlist(v as string[]);
  } catch (err) {
    throw badRequest(`${key}: ${(err as Error).message}`);
  }
}
function optPassword(b: Record<string, unknown>, key: string): string | undefined {
  const v = b[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'string' || v.length < 8 || v.length > 256 || v.includes('\0')) throw badRequest(`${key} must be a string of 8 to 256 characters`);
  return v;
}

/** The compute driver the configuration names (`XENON_VM_DRIVER`). */
async function createDriver(config: ControlPlaneConfig, logger: Logger): Promise<ComputeDriver> {
  const common = {
    pgBin: config.pgBin,
    dataRoot: config.dataRoot,
    logDir: computeLogDir(config.stateDir),
    runAs: config.runAs,
    portRange: config.computePortRange,
    settings: config.computeSettings,
    imageCache: config.imageCacheMaxBytes > 0 ? { maxBytes: config.imageCacheMaxBytes } : false as const,
    logger,
  };
  if (config.vmDriver === 'process') return ProcessDriver.create({ ...common, freezer: config.freezer });
  // The image is built once (minutes: debootstrap) and then found in its directory.
  const image = await ensureImage({ dir: config.vmImageDir, logger });
  return QemuDriver.create({
    ...common,
    image,
    accel: config.vmAccel,
    warmPool: config.vmWarmPool,
    ...(config.vmBootTimeoutMs ? { bootTimeoutMs: config.vmBootTimeoutMs } : {}),
    ...(config.pageserverUrl ? { pageserverUrl: config.pageserverUrl } : {}),
  });
}

export async function startControlPlane(config: ControlPlaneConfig, deps: ControlPlaneDeps): Promise<ControlPlaneHandle> {
  const logger = deps.logger;
  const registry = deps.registry ?? new Registry();
  if (!deps.registry) collectDefaultMetrics({ register: registry });
  const store = await MetadataStore.connect(config.databaseUrl);
  const driver = deps.driver ?? (await createDriver(config, logger.child({ component: 'vm' })));

  const transitions = new Counter({ name: 'xenon_compute_transitions_total', help: 'Compute lifecycle transitions', labelNames: ['from', 'to'], registers: [registry] });
  const transitionSeconds = new Histogram({
    name: 'xenon_compute_transition_seconds', help: 'Time to become active (start or resume)', labelNames: ['kind'],
    buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10], registers: [registry],
  });
  const safekeepers = new SafekeeperSet(config.safekeepers, logger.child({ component: 'safekeepers' }), {
    maxSlotWalKeepSize: config.maxSlotWalKeepSize,
    stopWaitMs: config.safekeeperStopWaitMs,
  });
  if (!safekeepers.enabled) logger.warn('no safekeepers configured (XENON_SAFEKEEPERS): commits are only as durable as each compute\'s own disk');
  const storage = config.pageserverUrl ? new Storage(config.pageserverUrl, driver, logger.child({ component: 'storage' })) : undefined;
  if (!storage) logger.warn('no pageserver configured (XENON_PAGESERVER_URL): computes start from their local data directory only, and there are no branches');
  const manager = new ComputeManager({
    store,
    driver,
    safekeepers,
    storage,
    logger: logger.child({ component: 'lifecycle' }),
    idleCheckIntervalMs: config.idleCheckIntervalMs,
    imageWarmIntervalMs: config.imageWarmIntervalMs,
    maxWakeCacheMs: config.maxWakeCacheMs,
    onTransition: (_id, from, to, ms) => {
      transitions.inc({ from, to });
      if (to === 'active') transitionSeconds.observe({ kind: from === 'suspended' ? 'resume' : 'start' }, ms / 1000);
    },
  });
  await manager.init();
  const autoscaler = new Autoscaler({ store, driver, manager, logger: logger.child({ component: 'autoscaler' }), registry, intervalMs: config.autoscaleIntervalMs });
  autoscaler.start();
  new Gauge({
    name: 'xenon_endpoints', help: 'Endpoints by state', labelNames: ['state'], registers: [registry],
    async collect() {
      const rows = await store.listEndpoints().catch(() => []);
      const counts = new Map<string, number>(ENDPOINT_STATES.map((s) => [s, 0]));
      for (const r of rows) counts.set(manager.state(r.id), (counts.get(manager.state(r.id)) ?? 0) + 1);
      for (const [state, n] of counts) this.set({ state }, n);
    },
  });

  if (driver instanceof QemuDriver) {
    new Gauge({ name: 'xenon_vm_warm_pool', help: 'Compute VMs booted and waiting for a compute (qemu driver)', registers: [registry], collect() { this.set(driver.pooled); } });
  }
  if (driver.imageCacheStats) {
    const stats = driver.imageCacheStats.bind(driver);
    new Gauge({
      name: 'xenon_image_cache_bytes', help: 'Bytes of pageserver images unpacked in the compute host\'s cache (0 where the file system cannot clone files)', registers: [registry],
      collect() { this.set(stats().bytes); },
    });
    new Gauge({
      name: 'xenon_image_cache_lookups', help: 'Image cache lookups since start (starts and warm-ups), by result', labelNames: ['result'], registers: [registry],
      collect() { const s = stats(); this.set({ result: 'hit' }, s.hits); this.set({ result: 'miss' }, s.misses); },
    });
    new Gauge({
      name: 'xenon_image_cache_wal_lookups', help: 'WAL files of starts found in (hit) or downloaded past (miss) the compute host\'s cache since start', labelNames: ['result'], registers: [registry],
      collect() { const s = stats(); this.set({ result: 'hit' }, s.walHits); this.set({ result: 'miss' }, s.walMisses); },
    });
  }

  const host = (id: string): string => `${id}.${config.domain}`;
  const epOut = (r: EndpointRow) =>
    endpointOut(r, { host: host(r.id), state: manager.state(r.id), connections: manager.connections(r.id), lastActive: manager.lastActive(r.id), cu: manager.cu(r.id) });
  const connectionUri = (endpointId: string, role: string, password: string | undefined, db: string): string =>
    `postgresql://${encodeURIComponent(role)}${password === undefined ? '' : `:${encodeURIComponent(password)}`}@${host(endpointId)}:${config.proxyPort}/${encodeURIComponent(db)}?sslmode=verify-full`;
  const insertEndpoint = async (s: MetadataStore, id: string, projectId: string, branchId: string, suspend: number, stop: number): Promise<void> => {
    await s.insertEndpoint({ id, projectId, branchId, suspend, stop }).catch((err: { code?: string }) => {
      if (err instanceof XenonError && err.code === 'CP_CONFLICT') throw new XenonError('CP_CONFLICT', 'branch already has an endpoint', { userMessage: `branch ${branchId} already has a read-write endpoint` });
      throw err;
    });
  };

  /**
   * Changes a branch's roles or databases: the metadata and the running compute together (the
   * change rolls back when the compute refuses it); then proxies drop their cached secrets.
   */
  async function changeBranch<T>(branchId: string, change: (tx: MetadataStore) => Promise<T>): Promise<T> {
    const out = await store.atomically(async (tx) => {
      const result = await change(tx);
      await manager.branchSpecChanged(branchId, tx);
      return result;
    });
    for (const e of await store.listEndpoints()) if (e.branch_id === branchId) manager.invalidate(e.id, 'access');
    return out;
  }

  const setRole = (branchId: string, name: string, password: string, mustBeNew: boolean) =>
    changeBranch(branchId, (tx) => tx.upsertRole(branchId, name, formatScramSecret(makeScramSecret(password)), mustBeNew));

  const r = new Router({ maxBody: 1 << 20 });

  // ---- projects
  r.get('/v1/projects', async () => ({ projects: await store.listProjects() }));
  r.post('/v1/projects', async ({ body }): Promise<HttpReply> => {
    const b = obj(body) as Record<string, unknown> & CreateProjectRequest;
    const name = b.name === undefined ? undefined : String(b.name).slice(0, 100);
    const roleName = optName(b, 'role_name', 'role') ?? 'neondb_owner';
    const dbName = optName(b, 'database_name', 'database') ?? 'neondb';
    const password = optPassword(b, 'role_password') ?? generatePassword();
    const suspend = optSeconds(b, 'suspend_timeout_seconds') ?? config.defaultSuspendTimeoutSeconds;
    const stop = optSeconds(b, 'stop_timeout_seconds') ?? config.defaultStopTimeoutSeconds;
    const projectId = newProjectId();
    const branchId = newBranchId();
    const endpointId = newEndpointId();
    const adminPassword = generatePassword();
    const secret = formatScramSecret(makeScramSecret(password));
    await store.tx(async (c) => {
      await c.query('INSERT INTO projects (id, name) VALUES ($1, $2)', [projectId, name ?? projectId]);
      await c.query('INSERT INTO branches (id, project_id, name, admin_password) VALUES ($1, $2, $3, $4)', [branchId, projectId, 'main', adminPassword]);
      await c.query('UPDATE projects SET default_branch_id = $2 WHERE id = $1', [projectId, branchId]);
      await c.query(
        'INSERT INTO endpoints (id, project_id, branch_id, suspend_timeout_seconds, stop_timeout_seconds) VALUES ($1, $2, $3, $4, $5)',
        [endpointId, projectId, branchId, suspend, stop],
      );
      await c.query('INSERT INTO roles (branch_id, name, scram_secret) VALUES ($1, $2, $3)', [branchId, roleName, secret]);
      await c.query('INSERT INTO databases (branch_id, name, owner_name) VALUES ($1, $2, $3)', [branchId, dbName, roleName]);
    });
    try {
      // initdb now, never on the wake path; then start once so roles and databases exist and
      // the first connection is warm. The idle policy suspends it later.
      await driver.prepare(branchId, { user: ADMIN_ROLE, password: adminPassword });
      await storage?.createRoot(projectId, branchId);
      await manager.wake(endpointId);
    } catch (err) {
      await store.deleteProject(projectId).catch(() => {});
      await driver.destroyData(branchId).catch(() => {});
      await storage?.deleteTenant(projectId);
      throw err;
    }
    const out: CreateProjectResponse = {
      project: await store.getProject(projectId),
      branch: branchOut(await store.branchById(branchId)),
      endpoint: epOut(await store.getEndpoint(endpointId)),
      role: (await store.listRoles(branchId)).map(({ scram_secret: _s, ...role }) => role)[0]!,
      database: (await store.listDatabases(branchId))[0]!,
      password,
      connection_uri: connectionUri(endpointId, roleName, password, dbName),
    };
    logger.info('project created', { project: projectId, endpoint: endpointId });
    return new HttpReply(201, out);
  });
  r.get('/v1/projects/:project', async ({ params }) => ({ project: await store.getProject(params.project!) }));
  r.patch('/v1/projects/:project', async ({ params, body }) => {
    const b = obj(body) as Record<string, unknown>;
    if (b.name !== undefined && (typeof b.name !== 'string' || !b.name || b.name.length > 100)) throw badRequest('name must be a string of 1 to 100 characters');
    const project = await store.updateProject(params.project!, { name: b.name as string | undefined, allowed_ips: optAllowedIps(b, 'allowed_ips') });
    // Proxies cache access answers (allowlist included): make them ask again.
    for (const e of await store.listEndpoints(project.id)) manager.invalidate(e.id, 'access');
    return { project };
  });
  r.delete('/v1/projects/:project', async ({ params }) => {
    const project = await store.getProject(params.project!);
    const endpoints = await store.listEndpoints(project.id);
    const branches = await store.listBranches(project.id);
    for (const e of endpoints) await manager.retire(e.id);
    try {
      await store.deleteProject(project.id);
    } catch (err) {
      for (const e of endpoints) manager.unretire(e.id);
      throw err;
    }
    for (const b of branches) {
      await driver.destroyData(b.id).catch((err: Error) => logger.warn('could not delete branch data', { branch: b.id, err }));
      await safekeepers.deleteTimeline(b.id);
    }
    await storage?.deleteTenant(project.id);
    return { project };
  });

  // ---- branches
  r.get('/v1/projects/:project/branches', async ({ params }) => ({ branches: await store.listBranches(params.project!) }));
  r.get('/v1/projects/:project/branches/:branch', async ({ params }) => ({ branch: branchOut(await store.getBranchRow(params.project!, params.branch!)) }));
  r.post('/v1/projects/:project/branches', async ({ params, body }): Promise<HttpReply> => {
    const b = obj(body) as Record<string, unknown> & CreateBranchRequest;
    if (!storage) throw badRequest('branches need the pageserver: this control plane runs without one (XENON_PAGESERVER_URL)');
    const project = await store.getProject(params.project!);
    if (b.parent !== undefined && typeof b.parent !== 'string') throw badRequest('parent must be a branch id or name');
    const parent = await store.getBranchRow(project.id, (b.parent as string | undefined) ?? project.default_branch_id ?? 'main');
    const name = b.name === undefined ? undefined : optBranchName(b.name);
    let lsn: string | undefined;
    let time: string | undefined;
    if (b.parent_lsn !== undefined) {
      if (typeof b.parent_lsn !== 'string') throw badRequest('parent_lsn must be an LSN such as "0/16B3748"');
      parseLsn(b.parent_lsn); // a clear 400 for anything else
      lsn = b.parent_lsn.toUpperCase();
    }
    if (b.parent_timestamp !== undefined) {
      if (typeof b.parent_timestamp !== 'string' || !/^\d{4}-\d\d-\d\d[T ]/.test(b.parent_timestamp) || Number.isNaN(Date.parse(b.parent_timestamp))) {
        throw badRequest('parent_timestamp must be an ISO 8601 time such as "2026-12-02T04:05:06.789Z"');
      }
      time = new Date(b.parent_timestamp).toISOString();
    }
    if (lsn && time) throw badRequest('give parent_lsn or parent_timestamp, not both');
    if (b.endpoint !== undefined && typeof b.endpoint !== 'boolean') throw badRequest('endpoint must be a boolean');
    const suspend = optSeconds(b, 'suspend_timeout_seconds') ?? config.defaultSuspendTimeoutSeconds;
    const stop = optSeconds(b, 'stop_timeout_seconds') ?? config.defaultStopTimeoutSeconds;
    const id = newBranchId();
    const branchName = name ?? id;
    if ((await store.listBranches(project.id)).some((x) => x.name === branchName)) {
      throw new XenonError('CP_CONFLICT', `branch ${branchName} exists`, { userMessage: `a branch named ${branchName} already exists in project ${project.id}` });
    }
    // The pageserver checks the point (GC cutoff, tip, an image before it) and pins it: first.
    const t0 = Date.now();
    const timeline = await storage.branch(project.id, { id, parentId: parent.id, lsn, time });
    const endpointId = b.endpoint === false ? undefined : newEndpointId();
    try {
      await store.atomically(async (tx) => {
        await tx.createChildBranch(parent, { id, name: branchName, parentLsn: timeline.ancestor_lsn ?? lsn ?? '0/0', parentTime: time ? new Date(time) : null });
        if (endpointId) await insertEndpoint(tx, endpointId, project.id, id, suspend, stop);
      });
    } catch (err) {
      await storage.deleteTimeline(project.id, id).catch((e: Error) => logger.warn('could not undo the pageserver timeline of a failed branch', { branch: id, err: e }));
      throw err;
    }
    const branch = branchOut(await store.branchById(id));
    const endpoint = endpointId ? epOut(await store.getEndpoint(endpointId)) : null;
    const dbs = await store.listDatabases(id);
    const out: CreateBranchResponse = {
      branch,
      endpoint,
      connection_uris: endpointId ? dbs.map((d) => ({ role: d.owner_name, database: d.name, uri: connectionUri(endpointId, d.owner_name, undefined, d.name) })) : [],
    };
    logger.info('branch created', { project: project.id, branch: id, parent: parent.id, lsn: branch.parent_lsn, time, ms: Date.now() - t0 });
    return new HttpReply(201, out);
  });
  r.delete('/v1/projects/:project/branches/:branch', async ({ params }) => {
    const project = await store.getProject(params.project!);
    const branch = await store.getBranchRow(project.id, params.branch!);
    if (project.default_branch_id === branch.id) throw new XenonError('CP_CONFLICT', 'default branch', { userMessage: `${branch.name} is the project's default branch: delete the project instead` });
    const children = await store.childBranches(branch.id);
    if (children.length) throw new XenonError('CP_CONFLICT', 'branch has children', { userMessage: `branch ${branch.name} has child branches (${children.map((c) => c.name).join(', ')}): delete them first` });
    const endpoints = (await store.listEndpoints(project.id)).filter((e) => e.branch_id === branch.id);
    for (const e of endpoints) await manager.retire(e.id);
    try {
      await storage?.deleteTimeline(project.id, branch.id);
      await store.deleteBranch(branch.id);
    } catch (err) {
      for (const e of endpoints) manager.unretire(e.id);
      throw err;
    }
    await driver.destroyData(branch.id).catch((err: Error) => logger.warn('could not delete branch data', { branch: branch.id, err }));
    await safekeepers.deleteTimeline(branch.id);
    return { branch: branchOut(branch) };
  });

  // ---- endpoints
  r.get('/v1/projects/:project/endpoints', async ({ params }) => {
    await store.getProject(params.project!);
    return { endpoints: (await store.listEndpoints(params.project!)).map(epOut) };
  });
  r.post('/v1/projects/:project/endpoints', async ({ params, body }) => {
    const b = obj(body) as Record<string, unknown> & CreateEndpointRequest;
    if (typeof b.branch_id !== 'string') throw badRequest('branch_id is required');
    const branch = await store.getBranchRow(params.project!, b.branch_id);
    const id = newEndpointId();
    await insertEndpoint(store, id, params.project!, branch.id, optSeconds(b, 'suspend_timeout_seconds') ?? config.defaultSuspendTimeoutSeconds, optSeconds(b, 'stop_timeout_seconds') ?? config.defaultStopTimeoutSeconds);
    return new HttpReply(201, { endpoint: epOut(await store.getEndpoint(id)) });
  });
  r.get('/v1/endpoints/:endpoint', async ({ params }) => ({ endpoint: epOut(await store.getEndpoint(params.endpoint!)) }));
  r.patch('/v1/endpoints/:endpoint', async ({ params, body }) => {
    const b = obj(body) as Record<string, unknown> & UpdateEndpointRequest;
    if (b.disabled !== undefined && typeof b.disabled !== 'boolean') throw badRequest('disabled must be a boolean');
    const poolSize = optPoolSize(b, 'pool_size');
    let row = await store.updateEndpoint(params.endpoint!, {
      suspend_timeout_seconds: optSeconds(b, 'suspend_timeout_seconds'),
      stop_timeout_seconds: optSeconds(b, 'stop_timeout_seconds'),
      disabled: b.disabled,
      connection_rate_limit: optRateLimit(b, 'connection_rate_limit'),
    });
    if (poolSize !== undefined) row = await store.setEndpointPoolSize(row.id, poolSize);
    const minCu = optCu(b, 'min_cu', false) ?? undefined;
    const maxCu = optCu(b, 'max_cu', false) ?? undefined;
    const cu = optCu(b, 'cu', true);
    if (minCu !== undefined || maxCu !== undefined || cu !== undefined) {
      const lo = minCu ?? row.min_cu ?? maxCu;
      const hi = maxCu ?? row.max_cu ?? minCu;
      if (lo === undefined || hi === undefined || lo === null || hi === null) throw badRequest('set min_cu and max_cu first: the endpoint has no size yet');
      if (hi < lo) throw badRequest(`max_cu (${hi}) must not be below min_cu (${lo})`);
      const pin = cu === undefined ? row.cu_override : cu;
      if (pin !== null && (pin < lo || pin > hi)) throw badRequest(`cu (${pin}) must be within min_cu and max_cu (${lo}–${hi})`);
      row = await store.setEndpointSize(row.id, { min_cu: lo, max_cu: hi, ...(cu !== undefined ? { cu } : {}) });
    }
    manager.refresh(row);
    if (minCu !== undefined || maxCu !== undefined || cu !== undefined) {
      await autoscaler.apply(row);
    }
    if (b.connection_rate_limit !== undefined || poolSize !== undefined) manager.invalidate(row.id, 'access');
    if (row.disabled) await manager.stop(row.id);
    return { endpoint: epOut(row) };
  });
  r.delete('/v1/endpoints/:endpoint', async ({ params }) => {
    const existing = await store.getEndpoint(params.endpoint!);
    await manager.retire(existing.id);
    try {
      return { endpoint: epOut(await store.deleteEndpoint(existing.id)) };
    } catch (err) {
      manager.unretire(existing.id);
      throw err;
    }
  });
  r.post('/v1/endpoints/:endpoint/start', async ({ params }) => {
    await manager.wake(params.endpoint!);
    return { endpoint: epOut(await store.getEndpoint(params.endpoint!)) };
  });
  r.post('/v1/endpoints/:endpoint/suspend', async ({ params }) => {
    await manager.suspend(params.endpoint!);
    return { endpoint: epOut(await store.getEndpoint(params.endpoint!)) };
  });
  r.post('/v1/endpoints/:endpoint/stop', async ({ params }) => {
    await manager.stop(params.endpoint!);
    return { endpoint: epOut(await store.getEndpoint(params.endpoint!)) };
  });
  r.get('/v1/endpoints/:endpoint/events', async ({ params }) => ({ events: await store.listEvents(params.endpoint!) }));
  r.get('/v1/endpoints/:endpoint/wal', async ({ params }): Promise<WalStatus> => {
    const row = await store.getEndpoint(params.endpoint!);
    const branch = await store.branchById(row.branch_id);
    return {
      timeline_id: branch.id,
      generation: Number(branch.generation),
      quorum: safekeepers.enabled ? safekeepers.quorum : 0,
      safekeepers: await safekeepers.report(branch.id),
    };
  });

  // ---- roles
  const branchOf = (p: Record<string, string>) => store.getBranchRow(p.project!, p.branch!);
  r.get('/v1/projects/:project/branches/:branch/roles', async ({ params }) => ({
    roles: (await store.listRoles((await branchOf(params)).id)).map(({ scram_secret: _s, ...role }) => role),
  }));
  r.post('/v1/projects/:project/branches/:branch/roles', async ({ params, body }) => {
    const b = obj(body) as Record<string, unknown> & CreateRoleRequest;
    const name = reqName(b, 'name', 'role');
    const password = optPassword(b, 'password') ?? generatePassword();
    const role = await setRole((await branchOf(params)).id, name, password, true);
    return new HttpReply(201, { role, password });
  });
  r.post('/v1/projects/:project/branches/:branch/roles/:role/reset_password', async ({ params, body }) => {
    const password = optPassword(obj(body), 'password') ?? generatePassword();
    const role = await setRole((await branchOf(params)).id, params.role!, password, false);
    return { role, password };
  });
  r.delete('/v1/projects/:project/branches/:branch/roles/:role', async ({ params }) => {
    const branch = await branchOf(params);
    const owned = (await store.listDatabases(branch.id)).filter((d) => d.owner_name === params.role);
    if (owned.length) throw badRequest(`role ${params.role} owns databases ${owned.map((d) => d.name).join(', ')}: delete them first`);
    const role = await changeBranch(branch.id, (tx) => tx.deleteRole(branch.id, params.role!));
    return { role };
  });

  // ---- databases
  r.get('/v1/projects/:project/branches/:branch/databases', async ({ params }) => ({ databases: await store.listDatabases((await branchOf(params)).id) }));
  r.post('/v1/projects/:project/branches/:branch/databases', async ({ params, body }) => {
    const b = obj(body) as Record<string, unknown> & CreateDatabaseRequest;
    const branch = await branchOf(params);
    const name = reqName(b, 'name', 'database');
    const owner = reqName(b, 'owner_name', 'role');
    const database = await changeBranch(branch.id, (tx) => tx.createDatabase(branch.id, name, owner));
    return new HttpReply(201, { database });
  });
  r.delete('/v1/projects/:project/branches/:branch/databases/:database', async ({ params }) => {
    const branch = await branchOf(params);
    const database = await changeBranch(branch.id, (tx) => tx.deleteDatabase(branch.id, params.database!));
    return { database };
  });

  // ---- proxy API
  r.get('/v1/proxy/endpoints/:endpoint/access', async ({ params, query }): Promise<EndpointAccess> => {
    const id = params.endpoint!;
    const role = query.get('role') ?? '';
    const row = ENDPOINT_ID_RE.test(id) ? await store.findEndpoint(id) : undefined;
    if (!row) throw new XenonError('CP_ENDPOINT_NOT_FOUND', `endpoint ${id} not found`);
    const project = await store.getProject(row.project_id);
    return {
      endpoint_id: row.id,
      project_id: row.project_id,
      branch_id: row.branch_id,
      role_secret: role ? await store.roleSecret(row.branch_id, role) : null,
      allowed_ips: project.allowed_ips,
      connection_rate_limit: rateLimitOut(row),
      pool_size: row.pool_size ?? null,
    };
  });
  r.post('/v1/proxy/endpoints/:endpoint/wake', async ({ params }) => manager.wake(params.endpoint!));
  r.post('/v1/proxy/connections', ({ body }) => {
    const b = obj(body) as Partial<ConnectionReport>;
    if (typeof b.proxy_id !== 'string' || !b.proxy_id || typeof b.counts !== 'object' || b.counts === null || typeof b.ttl_seconds !== 'number' || !(b.ttl_seconds > 0)) {
      throw badRequest('expected { proxy_id: string, counts: { [endpoint]: number }, ttl_seconds: number > 0 }');
    }
    const counts: Record<string, number> = {};
    for (const [k, v] of Object.entries(b.counts)) {
      if (typeof v !== 'number' || !Number.isInteger(v) || v < 0) throw badRequest(`counts.${k} must be a non-negative integer`);
      counts[k] = v;
    }
    const inv = manager.reportConnections({ proxy_id: b.proxy_id, counts, ttl_seconds: Math.min(b.ttl_seconds, 300) });
    return { ok: true, invalidate: inv.wake, invalidate_access: inv.access } satisfies ConnectionReportResponse;
  });

  const http = await startHttpServer({ host: config.host, port: config.port, router: r, logger, registry });
  logger.info('control plane listening', { url: http.url });
  return {
    url: http.url,
    address: http.address,
    store,
    manager,
    driver,
    async close() {
      autoscaler.stop();
      await http.close();
      await manager.close();
      safekeepers.close();
      await driver.close();
      await store.close();
    },
  };
}

export { loadControlPlaneConfig, type ControlPlaneConfig } from './config.ts';
export { ControlPlaneClient } from './client.ts';
