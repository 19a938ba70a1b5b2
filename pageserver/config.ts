/** Pageserver configuration: the only file of pageserver/ that reads `process.env`. */
import { join } from 'node:path';
import { ConfigError, ConfigSource, parseFlags, parseSafekeepers, stateDirFrom, type Env, type SafekeeperRef } from '../lib/config.ts';
import type { LogLevel } from '../lib/logger.ts';
import { dataRootFor, findPgBin, pgRunAs, type RunAs } from '../lib/postgres.ts';

export interface PageserverConfig {
  readonly host: string;
  /** 0: any free port. */
  readonly port: number;
  /**
   * Where objects live: a path or `file:///…` (a local directory). `s3://…` is refused (not
   * supported yet).
   */
  readonly storage: string;
  /** Scratch space (temporary data directories of imaging and LSN-by-time). */
  readonly dir: string;
  /** The safekeepers every timeline's WAL is on (`XENON_SAFEKEEPERS=sk1=http://…,sk2=…`). */
  readonly safekeepers: readonly SafekeeperRef[];
  readonly ingestIntervalMs: number;
  readonly pitrWindowSeconds: number;
  /** 0: no periodic GC (`POST …/gc` still works). */
  readonly gcIntervalSeconds: number;
  /** A new `BASE_BACKUP` image once this much WAL has been written since the last image. */
  readonly imageWalBytes: number;
  readonly pgBin: string;
  /**
   * The OS user scratch Postgres (scratch images) runs as: `postgres` (or `$XENON_PG_USER`) when
   * this process is root, else undefined (this user).
   */
  readonly runAs: RunAs | undefined;
  /**
   * Scratch data directories of scratch images (`XENON_PAGESERVER_SCRATCH_DATA_DIR`): reachable
   * by `runAs`. Default `<dir>/tmp`, or as root `<data root>/pageserver-scratch` (lib/postgres.ts
   * `dataRootFor`: `/var/lib/xenon/<hash>` unless `XENON_DATA_DIR`).
   */
  readonly scratchDataDir: string;
  /** The base URL computes reach this pageserver at (default: the address it listens on). */
  readonly publicUrl: string | undefined;
  readonly logLevel: LogLevel;
  readonly exitWithParent: boolean;
}


export function loadPageserverConfig(env: Env = process.env, argv: readonly string[] = process.argv.slice(2)): PageserverConfig {
  const c = new ConfigSource(env, parseFlags(argv));
  const state = stateDirFrom(env);
  const publicUrl = c.optionalString('XENON_PAGESERVER_PUBLIC_URL', 'public-url');
  if (publicUrl !== undefined && !/^https?:\/\/[^\s/]+$/.test(publicUrl.replace(/\/+$/, ''))) {
    throw new ConfigError(`XENON_PAGESERVER_PUBLIC_URL must be http(s)://host:port, got ${JSON.stringify(publicUrl)}`);
  }
  const storage = c.string('XENON_PAGESERVER_STORAGE', join(state, 'pageserver', 'objects'), 'storage');
  if (/^s3:\/\//i.test(storage)) throw new ConfigError(`XENON_PAGESERVER_STORAGE=${storage}: S3 object storage is not supported yet; use a local directory`);
  const dir = c.string('XENON_PAGESERVER_DIR', join(state, 'pageserver'), 'dir');
  const runAs = runAsOf(env);
  return Object.freeze({
    host: c.string('XENON_PAGESERVER_HOST', '127.0.0.1', 'host'),
    port: c.int('XENON_PAGESERVER_PORT', 9898, { min: 0, max: 65535, flag: 'port' }),
    storage,
    dir,
    safekeepers: Object.freeze(parseSafekeepers(c.optionalString('XENON_SAFEKEEPERS'))),
    ingestIntervalMs: c.int('XENON_PAGESERVER_INGEST_INTERVAL_MS', 1000, { min: 10, max: 3_600_000 }),
    pitrWindowSeconds: c.int('XENON_PAGESERVER_PITR_WINDOW_SECONDS', 604800, { min: 0 }),
    gcIntervalSeconds: c.int('XENON_PAGESERVER_GC_INTERVAL_SECONDS', 600, { min: 0 }),
    imageWalBytes: c.int('XENON_PAGESERVER_IMAGE_WAL_BYTES', 64 * 1024 * 1024, { min: 16 * 1024 * 1024 }),
    pgBin: pgBinOf(env),
    runAs,
    scratchDataDir: c.string('XENON_PAGESERVER_SCRATCH_DATA_DIR', runAs ? join(dataRootFor(env, state), 'pageserver-scratch') : join(dir, 'tmp')),
    publicUrl: publicUrl?.replace(/\/+$/, ''),
    logLevel: c.logLevel(),
    exitWithParent: c.bool('XENON_EXIT_WITH_PARENT', false),
  });
}

/** The Postgres binaries (lib/postgres.ts rules); resolved lazily by users when none are installed. */
function pgBinOf(env: Env): string {
  try {
    return findPgBin(env);
  } catch {
    return env.XENON_PG_BIN || '/usr/lib/postgresql/15/bin';
  }
}

/** `pgRunAs`; undefined when root has no user to run Postgres as (scratch images then fail, logged). */
function runAsOf(env: Env): RunAs | undefined {
  try {
    return pgRunAs(env);
  } catch {
    return undefined;
  }
}
