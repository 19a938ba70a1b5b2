/**
 * `npm run bench`, part 3: the transaction pooler against PgBouncer (issue 7). In one run, side by
 * side, on the same compute, all with TLS from pgbench:
 *
 * - `pgbench -S -c 200 -j 2 -T 15` (long-lived clients): direct to the compute (`ssl=on`,
 *   max_connections raised to fit), PgBouncer (Debian package, transaction mode, pool 20, server
 *   side plain TCP like the proxy's), and the Xenon proxy on `<endpoint>-pooler` (pool 20);
 * - `pgbench -S -C -c 8 -j 2 -T 10` (a new connection, TLS + SCRAM, per transaction).
 *
 * Rows alternate (their order rotates between repetitions), BENCH_REPS repetitions (3); tables give the median and (min–max), the CPU per
 * transaction of the proxy / PgBouncer process, and the ratios the issue sets as goals (Xenon ≥
 * 1.1× PgBouncer TPS at 200 clients; churn ≥ 1.0×). Knobs: BENCH_PGBENCH_SECONDS (15),
 * BENCH_CHURN_SECONDS (10), BENCH_REPS (3), BENCH_CLIENTS (200).
 */
import { chownSync, copyFileSync, mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { pgRunAs } from '../../lib/postgres.ts';
import { startTestStack } from '../helpers/stack.ts';
import { firstRow, fmt, HAS_SCHEDSTAT, median, pgbench, postmasterPort, proxyPid, spread, startPgbouncer, type PgbenchResult } from './harness.ts';

const PGBENCH_SECONDS = Number(process.env.BENCH_PGBENCH_SECONDS ?? 15);
const CHURN_SECONDS = Number(process.env.BENCH_CHURN_SECONDS ?? 10);
const REPS = Number(process.env.BENCH_REPS ?? 3);
const CLIENTS = Number(process.env.BENCH_CLIENTS ?? 200);
const POOL = 20;
const teardowns: (() => unknown)[] = [];

async function main(): Promise<void> {
  const stack = await startTestStack({ teardown: (fn) => teardowns.push(fn) }, {
    XENON_LOG_LEVEL: 'warn',
    // Churn opens hundreds of connections a second: above the default per-endpoint rate limit.
    XENON_PROXY_CONNECT_RATE_PER_SECOND: '100000',
    XENON_PROXY_CONNECT_RATE_BURST: '100000',
    XENON_POOLER_DEFAULT_POOL_SIZE: String(POOL),
  });
  const tlsDir = join(stack.dirs.data, 'bench-tls');
  mkdirSync(tlsDir, { mode: 0o700 });
  copyFileSync(join(stack.dirs.state, 'certs', 'server.pem'), join(tlsDir, 'server.pem'));
  copyFileSync(join(stack.dirs.state, 'certs', 'server-key.pem'), join(tlsDir, 'server-key.pem'));
  const runAs = pgRunAs(process.env);
  if (runAs) for (const f of ['', 'server.pem', 'server-key.pem']) chownSync(join(tlsDir, f), runAs.uid, runAs.gid);
  // Computes with TLS (the direct rows) and room for 200 direct clients.
  stack.env.XENON_COMPUTE_SETTINGS = `ssl=on,ssl_cert_file=${tlsDir}/server.pem,ssl_key_file=${tlsDir}/server-key.pem,max_connections=${CLIENTS + 50}`;
  await stack.restart();

  const ep = stack.info.endpoint_id;
  const branch = (await stack.api.getEndpoint(ep)).endpoint.branch_id;
  await stack.api.updateEndpoint(ep, { suspend_timeout_seconds: 0, stop_timeout_seconds: 0 });
  await firstRow(stack.pgConfig());
  const computePort = postmasterPort(stack, branch);
  const postmaster = Number(readFileSync(join(stack.dirs.data, 'computes', branch, 'pgdata', 'postmaster.pid'), 'utf8').split('\n')[0]);
  const { role, database, ca_cert: ca } = stack.info;
  const proxyPort = stack.info.proxy_port;
  const pw = { PGPASSWORD: stack.info.password };
  const conn = {
    direct: `host=${ep}.localtest.me hostaddr=127.0.0.1 port=${computePort} user=${role} dbname=${database} sslmode=verify-full sslrootcert=${ca}`,
    pooler: `host=${ep}-pooler.localtest.me hostaddr=127.0.0.1 port=${proxyPort} user=${role} dbname=${database} sslmode=verify-full sslrootcert=${ca}`,
  };
  await pgbench(['-i', '-s', '10', '-q', `host=${ep}.localtest.me hostaddr=127.0.0.1 port=${proxyPort} user=${role} dbname=${database} sslmode=verify-full sslrootcert=${ca}`], pw);
  const pid = proxyPid(stack);
  const bouncer = await startPgbouncer(join(stack.dirs.data, 'bench-pgbouncer'), computePort, stack, teardowns, {
    poolMode: 'transaction',
    poolSize: POOL,
    maxClientConn: CLIENTS + 100,
    serverTls: 'disable',
  });
  if (!bouncer) throw new Error('pgbouncer is not installed (apt-get install pgbouncer; test/setup/system-deps.js does it as root)');
  // Same certificate (*.<domain>) and the same verify-full as the other rows: the client's certificate check costs the same everywhere.
  const viaBouncer = `host=pgbouncer.localtest.me hostaddr=127.0.0.1 port=${bouncer.port} user=${role} dbname=${database} sslmode=verify-full sslrootcert=${ca}`;

  type Row = { name: string; args: string[]; pid?: number; results: PgbenchResult[] };
  const many = ['-S', '-c', String(CLIENTS), '-j', '2', '-T', String(PGBENCH_SECONDS), '-n'];
  const churn = ['-S', '-C', '-c', '8', '-j', '2', '-T', String(CHURN_SECONDS), '-n'];
  const manyRows: Row[] = [
    { name: 'direct to the compute', args: [...many, conn.direct], results: [] },
    { name: `PgBouncer 1.x, transaction mode, pool ${POOL}`, args: [...many, viaBouncer], pid: bouncer.pid, results: [] },
    { name: `Xenon proxy, \`-pooler\`, pool ${POOL}`, args: [...many, conn.pooler], pid, results: [] },
  ];
  const churnRows: Row[] = [
    { name: 'direct to the compute', args: [...churn, conn.direct], results: [] },
    { name: `PgBouncer 1.x, transaction mode, pool ${POOL}`, args: [...churn, viaBouncer], pid: bouncer.pid, results: [] },
    { name: `Xenon proxy, \`-pooler\`, pool ${POOL}`, args: [...churn, conn.pooler], pid, results: [] },
  ];
  // Warm the pools (and PgBouncer's) before the first measured run.
  await pgbench(['-S', '-c', '20', '-j', '2', '-T', '2', '-n', conn.pooler], pw);
  await pgbench(['-S', '-c', '20', '-j', '2', '-T', '2', '-n', viaBouncer], pw);
  // The order of the rows rotates from one repetition to the next, so that none always runs
  // right after another (200 direct backends exiting, say) or always first.
  const rotate = <T>(xs: T[], k: number): T[] => xs.map((_, i) => xs[(i + k) % xs.length]!);
  for (let rep = 0; rep < REPS; rep++) {
    for (const r of rotate(manyRows, rep)) r.results.push(await pgbench(r.args, pw, r.pid, postmaster));
    for (const r of rotate(churnRows, rep)) r.results.push(await pgbench(r.args, pw, r.pid, postmaster));
  }

  const out: string[] = [];
  const line = (...cells: string[]): number => out.push(`| ${cells.join(' | ')} |`);
  const pick = (r: Row, f: (x: PgbenchResult) => number): number[] => r.results.map(f);
  const tps = (r: Row): number => median(pick(r, (x) => x.tps));
  out.push(`pgbench -S -c ${CLIENTS} -j 2 -T ${PGBENCH_SECONDS}, scale 10, TLS from pgbench, ${REPS} runs each: median (min–max)`, '');
  line('target', 'TPS', 'avg latency ms', 'failed', 'CPU µs/tx: proxy or PgBouncer', 'Postgres', 'pgbench');
  line('---', '---', '---', '---', '---', '---', '---');
  for (const r of manyRows) {
    const failed = pick(r, (x) => x.failed).reduce((a, b) => a + b, 0);
    line(r.name, spread(pick(r, (x) => x.tps), 0), spread(pick(r, (x) => x.latency), 2), String(failed), r.pid ? spread(pick(r, (x) => x.cpuPerTx)) : '—',
      spread(pick(r, (x) => x.pgCpuPerTx)), spread(pick(r, (x) => x.pgbenchCpuPerTx)));
  }
  out.push('', `Xenon / PgBouncer TPS: ${fmt(tps(manyRows[2]!) / tps(manyRows[1]!), 3)} (goal ≥ 1.1) · Xenon / direct: ${fmt(tps(manyRows[2]!) / tps(manyRows[0]!), 3)} · PgBouncer / direct: ${fmt(tps(manyRows[1]!) / tps(manyRows[0]!), 3)}`, '');
  out.push(`pgbench -S -C -c 8 -j 2 -T ${CHURN_SECONDS} (a new TLS connection per transaction), ${REPS} runs each: median (min–max)`, '');
  line('target', 'TPS', 'avg connection time ms', 'failed', 'CPU ms/connection: proxy or PgBouncer', 'Postgres', 'pgbench');
  line('---', '---', '---', '---', '---', '---', '---');
  for (const r of churnRows) {
    const failed = pick(r, (x) => x.failed).reduce((a, b) => a + b, 0);
    line(r.name, spread(pick(r, (x) => x.tps), 0), spread(pick(r, (x) => x.connectMs), 2), String(failed), r.pid ? spread(pick(r, (x) => x.cpuPerTx / 1000), 3) : '—',
      spread(pick(r, (x) => x.pgCpuPerTx / 1000), 3), spread(pick(r, (x) => x.pgbenchCpuPerTx / 1000), 3));
  }
  out.push('', `Xenon / PgBouncer churn TPS: ${fmt(tps(churnRows[2]!) / tps(churnRows[1]!), 3)} (goal ≥ 1.0) · Xenon / direct: ${fmt(tps(churnRows[2]!) / tps(churnRows[0]!), 3)} · PgBouncer / direct: ${fmt(tps(churnRows[1]!) / tps(churnRows[0]!), 3)}`, '');
  // What the pooler did over the whole run (warm-up included): batches, their pauses and retries.
  const pools = ((await (await fetch(`${stack.info.metrics_url.replace(/\/metrics$/, '')}/pooler`)).json()) as { pools: { pipelined: number; transactions: number; pipeline_pauses: number; pipeline_retries: number }[] }).pools;
  const sum = (f: (p: (typeof pools)[number]) => number): number => pools.reduce((a, p) => a + f(p), 0);
  out.push(`Xenon pooler over the run: ${sum((p) => p.transactions)} transactions, ${sum((p) => p.pipelined)} of them batched behind another client's (XENON_POOLER_PIPELINE_DEPTH ${process.env.XENON_POOLER_PIPELINE_DEPTH ?? 'default 4'}), ${sum((p) => p.pipeline_pauses)} batching pauses, ${sum((p) => p.pipeline_retries)} retries.`, '');
  out.push(`CPU of the proxy / PgBouncer measured with ${HAS_SCHEDSTAT ? '/proc/<pid>/task/*/schedstat (ns)' : '/proc/<pid>/stat utime+stime (10 ms ticks)'}; Postgres: the compute's postmaster and all its processes, reaped ones included (/proc/<pid>/stat, 10 ms ticks); pgbench: this process's reaped children.`);
  process.stdout.write(out.join('\n') + '\n');
}

try {
  await main();
} finally {
  for (const fn of teardowns.reverse()) await fn();
}
