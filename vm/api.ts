/**
 * The compute driver contract: what the control plane asks of a place that runs computes
 * (a local process, a QEMU VM, a Kubernetes pod). Drivers never touch metadata.
 */
import type { StartPlan } from '../pageserver/api.ts';
import type { Readable } from 'node:stream';
import type { ControlData } from './pg-control.ts';
import type { WalSource } from './wal-restore.ts';

export type { ControlData, StartPlan, WalSource };

export const COMPUTE_STATUSES = ['stopped', 'running', 'suspended'] as const;
export type ComputeStatus = (typeof COMPUTE_STATUSES)[number];

/** What a compute may use: vCPUs (fractional: a share of CPU time) and memory. */
export interface ComputeResources {
  cpu: number;
  memoryMiB: number;
}

/** Bounds and current size of a compute (NeonVM: `guest.cpus` / `guest.memorySlots` min, use, max). */
export interface ComputeSize {
  min: ComputeResources;
  max: ComputeResources;
  use: ComputeResources;
}

/** A running compute's load: CPU time used so far, memory in use where the driver can see it. */
export interface ComputeUsage {
  /** CPU seconds since the compute started (monotonic while it runs). */
  cpuSeconds: number;
  /** The size it has now. */
  size: ComputeResources;
  memoryUsedMiB?: number;
}

export interface ComputeSpec {
  /** The endpoint id: one compute per endpoint. */
  computeId: string;
  /** Whose data the compute serves (the branch id); data of one key is used by one compute at a time. */
  dataKey: string;
  /** Extra `postgresql.conf` settings for this start. */
  settings?: Record<string, string | number>;
  /**
   * WAL the data must have before Postgres starts: segments missing or different locally are
   * fetched from these safekeepers (see `wal-restore.ts`).
   */
  wal?: WalSource;
  /**
   * How to build the data from the pageserver when the driver has none for `dataKey` (see
   * `materialise.ts`). Data the driver already has is started as it is. In `archive` mode `wal`
   * is ignored (the pageserver serves the WAL) and the start resolves only after recovery and
   * promotion.
   */
  plan?: StartPlan;
  /**
   * How long Postgres may take to accept connections (default: the driver's, plus time to replay
   * the plan's WAL at 4 MB/s when the data was just materialised).
   */
  readyTimeoutMs?: number;
  /** Resources (default: the driver's). Drivers that cannot resize live start at `use`. */
  size?: ComputeSize;
}

export interface ComputeAddress {
  host: string;
  port: number;
}

export interface AdminCredentials {
  user: string;
  password: string;
}

export interface ComputeExit {
  computeId: string;
  code: number | null;
  expected: boolean;
}

export interface ComputeDriver {
  /** What `global/pg_control` of `dataKey` says (undefined when there is no data). */
  controlData(dataKey: string): Promise<ControlData | undefined>;
  readonly kind: string;
  /** Creates the data for `dataKey` if it does not exist yet (initdb: never on the wake path). */
  prepare(dataKey: string, admin: AdminCredentials): Promise<{ created: boolean }>;
  /** Whether data for `dataKey` exists. */
  hasData(dataKey: string): Promise<boolean>;
  /** Starts the compute and resolves once it accepts connections. */
  start(spec: ComputeSpec): Promise<ComputeAddress>;
  /** Clean shutdown (a checkpoint, then exit); resolves when it is gone. No-op when stopped. */
  stop(computeId: string): Promise<void>;
  /** Freezes every process of the compute: memory kept, CPU zero. */
  suspend(computeId: string): Promise<void>;
  /** Thaws a suspended compute. */
  resume(computeId: string): Promise<void>;
  status(computeId: string): ComputeStatus;
  address(computeId: string): ComputeAddress | undefined;
  /** Pids of every process of the compute (tests, diagnostics). */
  pids(computeId: string): Promise<number[]>;
  /** Called when a compute exits without being asked to. */
  onUnexpectedExit(cb: (exit: ComputeExit) => void): void;
  /** Stops a compute a crashed predecessor left running on `dataKey` (no-op when there is none). */
  reclaim(dataKey: string): Promise<void>;
  /**
   * A tar stream of the data of `dataKey` (the compute must be stopped): a new project's first
   * image for the pageserver. Errors surface as the stream's 'error'.
   */
  exportImage(dataKey: string): Promise<Readable>;
  /** Deletes the data of `dataKey` (the compute must be stopped). */
  destroyData(dataKey: string): Promise<void>;
  /** Stops every compute. */
  close(): Promise<void>;
  /**
   * Whether the driver keeps images of the pageserver on its host (then {@link warmImage} is
   * worth calling: a later start from that image skips the download).
   */
  readonly cachesImages?: boolean;
  /**
   * Fetches what a start from `plan` needs (its image, its unchanging WAL files) into the host's
   * cache ahead of the start; false when there is no cache (or it failed: logged).
   */
  warmImage?(plan: Pick<StartPlan, 'image' | 'wal'>): Promise<boolean>;
  /**
   * Moves a running compute to `use` (within the bounds it was started with) without a restart;
   * resolves with what the compute has afterwards.
   */
  resize?(computeId: string, use: ComputeResources): Promise<ComputeResources>;
  /** Load of a running compute, for the autoscaler (undefined when it is not running). */
  usage?(computeId: string): Promise<ComputeUsage | undefined>;
  /** The host's image cache, for metrics. */
  imageCacheStats?(): { enabled: boolean; entries: number; bytes: number; spares: number; hits: number; misses: number; walHits: number; walMisses: number };
}
