/** Control-plane configuration: the only file of wake-compute/ that reads `process.env`. */
import { join } from 'node:path';
import { ConfigError, ConfigSource, parseFlags, parseSafekeepers, stateDirFrom, type Env, type SafekeeperRef } from '../lib/config.ts';

export { parseSafekeepers, type SafekeeperRef };
import type { LogLevel } from '../lib/logger.ts';
import { dataRootFor, findPgBin, pgRunAs, type RunAs } from '../lib/postgres.ts';

export interface ControlPlaneConfig {
  readonly host: string;
  readonly port: number;
  readonly stateDir: string;
  /** Postgres data directories (computes, and the local metadata cluster). */
  readonly dataRoot: string;
  readonly databaseUrl: string;
  readonly domain: string;
  /** The port clients connect to at the proxy (for connection strings). */
  readonly proxyPort: number;
  readonly pgBin: string;
  readonly runAs: RunAs | undefined;
  readonly computePortRange: readonly [number, number];
  readonly defaultSuspendTimeoutSeconds: number;
  readonly defaultStopTimeoutSeconds: number;
  readonly idleCheckIntervalMs: number;
  readonly maxWakeCacheMs: number;
  readonly freezer: 'auto' | 'cgroup' | 'signal';
  /** Where computes run (`XENON_VM_DRIVER`): local processes (default) or QEMU VMs. */
  readonly vmDriver: 'process' | 'qemu';
  /** The qemu driver's compute images (`XENON_VM_IMAGE_DIR`, default `<state>/vm-image`). */
  readonly vmImageDir: string;
  /** `XENON_VM_ACCEL`: auto (KVM where the CPU has vmx/svm and /dev/kvm exists), kvm or tcg. */
  readonly vmAccel: 'auto' | 'kvm' | 'tcg';
  /** Launch → guest agent up, before the boot is retried (0: the driver's default). */
  readonly vmBootTimeoutMs: number;
  /** qemu driver: VMs kept booted for the next cold start (`XENON_VM_WARM_POOL`, default 0). */
  readonly vmWarmPool: number;
  /** How often sized computes are sampled and resized between min_cu and max_cu (0: never). */
  readonly autoscaleIntervalMs: number;
  /** Bound of the compute host's image cache (0: no cache; used only where files can be cloned). */
  readonly imageCacheMaxBytes: number;
  /** How often images of recently active branches are fetched into the cache ahead (0: never). */
  readonly imageWarmIntervalMs: number;
  /** Extra `postgresql.conf` settings for every compute, `k=v,k=v`. */
  readonly computeSettings: Readonly<Record<string, string>>;
  /**
   * The safekeepers every compute's WAL goes to (`XENON_SAFEKEEPERS=sk1=http://…,sk2=…`). Empty:
   * no WAL quorum — a commit is as durable as the compute's own disk (development only).
   */
  readonly safekeepers: readonly SafekeeperRef[];
  /**
   * The pageserver (`XENON_PAGESERVER_URL`): computes start from its images and WAL, and
   * branches exist. Unset: computes keep their data directory and there are no branches.
   */
  readonly pageserverUrl: string | undefined;
  /** Bound on WAL a compute keeps for a lagging safekeeper's slot (`max_slot_wal_keep_size`). */
  readonly maxSlotWalKeepSize: string;
  /** How long a compute stop waits for a safekeeper majority to flush the shutdown checkpoint. */
  readonly safekeeperStopWaitMs: number;
  readonly logLevel: LogLevel;
  /** Stop when stdin closes (set by `xenon up` for its children). */
  readonly exitWithParent: boolean;
}



function optionalUrl(v: string | undefined, name: string): string | undefined {
  if (!v) return undefined;
  if (!/^https?:\/\/[^\s/]+/.test(v)) throw new ConfigError(`${name} must be an http(s) URL, e.g. http://127.0.0.1:9898`);
  return v.replace(/\/+$/, '');
}

export function parseSettings(text: string | undefined): Record<string, string> {
  const out: Record<string, string> = {};
  if (!text) return out;
  for (const part of text.split(',')) {
    const eq = part.indexOf('=');
    if (eq <= 0 || !/^[a-z_.]+$/.test(part.slice(0, eq).trim())) throw new ConfigError(`bad compute setting ${JSON.stringify(part)}: use name=value`);
    out[part.slice(0, eq).trim()] = part.slice(eq + 1).trim();
  }
  return out;
}

export function loadControlPlaneConfig(env: Env = process.env, argv: readonly string[] = process.argv.slice(2)): ControlPlaneConfig {
  const c = new ConfigSource(env, parseFlags(argv));
  const stateDir = stateDirFrom(env);
  const databaseUrl = c.optionalString('DATABASE_URL', 'database-url');
  if (!databaseUrl) throw new ConfigError('DATABASE_URL is required (xenon up starts a local metadata cluster and sets it)');
  const portFrom = c.int('XENON_COMPUTE_PORT_MIN', 55433, { min: 1024, max: 65535 });
  const portTo = c.int('XENON_COMPUTE_PORT_MAX', 55999, { min: portFrom, max: 65535 });
  const freezer = c.string('XENON_FREEZER', 'auto');
  if (freezer !== 'auto' && freezer !== 'cgroup' && freezer !== 'signal') throw new ConfigError('XENON_FREEZER must be auto, cgroup or signal');
  const vmDriver = c.string('XENON_VM_DRIVER', 'process');
  if (vmDriver !== 'process' && vmDriver !== 'qemu') throw new ConfigError('XENON_VM_DRIVER must be process or qemu');
  const vmAccel = c.string('XENON_VM_ACCEL', 'auto');
  if (vmAccel !== 'auto' && vmAccel !== 'kvm' && vmAccel !== 'tcg') throw new ConfigError('XENON_VM_ACCEL must be auto, kvm or tcg');
  return Object.freeze({
    host: c.string('XENON_API_HOST', '127.0.0.1', 'host'),
    port: c.int('XENON_API_PORT', 3000, { min: 0, max: 65535, flag: 'port' }),
    stateDir,
    dataRoot: dataRootFor(env, stateDir),
    databaseUrl,
    domain: c.string('XENON_DOMAIN', 'localtest.me', 'domain'),
    proxyPort: c.int('XENON_PROXY_PORT', 4432, { min: 0, max: 65535 }),
    pgBin: findPgBin(env),
    runAs: pgRunAs(env),
    computePortRange: [portFrom, portTo] as const,
    defaultSuspendTimeoutSeconds: c.int('XENON_SUSPEND_TIMEOUT_SECONDS', 300, { min: 0 }),
    defaultStopTimeoutSeconds: c.int('XENON_STOP_TIMEOUT_SECONDS', 600, { min: 0 }),
    idleCheckIntervalMs: c.int('XENON_IDLE_CHECK_MS', 1000, { min: 10 }),
    maxWakeCacheMs: c.int('XENON_WAKE_CACHE_MS', 30_000, { min: 0 }),
    freezer,
    vmDriver,
    vmImageDir: c.optionalString('XENON_VM_IMAGE_DIR') || join(stateDir, 'vm-image'),
    vmAccel,
    vmBootTimeoutMs: c.int('XENON_VM_BOOT_TIMEOUT_MS', 0, { min: 0 }),
    vmWarmPool: c.int('XENON_VM_WARM_POOL', 0, { min: 0, max: 64 }),
    autoscaleIntervalMs: c.int('XENON_AUTOSCALE_INTERVAL_MS', 5_000, { min: 0 }),
    imageCacheMaxBytes: c.int('XENON_IMAGE_CACHE_MAX_BYTES', 20 * 1024 ** 3, { min: 0, max: Number.MAX_SAFE_INTEGER }),
    imageWarmIntervalMs: c.int('XENON_IMAGE_CACHE_WARM_MS', 30_000, { min: 0 }),
    computeSettings: Object.freeze(parseSettings(c.optionalString('XENON_COMPUTE_SETTINGS'))),
    safekeepers: Object.freeze(parseSafekeepers(c.optionalString('XENON_SAFEKEEPERS'))),
    pageserverUrl: optionalUrl(c.optionalString('XENON_PAGESERVER_URL'), 'XENON_PAGESERVER_URL'),
    maxSlotWalKeepSize: c.string('XENON_MAX_SLOT_WAL_KEEP_SIZE', '1GB'),
    safekeeperStopWaitMs: c.int('XENON_SAFEKEEPER_STOP_WAIT_MS', 10_000, { min: 0 }),
    logLevel: c.logLevel(),
    exitWithParent: c.bool('XENON_EXIT_WITH_PARENT', false),
  });
}

export const computeLogDir = (stateDir: string): string => join(stateDir, 'logs');
