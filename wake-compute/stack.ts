/**
 * What `xenon up` runs: the local metadata cluster (a Postgres in the data root), then the
 * control plane and the proxy, each as its own process through its `main.ts` (DESIGN §2).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createWriteStream, existsSync } from 'node:fs';
import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { dirname, join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath, pathToFileURL } from 'node:url';
import pg from 'pg';
import { ensureCerts } from '../certs/index.ts';
import type { Env } from '../lib/config.ts';
import { dataRootFor, ensureOwnedDir, findFreePort, findPgBin, initdb, pgRunAs, PostgresProcess } from '../lib/postgres.ts';

export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');

/**
 * The TypeScript loader services run under: tsx, unless `XENON_TS_LOADER` names another
 * `--import` module (the test harness passes tap's, so coverage of child processes is real).
 */
/**
 * The TypeScript loader a service runs under: `XENON_TS_LOADER` (the test runner's, which also
 * measures coverage) for the services listed in `XENON_TS_LOADER_SERVICES` (all when unset),
 * else tsx.
 */
function tsLoader(env: Env, service: string): string {
  if (env.XENON_TS_LOADER && (!env.XENON_TS_LOADER_SERVICES || env.XENON_TS_LOADER_SERVICES.split(',').includes(service))) return env.XENON_TS_LOADER;
  return pathToFileURL(createRequire(import.meta.url).resolve('tsx')).href;
}

/** A service outside `XENON_TS_LOADER_SERVICES` runs without the test runner's coverage collection. */
function serviceEnv(env: NodeJS.ProcessEnv, service: string): NodeJS.ProcessEnv {
  if (!env.XENON_TS_LOADER || !env.XENON_TS_LOADER_SERVICES || env.XENON_TS_LOADER_SERVICES.split(',').includes(service)) return env;
  const { NODE_V8_COVERAGE: _c, NODE_OPTIONS: _o, ...rest } = env;
  return rest;
}

export async function writeJsonAtomic(path: string, value: unknown, mode = 0o600): Promise<void> {
  await mkdir(dirname(path), { recursive: true });
  const tmp = `${path}.tmp-${process.pid}`;
  await writeFile(tmp, JSON.stringify(value, null, 2) + '\n', { mode });
  await rename(tmp, path);
}

export async function readJson<T>(path: string): Promise<T | undefined> {
  try {
    return JSON.parse(await readFile(path, 'utf8')) as T;
  } catch {
    return undefined;
  }
}

interface MetadataInfo {
  port: number;
  password: string;
}

/** Starts (creating on first run) the metadata cluster; returns its URL. */
export async function startMetadataCluster(stateDir: string, env: Env, log: (m: string) => void): Promise<{ pg: PostgresProcess; url: string }> {
  const bin = findPgBin(env);
  const runAs = pgRunAs(env);
  const dataRoot = dataRootFor(env, stateDir);
  await ensureOwnedDir(dataRoot, undefined, 0o755);
  const dataDir = join(dataRoot, 'metadata', 'pgdata');
  const infoPath = join(stateDir, 'metadata.json');
  let info = await readJson<MetadataInfo>(infoPath);
  if (!info || !existsSync(join(dataDir, 'PG_VERSION'))) {
    log(`creating the metadata cluster in ${dataDir}`);
    info = { port: 0, password: randomBytes(18).toString('base64url') };
    await initdb({ bin, dataDir, superuser: 'xenon', password: info.password, runAs });
    await writeJsonAtomic(infoPath, info);
  }
  const wanted = Number(env.XENON_METADATA_PORT) || info.port || 55432;
  await mkdir(join(stateDir, 'logs'), { recursive: true });
  // A port free when probed can be taken before postgres binds it (another process's outgoing
  // connection, a second stack starting): then try another.
  let port = await findFreePort(wanted, wanted).catch(() => findFreePort(55000, 55430));
  let proc: PostgresProcess | undefined;
  for (let attempt = 0; !proc; attempt++) {
    try {
      proc = await PostgresProcess.start({ bin, dataDir, port, runAs, logFile: join(stateDir, 'logs', 'metadata-postgres.log'), settings: { max_connections: 50 } });
    } catch (err) {
      if (attempt >= 3 || !String((err as Error).message).includes('could not bind')) throw err;
      log(`port ${port} was taken while the metadata cluster started; trying another`);
      port = await findFreePort(55000, 55430);
    }
  }
  if (port !== info.port) await writeJsonAtomic(infoPath, { ...info, port });
  const admin = new pg.Client({ host: '127.0.0.1', port, user: 'xenon', password: info.password, database: 'postgres' });
  admin.on('error', () => { /* surfaces as the failing query's rejection */ });
  try {
    await admin.connect();
    const { rowCount } = await admin.query(`SELECT 1 FROM pg_database WHERE datname = 'xenon_control'`);
    if (!rowCount) await admin.query('CREATE DATABASE xenon_control');
  } catch (err) {
    await proc.stop('fast'); // do not leave it running behind a failed start
    throw err;
  } finally {
    await admin.end().catch(() => {});
  }
  return { pg: proc, url: `postgresql://xenon:${encodeURIComponent(info.password)}@127.0.0.1:${port}/xenon_control` };
}

export interface ServiceProcess {
  name: string;
  child: ChildProcess;
  ready: Record<string, unknown>;
  exited: Promise<number | null>;
}

/**
 * Spawns `node <service>/main.ts` and resolves with the JSON of its `ready` line. Its stderr
 * (JSON logs) goes to `<logDir>/<name>.log`, and to our stderr when `echo` is set.
 */
/** `readyAs`: the service name in its ready line, when it differs from `name` (the log file's). */
/**
 * `detached`: its own process group, so a Ctrl-C on the terminal does not reach it (the stack
 * stops it after the services that need it).
 */
export function spawnService(name: string, mainPath: string, env: NodeJS.ProcessEnv, logDir: string, echo: boolean, readyAs = name, detached = false): Promise<ServiceProcess> {
  return new Promise((resolvePromise, reject) => {
    const kind = name.replace(/^sk\d+$/, 'safekeeper');
    const child = spawn(process.execPath, ['--import', tsLoader(env, kind), join(ROOT, mainPath)], {
      env: { ...serviceEnv(env, kind), XENON_EXIT_WITH_PARENT: '1' },
      stdio: ['pipe', 'pipe', 'pipe'],
      detached,
    });
    const log = createWriteStream(join(logDir, `${name}.log`), { flags: 'a' });
    log.on('error', () => {});
    let tail = '';
    child.stderr!.on('data', (d: Buffer) => {
      log.write(d);
      tail = (tail + d.toString()).slice(-3000);
      if (echo) process.stderr.write(d);
    });
    const exited = new Promise<number | null>((r) => child.once('exit', (code) => { log.end(); r(code); }));
    const lines = createInterface({ input: child.stdout! });
    let ready = false;
    lines.on('line', (line) => {
      if (ready) return;
      try {
        const msg = JSON.parse(line) as Record<string, unknown>;
        if (msg.ready === readyAs) {
          ready = true;
          resolvePromise({ name, child, ready: msg, exited });
        }
      } catch { /* not the ready line */ }
    });
    void exited.then((code) => {
      if (!ready) reject(new Error(`${name} exited with ${code} before it was ready:\n${tail}`));
    });
  });
}

export interface StackOptions {
  stateDir: string;
  domain: string;
  env: Env;
  echoLogs: boolean;
  log: (m: string) => void;
}

export interface Stack {
  apiUrl: string;
  proxyPort: number;
  /** The proxy's HTTP port: WebSocket sessions and SQL over HTTP. */
  httpPort: number;
  metricsUrl: string;
  caCert: string;
  safekeepers: { id: string; url: string; data_dir: string }[];
  pageserverUrl: string;
  stop(): Promise<void>;
  /** Resolves when any service exits on its own. */
  died: Promise<string>;
}

/**
 * One `xenon up` per state directory: a second one would take over the first one's metadata
 * cluster and computes. The lock file holds the owner's pid; a dead owner's lock is taken over.
 */
async function lockStateDir(stateDir: string): Promise<() => Promise<void>> {
  const path = join(stateDir, 'up.lock');
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      await writeFile(path, `${process.pid}\n`, { flag: 'wx', mode: 0o600 });
      return () => rm(path, { force: true });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      const pid = Number((await readFile(path, 'utf8').catch(() => '')).trim());
      let alive = false;
      try { if (pid > 0) { process.kill(pid, 0); alive = true; } } catch { /* gone */ }
      if (alive) throw new Error(`xenon is already running on ${stateDir} (pid ${pid}); stop it first or use another XENON_STATE_DIR`);
      await rm(path, { force: true });
    }
  }
  throw new Error(`could not lock ${path}`);
}

export async function startStack(o: StackOptions): Promise<Stack> {
  const { stateDir, env } = o;
  await mkdir(stateDir, { recursive: true, mode: 0o700 });
  const unlock = await lockStateDir(stateDir);
  try {
    return await startLocked(o, unlock);
  } catch (err) {
    await unlock();
    throw err;
  }
}

async function startLocked(o: StackOptions, unlock: () => Promise<void>): Promise<Stack> {
  const { stateDir, env } = o;
  const logDir = join(stateDir, 'logs');
  await mkdir(logDir, { recursive: true });
  const certs = await ensureCerts({ stateDir, domain: o.domain });
  if (certs.created.ca) o.log(`created a local CA: ${certs.caCert}`);
  const services: ServiceProcess[] = [];
  let stopping = false;
  let sks: LocalSafekeeper[] = [];
  let meta: Awaited<ReturnType<typeof startMetadataCluster>> | undefined;
  const stop = async (): Promise<void> => {
    stopping = true;
    // Proxy first (no new sessions), then the control plane (it stops every compute, which
    // waits for the safekeepers to have the shutdown checkpoint), then safekeepers, then metadata.
    for (const s of [...services].reverse()) {
      s.child.kill('SIGTERM');
      await s.exited;
    }
    for (const k of sks) await k.stop();
    await meta?.pg.stop('fast');
    await unlock();
  };
  try {
    // The control plane prints connection strings with the proxy's port, and the proxy needs the
    // control plane's address: with "any free port" (0), choose both now, so that the two start
    // side by side.
    const proxyPort = env.XENON_PROXY_PORT === '0' ? String(await findFreePort(20000, 29999)) : env.XENON_PROXY_PORT;
    const apiPort = env.XENON_API_PORT === '0' ? String(await findFreePort(40000, 44999)) : (env.XENON_API_PORT ?? '3000');
    const apiHost = env.XENON_API_HOST && env.XENON_API_HOST !== '0.0.0.0' && env.XENON_API_HOST !== '::' ? env.XENON_API_HOST : '127.0.0.1';
    const baseEnv: NodeJS.ProcessEnv = { ...env, XENON_STATE_DIR: stateDir, XENON_DOMAIN: o.domain, XENON_API_PORT: apiPort, ...(proxyPort ? { XENON_PROXY_PORT: proxyPort } : {}) };
    // The metadata cluster and the safekeepers (computes commit only once a quorum has their
    // WAL; stopped last) side by side.
    const first = await Promise.allSettled([startMetadataCluster(stateDir, env, o.log), startSafekeepers(stateDir, env, baseEnv, logDir, o, () => stopping)]);
    if (first[0].status === 'fulfilled') meta = first[0].value;
    if (first[1].status === 'fulfilled') sks = first[1].value;
    for (const r of first) if (r.status === 'rejected') throw r.reason;
    const skList = env.XENON_SAFEKEEPERS ?? sks.map((k) => `${k.id}=${k.url}`).join(',');
    // The pageserver (it ingests the safekeepers' WAL; computes start from it) and the control
    // plane next, side by side: the control plane only needs the pageserver's address, chosen
    // here when "any free port" (0) is asked for. The pageserver is stopped after the control
    // plane. XENON_PAGESERVER_URL: use that one instead of starting ours.
    let pageserverUrl = env.XENON_PAGESERVER_URL;
    const psPort = env.XENON_PAGESERVER_PORT === '0' ? String(await findFreePort(30000, 39999)) : (env.XENON_PAGESERVER_PORT ?? '9898');
    if (!pageserverUrl) pageserverUrl = `http://${env.XENON_PAGESERVER_HOST ?? '127.0.0.1'}:${psPort}`;
    // The proxy alongside: until the control plane answers, its heartbeats fail (a warning) and
    // no client can have connected yet (the stack is not announced before all three are ready).
    const starting = await Promise.allSettled([
      env.XENON_PAGESERVER_URL ? Promise.resolve(undefined) : spawnService('pageserver', 'pageserver/main.ts', { ...baseEnv, XENON_PAGESERVER_PORT: psPort, XENON_SAFEKEEPERS: skList }, logDir, o.echoLogs),
      spawnService('wake-compute', 'wake-compute/main.ts', {
        ...baseEnv,
        DATABASE_URL: env.DATABASE_URL ?? meta!.url,
        XENON_PAGESERVER_URL: pageserverUrl,
        ...(env.XENON_SAFEKEEPERS === undefined ? { XENON_SAFEKEEPERS: skList } : {}),
      }, logDir, o.echoLogs),
      spawnService('proxy', 'proxy/main.ts', { ...baseEnv, XENON_CONTROL_PLANE_URL: `http://${apiHost.includes(':') ? `[${apiHost}]` : apiHost}:${apiPort}` }, logDir, o.echoLogs),
    ]);
    for (const r of starting) if (r.status === 'fulfilled' && r.value) services.push(r.value);
    const failed = starting.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
    const ps = starting[0].status === 'fulfilled' ? starting[0].value : undefined;
    if (ps) pageserverUrl = String(ps.ready.url);
    const cp = (starting[1] as PromiseFulfilledResult<ServiceProcess>).value;
    const apiUrl = String(cp.ready.url);
    const proxy = (starting[2] as PromiseFulfilledResult<ServiceProcess>).value;
    const died = Promise.race(services.map((s) => s.exited.then(() => s.name))).then(async (name) => {
      if (!stopping) await stop().catch(() => {});
      return name;
    });
    return {
      apiUrl,
      proxyPort: Number(proxy.ready.port),
      httpPort: Number(proxy.ready.http_port),
      metricsUrl: String(proxy.ready.metrics),
      caCert: certs.caCert,
      safekeepers: sks.map((k) => ({ id: k.id, url: k.url, data_dir: k.dataDir })),
      pageserverUrl,
      stop,
      died,
    };
  } catch (err) {
    await stop().catch(() => {});
    throw err;
  }
}

export interface LocalSafekeeper {
  id: string;
  url: string;
  dataDir: string;
  stop(): Promise<void>;
}

/**
 * Starts `XENON_SAFEKEEPER_COUNT` (default 3) safekeepers on ports from
 * `XENON_SAFEKEEPER_BASE_PORT` (default 7676; 0 = any free port each), data under
 * `<state>/safekeepers/<id>`. One that exits is started again on the same port after
 * `XENON_SAFEKEEPER_RESTART_MS` (default 1000; 0 = never) — the others keep the quorum meanwhile.
 * `<state>/safekeepers.json` lists their ids, URLs and current pids.
 */
async function startSafekeepers(stateDir: string, env: Env, baseEnv: NodeJS.ProcessEnv, logDir: string, o: StackOptions, stopping: () => boolean): Promise<LocalSafekeeper[]> {
  const count = env.XENON_SAFEKEEPER_COUNT === undefined ? 3 : Number(env.XENON_SAFEKEEPER_COUNT);
  const basePort = env.XENON_SAFEKEEPER_BASE_PORT === undefined ? 7676 : Number(env.XENON_SAFEKEEPER_BASE_PORT);
  const restartMs = env.XENON_SAFEKEEPER_RESTART_MS === undefined ? 1000 : Number(env.XENON_SAFEKEEPER_RESTART_MS);
  if (!Number.isInteger(count) || count < 0 || count > 15) throw new Error('XENON_SAFEKEEPER_COUNT must be an integer from 0 to 15');
  if (!Number.isInteger(basePort) || basePort < 0 || basePort > 65535 - count) throw new Error('XENON_SAFEKEEPER_BASE_PORT must be a port number (0: any free port)');
  if (!Number.isFinite(restartMs) || restartMs < 0) throw new Error('XENON_SAFEKEEPER_RESTART_MS must be a number of milliseconds (0: never restart)');
  const listPath = join(stateDir, 'safekeepers.json');
  const current: { id: string; url: string; pid: number | undefined; data_dir: string }[] = [];
  const writeList = (): Promise<void> => writeJsonAtomic(listPath, current).catch(() => {});
  const started = await Promise.allSettled(Array.from({ length: count }, (_, i) => startOne(i)));
  const out = started.flatMap((r) => (r.status === 'fulfilled' ? [r.value] : []));
  const failed = started.find((r) => r.status === 'rejected');
  if (failed) {
    for (const k of out) await k.stop();
    throw failed.reason;
  }
  return out;

  async function startOne(i: number): Promise<LocalSafekeeper> {
    const id = `sk${i + 1}`;
    const dataDir = join(stateDir, 'safekeepers', id);
    let port = basePort === 0 ? 0 : basePort + i;
    const spawnOne = async (): Promise<ServiceProcess> => {
      const svc = await spawnService(id, 'safekeeper/main.ts', {
        ...baseEnv,
        XENON_SAFEKEEPER_ID: id,
        XENON_SAFEKEEPER_PORT: String(port),
        XENON_SAFEKEEPER_DATA_DIR: dataDir,
      }, logDir, o.echoLogs, 'safekeeper', true);
      port = new URL(String(svc.ready.url)).port ? Number(new URL(String(svc.ready.url)).port) : port;
      current[i] = { id, url: String(svc.ready.url), pid: svc.child.pid, data_dir: dataDir };
      await writeList();
      return svc;
    };
    let svc = await spawnOne();
    let stopped = false;
    const supervise = (s: ServiceProcess): void => {
      void s.exited.then(async (code) => {
        if (stopped || stopping()) return;
        current[i] = { ...current[i]!, pid: undefined };
        await writeList();
        if (restartMs === 0) { o.log(`safekeeper ${id} exited (${code}); not restarting it (XENON_SAFEKEEPER_RESTART_MS=0)`); return; }
        o.log(`safekeeper ${id} exited (${code}); restarting it in ${restartMs} ms`);
        for (;;) {
          await new Promise((r) => setTimeout(r, restartMs));
          if (stopped || stopping()) return;
          try {
            svc = await spawnOne();
            supervise(svc);
            return;
          } catch (err) {
            o.log(`safekeeper ${id} failed to start again: ${(err as Error).message.split('\n')[0]}`);
          }
        }
      });
    };
    supervise(svc);
    return {
      id,
      get url() { return current[i]!.url; },
      dataDir,
      async stop() {
        stopped = true;
        if (svc.child.exitCode === null && svc.child.signalCode === null) svc.child.kill('SIGTERM');
        await svc.exited;
      },
    };
  }
}
