/**
 * `npm run bench`: measures and prints a table (not a timed test). Figures go to docs/BENCHMARKS.md.
 *
 * - cold start: endpoint stopped → first row through the proxy (TLS + SCRAM + wake + query)
 * - resume: endpoint suspended → first row
 * - warm connect: TLS + SCRAM + first row on an active endpoint
 * - pgbench -S -c 16 -T 15 through the proxy vs directly to the compute with TLS
 *
 * Runs on the real stack (`xenon up`), like the acceptance tests. BENCH_RUNS / BENCH_PGBENCH_SECONDS
 * shorten or lengthen it.
 */
import { spawn } from 'node:child_process';
import { chownSync, copyFileSync, mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import pg from 'pg';
import { findPgBin, pgRunAs } from '../../lib/postgres.ts';
import { startTestStack, type TestStack } from '../helpers/stack.ts';

const RUNS = Number(process.env.BENCH_RUNS ?? 30);
const PGBENCH_SECONDS = Number(process.env.BENCH_PGBENCH_SECONDS ?? 15);
const teardowns: (() => unknown)[] = [];

function quantile(xs: number[], q: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil(q * s.length) - 1)]!;
}

const fmt = (n: number): string => n.toFixed(1);

async function firstRow(stack: TestStack): Promise<number> {
  const t0 = performance.now();
  const c = new pg.Client(stack.pgConfig());
  await c.connect();
  await c.query('SELECT 1');
  const ms = performance.now() - t0;
  await c.end();
  return ms;
}

function postmasterPort(stack: TestStack, branch: string): number {
  return Number(readFileSync(join(stack.dirs.data, 'computes', branch, 'pgdata', 'postmaster.pid'), 'utf8').split('\n')[3]);
}

/** utime + stime of a process, in microseconds (clock ticks are 100 Hz on Linux). */
function cpuMicros(pid: number): number {
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

function pgbench(args: string[], env: NodeJS.ProcessEnv): Promise<{ tps: number; latency: number; failed: number; out: string }> {
  const bin = join(findPgBin(process.env), 'pgbench');
  return new Promise((resolve, reject) => {
    const child = spawn(bin, args, { env: { ...process.env, ...env } });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (out += d.toString()));
    child.on('exit', (code) => {
      if (code !== 0) return reject(new Error(`pgbench ${args.join(' ')} exited ${code}:\n${out}`));
      const tps = Number(/tps = ([\d.]+)/.exec(out)?.[1]);
      const latency = Number(/latency average = ([\d.]+) ms/.exec(out)?.[1]);
      const failed = Number(/number of failed transactions: (\d+)/.exec(out)?.[1] ?? 0);
      resolve({ tps, latency, failed, out });
    });
  });
}

async function main(): Promise<void> {
  // The compute gets TLS too, so "direct" is a like-for-like TLS baseline for pgbench.
  const stack = await startTestStack({ teardown: (fn) => teardowns.push(fn) }, { XENON_LOG_LEVEL: 'warn' });
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
  const rows: [string, number, number, number][] = [];

  await firstRow(stack); // warm up
  const warm: number[] = [];
  for (let i = 0; i < RUNS; i++) warm.push(await firstRow(stack));
  rows.push(['warm connect (TLS + SCRAM + first row)', warm.length, quantile(warm, 0.5), quantile(warm, 0.99)]);

  const resume: number[] = [];
  for (let i = 0; i < RUNS; i++) {
    await stack.api.endpointAction(ep, 'suspend');
    await new Promise((r) => setTimeout(r, 300)); // let the proxy's heartbeat carry the invalidation
    resume.push(await firstRow(stack));
  }
  rows.push(['resume (suspended → first row)', resume.length, quantile(resume, 0.5), quantile(resume, 0.99)]);

  const cold: number[] = [];
  for (let i = 0; i < Math.min(RUNS, 20); i++) {
    await stack.api.endpointAction(ep, 'stop');
    await new Promise((r) => setTimeout(r, 300));
    cold.push(await firstRow(stack));
  }
  rows.push(['cold start (stopped → first row)', cold.length, quantile(cold, 0.5), quantile(cold, 0.99)]);

  // pgbench: initialise through the proxy, then -S both ways.
  const conn = (host: string, port: number, sni: boolean): string =>
    `host=${sni ? `${ep}.localtest.me` : host} hostaddr=127.0.0.1 port=${port} user=${stack.info.role} dbname=${stack.info.database} sslmode=${sni ? 'verify-full' : 'require'} sslrootcert=${stack.info.ca_cert}`;
  const pw = { PGPASSWORD: stack.info.password };
  await pgbench(['-i', '-s', '10', '-q', conn('127.0.0.1', stack.info.proxy_port, true)], pw);
  const computePort = postmasterPort(stack, branch);
  const bench = ['-S', '-c', '16', '-j', '2', '-T', String(PGBENCH_SECONDS), '-n'];
  const direct = await pgbench([...bench, conn('127.0.0.1', computePort, false)], pw);
  const pid = proxyPid(stack);
  const cpu0 = cpuMicros(pid);
  const proxied = await pgbench([...bench, conn('127.0.0.1', stack.info.proxy_port, true)], pw);
  const proxyCpuPerTx = (cpuMicros(pid) - cpu0) / (proxied.tps * PGBENCH_SECONDS);

  const out: string[] = [];
  out.push('| measure | runs | median ms | p99 ms |', '|---|---|---|---|');
  for (const [name, n, p50, p99] of rows) out.push(`| ${name} | ${n} | ${fmt(p50)} | ${fmt(p99)} |`);
  out.push('', `resume − warm (median): ${fmt(quantile(resume, 0.5) - quantile(warm, 0.5))} ms`, '');
  out.push(`| pgbench -S -c 16 -j 2 -T ${PGBENCH_SECONDS} (scale 10) | TPS | avg latency ms | failed |`, '|---|---|---|---|');
  out.push(`| direct to the compute (TLS) | ${direct.tps.toFixed(0)} | ${direct.latency.toFixed(3)} | ${direct.failed} |`);
  out.push(`| through the proxy (TLS, pipe mode) | ${proxied.tps.toFixed(0)} | ${proxied.latency.toFixed(3)} | ${proxied.failed} |`);
  out.push('', `proxy / direct TPS: ${(proxied.tps / direct.tps).toFixed(3)}`);
  out.push(`proxy CPU per transaction (one query round trip, TLS to the client): ${proxyCpuPerTx.toFixed(1)} µs`);
  process.stdout.write(out.join('\n') + '\n');
}

try {
  await main();
} finally {
  for (const fn of teardowns.reverse()) await fn();
}
