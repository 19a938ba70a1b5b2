/**
 * The process driver (the embedded default): one stock `postgres` per endpoint on a loopback
 * port, its data directory under the data root, frozen with the cgroup freezer when suspended.
 */
import { createHash } from 'node:crypto';
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { XenonError } from '../lib/errors.ts';
import type { Logger } from '../lib/logger.ts';
import { findFreePort, PostgresProcess, stopStalePostmaster, writeManagedHba, type RunAs } from '../lib/postgres.ts';
import type { ComputeAddress, ComputeDriver, ComputeExit, ComputeResources, ComputeSize, ComputeSpec, ComputeStatus, ComputeUsage } from './api.ts';
import { LocalData, LocalDataDriver, replayAllowanceMs } from './local-data.ts';
import type { MaterialiseResult } from './materialise.ts';
import { restoreWal } from './wal-restore.ts';
import { childPids, createFreezer, type Freezer } from './freezer.ts';
import { CgroupLimits, cpuSeconds } from './limits.ts';

export interface ProcessDriverOptions {
  pgBin: string;
  /** Data directories: `<dataRoot>/computes/<dataKey>/pgdata` (reachable by `runAs`). */
  dataRoot: string;
  /** Compute logs: `<logDir>/<computeId>.log`. */
  logDir: string;
  runAs: RunAs | undefined;
  portRange: readonly [number, number];
  /** Defaults for every compute's postgresql.conf. */
  settings?: Record<string, string | number>;
  freezer?: 'auto' | 'cgroup' | 'signal';
  readyTimeoutMs?: number;
  stopTimeoutMs?: number;
  /**
   * The host's image cache under `<dataRoot>/image-cache` (used where the file system clones
   * files; see image-cache.ts): its size bound in bytes, or `false` for none.
   */
  imageCache?: { maxBytes: number } | false;
  logger: Logger;
}

interface Running {
  pg: PostgresProcess;
  dataKey: string;
  /** Bounds and current size (cgroup limits; no size: unlimited). */
  size: ComputeSize | undefined;
  suspended: boolean;
  stopping: boolean;
}

export class ProcessDriver extends LocalDataDriver implements ComputeDriver {
  readonly kind = 'process';
  private readonly running = new Map<string, Running>();
  private readonly exitListeners: ((e: ComputeExit) => void)[] = [];
  /** Freezer-group cleanups after exits; a restart of the same compute waits for its own. */
  private readonly releasing = new Map<string, Promise<void>>();
  private constructor(
    private readonly opts: ProcessDriverOptions,
    private readonly freezer: Freezer,
    data: LocalData,
    private readonly limits: CgroupLimits,
  ) {
    super(data);
  }

  static async create(opts: ProcessDriverOptions): Promise<ProcessDriver> {
    const data = await LocalData.open({ dataRoot: opts.dataRoot, runAs: opts.runAs, pgBin: opts.pgBin, imageCache: opts.imageCache ?? false, logger: opts.logger });
    await mkdir(opts.logDir, { recursive: true });
    const scope = createHash('sha256').update(opts.dataRoot).digest('hex').slice(0, 12);
    const freezer = await createFreezer(scope, opts.freezer ?? 'auto');
    const limits = await CgroupLimits.create(scope, opts.logger, { cpu: true, memory: true });
    opts.logger.info('process driver ready', { freezer: freezer.kind, limits: limits.enabled, dataRoot: opts.dataRoot, imageCache: data.cachesImages });
    return new ProcessDriver(opts, freezer, data, limits);
  }

  get freezerKind(): Freezer['kind'] {
    return this.freezer.kind;
  }

  async start(spec: ComputeSpec): Promise<ComputeAddress> {
    const existing = this.running.get(spec.computeId);
    if (existing && !existing.stopping) throw new XenonError('CP_CONFLICT', `compute ${spec.computeId} is already running`);
    await this.releasing.get(spec.computeId);
    const dataDir = this.data.dataDir(spec.dataKey);
    const log = this.opts.logger.child({ computeId: spec.computeId, dataKey: spec.dataKey });
    const materialised = await this.data.materialiseFor(spec, log);
    const logFile = join(this.opts.logDir, `${spec.computeId}.log`);
    try {
      return await this.startPostgres(spec, dataDir, logFile, materialised);
    } catch (err) {
      if (materialised) {
        // The next start must materialise again, not start a half-recovered directory.
        await this.data.discardMaterialised(spec.dataKey);
        log.warn('compute failed to start from materialised data: removed the data directory', { err, logFile });
      }
      if (err instanceof XenonError) throw new XenonError(err.code, `${err.message} (compute log: ${logFile})`, { cause: err, userMessage: err.userMessage, retryable: err.retryable });
      throw err;
    } finally {
      if (materialised && spec.plan?.mode === 'archive') await this.data.dropPrefetch(spec.dataKey);
    }
  }

  private async startPostgres(spec: ComputeSpec, dataDir: string, logFile: string, materialised: MaterialiseResult | undefined): Promise<ComputeAddress> {
    await stopStalePostmaster(dataDir); // before touching pg_wal
    await writeManagedHba(dataDir, this.opts.runAs);
    let recovery: Record<string, string> = {};
    // In archive mode the pageserver serves the WAL (restore_command); pg_wal is not to be filled.
    if (spec.wal && !(materialised && spec.plan?.mode === 'archive')) {
      const r = await restoreWal(dataDir, spec.wal, this.opts.runAs, this.opts.logger);
      if (r.restored.length) this.opts.logger.warn('WAL restored from the safekeepers before start', { computeId: spec.computeId, files: r.restored });
      recovery = r.settings;
    }
    const readyTimeoutMs = spec.readyTimeoutMs ?? (this.opts.readyTimeoutMs ?? 30_000) + (materialised && spec.plan ? replayAllowanceMs(spec.plan.image.lsn, spec.plan.lsn) : 0);
    const inUse = new Set([...this.running.values()].map((r) => r.pg.port));
    let lastErr: unknown;
    // A port that was free when probed can be taken before postgres binds it: try a few.
    for (let attempt = 0; attempt < 3; attempt++) {
      const port = await findFreePort(this.opts.portRange[0], this.opts.portRange[1], inUse);
      try {
        const pg = await PostgresProcess.start({
          bin: this.opts.pgBin,
          dataDir,
          port,
          runAs: this.opts.runAs,
          logFile,
          readyTimeoutMs,
          // Materialised settings (recovery) are for this start only: never persisted.
          settings: { password_encryption: 'scram-sha-256', ...this.opts.settings, ...spec.settings, ...recovery, ...materialised?.settings },
        });
        const r: Running = { pg, dataKey: spec.dataKey, size: spec.size, suspended: false, stopping: false };
        this.running.set(spec.computeId, r);
        await this.freezer.adopt(spec.computeId, pg.pid).catch((err: Error) =>
          this.opts.logger.warn('could not put compute in its freezer cgroup', { computeId: spec.computeId, err }),
        );
        if (spec.size) await this.applyLimits(spec.computeId, r, spec.size.use);
        void pg.waitExit().then(() => this.onExit(spec.computeId, r));
        return { host: '127.0.0.1', port };
      } catch (err) {
        lastErr = err;
        inUse.add(port);
        if (!String((err as Error).message).includes('could not bind')) break;
      }
    }
    throw lastErr;
  }

  /** cgroup v1 CPU quota and memory limit (a warning, not a failure, where they cannot be set). */
  private async applyLimits(computeId: string, r: Running, use: ComputeResources): Promise<void> {
    const problems = await this.limits.set(computeId, r.pg.pid, use).catch((err: Error) => [err.message]);
    if (problems.length) this.opts.logger.warn('compute limits not (all) applied', { computeId, use, problems });
  }

  /**
   * Moves the compute's cgroup limits to `use` (within its bounds): CPU time and memory take
   * effect at once. Where the cgroup v1 cpu/memory controllers are not writable this changes
   * nothing but the size the control plane reports (a warning at start says so).
   */
  async resize(computeId: string, use: ComputeResources): Promise<ComputeResources> {
    const r = this.running.get(computeId);
    if (!r) throw new XenonError('CP_CONFLICT', `compute ${computeId} is not running`);
    const size = r.size ?? { min: use, max: use, use };
    const clamped = {
      cpu: Math.min(size.max.cpu, Math.max(size.min.cpu, use.cpu)),
      memoryMiB: Math.min(size.max.memoryMiB, Math.max(size.min.memoryMiB, use.memoryMiB)),
    };
    await this.applyLimits(computeId, r, clamped);
    r.size = { ...size, use: clamped };
    return clamped;
  }

  async usage(computeId: string): Promise<ComputeUsage | undefined> {
    const r = this.running.get(computeId);
    if (!r) return undefined;
    const cg = await this.limits.current(computeId);
    return {
      cpuSeconds: await cpuSeconds(r.pg.pid, true),
      size: r.size?.use ?? { cpu: cg.cpu ?? 0, memoryMiB: cg.memoryMiB ?? 0 },
      ...(cg.memoryUsedMiB !== undefined ? { memoryUsedMiB: cg.memoryUsedMiB } : {}),
    };
  }

  /** The cgroup limits in force for a running compute (tests, diagnostics). */
  limitsOf(computeId: string): Promise<{ cpu?: number; memoryMiB?: number; memoryUsedMiB?: number }> {
    return this.limits.current(computeId);
  }

  private onExit(computeId: string, r: Running): void {
    if (this.running.get(computeId) === r) this.running.delete(computeId);
    const released = Promise.all([this.freezer.release(computeId), this.limits.release(computeId)]).then(() => {}).finally(() => {
      if (this.releasing.get(computeId) === released) this.releasing.delete(computeId);
    });
    this.releasing.set(computeId, released);
    if (!r.stopping) {
      this.opts.logger.warn('compute exited unexpectedly', { computeId, code: r.pg.lastExitCode });
      for (const l of this.exitListeners) l({ computeId, code: r.pg.lastExitCode, expected: false });
    }
  }

  async stop(computeId: string): Promise<void> {
    const r = this.running.get(computeId);
    if (!r) return;
    r.stopping = true;
    if (r.suspended) await this.resume(computeId);
    await r.pg.stop('fast', this.opts.stopTimeoutMs ?? 30_000);
    await this.releasing.get(computeId);
  }

  async suspend(computeId: string): Promise<void> {
    const r = this.running.get(computeId);
    if (!r) throw new XenonError('CP_CONFLICT', `compute ${computeId} is not running`);
    if (r.suspended) return;
    await this.freezer.freeze(computeId, r.pg.pid);
    r.suspended = true;
  }

  async resume(computeId: string): Promise<void> {
    const r = this.running.get(computeId);
    if (!r) throw new XenonError('CP_CONFLICT', `compute ${computeId} is not running`);
    if (!r.suspended) return;
    await this.freezer.thaw(computeId, r.pg.pid);
    r.suspended = false;
  }

  status(computeId: string): ComputeStatus {
    const r = this.running.get(computeId);
    if (!r) return 'stopped';
    return r.suspended ? 'suspended' : 'running';
  }

  address(computeId: string): ComputeAddress | undefined {
    const r = this.running.get(computeId);
    return r ? { host: '127.0.0.1', port: r.pg.port } : undefined;
  }

  async pids(computeId: string): Promise<number[]> {
    const r = this.running.get(computeId);
    if (!r) return [];
    return [r.pg.pid, ...(await childPids(r.pg.pid))];
  }

  onUnexpectedExit(cb: (e: ComputeExit) => void): void {
    this.exitListeners.push(cb);
  }

  async reclaim(dataKey: string): Promise<void> {
    if (this.inUse(dataKey)) return; // ours, not stale
    await stopStalePostmaster(this.data.dataDir(dataKey));
  }

  protected inUse(dataKey: string): boolean {
    return [...this.running.values()].some((r) => r.dataKey === dataKey);
  }

  async close(): Promise<void> {
    await this.data.close();
    await Promise.all([...this.running.keys()].map((id) => this.stop(id).catch(() => {})));
    await Promise.all(this.releasing.values());
  }
}
