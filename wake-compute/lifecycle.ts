/**
 * Compute lifecycle: `stopped → starting → active → suspended → stopped` (and `stopping`), one
 * state machine per endpoint. Every transition of one endpoint runs under that endpoint's lock,
 * and concurrent wakes share one in-flight promise (single-flight), so any number of
 * simultaneous connections cause one start.
 *
 * Idle policy (scale to zero): proxies report live connection counts; an endpoint with zero
 * connections for `suspend_timeout_seconds` is suspended, and after `stop_timeout_seconds`
 * suspended it is stopped. A wake resumes or cold-starts it.
 */
import { createHash } from 'node:crypto';
import pg from 'pg';
import type { ComputeAddress, ComputeDriver, ComputeResources } from '../vm/index.ts';
import { XenonError } from '../lib/errors.ts';
import type { Logger } from '../lib/logger.ts';
import { quoteIdent, quoteLiteral } from '../lib/postgres.ts';
import type { ComputeInfo, ConnectionReport, EndpointState } from './api.ts';
import type { EndpointRow, MetadataStore } from './store.ts';
import type { SafekeeperSet } from './safekeepers.ts';
import type { Storage } from './storage.ts';
import type { StartPlan } from '../pageserver/api.ts';
import { checkpointRecordEnd } from '../vm/index.ts';

export const ADMIN_ROLE = 'cloud_admin';
const MANAGED = 'managed by xenon';

interface Runtime {
  id: string;
  state: EndpointState;
  address?: ComputeAddress;
  lastActive: number;
  suspendedAt: number;
  suspendTimeoutMs: number;
  stopTimeoutMs: number;
  /** Tail of the per-endpoint lock chain. */
  lock: Promise<unknown>;
  wakeInFlight?: Promise<ComputeInfo>;
  /** The running compute's generation and timeline (branch), when safekeepers are in use. */
  wal?: { timelineId: string; generation: number };
  /** The running compute is attached to the pageserver under this (tenant, timeline). */
  attached?: { projectId: string; branchId: string };
  /** The branch of its last start (whose images the host's cache keeps warm for a while). */
  branch?: { projectId: string; branchId: string };
  /** The running compute's size in CU (undefined when stopped). */
  cu?: number;
}

/** 1 CU = 1 vCPU + 4 GiB (as Neon's compute units; fractions of a CPU are CPU time). */
export function cuResources(cu: number): ComputeResources {
  return { cpu: cu, memoryMiB: Math.round(cu * 4096) };
}

/** Branches of endpoints active within this long have their newest image kept in the host's cache. */
const WARM_WINDOW_MS = 24 * 3600_000;

export interface ComputeManagerOptions {
  store: MetadataStore;
  driver: ComputeDriver;
  logger: Logger;
  idleCheckIntervalMs: number;
  /**
   * How often the newest image of each recently active branch is fetched into the compute host's
   * image cache, so that a start or a new child branch clones it (0 or absent: never; also
   * nothing where the driver keeps no cache).
   */
  imageWarmIntervalMs?: number;
  /** Upper bound of how long a proxy may reuse a wake answer. */
  maxWakeCacheMs: number;
  now?: () => number;
  /** The WAL quorum; without one (or an empty one) computes run without synchronous replication. */
  safekeepers?: SafekeeperSet;
  /**
   * The pageserver: a compute without a local data directory starts from its plan (image + WAL).
   * Without one, a missing data directory is initdb'd (development setups only).
   */
  storage?: Storage;
  onTransition?: (endpointId: string, from: EndpointState, to: EndpointState, ms: number) => void;
}

export class ComputeManager {
  private readonly runtimes = new Map<string, Runtime>();
  /** Deleted endpoints: never started again, even by a wake that read the row before the delete. */
  private readonly retired = new Set<string>();
  private readonly reports = new Map<string, { counts: Record<string, number>; expires: number }>();
  /** Per proxy: what its caches must drop since its last report. */
  private readonly invalidations = new Map<string, { wake: Set<string>; access: Set<string> }>();
  private timer?: NodeJS.Timeout;
  private warmTimer?: NodeJS.Timeout;
  private warming = false;
  private closing = false;
  private readonly now: () => number;

  constructor(private readonly o: ComputeManagerOptions) {
    this.now = o.now ?? Date.now;
    o.driver.onUnexpectedExit((e) => void this.onComputeExit(e.computeId, e.code));
  }

  /**
   * No compute survives a control-plane restart: stop any a crashed predecessor left running,
   * mark every endpoint stopped, and start the idle policy.
   */
  async init(): Promise<void> {
    const { rows } = await this.o.store.pool.query<{ id: string; branch_id: string }>(`SELECT id, branch_id FROM endpoints WHERE state <> 'stopped'`);
    for (const r of rows) {
      await this.o.driver.reclaim(r.branch_id).catch((err: Error) => this.o.logger.warn('could not stop a leftover compute', { endpoint: r.id, err }));
    }
    await this.o.store.pool.query(`UPDATE endpoints SET state = 'stopped' WHERE state <> 'stopped'`);
    this.timer = setInterval(() => this.tick(), this.o.idleCheckIntervalMs);
    this.timer.unref();
    const warmMs = this.o.imageWarmIntervalMs ?? 0;
    if (warmMs > 0 && this.o.storage && this.o.driver.cachesImages && this.o.driver.warmImage) {
      this.warmTimer = setInterval(() => void this.warmImages(), warmMs);
      this.warmTimer.unref();
    }
  }

  /**
   * Fetches, into the compute host's image cache, the image a start at the tip of each recently
   * active branch would use (the one a new child branch at its tip uses too). One pass at a time.
   */
  async warmImages(): Promise<number> {
    const storage = this.o.storage;
    const driver = this.o.driver;
    if (this.warming || this.closing || !storage || !driver.warmImage) return 0;
    this.warming = true;
    let warmed = 0;
    try {
      const seen = new Set<string>();
      for (const rt of [...this.runtimes.values()]) {
        const b = rt.branch;
        if (!b || seen.has(b.branchId) || this.now() - rt.lastActive > WARM_WINDOW_MS || this.retired.has(rt.id)) continue;
        seen.add(b.branchId);
        let plan: StartPlan | undefined;
        try {
          plan = await storage.storedTipPlan(b.projectId, b.branchId);
        } catch (err) {
          this.o.logger.debug('no start plan to warm the image cache with', { branch: b.branchId, err: (err as Error).message });
          continue;
        }
        if (plan && await driver.warmImage(plan)) warmed++;
        if (this.closing) break;
      }
    } finally {
      this.warming = false;
    }
    return warmed;
  }

  private runtime(row: EndpointRow): Runtime {
    if (this.retired.has(row.id)) throw new XenonError('CP_ENDPOINT_NOT_FOUND', `endpoint ${row.id} was deleted`, { userMessage: `endpoint ${row.id} not found` });
    let rt = this.runtimes.get(row.id);
    if (!rt) {
      rt = { id: row.id, state: 'stopped', lastActive: this.now(), suspendedAt: 0, suspendTimeoutMs: 0, stopTimeoutMs: 0, lock: Promise.resolve() };
      this.runtimes.set(row.id, rt);
    }
    rt.suspendTimeoutMs = row.suspend_timeout_seconds * 1000;
    rt.stopTimeoutMs = row.stop_timeout_seconds * 1000;
    return rt;
  }

  /** Refreshes cached settings after an update. */
  refresh(row: EndpointRow): void {
    if (this.runtimes.has(row.id)) this.runtime(row);
  }

  state(endpointId: string): EndpointState {
    return this.runtimes.get(endpointId)?.state ?? 'stopped';
  }

  lastActive(endpointId: string): Date | null {
    const rt = this.runtimes.get(endpointId);
    return rt ? new Date(rt.lastActive) : null;
  }

  /** Live connections to `endpointId` summed over every proxy's unexpired report. */
  /** The running compute's size in CU; null when it is not running. */
  cu(endpointId: string): number | null {
    const rt = this.runtimes.get(endpointId);
    return rt && rt.state !== 'stopped' && rt.cu !== undefined ? rt.cu : null;
  }

  /** Active computes with their size (the autoscaler's work list). */
  activeComputes(): { id: string; cu: number }[] {
    return [...this.runtimes.values()].filter((rt) => rt.state === 'active' && rt.cu !== undefined).map((rt) => ({ id: rt.id, cu: rt.cu! }));
  }

  /**
   * Resizes a running compute under its lock (no start, stop or suspend meanwhile); false when it
   * is not active (then nothing changed).
   */
  /**
   * Resizes the running compute to `cu`; `stillWanted`, when given, is asked under the compute's
   * lock, after any resize before it (an autoscaler decision checks that no pin or new bounds
   * arrived while it measured).
   */
  async resize(endpointId: string, cu: number, why: string, stillWanted?: (current: number) => Promise<boolean>): Promise<boolean> {
    const rt = this.runtimes.get(endpointId);
    if (!rt || !this.o.driver.resize) return false;
    return this.withLock(rt, async () => {
      if (rt.state !== 'active' || rt.cu === undefined || rt.cu === cu) return false;
      if (stillWanted && !(await stillWanted(rt.cu))) return false;
      const from = rt.cu;
      await this.o.driver.resize!(rt.id, cuResources(cu));
      rt.cu = cu;
      await this.o.store.recordEvent(rt.id, 'resized', `${from} → ${cu} CU: ${why}`).catch(() => {});
      this.o.logger.info('compute resized', { endpoint: rt.id, from, to: cu, why });
      return true;
    });
  }

  connections(endpointId: string): number {
    const now = this.now();
    let n = 0;
    for (const [proxy, r] of this.reports) {
      if (r.expires < now) { this.reports.delete(proxy); continue; }
      n += r.counts[endpointId] ?? 0;
    }
    return n;
  }

  /** Records a proxy's counts; returns what its caches must drop. */
  reportConnections(report: ConnectionReport): { wake: string[]; access: string[] } {
    const now = this.now();
    const prev = this.reports.get(report.proxy_id)?.counts ?? {};
    this.reports.set(report.proxy_id, { counts: report.counts, expires: now + report.ttl_seconds * 1000 });
    // An endpoint that had connections until now, or has some now, was active now.
    for (const id of new Set([...Object.keys(prev), ...Object.keys(report.counts)])) {
      if ((prev[id] ?? 0) > 0 || (report.counts[id] ?? 0) > 0) {
        const rt = this.runtimes.get(id);
        if (rt) rt.lastActive = Math.max(rt.lastActive, now);
      }
    }
    const invalid = this.invalidations.get(report.proxy_id);
    this.invalidations.set(report.proxy_id, { wake: new Set(), access: new Set() });
    return { wake: [...(invalid?.wake ?? [])], access: [...(invalid?.access ?? [])] };
  }

  /**
   * Tell every live proxy to drop cached answers for an endpoint: `wake` when its address is no
   * longer good (suspended, stopped, gone), `access` when its roles changed.
   */
  invalidate(endpointId: string, what: 'wake' | 'access' = 'wake'): void {
    const now = this.now();
    for (const [proxy, r] of this.reports) {
      if (r.expires < now) { this.reports.delete(proxy); this.invalidations.delete(proxy); continue; }
      let inv = this.invalidations.get(proxy);
      if (!inv) this.invalidations.set(proxy, (inv = { wake: new Set(), access: new Set() }));
      inv[what].add(endpointId);
    }
  }

  private withLock<T>(rt: Runtime, fn: () => Promise<T>): Promise<T> {
    const run = rt.lock.then(fn, fn);
    rt.lock = run.catch(() => {});
    return run;
  }

  private async setState(rt: Runtime, to: EndpointState, t0?: number): Promise<void> {
    const from = rt.state;
    rt.state = to;
    if (to === 'stopped') rt.cu = undefined;
    await this.o.store.setEndpointState(rt.id, to, new Date(rt.lastActive)).catch((err: Error) =>
      this.o.logger.warn('could not persist endpoint state', { endpoint: rt.id, state: to, err }),
    );
    if (from !== to) this.o.onTransition?.(rt.id, from, to, t0 === undefined ? 0 : this.now() - t0);
  }

  private info(rt: Runtime, cold: boolean): ComputeInfo {
    const addr = rt.address!;
    // A proxy may reuse this answer only for half the idle timeout: a compute is suspended only
    // after a full timeout without connections, so a cached address never points at a frozen one.
    const ttl = rt.suspendTimeoutMs > 0 ? Math.min(this.o.maxWakeCacheMs, rt.suspendTimeoutMs / 2) : this.o.maxWakeCacheMs;
    return { endpoint_id: rt.id, host: addr.host, port: addr.port, cold, cache_ttl_ms: Math.floor(ttl) };
  }

  /** Resumes or starts the endpoint's compute; concurrent calls share one transition. */
  async wake(endpointId: string): Promise<ComputeInfo> {
    if (this.closing) throw new XenonError('CP_SHUTTING_DOWN');
    const row = await this.o.store.getEndpoint(endpointId);
    if (row.disabled) throw new XenonError('CP_ENDPOINT_DISABLED', `endpoint ${endpointId} is disabled`);
    const rt = this.runtime(row);
    rt.lastActive = this.now();
    if (rt.state === 'active' && rt.address && this.o.driver.status(endpointId) === 'running') return this.info(rt, false);
    if (!rt.wakeInFlight) {
      rt.wakeInFlight = this.withLock(rt, async () => {
        if (this.retired.has(rt.id)) throw new XenonError('CP_ENDPOINT_NOT_FOUND', `endpoint ${rt.id} was deleted`, { userMessage: `endpoint ${rt.id} not found` });
        if (rt.state === 'active' && this.o.driver.status(endpointId) === 'running') return this.info(rt, false);
        if (rt.state === 'suspended' && this.o.driver.status(endpointId) === 'suspended') {
          await this.doResume(rt);
        } else {
          await this.doStart(rt, row);
        }
        return this.info(rt, true);
      }).finally(() => { rt.wakeInFlight = undefined; });
    }
    return rt.wakeInFlight;
  }

  private async doStart(rt: Runtime, row: EndpointRow): Promise<void> {
    const t0 = this.now();
    if (this.o.driver.status(rt.id) !== 'stopped') await this.o.driver.stop(rt.id);
    await this.setState(rt, 'starting');
    await this.o.store.recordEvent(rt.id, 'start');
    let branchRow: Awaited<ReturnType<MetadataStore['branchById']>>;
    let attaching: Promise<void> | undefined;
    try {
      const branch = (branchRow = await this.o.store.branchById(row.branch_id));
      let plan: StartPlan | undefined;
      const hasData = await this.o.driver.hasData(branch.id);
      if (hasData && this.o.storage) await this.adopt(branch);
      if (!hasData) {
        if (this.o.storage) {
          // Stateless start: the pageserver says which image and which WAL make this branch.
          plan = await this.o.storage.startPlan(branch.project_id, branch.id);
          this.o.logger.info('starting from the pageserver', { endpoint: rt.id, branch: branch.id, mode: plan.mode, lsn: plan.lsn, image: plan.image.id, imageTimeline: plan.image.timeline_id });
        } else {
          this.o.logger.warn('no data for branch; initialising on the wake path', { endpoint: rt.id, branch: branch.id });
          await this.o.driver.prepare(branch.id, { user: ADMIN_ROLE, password: branch.admin_password });
        }
      }
      const sk = this.o.safekeepers;
      rt.branch = { projectId: branch.project_id, branchId: branch.id };
      // An unsized endpoint gets the driver's default size (no limits, no autoscaling).
      const cu = row.min_cu === null || row.max_cu === null ? undefined : (row.cu_override ?? row.min_cu);
      const size = cu === undefined ? undefined : { min: cuResources(row.min_cu!), max: cuResources(row.max_cu!), use: cuResources(cu) };
      // The pageserver learns of the compute (for images) while the safekeepers connect to it.
      const attach = async (address: ComputeAddress): Promise<void> => {
        if (!this.o.storage) return;
        rt.attached = { projectId: branch.project_id, branchId: branch.id };
        await this.o.storage.attach(branch.project_id, branch.id, { host: address.host, port: address.port, user: ADMIN_ROLE, password: branch.admin_password });
      };
      if (sk?.enabled) {
        // Where the committed WAL ends is known only to a safekeeper majority: the compute starts
        // with WAL up to there (fetched into pg_wal when its disk lacks it), as a new generation,
        // which first fences older computes on the safekeepers (so the start point is final).
        const generation = await this.o.store.nextGeneration(branch.id);
        const sp = await sk.startPoint(branch.id, generation);
        const address = (rt.address = await this.o.driver.start({
          computeId: rt.id,
          dataKey: branch.id,
          ...(size ? { size } : {}),
          settings: sk.computeSettings(generation),
          wal: { timelineId: branch.id, upTo: sp.upTo, safekeepers: sp.order },
          ...(plan ? { plan } : {}),
        }));
        rt.wal = { timelineId: branch.id, generation };
        attaching = attach(address);
        attaching.catch(() => {}); // awaited below; not an unhandled rejection meanwhile
        await sk.follow(branch.id, generation, { host: address.host, port: address.port, user: ADMIN_ROLE, password: branch.admin_password }, sp);
        this.o.logger.info('safekeepers follow the compute', { endpoint: rt.id, generation, startLsn: sp.upTo });
        await attaching;
      } else {
        rt.address = await this.o.driver.start({ computeId: rt.id, dataKey: branch.id, ...(size ? { size } : {}), ...(plan ? { plan } : {}) });
        await attach(rt.address);
      }
      rt.cu = cu;
    } catch (err) {
      this.o.logger.error('compute start failed', { endpoint: rt.id, err });
      await attaching?.catch(() => {}); // settled before the detach in releaseWal
      await this.o.store.recordEvent(rt.id, 'start_failed', (err as Error).message.slice(0, 2000)).catch(() => {});
      await this.o.driver.stop(rt.id).catch(() => {});
      await this.releaseWal(rt, false);
      rt.address = undefined;
      await this.setState(rt, 'stopped');
      throw err instanceof XenonError && err.kind === 'compute' ? err : new XenonError('CP_COMPUTE_START_FAILED', (err as Error).message, { cause: err });
    }
    // Roles and databases changed while it slept. A change the compute refuses is logged and
    // retried at the next start; it does not keep the endpoint from serving everyone else.
    await this.applySpecIfChanged(rt.id, branchRow.id, branchRow.admin_password, branchRow.spec_applied, this.o.store).catch(async (err: Error) => {
      this.o.logger.error('could not apply roles/databases to the compute', { endpoint: rt.id, err });
      await this.o.store.recordEvent(rt.id, 'spec_failed', err.message.slice(0, 2000)).catch(() => {});
    });
    rt.lastActive = this.now();
    await this.setState(rt, 'active', t0);
    await this.o.store.recordEvent(rt.id, 'started', `${this.now() - t0} ms`);
    this.o.logger.info('compute started', { endpoint: rt.id, port: rt.address.port, ms: this.now() - t0 });
  }

  /**
   * A root branch whose data the pageserver has never seen (a project made before Xenon had a
   * pageserver, or a pageserver that lost its objects) gets its tenant and timeline, with the
   * stopped compute's data directory as the first image: then it can be branched and started
   * without its disk. Never fatal: the compute starts from its data directory either way (a
   * directory not cleanly shut down is adopted at a later start).
   */
  private async adopt(branch: { id: string; project_id: string; parent_id: string | null }): Promise<void> {
    const storage = this.o.storage!;
    try {
      if (await storage.hasTimeline(branch.project_id, branch.id)) return;
      if (branch.parent_id) {
        this.o.logger.error('the pageserver has no timeline for this branch, and a child branch cannot be adopted from its data directory', { branch: branch.id, project: branch.project_id });
        return;
      }
      const image = await storage.createRoot(branch.project_id, branch.id);
      this.o.logger.warn('adopted a branch the pageserver did not know: its data directory is the timeline\'s first image', { branch: branch.id, project: branch.project_id, image: image.id, lsn: image.lsn });
    } catch (err) {
      this.o.logger.error('could not adopt the branch into the pageserver; starting from its data directory', { branch: branch.id, err });
    }
  }

  private async doResume(rt: Runtime): Promise<void> {
    const t0 = this.now();
    await this.o.driver.resume(rt.id);
    rt.lastActive = this.now();
    await this.setState(rt, 'active', t0);
    await this.o.store.recordEvent(rt.id, 'resume');
    this.o.logger.info('compute resumed', { endpoint: rt.id, ms: this.now() - t0 });
  }

  private async doSuspend(rt: Runtime): Promise<void> {
    if (rt.state !== 'active' || this.o.driver.status(rt.id) !== 'running') return;
    await this.o.driver.suspend(rt.id);
    this.invalidate(rt.id);
    rt.suspendedAt = this.now();
    await this.setState(rt, 'suspended');
    await this.o.store.recordEvent(rt.id, 'suspend');
    this.o.logger.info('compute suspended', { endpoint: rt.id });
  }

  private async doStop(rt: Runtime): Promise<void> {
    if (rt.state === 'stopped' && this.o.driver.status(rt.id) === 'stopped') return;
    await this.setState(rt, 'stopping');
    this.invalidate(rt.id);
    await this.o.driver.stop(rt.id);
    await this.releaseWal(rt, true);
    rt.address = undefined;
    await this.setState(rt, 'stopped');
    await this.o.store.recordEvent(rt.id, 'stop');
    this.o.logger.info('compute stopped', { endpoint: rt.id });
  }

  /**
   * The compute of `rt` is gone: after a clean stop, wait until a safekeeper quorum has its
   * shutdown checkpoint (the fast shutdown already waited for the connected ones); then the
   * safekeepers stop following it.
   */
  private async releaseWal(rt: Runtime, clean: boolean): Promise<void> {
    const attached = rt.attached;
    rt.attached = undefined;
    if (attached) await this.o.storage?.detach(attached.projectId, attached.branchId);
    const wal = rt.wal;
    const sk = this.o.safekeepers;
    if (!wal || !sk) return;
    rt.wal = undefined;
    let end: bigint | undefined;
    if (clean) {
      const ctl = await this.o.driver.controlData(wal.timelineId).catch(() => undefined);
      if (ctl?.state === 'shut down') end = checkpointRecordEnd(ctl.checkpoint);
    }
    const r = await sk.stopped(wal.timelineId, wal.generation, end);
    if (end !== undefined && !r.quorum) {
      await this.o.store.recordEvent(rt.id, 'wal_quorum_missing', `shutdown checkpoint on ${r.flushed} of ${sk.size} safekeepers (quorum ${sk.quorum})`).catch(() => {});
    }
  }

  /** Manual transitions (API / CLI). */
  async suspend(endpointId: string): Promise<void> {
    const rt = this.runtime(await this.o.store.getEndpoint(endpointId));
    await this.withLock(rt, () => this.doSuspend(rt));
  }

  async stop(endpointId: string): Promise<void> {
    const rt = this.runtime(await this.o.store.getEndpoint(endpointId));
    await this.withLock(rt, () => this.doStop(rt));
  }

  /** What the idle policy wants for `rt` now. */
  private due(rt: Runtime): 'suspend' | 'stop' | null {
    if (rt.state !== 'active' && rt.state !== 'suspended') return null;
    const now = this.now();
    if (this.connections(rt.id) > 0) {
      rt.lastActive = now;
      return null;
    }
    const idle = now - rt.lastActive;
    if (rt.state === 'active') {
      if (rt.suspendTimeoutMs > 0) return idle >= rt.suspendTimeoutMs ? 'suspend' : null;
      return rt.stopTimeoutMs > 0 && idle >= rt.stopTimeoutMs ? 'stop' : null;
    }
    return rt.stopTimeoutMs > 0 && now - rt.suspendedAt >= rt.stopTimeoutMs ? 'stop' : null;
  }

  /** Idle policy, one pass. */
  tick(): void {
    for (const rt of this.runtimes.values()) {
      if (!this.due(rt)) continue;
      void this.withLock(rt, async () => {
        // Decide again under the lock: a wake or a connection may have come in meanwhile.
        const d = this.due(rt);
        if (d === 'suspend') await this.doSuspend(rt);
        else if (d === 'stop') await this.doStop(rt);
      }).catch((err: Error) => this.o.logger.error('idle transition failed', { endpoint: rt.id, err }));
    }
  }

  private async onComputeExit(endpointId: string, code: number | null): Promise<void> {
    const rt = this.runtimes.get(endpointId);
    if (!rt || this.closing) return;
    await this.withLock(rt, async () => {
      if (this.o.driver.status(endpointId) !== 'stopped') return;
      rt.address = undefined;
      this.invalidate(endpointId);
      await this.releaseWal(rt, false);
      await this.o.store.recordEvent(endpointId, 'exit', `exit code ${code}`).catch(() => {});
      await this.setState(rt, 'stopped');
    });
  }

  /** Roles and databases of a branch as the compute must have them; its hash decides whether to apply. */
  private async branchSpec(store: MetadataStore, branchId: string): Promise<{ hash: string; roles: { name: string; scram_secret: string }[]; dbs: { name: string; owner_name: string }[] }> {
    const roles = (await store.listRoles(branchId)).map((r) => ({ name: r.name, scram_secret: r.scram_secret }));
    const dbs = (await store.listDatabases(branchId)).map((d) => ({ name: d.name, owner_name: d.owner_name }));
    const hash = createHash('sha256').update(JSON.stringify({ roles, dbs })).digest('hex');
    return { hash, roles, dbs };
  }

  private async applySpecIfChanged(endpointId: string, branchId: string, adminPassword: string, applied: string | null, store: MetadataStore): Promise<void> {
    const spec = await this.branchSpec(store, branchId);
    if (spec.hash === applied) return;
    const addr = this.runtimes.get(endpointId)?.address;
    if (!addr) return;
    const t0 = this.now();
    const c = new pg.Client({ host: addr.host, port: addr.port, user: ADMIN_ROLE, password: adminPassword, database: 'postgres' });
    c.on('error', () => { /* surfaces as the failing query's rejection */ });
    await c.connect();
    try {
      const have = new Map((await c.query<{ rolname: string; managed: boolean }>(
        `SELECT rolname, coalesce(shobj_description(oid, 'pg_authid') = $1, false) AS managed FROM pg_roles`, [MANAGED],
      )).rows.map((r) => [r.rolname, r.managed]));
      for (const r of spec.roles) {
        const verb = have.has(r.name) ? 'ALTER' : 'CREATE';
        // No CREATEROLE: up to PG 15 it lets a role grant itself pg_execute_server_program
        // (COPY … TO PROGRAM runs shell commands on the host).
        await c.query(`${verb} ROLE ${quoteIdent(r.name)} WITH LOGIN CREATEDB NOCREATEROLE PASSWORD ${quoteLiteral(r.scram_secret)}`);
        await c.query(`COMMENT ON ROLE ${quoteIdent(r.name)} IS ${quoteLiteral(MANAGED)}`);
      }
      const dbs = new Map((await c.query<{ datname: string; managed: boolean }>(
        `SELECT datname, coalesce(shobj_description(oid, 'pg_database') = $1, false) AS managed FROM pg_database`, [MANAGED],
      )).rows.map((r) => [r.datname, r.managed]));
      for (const d of spec.dbs) {
        if (!dbs.has(d.name)) await c.query(`CREATE DATABASE ${quoteIdent(d.name)} OWNER ${quoteIdent(d.owner_name)}`);
        else await c.query(`ALTER DATABASE ${quoteIdent(d.name)} OWNER TO ${quoteIdent(d.owner_name)}`);
        await c.query(`COMMENT ON DATABASE ${quoteIdent(d.name)} IS ${quoteLiteral(MANAGED)}`);
      }
      // Objects this control plane created earlier and that are gone from the spec.
      const wantedDbs = new Set(spec.dbs.map((d) => d.name));
      for (const [name, managed] of dbs) {
        if (managed && !wantedDbs.has(name)) await c.query(`DROP DATABASE IF EXISTS ${quoteIdent(name)} WITH (FORCE)`);
      }
      const wanted = new Set(spec.roles.map((r) => r.name));
      for (const [name, managed] of have) {
        if (managed && !wanted.has(name)) await c.query(`DROP ROLE IF EXISTS ${quoteIdent(name)}`);
      }
    } finally {
      await c.end().catch(() => {});
    }
    await store.setSpecApplied(branchId, spec.hash);
    this.o.logger.info('compute spec applied', { endpoint: endpointId, ms: this.now() - t0 });
  }

  /**
   * After roles/databases change: apply them to the branch's running compute now (a stopped one
   * gets them at its next start). Pass the store of the transaction that made the change: when
   * the compute refuses it (Postgres' own rules), this throws and the change rolls back.
   */
  async branchSpecChanged(branchId: string, store: MetadataStore): Promise<void> {
    for (const rt of this.runtimes.values()) {
      if (!rt.address) continue;
      const row = await this.o.store.findEndpoint(rt.id);
      if (row?.branch_id !== branchId) continue;
      await this.withLock(rt, async () => {
        if (this.o.driver.status(rt.id) === 'suspended') await this.doResume(rt);
        if (rt.state !== 'active') return;
        const branch = await store.branchById(branchId);
        await this.applySpecIfChanged(rt.id, branchId, branch.admin_password, branch.spec_applied, store).catch((err: { code?: string; message: string }) => {
          // Postgres refused it (a reserved name, an object in use, …): a user error, with its words.
          if (err.code && /^(22|23|42|55|2B)/.test(err.code)) throw new XenonError('CP_BAD_REQUEST', err.message, { userMessage: `the compute refused the change: ${err.message}` });
          throw err;
        });
      });
    }
  }

  /** Before deleting an endpoint: stop its compute and refuse every later wake of it. */
  async retire(endpointId: string): Promise<void> {
    this.retired.add(endpointId);
    const rt = this.runtimes.get(endpointId);
    if (rt) await this.withLock(rt, () => this.doStop(rt));
    this.runtimes.delete(endpointId);
  }

  /** A retire whose delete failed: the endpoint may be woken again. */
  unretire(endpointId: string): void {
    this.retired.delete(endpointId);
  }

  async close(): Promise<void> {
    this.closing = true;
    if (this.timer) clearInterval(this.timer);
    if (this.warmTimer) clearInterval(this.warmTimer);
    await Promise.all([...this.runtimes.values()].map((rt) =>
      this.withLock(rt, () => this.doStop(rt)).catch((err: Error) => this.o.logger.error('stop on close failed', { endpoint: rt.id, err })),
    ));
  }
}
