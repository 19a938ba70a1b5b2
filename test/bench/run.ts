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
import { chownSync, copyFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import type pg from 'pg';
import { pgRunAs } from '../../lib/postgres.ts';
import { startTestStack } from '../helpers/stack.ts';
import { firstRow, fmt, HAS_SCHEDSTAT, median, pgbench, postmasterPort, proxyPid, quantile, spread, startPgbouncer, type PgbenchResult } from './harness.ts';

const RUNS = Number(process.env.BENCH_RUNS ?? 30);
const PGBENCH_SECONDS = Number(process.env.BENCH_PGBENCH_SECONDS ?? 15);
const CHURN_SECONDS = Number(process.env.BENCH_CHURN_SECONDS ?? 10);
const REPS = Number(process.env.BENCH_REPS ?? 3);
const teardowns: (() => unknown)[] = [];


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
  const bouncer = await startPgbouncer(join(stack.dirs.data, 'bench-pgbouncer'), computePort, stack, teardowns);

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
