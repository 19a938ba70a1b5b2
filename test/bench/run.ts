/**
 * `npm run bench`: measures and prints tables (not a timed test). Figures go to docs/BENCHMARKS.md.
 *
 * - connect latency: warm connect through the proxy (TLS + SCRAM + first row) vs the same
 *   directly to the compute (TLS + SCRAM), resume (suspended → first row), cold start (stopped → first row)
 * - pgbench -S (long-lived connections): direct vs through the proxy, with TLS and without, and the
 *   proxy's own CPU per query (pipe mode); PgBouncer (session mode, same compute) as a reference
 *   when a `pgbouncer` binary is installed
 * - connection churn: pgbench -C -S (a new connection per transaction), direct vs the proxy
 *
 * Runs on the real stack (`xenon up`), like the acceptance tests, with `XENON_PROXY_REQUIRE_TLS=false`
 * so the plaintext rows can separate the TLS cost from the pipe cost. Environment knobs:
 * BENCH_RUNS (connect samples, 30), BENCH_PGBENCH_SECONDS (15), BENCH_CHURN_SECONDS (10),
 * BENCH_REPS (repetitions of every pgbench row, 3; the tables give the median and the range),
 * BENCH_PGBOUNCER=0 (skip PgBouncer).
 *
 * CPU is the sum over the process's threads of /proc/<pid>/task/<tid>/schedstat (nanoseconds of
 * CPU time accounted by the scheduler, user + system), read before and after each pgbench run;
 * where schedstat is missing, utime + stime from /proc/<pid>/stat (10 ms ticks).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { chownSync, copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { delimiter, join } from 'node:path';
import pg from 'pg';
import { findPgBin, pgRunAs } from '../../lib/postgres.ts';
import { freePort, startTestStack, type TestStack } from '../helpers/stack.ts';

const RUNS = Number(process.env.BENCH_RUNS ?? 30);
const PGBENCH_SECONDS = Number(process.env.BENCH_PGBENCH_SECONDS ?? 15);
const CHURN_SECONDS = Number(process.env.BENCH_CHURN_SECONDS ?? 10);
const REPS = Number(process.env.BENCH_REPS ?? 3);
const teardowns: (() => unknown)[] = [];

function quantile(xs: number[], q: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil(q * s.length) - 1)]!;
}
function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}
const fmt = (n: number, d = 1): string => n.toFixed(d);
/** "median (min–max)" */
const spread = (xs: number[], d = 1): string => (xs.length > 1 ? `${fmt(median(xs), d)} (${fmt(Math.min(...xs), d)}–${fmt(Math.max(...xs), d)})` : fmt(xs[0] ?? NaN, d));

async function firstRow(config: pg.ClientConfig): Promise<number> {
  const t0 = performance.now();
  const c = new pg.Client(config);
  c.on('error', () => {});
  await c.connect();
  await c.query('SELECT 1');
  const ms = performance.now() - t0;
  await c.end();
  return ms;
}

function postmasterPort(stack: TestStack, branch: string): number {
  return Number(readFileSync(join(stack.dirs.data, 'computes', branch, 'pgdata', 'postmaster.pid'), 'utf8').split('\n')[3]);
}

const HAS_SCHEDSTAT = existsSync('/proc/self/schedstat');

/** CPU time (user + system) of a process and all its threads, in microseconds. */
function cpuMicros(pid: number): number {
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

/** The proxy's pid: the child of `xenon up` running proxy/main.ts. */
function proxyPid(stack: TestStack): number {
  const kids = readFileSync(`/proc/${stack.child.pid}/task/${stack.child.pid}/children`, 'utf8').trim().split(/\s+/).map(Number);
  const pid = kids.find((k) => readFileSync(`/proc/${k}/cmdline`, 'utf8').includes('proxy/main.ts'));
  if (!pid) throw new Error('proxy process not found');
  return pid;
}

interface PgbenchResult {
  tps: number;
  latency: number;
  failed: number;
  transactions: number;
  /** pgbench -C: average connection time, ms. */
  connectMs: number;
  /** CPU of the measured process per transaction, µs (NaN when none is measured). */
  cpuPerTx: number;
}

function pgbench(args: string[], env: NodeJS.ProcessEnv, measurePid?: number): Promise<PgbenchResult> {
  const bin = join(findPgBin(process.env), 'pgbench');
  const cpu0 = measurePid ? cpuMicros(measurePid) : 0;
  return new Promise((resolve, reject) => {
    const child = spawn(bin, args, { env: { ...process.env, ...env } });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (out += d.toString()));
    child.on('exit', (code) => {
      const cpu = measurePid ? cpuMicros(measurePid) - cpu0 : NaN;
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
      });
    });
  });
}

function findBinary(name: string): string | undefined {
  const dirs = [...(process.env.PATH ?? '').split(delimiter), '/usr/sbin', '/usr/local/sbin'];
  return dirs.map((d) => join(d, name)).find((p) => existsSync(p));
}

/** PgBouncer in session mode in front of the compute, client TLS optional, as a reference pipe. */
async function startPgbouncer(dir: string, computePort: number, stack: TestStack): Promise<{ port: number; pid: number } | undefined> {
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
    'pool_mode = session',
    'max_client_conn = 200',
    'default_pool_size = 40',
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

async function main(): Promise<void> {
  // The compute gets TLS too, so "direct" is a like-for-like TLS baseline. The proxy accepts
  // plaintext sessions (options=endpoint=…) for the rows that separate TLS from the pipe.
  const stack = await startTestStack({ teardown: (fn) => teardowns.push(fn) }, { XENON_LOG_LEVEL: 'warn', XENON_PROXY_REQUIRE_TLS: 'false' });
  const tlsDir = join(stack.dirs.data, 'bench-tls');
  mkdirSync(tlsDir, { mode: 0o700 });
  copyFileSync(join(stack.dirs.state, 'certs', 'server.pem'), join(tlsDir, 'server.pem'));
  copyFileSync(join(stack.dirs.state, 'certs', 'server-key.pem'), join(tlsDir, 'server-key.pem'));
  const runAs = pgRunAs(process.env);
  if (runAs) for (const f of ['', 'server.pem', 'server-key.pem']) chownSync(join(tlsDir, f), runAs.uid, runAs.gid);
  // Restart with TLS settings for computes (the proxy and control plane are unchanged).
  stack.env.XENON_COMPUTE_SETTINGS = `ssl=on,ssl_cert_file=${tlsDir}/server.pem,ssl_key_file=${tlsDir}/server-key.pem`;
  await stack.restart();

  const ep = stack.info.endpoint_id;
  const branch = (await stack.api.getEndpoint(ep)).endpoint.branch_id;
  const viaProxy = stack.pgConfig();
  const direct = (): pg.ClientConfig => ({ ...viaProxy, port: postmasterPort(stack, branch) });
  const rows: [string, number[]][] = [];

  // ---- connect latency
  await firstRow(viaProxy); // wakes the compute
  await firstRow(direct());
  const warm: number[] = [];
  const warmDirect: number[] = [];
  const directConfig = direct();
  for (let i = 0; i < RUNS; i++) {
    warm.push(await firstRow(viaProxy));
    warmDirect.push(await firstRow(directConfig));
  }
  rows.push(['warm connect through the proxy (TLS + SCRAM + first row)', warm]);
  rows.push(['warm connect directly to the compute (TLS + SCRAM + first row)', warmDirect]);

  const resume: number[] = [];
  for (let i = 0; i < RUNS; i++) {
    await stack.api.endpointAction(ep, 'suspend');
    await new Promise((r) => setTimeout(r, 300)); // let the proxy's heartbeat carry the invalidation
    resume.push(await firstRow(viaProxy));
  }
  rows.push(['resume (suspended → first row)', resume]);

  const cold: number[] = [];
  for (let i = 0; i < Math.min(RUNS, 20); i++) {
    await stack.api.endpointAction(ep, 'stop');
    await new Promise((r) => setTimeout(r, 300));
    cold.push(await firstRow(viaProxy));
  }
  rows.push(['cold start (stopped → first row)', cold]);

  // ---- pgbench: the endpoint must stay up while direct runs leave the proxy idle
  await stack.api.updateEndpoint(ep, { suspend_timeout_seconds: 0, stop_timeout_seconds: 0 });
  await firstRow(viaProxy);
  const computePort = postmasterPort(stack, branch);
  const { role, database, ca_cert: ca } = stack.info;
  const proxyPort = stack.info.proxy_port;
  const conn = {
    proxyTls: `host=${ep}.localtest.me hostaddr=127.0.0.1 port=${proxyPort} user=${role} dbname=${database} sslmode=verify-full sslrootcert=${ca}`,
    proxyPlain: `host=127.0.0.1 port=${proxyPort} user=${role} dbname=${database} sslmode=disable options=endpoint=${ep}`,
    directTls: `host=${ep}.localtest.me hostaddr=127.0.0.1 port=${computePort} user=${role} dbname=${database} sslmode=verify-full sslrootcert=${ca}`,
    directPlain: `host=127.0.0.1 port=${computePort} user=${role} dbname=${database} sslmode=disable`,
  };
  const pw = { PGPASSWORD: stack.info.password };
  await pgbench(['-i', '-s', '10', '-q', conn.proxyTls], pw);
  const pid = proxyPid(stack);
  const bouncer = await startPgbouncer(join(stack.dirs.data, 'bench-pgbouncer'), computePort, stack);

  const bench = ['-S', '-c', '16', '-j', '2', '-T', String(PGBENCH_SECONDS), '-n'];
  type Row = { name: string; args: string[]; pid?: number; results: PgbenchResult[] };
  const pipeRows: Row[] = [
    { name: 'direct to the compute, TLS', args: [...bench, conn.directTls], results: [] },
    { name: 'through the proxy, TLS', args: [...bench, conn.proxyTls], pid, results: [] },
    { name: 'direct to the compute, no TLS', args: [...bench, conn.directPlain], results: [] },
    { name: 'through the proxy, no TLS', args: [...bench, conn.proxyPlain], pid, results: [] },
  ];
  if (bouncer) {
    const b = (ssl: string): string => `host=127.0.0.1 port=${bouncer.port} user=${role} dbname=${database} sslmode=${ssl}`;
    pipeRows.push({ name: 'through PgBouncer 1.x (session mode), TLS', args: [...bench, b('require')], pid: bouncer.pid, results: [] });
    pipeRows.push({ name: 'through PgBouncer 1.x (session mode), no TLS', args: [...bench, b('disable')], pid: bouncer.pid, results: [] });
  }
  const churn = ['-C', '-S', '-c', '8', '-j', '2', '-T', String(CHURN_SECONDS), '-n'];
  const churnRows: Row[] = [
    { name: 'direct to the compute, TLS', args: [...churn, conn.directTls], results: [] },
    { name: 'through the proxy, TLS', args: [...churn, conn.proxyTls], pid, results: [] },
  ];
  // Rows interleaved, repetition after repetition, so that load from elsewhere spreads over all of them.
  for (let rep = 0; rep < REPS; rep++) {
    for (const r of pipeRows) r.results.push(await pgbench(r.args, pw, r.pid));
    for (const r of churnRows) r.results.push(await pgbench(r.args, pw, r.pid));
  }

  // ---- report
  const out: string[] = [];
  const line = (...cells: string[]): number => out.push(`| ${cells.join(' | ')} |`);
  line('measure', 'runs', 'median ms', 'p99 ms');
  line('---', '---', '---', '---');
  for (const [name, xs] of rows) line(name, String(xs.length), fmt(median(xs)), fmt(quantile(xs, 0.99)));
  out.push('', `proxy − direct warm connect (median): ${fmt(median(warm) - median(warmDirect))} ms · resume − warm (median): ${fmt(median(resume) - median(warm))} ms`, '');

  const pick = (r: Row, f: (x: PgbenchResult) => number): number[] => r.results.map(f);
  out.push(`pgbench -S -c 16 -j 2 -T ${PGBENCH_SECONDS}, scale 10, ${REPS} runs each: median (min–max)`, '');
  line('pipe', 'TPS', 'avg latency ms', 'failed', 'CPU µs per query of the proxy / PgBouncer');
  line('---', '---', '---', '---', '---');
  for (const r of pipeRows) {
    const failed = pick(r, (x) => x.failed).reduce((a, b) => a + b, 0);
    line(r.name, spread(pick(r, (x) => x.tps), 0), spread(pick(r, (x) => x.latency), 3), String(failed), r.pid ? spread(pick(r, (x) => x.cpuPerTx)) : '—');
  }
  const tlsCost = median(pick(pipeRows[1]!, (x) => x.cpuPerTx)) - median(pick(pipeRows[3]!, (x) => x.cpuPerTx));
  out.push('', `proxy / direct TPS: TLS ${fmt(median(pick(pipeRows[1]!, (x) => x.tps)) / median(pick(pipeRows[0]!, (x) => x.tps)), 3)}, no TLS ${fmt(median(pick(pipeRows[3]!, (x) => x.tps)) / median(pick(pipeRows[2]!, (x) => x.tps)), 3)} · TLS share of the proxy's CPU per query (median TLS − median no TLS): ${fmt(tlsCost)} µs`, '');

  out.push(`pgbench -C -S -c 8 -j 2 -T ${CHURN_SECONDS} (a new connection per transaction), ${REPS} runs each: median (min–max)`, '');
  line('connection churn', 'TPS', 'avg connection time ms', 'failed', 'proxy CPU ms per connection');
  line('---', '---', '---', '---', '---');
  for (const r of churnRows) {
    const failed = pick(r, (x) => x.failed).reduce((a, b) => a + b, 0);
    line(r.name, spread(pick(r, (x) => x.tps), 0), spread(pick(r, (x) => x.connectMs), 2), String(failed), r.pid ? spread(pick(r, (x) => x.cpuPerTx / 1000), 2) : '—');
  }
  out.push('', `CPU measured with ${HAS_SCHEDSTAT ? '/proc/<pid>/task/*/schedstat (ns)' : '/proc/<pid>/stat utime+stime (10 ms ticks)'}${bouncer ? '' : '; PgBouncer not installed or BENCH_PGBOUNCER=0: no reference rows'}.`);
  process.stdout.write(out.join('\n') + '\n');
}

try {
  await main();
} finally {
  for (const fn of teardowns.reverse()) await fn();
}
