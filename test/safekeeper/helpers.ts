/**
 * Shared pieces of the safekeeper tests: a compute (real PG 15) configured for physical
 * replication, in-process safekeepers on port 0 with temp data dirs, `pg_receivewal` as a child
 * process, and byte-for-byte comparison of segment directories.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import pg from 'pg';
import { silentLogger } from '../../lib/logger.ts';
import { formatLsn, parseLsn, parseSegmentFileName, segmentStart, WAL_SEGMENT_SIZE } from '../../lib/lsn.ts';
import type { ComputeTarget } from '../../safekeeper/api.ts';
import { loadSafekeeperConfig, startSafekeeper, type SafekeeperDeps, type SafekeeperHandle } from '../../safekeeper/index.ts';
import type { TestPostgres } from '../helpers/postgres.ts';

export const ROOT = resolve(import.meta.dirname, '..', '..');
export const PG_BIN = '/usr/lib/postgresql/15/bin';
export const REPL_SETTINGS = { wal_level: 'replica', max_wal_senders: 10, max_replication_slots: 10 } as const;

type Teardown = { teardown(fn: () => unknown): void };

export const delay = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export function tempDir(t: Teardown, prefix: string): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

export function computeOf(pgc: { port: number }): ComputeTarget {
  return { host: '127.0.0.1', port: pgc.port, user: 'admin', password: 'admin-pw' };
}

/** An in-process safekeeper on a free port; closed at teardown (unless closed before). */
export async function startTestSafekeeper(t: Teardown, id: string, dataDir: string, extra: Omit<SafekeeperDeps, 'logger'> = {}): Promise<SafekeeperHandle> {
  const config = loadSafekeeperConfig({ XENON_SAFEKEEPER_ID: id, XENON_SAFEKEEPER_PORT: '0', XENON_SAFEKEEPER_DATA_DIR: dataDir }, []);
  const sk = await startSafekeeper(config, { logger: process.env.SK_TEST_LOG ? (await import('../../lib/logger.ts')).createLogger({ level: 'debug' }).child({ sk: id }) : silentLogger, ...extra });
  t.teardown(() => sk.close());
  return sk;
}

export async function waitFor<T>(what: string, fn: () => Promise<T | undefined | false> | T | undefined | false, timeoutMs = 30_000, everyMs = 50): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await fn();
      if (v !== undefined && v !== false) return v;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${last ? `: ${(last as Error).message}` : ''}`);
    await delay(everyMs);
  }
}

export async function withClient<T>(cfg: pg.ClientConfig, fn: (c: pg.Client) => Promise<T>): Promise<T> {
  const c = new pg.Client(cfg);
  await c.connect();
  try {
    return await fn(c);
  } finally {
    await c.end().catch(() => {});
  }
}

/** The compute's current WAL insert position. */
export async function currentLsn(pgc: { admin(): pg.ClientConfig }): Promise<bigint> {
  return withClient(pgc.admin(), async (c) => parseLsn((await c.query<{ l: string }>('SELECT pg_current_wal_lsn()::text AS l')).rows[0]!.l));
}

/** Flush LSNs per application_name from pg_stat_replication. */
export async function replicationFlush(pgc: { admin(): pg.ClientConfig }): Promise<Map<string, bigint>> {
  return withClient(pgc.admin(), async (c) => {
    const r = await c.query<{ application_name: string; flush_lsn: string | null }>('SELECT application_name, flush_lsn::text FROM pg_stat_replication');
    return new Map(r.rows.filter((x) => x.flush_lsn).map((x) => [x.application_name, parseLsn(x.flush_lsn!)]));
  });
}

export async function waitReplicated(pgc: { admin(): pg.ClientConfig }, names: string[], lsn: bigint, timeoutMs = 60_000): Promise<void> {
  await waitFor(`${names.join(', ')} to flush ${formatLsn(lsn)}`, async () => {
    const m = await replicationFlush(pgc);
    return names.every((n) => (m.get(n) ?? 0n) >= lsn);
  }, timeoutMs, 100);
}

export interface Receivewal {
  dir: string;
  child: ChildProcess;
  stop(): Promise<void>;
}

/** `pg_receivewal --synchronous` into `dir` with its own slot (application_name = slot). */
export async function startReceivewal(t: Teardown, pgc: { port: number; admin(): pg.ClientConfig }, dir: string, slot: string): Promise<Receivewal> {
  const conn = `host=127.0.0.1 port=${pgc.port} user=admin password=admin-pw application_name=${slot}`;
  mkdirSync(dir, { recursive: true });
  await runTool(join(PG_BIN, 'pg_receivewal'), ['--create-slot', '--if-not-exists', '--slot', slot, '-d', conn]);
  const child = spawn(join(PG_BIN, 'pg_receivewal'), ['-D', dir, '--slot', slot, '--synchronous', '--no-loop', '--status-interval=1', '-d', conn], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err = (err + d.toString()).slice(-4000)));
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  const stop = async (): Promise<void> => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGINT');
    await exited;
  };
  t.teardown(stop);
  await waitFor('pg_receivewal to stream', async () => {
    if (child.exitCode !== null) throw new Error(`pg_receivewal exited: ${err}`);
    return (await replicationFlush(pgc)).has(slot);
  });
  return { dir, child, stop };
}

export function runTool(cmd: string, args: string[], opts: { uid?: number; gid?: number; env?: NodeJS.ProcessEnv } = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], uid: opts.uid, gid: opts.gid, env: { PATH: process.env.PATH, LANG: 'C', ...opts.env } });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (out += d.toString()));
    child.on('error', reject);
    child.on('exit', (code) => (code === 0 ? resolve(out) : reject(new Error(`${cmd} ${args.join(' ')} exited with ${code}: ${out.slice(-2000)}`))));
  });
}

/** Segment files of a directory by base name (no `.partial`), with whether they are partial. */
export function segmentsIn(dir: string): Map<string, { name: string; partial: boolean; tli: number; segno: bigint }> {
  const out = new Map<string, { name: string; partial: boolean; tli: number; segno: bigint }>();
  if (!existsSync(dir)) return out;
  for (const name of readdirSync(dir)) {
    const s = parseSegmentFileName(name);
    if (s) out.set(name.replace(/\.partial$/, ''), { name, partial: s.partial, tli: s.tli, segno: s.segno });
  }
  return out;
}

/**
 * Compares every segment both directories hold: complete ones byte for byte (and both complete),
 * partial ones up to `upTo` (LSN). Returns the list of compared names and any differences.
 */
export function compareSegments(a: string, b: string, upTo: bigint): { compared: string[]; diffs: string[] } {
  const sa = segmentsIn(a);
  const sb = segmentsIn(b);
  const compared: string[] = [];
  const diffs: string[] = [];
  for (const [base, fa] of sa) {
    const fb = sb.get(base);
    if (!fb) continue;
    const start = segmentStart(fa.segno);
    const ba = readFileSync(join(a, fa.name));
    const bb = readFileSync(join(b, fb.name));
    if (ba.length !== WAL_SEGMENT_SIZE || bb.length !== WAL_SEGMENT_SIZE) diffs.push(`${base}: sizes ${ba.length} / ${bb.length}`);
    let limit = WAL_SEGMENT_SIZE;
    if (fa.partial || fb.partial) {
      if (!fa.partial || !fb.partial) {
        // One side completed it later than the other: compare up to upTo.
      }
      limit = upTo <= start ? 0 : upTo - start >= BigInt(WAL_SEGMENT_SIZE) ? WAL_SEGMENT_SIZE : Number(upTo - start);
    }
    compared.push(`${base}${fa.partial || fb.partial ? `[..${limit}]` : ''}`);
    const x = ba.subarray(0, limit);
    const y = bb.subarray(0, limit);
    if (!x.equals(y)) {
      let i = 0;
      while (i < x.length && x[i] === y[i]) i++;
      diffs.push(`${base}: first difference at offset ${i}`);
    }
  }
  return { compared: compared.sort(), diffs };
}

/** A safekeeper as a real process (`node safekeeper/main.ts`), for kill -9 tests. */
export interface SafekeeperProcess {
  url: string;
  child: ChildProcess;
  kill(sig: NodeJS.Signals): Promise<number | null>;
}

const TAP_TS_LOADER = process.execArgv.find((a) => a.includes('@tapjs/typescript'))?.replace(/^--import=/, '');

export async function spawnSafekeeper(t: Teardown, id: string, dataDir: string, port = 0, extraEnv: NodeJS.ProcessEnv = {}): Promise<SafekeeperProcess> {
  const loader = TAP_TS_LOADER ? ['--import', TAP_TS_LOADER] : ['--import', 'tsx'];
  const nodeArgs = process.env.SK_NODE_ARGS ? process.env.SK_NODE_ARGS.split(' ') : []; // e.g. --cpu-prof, for profiling
  const child = spawn(process.execPath, [...nodeArgs, ...loader, join(ROOT, 'safekeeper', 'main.ts')], {
    cwd: ROOT,
    // stdin open + XENON_EXIT_WITH_PARENT: the safekeeper stops if this test process dies.
    stdio: ['pipe', 'pipe', 'pipe'],
    env: { ...process.env, ...extraEnv, XENON_EXIT_WITH_PARENT: '1', XENON_SAFEKEEPER_ID: id, XENON_SAFEKEEPER_PORT: String(port), XENON_SAFEKEEPER_DATA_DIR: dataDir, XENON_LOG_LEVEL: process.env.SK_TEST_LOG ? 'debug' : 'warn' },
  });
  let err = '';
  child.stderr!.on('data', (d: Buffer) => {
    err = (err + d.toString()).slice(-4000);
    if (process.env.SK_TEST_LOG) process.stderr.write(d);
  });
  const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
  t.teardown(async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await exited;
  });
  const ready = await new Promise<{ url: string }>((resolve, reject) => {
    const rl = createInterface({ input: child.stdout! });
    rl.on('line', (line) => {
      try {
        const j = JSON.parse(line) as { ready?: string; url: string };
        if (j.ready === 'safekeeper') resolve(j);
      } catch { /* not JSON */ }
    });
    child.once('exit', (code) => reject(new Error(`safekeeper exited with ${code}: ${err}`)));
  });
  return {
    url: ready.url,
    child,
    async kill(sig) {
      if (child.exitCode === null && child.signalCode === null) child.kill(sig);
      return exited;
    },
  };
}

export interface ClonedCompute {
  dataDir: string;
  readonly port: number;
  admin(): pg.ClientConfig;
  /** The backup's start LSN (from backup_label, read before the first start). */
  backupStartLsn: bigint;
  stop(): Promise<void>;
}

/**
 * A second cluster made with `pg_basebackup -X stream` from `pgc` (same system id): a standalone
 * copy (crash recovery to the backup end, same Postgres timeline) or, with `standby`, a streaming
 * standby of `pgc` (`-R`) that a test can promote to a new timeline.
 */
export async function cloneCompute(t: Teardown, pgc: TestPostgres & { root: string }, name: string, opts: { standby?: boolean; settings?: Record<string, string | number> } = {}): Promise<ClonedCompute> {
  const { ensureOwnedDir, findFreePort, findPgBin, pgRunAs } = await import('../../lib/postgres.ts');
  const runAs = pgRunAs(process.env);
  const bin = findPgBin(process.env);
  const dataDir = join(pgc.root, name);
  const conn = `host=127.0.0.1 port=${pgc.port} user=admin password=admin-pw`;
  await ensureOwnedDir(dataDir, runAs, 0o700);
  await runTool(join(PG_BIN, 'pg_basebackup'), ['-D', dataDir, '-X', 'stream', '-c', 'fast', '--no-sync', ...(opts.standby ? ['-R'] : []), '-d', conn], { uid: runAs?.uid, gid: runAs?.gid });
  const label = readFileSync(join(dataDir, 'backup_label'), 'utf8');
  const m = /START WAL LOCATION: ([0-9A-F]+\/[0-9A-F]+)/.exec(label);
  if (!m) throw new Error(`no start location in backup_label: ${label}`);
  const port = await findFreePort(30000, 39999);
  const args = ['-D', dataDir, '-p', String(port), '-c', 'listen_addresses=127.0.0.1', '-c', 'unix_socket_directories=', '-c', 'lc_messages=C'];
  for (const [k, v] of Object.entries({ ...REPL_SETTINGS, ...opts.settings })) args.push('-c', `${k}=${v}`);
  // Started here rather than with PostgresProcess: a standby says "ready to accept read-only connections".
  const child = spawn(join(bin, 'postgres'), args, { stdio: ['ignore', 'ignore', 'pipe'], uid: runAs?.uid, gid: runAs?.gid, env: { PATH: process.env.PATH, LANG: 'C', LC_ALL: 'C', TZ: 'UTC' } });
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  const proc = {
    port,
    async stop(sig: NodeJS.Signals = 'SIGINT'): Promise<void> {
      if (child.exitCode === null && child.signalCode === null) child.kill(sig);
      const timer = setTimeout(() => child.kill('SIGKILL'), 20_000);
      await exited;
      clearTimeout(timer);
    },
  };
  t.teardown(() => proc.stop('SIGQUIT'));
  let log = '';
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`clone ${name} not ready: ${log.slice(-2000)}`)), 60_000);
    child.stderr!.on('data', (d: Buffer) => {
      log = (log + d.toString()).slice(-8000);
      if (/ready to accept (read-only )?connections/.test(log)) { clearTimeout(timer); resolve(); }
    });
    child.once('exit', (code) => { clearTimeout(timer); reject(new Error(`clone ${name} exited with ${code}: ${log.slice(-2000)}`)); });
  });
  return {
    dataDir,
    port: proc.port,
    admin: () => ({ host: '127.0.0.1', port: proc.port, user: 'admin', password: 'admin-pw', database: 'postgres' }),
    backupStartLsn: parseLsn(m[1]!),
    stop: () => proc.stop('SIGINT'),
  };
}
