/**
 * `npm run bench` (second part): warm query round trips through the proxy for edge runtimes —
 * SQL over HTTP (`neon()`), WebSocket (`Pool.query` of @neondatabase/serverless) and TCP (`pg`) —
 * median and p99, and the ratios to TCP. Prints a table; figures go to docs/BENCHMARKS.md.
 * BENCH_SERVERLESS_RUNS changes the number of queries per row (default 500).
 */
import { readFileSync } from 'node:fs';
import { Agent as HttpAgent, request as httpRequest } from 'node:http';
import pg from 'pg';
import WebSocket from 'ws';
import { neon, neonConfig, Pool } from '@neondatabase/serverless';
import { fetchWithCa } from '../helpers/https-fetch.ts';
import { startTestStack } from '../helpers/stack.ts';

const RUNS = Number(process.env.BENCH_SERVERLESS_RUNS ?? 500);
const teardowns: (() => unknown)[] = [];

function quantile(xs: number[], q: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil(q * s.length) - 1)]!;
}

async function measure(fn: () => Promise<unknown>): Promise<number[]> {
  for (let i = 0; i < 50; i++) await fn(); // warm: pools, caches, JIT
  const out: number[] = [];
  for (let i = 0; i < RUNS; i++) {
    const t0 = performance.now();
    await fn();
    out.push(performance.now() - t0);
  }
  return out;
}

async function main(): Promise<void> {
  const stack = await startTestStack({ teardown: (fn) => teardowns.push(fn) }, { XENON_LOG_LEVEL: 'warn' });
  const { info } = stack;
  const ca = readFileSync(info.ca_cert, 'utf8');
  const host = `${info.endpoint_id}.localtest.me`;
  const cs = `postgresql://${info.role}:${info.password}@${host}/${info.database}`;
  const results: [string, number[]][] = [];

  const tcp = new pg.Client(stack.pgConfig());
  await tcp.connect();
  results.push(['TCP + TLS (pg) through the proxy', await measure(() => tcp.query('SELECT 1'))]);
  await tcp.end();

  neonConfig.webSocketConstructor = class extends WebSocket {
    constructor(url: string | URL, protocols?: string | string[]) {
      super(url, protocols, { ca });
    }
  } as typeof WebSocket;
  neonConfig.wsProxy = `127.0.0.1:${info.http_port}/v2`;
  neonConfig.useSecureWebSocket = true;
  const wss = new Pool({ connectionString: cs, max: 1 });
  results.push(['WebSocket + TLS (Pool.query)', await measure(() => wss.query('SELECT 1'))]);
  await wss.end();
  neonConfig.useSecureWebSocket = false;
  const ws = new Pool({ connectionString: cs, max: 1 });
  results.push(['WebSocket, loopback plain ws (Pool.query)', await measure(() => ws.query('SELECT 1'))]);
  await ws.end();
  // The driver's default coalesceWrites batches a tick's writes behind setTimeout(0) — at least
  // 1 ms in Node. Without it, the figure is the proxy's own cost.
  neonConfig.useSecureWebSocket = true;
  neonConfig.coalesceWrites = false;
  const wsNc = new Pool({ connectionString: cs, max: 1 });
  results.push(['WebSocket + TLS, coalesceWrites off', await measure(() => wsNc.query('SELECT 1'))]);
  await wsNc.end();
  neonConfig.coalesceWrites = true;

  // The same request without the driver and Node's fetch: what the proxy itself costs.
  const agent = new HttpAgent({ keepAlive: true, maxSockets: 1 });
  const body = JSON.stringify({ query: 'SELECT 1', params: [] });
  const raw = (): Promise<void> =>
    new Promise((resolve, reject) => {
      const headers = { 'Neon-Connection-String': cs, 'Neon-Raw-Text-Output': 'true', 'Neon-Array-Mode': 'true', 'content-length': Buffer.byteLength(body) };
      const req = httpRequest({ host: '127.0.0.1', port: info.http_port, path: '/sql', method: 'POST', agent, headers }, (res) => {
        res.resume();
        res.on('end', () => (res.statusCode === 200 ? resolve() : reject(new Error(`HTTP ${res.statusCode}`))));
      });
      req.on('error', reject);
      req.end(body);
    });
  results.push(['HTTP, loopback plain, node:http keep-alive (no driver)', await measure(raw)]);
  agent.destroy();

  neonConfig.fetchEndpoint = `http://127.0.0.1:${info.http_port}/sql`;
  const sql = neon(cs);
  results.push(['HTTP, loopback plain (neon(), Node\'s fetch)', await measure(() => sql`SELECT 1`)]);
  neonConfig.fetchEndpoint = `https://127.0.0.1:${info.http_port}/sql`;
  neonConfig.fetchFunction = fetchWithCa(ca, { keepAlive: true });
  results.push(['HTTPS (neon(), fetchFunction over node:https keep-alive)', await measure(() => sql`SELECT 1`)]);

  const base = quantile(results[0]![1], 0.5);
  console.log(`\nWarm query round trip (SELECT 1), ${RUNS} queries each, ms\n`);
  console.log('| path | p50 | p99 | p50 / TCP |');
  console.log('|---|---|---|---|');
  for (const [name, xs] of results) {
    const p50 = quantile(xs, 0.5);
    console.log(`| ${name} | ${p50.toFixed(3)} | ${quantile(xs, 0.99).toFixed(3)} | ${(p50 / base).toFixed(2)}× |`);
  }
}

main()
  .catch((err) => {
    console.error(err);
    process.exitCode = 1;
  })
  .finally(async () => {
    for (const fn of teardowns.reverse()) await fn();
  });
