/**
 * Compute data directories on this host, shared by the drivers that keep them locally (process,
 * qemu): `<dataRoot>/computes/<dataKey>/pgdata`, materialised from the pageserver through the
 * host's image cache, exported as the first image of a new project, deleted with the branch.
 */
import type { Readable } from 'node:stream';
import { access, rm } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { XenonError } from '../lib/errors.ts';
import type { Logger } from '../lib/logger.ts';
import { parseLsn } from '../lib/lsn.ts';
import { ensureOwnedDir, initdb, type RunAs } from '../lib/postgres.ts';
import type { AdminCredentials, ComputeSpec, ControlData, StartPlan } from './api.ts';
import { ImageCache } from './image-cache.ts';
import { materialise, type MaterialiseOptions, type MaterialiseResult } from './materialise.ts';
import { readControlData } from './pg-control.ts';
import { tarDirectory } from './tar.ts';

const SAFE_KEY = /^[a-z0-9][a-z0-9-]{0,62}$/;

/** Extra readiness time for replaying the WAL between an image and the target, at 4 MB/s. */
export function replayAllowanceMs(from: string, to: string): number {
  const bytes = parseLsn(to) - parseLsn(from);
  return bytes > 0n ? Number(bytes / 4_194_304n) * 1000 : 0;
}

export type ImageCacheStats = ReturnType<ImageCache['stats']>;

export class LocalData {
  private constructor(
    readonly dataRoot: string,
    private readonly runAs: RunAs | undefined,
    private readonly pgBin: string,
    readonly cache: ImageCache | undefined,
  ) {}

  static async open(o: { dataRoot: string; runAs: RunAs | undefined; pgBin: string; imageCache?: { maxBytes: number } | false; logger: Logger }): Promise<LocalData> {
    await ensureOwnedDir(o.dataRoot, undefined, 0o755);
    await ensureOwnedDir(join(o.dataRoot, 'computes'), o.runAs, 0o700);
    const cache = o.imageCache
      ? await ImageCache.open({ dir: join(o.dataRoot, 'image-cache'), runAs: o.runAs, logger: o.logger.child({ component: 'image-cache' }), maxBytes: o.imageCache.maxBytes })
      : undefined;
    return new LocalData(o.dataRoot, o.runAs, o.pgBin, cache);
  }

  get cachesImages(): boolean {
    return this.cache?.enabled ?? false;
  }

  imageCacheStats(): ImageCacheStats {
    return this.cache?.stats() ?? { enabled: false, entries: 0, bytes: 0, spares: 0, hits: 0, misses: 0, walHits: 0, walMisses: 0 };
  }

  warmImage(plan: Pick<StartPlan, 'image' | 'wal'>): Promise<boolean> {
    return this.cache ? this.cache.warm(plan) : Promise.resolve(false);
  }

  /** `<dataRoot>/computes/<dataKey>`: the data directory's parent (restore script, WAL fetched ahead). */
  keyDir(dataKey: string): string {
    if (!SAFE_KEY.test(dataKey)) throw new XenonError('CP_BAD_REQUEST', `unsafe data key ${JSON.stringify(dataKey)}`);
    return join(this.dataRoot, 'computes', dataKey);
  }

  dataDir(dataKey: string): string {
    return join(this.keyDir(dataKey), 'pgdata');
  }

  /**
   * Whether `dataKey` has a usable data directory. One with `recovery.signal` is not: only a
   * materialised archive start writes it (computes never run as standbys), and Postgres removes
   * it when it promotes — so it is a start the host's crash (or a kill) cut short, which lacks
   * the recovery settings (never persisted) to finish. The next start materialises again.
   */
  async hasData(dataKey: string): Promise<boolean> {
    const dir = this.dataDir(dataKey);
    try {
      await access(join(dir, 'PG_VERSION'));
    } catch {
      return false;
    }
    try {
      await access(join(dir, 'recovery.signal'));
      return false;
    } catch {
      return true;
    }
  }

  async controlData(dataKey: string): Promise<ControlData | undefined> {
    if (!(await this.hasData(dataKey))) return undefined;
    return readControlData(this.dataDir(dataKey));
  }

  async prepare(dataKey: string, admin: AdminCredentials): Promise<{ created: boolean }> {
    if (await this.hasData(dataKey)) return { created: false };
    const dir = this.dataDir(dataKey);
    await rm(dir, { recursive: true, force: true }); // a half-made dir from an interrupted initdb
    await initdb({ bin: this.pgBin, dataDir: dir, superuser: admin.user, password: admin.password, runAs: this.runAs });
    return { created: true };
  }

  /**
   * Makes sure `spec.dataKey` has data: nothing to do when it has, else the plan's image and WAL
   * from the pageserver (undefined: the data was there).
   */
  async materialiseFor(spec: ComputeSpec, log: Logger, extra: Pick<MaterialiseOptions, 'restoreCommand'> = {}): Promise<MaterialiseResult | undefined> {
    if (await this.hasData(spec.dataKey)) return undefined;
    if (!spec.plan) throw new XenonError('CP_COMPUTE_START_FAILED', `no data for ${spec.dataKey}: prepare() it first`);
    const dataDir = this.dataDir(spec.dataKey);
    await rm(dataDir, { recursive: true, force: true }); // a half-made dir from an interrupted start
    const m = await materialise({ dataDir, plan: spec.plan, runAs: this.runAs, logger: log, ...(this.cache ? { cache: this.cache } : {}), ...extra });
    log.info('compute data materialised from the pageserver', {
      mode: spec.plan.mode, image: spec.plan.image.id, kind: spec.plan.image.kind, lsn: spec.plan.lsn, walFiles: spec.plan.wal.length, bytes: m.bytes, ms: m.ms, cache: m.cache,
    });
    return m;
  }

  /** After a start from materialised data failed: the next start must materialise again. */
  async discardMaterialised(dataKey: string): Promise<void> {
    await rm(this.dataDir(dataKey), { recursive: true, force: true }).catch(() => {});
  }

  /** WAL fetched ahead for an archive recovery: done with once Postgres has promoted (or failed). */
  async dropPrefetch(dataKey: string): Promise<void> {
    await rm(join(dirname(this.dataDir(dataKey)), 'wal-prefetch'), { recursive: true, force: true }).catch(() => {});
  }

  async exportImage(dataKey: string, inUse: boolean): Promise<Readable> {
    if (inUse) throw new XenonError('CP_CONFLICT', `data ${dataKey} is in use by a running compute`);
    if (!(await this.hasData(dataKey))) throw new XenonError('CP_CONFLICT', `no data for ${dataKey}`);
    return tarDirectory(this.dataDir(dataKey));
  }

  async destroyData(dataKey: string, inUse: boolean): Promise<void> {
    if (inUse) throw new XenonError('CP_CONFLICT', `data ${dataKey} is in use by a running compute`);
    await rm(this.keyDir(dataKey), { recursive: true, force: true });
  }

  async close(): Promise<void> {
    await this.cache?.close();
  }
}

/**
 * What the drivers that keep data on this host (process, qemu) answer alike, from their
 * {@link LocalData}; each says which data keys its running computes use.
 */
export abstract class LocalDataDriver {
  protected constructor(protected readonly data: LocalData) {}

  /** Whether a running compute of this driver uses `dataKey`. */
  protected abstract inUse(dataKey: string): boolean;

  get cachesImages(): boolean {
    return this.data.cachesImages;
  }

  imageCacheStats(): ImageCacheStats {
    return this.data.imageCacheStats();
  }

  warmImage(plan: Pick<StartPlan, 'image' | 'wal'>): Promise<boolean> {
    return this.data.warmImage(plan);
  }

  hasData(dataKey: string): Promise<boolean> {
    return this.data.hasData(dataKey);
  }

  controlData(dataKey: string): Promise<ControlData | undefined> {
    return this.data.controlData(dataKey);
  }

  prepare(dataKey: string, admin: AdminCredentials): Promise<{ created: boolean }> {
    return this.data.prepare(dataKey, admin);
  }

  exportImage(dataKey: string): Promise<Readable> {
    return this.data.exportImage(dataKey, this.inUse(dataKey));
  }

  destroyData(dataKey: string): Promise<void> {
    return this.data.destroyData(dataKey, this.inUse(dataKey));
  }
}
