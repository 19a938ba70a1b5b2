/** Pageserver configuration: the only file of pageserver/ that reads `process.env`. */
import { join } from 'node:path';
import { ConfigError, ConfigSource, parseFlags, parseSafekeepers, stateDirFrom, type Env, type SafekeeperRef } from '../lib/config.ts';
import type { LogLevel } from '../lib/logger.ts';
import { findPgBin } from '../lib/postgres.ts';

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
  return Object.freeze({
    host: c.string('XENON_PAGESERVER_HOST', '127.0.0.1', 'host'),
    port: c.int('XENON_PAGESERVER_PORT', 9898, { min: 0, max: 65535, flag: 'port' }),
    storage,
    dir: c.string('XENON_PAGESERVER_DIR', join(state, 'pageserver'), 'dir'),
    safekeepers: Object.freeze(parseSafekeepers(c.optionalString('XENON_SAFEKEEPERS'))),
    ingestIntervalMs: c.int('XENON_PAGESERVER_INGEST_INTERVAL_MS', 1000, { min: 10, max: 3_600_000 }),
    pitrWindowSeconds: c.int('XENON_PAGESERVER_PITR_WINDOW_SECONDS', 604800, { min: 0 }),
    gcIntervalSeconds: c.int('XENON_PAGESERVER_GC_INTERVAL_SECONDS', 600, { min: 0 }),
    imageWalBytes: c.int('XENON_PAGESERVER_IMAGE_WAL_BYTES', 64 * 1024 * 1024, { min: 16 * 1024 * 1024 }),
    pgBin: pgBinOf(env),
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
