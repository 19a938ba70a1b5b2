/**
 * Helpers shared by the benchmarks (run.ts, pooler.ts): statistics, pgbench runs with the CPU of a
 * process measured around them, the proxy's pid, and a PgBouncer to compare with.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { chownSync, copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { delimiter, join } from 'node:path';
import pg from 'pg';
import { findPgBin, pgRunAs } from '../../lib/postgres.ts';
import { freePort, type TestStack } from '../helpers/stack.ts';

export function quantile(xs: number[], q: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil(q * s.length) - 1)]!;
}
export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}
export const fmt = (n: number, d = 1): string => n.toFixed(d);
/** "median (min–max)" */
export const spread = (xs: number[], d = 1): string => (xs.length > 1 ? `${fmt(median(xs), d)} (${fmt(Math.min(...xs), d)}–${fmt(Math.max(...xs), d)})` : fmt(xs[0] ?? NaN, d));

export async function firstRow(config: pg.ClientConfig): Promise<number> {
  const t0 = performance.now();
  const c = new pg.Client(config);
  c.on('error', () => {});
  await c.connect();
  await c.query('SELECT 1');
  const ms = performance.now() - t0;
  await c.end();
  return ms;
}

export function postmasterPort(stack: TestStack, branch: string): number {
  return Number(readFileSync(join(stack.dirs.data, 'computes', branch, 'pgdata', 'postmaster.pid'), 'utf8').split('\n')[3]);
}

export const HAS_SCHEDSTAT = existsSync('/proc/self/schedstat');

/** CPU time (user + system) of a process and all its threads, in microseconds. */
export function cpuMicros(pid: number): number {
  if (HAS_SCHEDSTAT) {
    let ns = 0;
    for (const tid of readdirSync(`/proc/${pid}/task`)) {
      try {
        ns += Number(readFileSync(`/proc/${pid}/task/${tid}/schedstat`, 'utf8').split(' ')[0]);
      } catch { /* the thread exited */ }
    }
    return ns / 1000;
  }
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) * 10_000;
}

/**
 * CPU time of a process tree in microseconds (10 ms ticks): the process's own and its reaped
 * children's (utime, stime, cutime, cstime), plus the same for every live descendant. Counts
 * Postgres backends that exited during a run (the postmaster reaps them).
 */
export function treeCpuMicros(pid: number): number {
  let ticks = 0;
  const visit = (p: number): void => {
    try {
      const stat = readFileSync(`/proc/${p}/stat`, 'utf8');
      const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      ticks += Number(f[11]) + Number(f[12]) + Number(f[13]) + Number(f[14]);
      for (const tid of readdirSync(`/proc/${p}/task`)) {
        const kids = readFileSync(`/proc/${p}/task/${tid}/children`, 'utf8').trim();
        if (kids) for (const k of kids.split(/\s+/)) visit(Number(k));
      }
    } catch { /* exited meanwhile */ }
  };
  visit(pid);
  return ticks * 10_000;
}

/** CPU of this process's reaped children (pgbench runs), µs. */
export function childrenCpuMicros(): number {
  const stat = readFileSync('/proc/self/stat', 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(f[13]) + Number(f[14])) * 10_000;
}

/** The proxy's pid: the child of `xenon up` running proxy/main.ts. */
export function proxyPid(stack: TestStack): number {
  const kids = readFileSync(`/proc/${stack.child.pid}/task/${stack.child.pid}/children`, 'utf8').trim().split(/\s+/).map(Number);
  const pid = kids.find((k) => readFileSync(`/proc/${k}/cmdline`, 'utf8').includes('proxy/main.ts'));
  if (!pid) throw new Error('proxy process not found');
  return pid;
}

export interface PgbenchResult {
  tps: number;
  latency: number;
  failed: number;
  transactions: number;
  /** pgbench -C: average connection time, ms. */
  connectMs: number;
  /** CPU of the measured process per transaction, µs (NaN when none is measured). */
  cpuPerTx: number;
  /** With `postmasterPid`: CPU of the compute's Postgres processes per transaction, µs. */
  pgCpuPerTx: number;
  /** CPU of pgbench itself per transaction, µs. */
  pgbenchCpuPerTx: number;
}

export function pgbench(args: string[], env: NodeJS.ProcessEnv, measurePid?: number, postmasterPid?: number): Promise<PgbenchResult> {
  const bin = join(findPgBin(process.env), 'pgbench');
  const cpu0 = measurePid ? cpuMicros(measurePid) : 0;
  const pg0 = postmasterPid ? treeCpuMicros(postmasterPid) : 0;
  const kids0 = childrenCpuMicros();
  return new Promise((resolve, reject) => {
    const child = spawn(bin, args, { env: { ...process.env, ...env } });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (out += d.toString()));
    child.on('exit', (code) => {
      const cpu = measurePid ? cpuMicros(measurePid) - cpu0 : NaN;
      const pgCpu = postmasterPid ? treeCpuMicros(postmasterPid) - pg0 : NaN;
      const kids = childrenCpuMicros() - kids0;
      if (code !== 0) return reject(new Error(`pgbench ${args.join(' ')} exited ${code}:\n${out}`));
      const num = (re: RegExp): number => Number(re.exec(out)?.[1]);
      const transactions = num(/number of transactions actually processed: (\d+)/);
      resolve({
        tps: num(/tps = ([\d.]+)/),
        latency: num(/latency average = ([\d.]+) ms/),
        failed: Number(/number of failed transactions: (\d+)/.exec(out)?.[1] ?? 0),
        transactions,
        connectMs: num(/average connection time = ([\d.]+) ms/),
        cpuPerTx: cpu / transactions,
        pgCpuPerTx: pgCpu / transactions,
        pgbenchCpuPerTx: kids / transactions,
      });
    });
  });
}

export function findBinary(name: string): string | undefined {
  const dirs = [...(process.env.PATH ?? '').split(delimiter), '/usr/sbin', '/usr/local/sbin'];
  return dirs.map((d) => join(d, name)).find((p) => existsSync(p));
}

/** Options of {@link startPgbouncer}; the defaults are run.ts's session-mode reference pipe. */
export interface PgbouncerOptions {
  poolMode?: 'session' | 'transaction';
  poolSize?: number;
  maxClientConn?: number;
  /** TLS between PgBouncer and the compute (`server_tls_sslmode`); default: PgBouncer's own default. */
  serverTls?: 'disable' | 'prefer' | 'require';
}

/**
 * PgBouncer in front of the compute, client TLS optional (clients choose with sslmode), SCRAM both
 * sides; session mode with a pool of 40 unless told otherwise. Stopped by `teardowns`.
 */
export async function startPgbouncer(dir: string, computePort: number, stack: TestStack, teardowns: (() => unknown)[], o: PgbouncerOptions = {}): Promise<{ port: number; pid: number } | undefined> {
  const bin = process.env.BENCH_PGBOUNCER === '0' ? undefined : findBinary('pgbouncer');
  if (!bin) return undefined;
  mkdirSync(dir, { mode: 0o700 });
  const port = await freePort();
  copyFileSync(join(stack.dirs.state, 'certs', 'server.pem'), join(dir, 'server.pem'));
  copyFileSync(join(stack.dirs.state, 'certs', 'server-key.pem'), join(dir, 'server-key.pem'));
  writeFileSync(join(dir, 'userlist.txt'), `"${stack.info.role}" "${stack.info.password}"\n`);
  writeFileSync(join(dir, 'pgbouncer.ini'), [
    '[databases]',
    `${stack.info.database} = host=127.0.0.1 port=${computePort} dbname=${stack.info.database}`,
    '[pgbouncer]',
    'listen_addr = 127.0.0.1',
    `listen_port = ${port}`,
    'unix_socket_dir =',
    'auth_type = scram-sha-256',
    `auth_file = ${dir}/userlist.txt`,
    `pool_mode = ${o.poolMode ?? 'session'}`,
    `max_client_conn = ${o.maxClientConn ?? 200}`,
    `default_pool_size = ${o.poolSize ?? 40}`,
    ...(o.serverTls ? [`server_tls_sslmode = ${o.serverTls}`] : []),
    'client_tls_sslmode = allow',
    `client_tls_cert_file = ${dir}/server.pem`,
    `client_tls_key_file = ${dir}/server-key.pem`,
    `logfile = ${dir}/pgbouncer.log`,
    '',
  ].join('\n'));
  const runAs = pgRunAs(process.env); // PgBouncer refuses to run as root
  if (runAs) for (const f of ['', 'server.pem', 'server-key.pem', 'userlist.txt', 'pgbouncer.ini']) chownSync(join(dir, f), runAs.uid, runAs.gid);
  const child: ChildProcess = spawn(bin, [...(runAs ? ['-u', runAs.user] : []), join(dir, 'pgbouncer.ini')], { stdio: 'ignore' });
  teardowns.push(() => new Promise<void>((r) => {
    if (child.exitCode !== null || child.signalCode !== null) return r();
    child.once('exit', () => r());
    child.kill('SIGINT');
  }));
  for (let i = 0; i < 100; i++) {
    if (child.exitCode !== null) return undefined;
    if (existsSync(join(dir, 'pgbouncer.log')) && readFileSync(join(dir, 'pgbouncer.log'), 'utf8').includes('process up')) return { port, pid: child.pid! };
    await new Promise((r) => setTimeout(r, 50));
  }
  return undefined;
}
