/**
 * Starts the real local stack for a test, the way users do: `xenon up --json` as a child
 * process, with its own state and data directories in /tmp, free ports, and fast idle timers.
 * Teardown sends SIGINT (as Ctrl-C does), waits for a clean exit and removes the directories.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, mkdtempSync, rmSync, readFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import pg from 'pg';
import { ControlPlaneClient } from '../../wake-compute/client.ts';

export const ROOT = resolve(import.meta.dirname, '..', '..');

/** tap's TypeScript loader when this runs under tap (its `--import` is in our execArgv). */
const TAP_TS_LOADER = process.execArgv.find((a) => a.includes('@tapjs/typescript'))?.replace(/^--import=/, '');

export interface UpInfo {
  connection_string: string;
  psql: string;
  api_url: string;
  proxy_port: number;
  http_port: number;
  metrics_url: string;
  ca_cert: string;
  safekeepers: { id: string; url: string; data_dir: string }[];
  pageserver_url: string;
  state_dir: string;
  project_id: string;
  endpoint_id: string;
  role: string;
  password: string;
  database: string;
}

export interface TestStack {
  info: UpInfo;
  api: ControlPlaneClient;
  dirs: { state: string; data: string };
  env: NodeJS.ProcessEnv;
  /** node-postgres config for an endpoint through the proxy, TLS verify-full by SNI. */
  pgConfig(o?: { endpoint?: string; user?: string; password?: string; database?: string }): pg.ClientConfig;
  /** psql connection string (hostaddr + host for SNI). */
  psqlConn(o?: { endpoint?: string; user?: string; password?: string; database?: string; extra?: string }): string;
  /** Stops the stack (SIGINT) and waits; keeps the directories. */
  stop(): Promise<number | null>;
  /** Starts `xenon up` again on the same directories. */
  restart(): Promise<void>;
  readonly child: ChildProcess;
}

export function freePort(): Promise<number> {
  return new Promise((res, rej) => {
    const s = createServer();
    s.once('error', rej);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => res(port));
    });
  });
}

interface Teardown {
  teardown(fn: () => unknown): void;
}

export async function startTestStack(t: Teardown, extraEnv: Record<string, string> = {}): Promise<TestStack> {
  const state = mkdtempSync(join(tmpdir(), 'xenon-state-'));
  const data = mkdtempSync(join(tmpdir(), 'xenon-data-'));
  chmodSync(data, 0o755); // computes run as `postgres` when we are root
  const portMin = 20000 + Math.floor(Math.random() * 400) * 100;
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    XENON_STATE_DIR: state,
    XENON_DATA_DIR: data,
    XENON_API_PORT: '0',
    XENON_PROXY_PORT: '0',
    XENON_PROXY_METRICS_PORT: '0',
    XENON_PROXY_HTTP_PORT: '0',
    XENON_METADATA_PORT: String(await freePort()),
    XENON_COMPUTE_PORT_MIN: String(portMin),
    XENON_COMPUTE_PORT_MAX: String(portMin + 99),
    XENON_IDLE_CHECK_MS: '100',
    XENON_SAFEKEEPER_BASE_PORT: '0',
    XENON_PAGESERVER_PORT: '0',
    XENON_PROXY_REPORT_INTERVAL_MS: '200',
    XENON_LOG_LEVEL: 'debug',
    // Coverage of the control plane and the proxy comes from these stacks; the safekeepers and
    // the pageserver are measured by their own in-process tests and run under tsx here, which
    // starts them several times faster than the coverage loader (four of seven processes).
    ...(TAP_TS_LOADER ? { XENON_TS_LOADER: TAP_TS_LOADER, XENON_TS_LOADER_SERVICES: 'wake-compute,proxy' } : {}),
    ...extraEnv,
  };
  let child!: ChildProcess;
  let exited!: Promise<number | null>;
  let info!: UpInfo;
  const up = async (): Promise<void> => {
    // Under tap, the CLI and the services it spawns run under tap's TypeScript loader (not the
    // bin's tsx) so that their coverage is measured correctly.
    const args = env.XENON_TS_LOADER
      ? ['--import', env.XENON_TS_LOADER, join(ROOT, 'wake-compute/cli.ts'), 'up', '--json']
      : [join(ROOT, 'wake-compute/bin/xenon.js'), 'up', '--json'];
    // stdin is a pipe that closes when this test process dies, however it dies: xenon up then
    // stops the stack instead of leaving it (and its detached Postgres processes) behind.
    child = spawn(process.execPath, args, { env: { ...env, XENON_EXIT_WITH_PARENT: '1' }, stdio: ['pipe', 'pipe', 'pipe'] });
    let err = '';
    child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
    exited = new Promise((r) => child.once('exit', (code) => r(code)));
    info = await new Promise<UpInfo>((res, rej) => {
      const timer = setTimeout(() => rej(new Error(`xenon up did not become ready in 120 s: ${err}`)), 120_000);
      createInterface({ input: child.stdout! }).on('line', (line) => {
        try {
          const msg = JSON.parse(line) as UpInfo & { ready?: string };
          if (msg.ready === 'xenon') { clearTimeout(timer); res(msg); }
        } catch { /* not JSON */ }
      });
      void exited.then((code) => { clearTimeout(timer); rej(new Error(`xenon up exited with ${code}: ${err}`)); });
    });
  };
  const stop = async (): Promise<number | null> => {
    if (child.exitCode !== null || child.signalCode !== null) return child.exitCode;
    child.kill('SIGINT');
    return exited;
  };
  t.teardown(async () => {
    await stop();
    rmSync(state, { recursive: true, force: true });
    rmSync(data, { recursive: true, force: true });
  });
  await up();
  const ca = readFileSync(info.ca_cert, 'utf8');
  const stack: TestStack = {
    get info() { return info; },
    get api() { return new ControlPlaneClient(info.api_url); },
    get child() { return child; },
    dirs: { state, data },
    env,
    pgConfig: (o = {}) => {
      const endpoint = o.endpoint ?? info.endpoint_id;
      return {
        host: '127.0.0.1',
        port: info.proxy_port,
        user: o.user ?? info.role,
        password: o.password ?? info.password,
        database: o.database ?? info.database,
        ssl: { ca, servername: `${endpoint}.localtest.me`, rejectUnauthorized: true },
        connectionTimeoutMillis: 30_000,
      };
    },
    psqlConn: (o = {}) => {
      const endpoint = o.endpoint ?? info.endpoint_id;
      return `host=${endpoint}.localtest.me hostaddr=127.0.0.1 port=${info.proxy_port} user=${o.user ?? info.role} password=${o.password ?? info.password} dbname=${o.database ?? info.database} sslmode=verify-full sslrootcert=${info.ca_cert} ${o.extra ?? ''}`;
    },
    stop,
    restart: async () => {
      await stop();
      await up();
    },
  };
  return stack;
}

/** Polls `fn` until it returns true (or the timeout passes). */
export async function waitFor(fn: () => Promise<boolean> | boolean, timeoutMs = 20_000, stepMs = 50): Promise<boolean> {
  const until = Date.now() + timeoutMs;
  while (Date.now() < until) {
    if (await fn()) return true;
    await new Promise((r) => setTimeout(r, stepMs));
  }
  return false;
}

/** Runs psql; resolves with stdout, stderr and the exit code. */
export function psql(conn: string, sql: string, timeoutMs = 60_000): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((res) => {
    const child = spawn('psql', [conn, '-X', '-A', '-t', '-v', 'ON_ERROR_STOP=1', '-c', sql], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, PGCONNECT_TIMEOUT: '30' } });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('exit', (code) => { clearTimeout(timer); res({ code, stdout: stdout.trim(), stderr: stderr.trim() }); });
  });
}

/** The stack's safekeepers as `xenon up` last wrote them (`<state>/safekeepers.json`). */
export function safekeeperList(stack: TestStack): { id: string; url: string; pid: number | undefined; data_dir: string }[] {
  return JSON.parse(readFileSync(join(stack.dirs.state, 'safekeepers.json'), 'utf8')) as { id: string; url: string; pid: number | undefined; data_dir: string }[];
}

export interface ManualSafekeeper {
  child: ChildProcess;
  url: string;
  /** When its ready line arrived (ms since the epoch). */
  readyAt: number;
  stop(signal?: NodeJS.Signals): Promise<void>;
}

/**
 * Starts safekeeper `id` of a stack by hand (its same port and data directory), as an operator
 * would after it died — for stacks started with XENON_SAFEKEEPER_RESTART_MS=0. Stopped at teardown.
 */
export async function startSafekeeperByHand(t: Teardown, stack: TestStack, id: string): Promise<ManualSafekeeper> {
  const sk = safekeeperList(stack).find((s) => s.id === id);
  if (!sk) throw new Error(`no safekeeper ${id}`);
  const loader = stack.env.XENON_TS_LOADER ?? 'tsx';
  const child = spawn(process.execPath, ['--import', loader, join(ROOT, 'safekeeper/main.ts')], {
    env: { ...stack.env, XENON_SAFEKEEPER_ID: id, XENON_SAFEKEEPER_PORT: new URL(sk.url).port, XENON_SAFEKEEPER_DATA_DIR: sk.data_dir },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err = (err + d.toString()).slice(-4000)));
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  const stop = async (signal: NodeJS.Signals = 'SIGTERM'): Promise<void> => {
    if (child.exitCode === null && child.signalCode === null) child.kill(signal);
    await exited;
  };
  t.teardown(() => stop());
  const url = await new Promise<string>((res, rej) => {
    const timer = setTimeout(() => rej(new Error(`safekeeper ${id} not ready in 30 s: ${err}`)), 30_000);
    createInterface({ input: child.stdout! }).on('line', (line) => {
      try {
        const msg = JSON.parse(line) as { ready?: string; url?: string };
        if (msg.ready === 'safekeeper') { clearTimeout(timer); res(String(msg.url)); }
      } catch { /* not JSON */ }
    });
    void exited.then(() => { clearTimeout(timer); rej(new Error(`safekeeper ${id} exited: ${err}`)); });
  });
  return { child, url, readyAt: Date.now(), stop };
}

/** The postmaster of the compute serving `client` (the parent of its backend). */
export async function computePostmasterPid(client: pg.Client): Promise<number> {
  const { rows } = await client.query<{ pid: number }>('SELECT pg_backend_pid() AS pid');
  const stat = readFileSync(`/proc/${rows[0]!.pid}/stat`, 'utf8');
  return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
}
