/** Safekeeper configuration: the only file of safekeeper/ that reads `process.env`. */
import { join } from 'node:path';
import { ConfigError, ConfigSource, parseFlags, stateDirFrom, type Env } from '../lib/config.ts';
import type { LogLevel } from '../lib/logger.ts';

export interface SafekeeperConfig {
  /** `sk1`…: also the replication slot name and `application_name` on the compute. */
  readonly id: string;
  readonly host: string;
  readonly port: number;
  /** Holds `timelines/<timeline_id>/{control.json,wal/}`. */
  readonly dataDir: string;
  /**
   * How a batch is made durable (one durable write per batch either way):
   * - `open_datasync_inline` (default): segments opened with O_DSYNC, the batch's `pwritev` made
   *   synchronously on the event loop — no thread-pool round trips; measured the fastest and
   *   cheapest in CPU (DESIGN: 2-core machines), but one timeline's write blocks the others';
   * - `open_datasync`: O_DSYNC `pwritev` on the libuv thread pool;
   * - `fdatasync`: `pwritev` then `fdatasync`, both on the thread pool.
   */
  readonly syncMethod: 'fdatasync' | 'open_datasync' | 'open_datasync_inline';
  readonly logLevel: LogLevel;
  readonly exitWithParent: boolean;
  /**
   * Test only (`XENON_SAFEKEEPER_TEST_WRITE_MS_PER_MIB`, default 0): every WAL data write takes
   * this much longer per MiB, inside the write — blocking the event loop for an inline write, on
   * the thread-pool side otherwise — as a slow disk would.
   */
  readonly testWriteMsPerMiB: number;
}

/** Slot names allow lower-case letters, digits and underscores only (at most 63). */
export const SAFEKEEPER_ID_RE = /^[a-z0-9_]{1,63}$/;

function syncMethodOf(v: string): SafekeeperConfig['syncMethod'] {
  if (v === 'fdatasync' || v === 'open_datasync' || v === 'open_datasync_inline') return v;
  throw new ConfigError(`XENON_SAFEKEEPER_SYNC_METHOD must be fdatasync or open_datasync, got ${JSON.stringify(v)}`);
}

export function loadSafekeeperConfig(env: Env = process.env, argv: readonly string[] = process.argv.slice(2)): SafekeeperConfig {
  const c = new ConfigSource(env, parseFlags(argv));
  const id = c.string('XENON_SAFEKEEPER_ID', 'sk1', 'id');
  if (!SAFEKEEPER_ID_RE.test(id)) throw new ConfigError(`XENON_SAFEKEEPER_ID must match ${SAFEKEEPER_ID_RE} (it is a replication slot name), got ${JSON.stringify(id)}`);
  return Object.freeze({
    id,
    host: c.string('XENON_SAFEKEEPER_HOST', '127.0.0.1', 'host'),
    port: c.int('XENON_SAFEKEEPER_PORT', 7676, { min: 0, max: 65535, flag: 'port' }),
    dataDir: c.string('XENON_SAFEKEEPER_DATA_DIR', join(stateDirFrom(env), 'safekeepers', id), 'data-dir'),
    syncMethod: syncMethodOf(c.string('XENON_SAFEKEEPER_SYNC_METHOD', 'open_datasync_inline', 'sync-method')),
    logLevel: c.logLevel(),
    exitWithParent: c.bool('XENON_EXIT_WITH_PARENT', false),
    testWriteMsPerMiB: c.int('XENON_SAFEKEEPER_TEST_WRITE_MS_PER_MIB', 0, { min: 0, max: 60_000 }),
  });
}
