// Acceptance for the transaction pooler (issue 7) on the real stack (`xenon up`): 1,000 concurrent
// pg clients with named prepared statements plus postgres.js with its default prepared
// statements on a `-pooler` endpoint with pool_size 10 (set through the control-plane API) — all
// results correct, never more than 10 server connections on the compute (pg_stat_activity);
// pgbench -M prepared and -M extended at -c 100 with 0 failed transactions; a client killed
// mid-transaction; garbage after startup; scale to zero counting pooled clients.
import t from 'tap';
import pg from 'pg';
import postgres from 'postgres';
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { findPgBin } from '../../lib/postgres.ts';
import { startTestStack, waitFor } from '../helpers/stack.ts';

const CLIENTS = 1000;
const POOL_SIZE = 10;

const stack = await startTestStack(t, {
  XENON_PROXY_CONNECT_RATE_BURST: '5000',
  XENON_PROXY_CONNECT_RATE_PER_SECOND: '5000',
  XENON_LOG_LEVEL: 'info',
});
const ep = stack.info.endpoint_id;
const pooler = `${ep}-pooler`;
const ca = readFileSync(stack.info.ca_cert, 'utf8');
const badPoolSize = await stack.api.updateEndpoint(ep, { pool_size: 0 }).then(() => 'accepted', (e: { code?: string }) => e.code ?? 'error');
const { endpoint } = await stack.api.updateEndpoint(ep, { pool_size: POOL_SIZE });

// A direct (unpooled) session to watch the compute.
const watcher = new pg.Client(stack.pgConfig());
watcher.on('error', () => {});
await watcher.connect();
t.teardown(() => watcher.end().catch(() => {}));
await watcher.query(`CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL)`);
await watcher.query(`INSERT INTO accounts SELECT g, 0 FROM generate_series(1, ${CLIENTS}) g`);
const serverConns = async (): Promise<number> => {
  const r = await watcher.query<{ n: string }>(
    `SELECT count(*) AS n FROM pg_stat_activity WHERE usename = $1 AND backend_type = 'client backend' AND pid <> pg_backend_pid()`,
    [stack.info.role],
  );
  return Number(r.rows[0]!.n);
};
/** Samples the number of the role's backends until stopped; returns the maximum seen. */
function sampleMax(): { stop: () => Promise<number> } {
  let max = 0;
  let on = true;
  const loop = (async () => {
    while (on) {
      max = Math.max(max, await serverConns());
      await new Promise((r) => setTimeout(r, 25));
    }
  })();
  return { stop: async () => { on = false; await loop; return max; } };
}

t.test(`${CLIENTS} concurrent pg clients with named prepared statements, and postgres.js, on pool size ${POOL_SIZE}`, async (t) => {
  t.equal(endpoint.pool_size, POOL_SIZE, 'pool_size set through PATCH /v1/endpoints/:id');
  t.equal(badPoolSize, 'CP_BAD_REQUEST', 'pool_size 0 refused');
  const sampler = sampleMax();
  const t0 = performance.now();
  // Connections are opened 50 at a time (TLS and SCRAM cost CPU on both sides of a 2-core
  // machine); then all of them run their transactions at once.
  const clients: pg.Client[] = [];
  let next = 0;
  await Promise.all(Array.from({ length: 50 }, async () => {
    while (next < CLIENTS) {
      const i = next++;
      const c = new pg.Client(stack.pgConfig({ endpoint: pooler }));
      c.on('error', () => {});
      await c.connect();
      clients[i] = c;
    }
  }));
  const connected = performance.now() - t0;
  const sql = postgres({
    host: '127.0.0.1', port: stack.info.proxy_port, user: stack.info.role, password: stack.info.password, database: stack.info.database,
    ssl: { ca, servername: `${pooler}.localtest.me` }, max: 50, onnotice: () => {},
  });
  t.teardown(() => sql.end());
  const [pgResults, pjResults] = await Promise.all([
    Promise.all(clients.map(async (c, i) => {
      const id = i + 1;
      await c.query('BEGIN');
      await c.query({ name: 'credit', text: 'UPDATE accounts SET balance = balance + $2 WHERE id = $1', values: [id, 10] });
      const r = await c.query<{ balance: string }>({ name: 'balance', text: 'SELECT balance FROM accounts WHERE id = $1', values: [id] });
      await c.query('COMMIT');
      const again = await c.query<{ balance: string }>({ name: 'balance', text: 'SELECT balance FROM accounts WHERE id = $1', values: [id] });
      return [r.rows[0]?.balance, again.rows[0]?.balance];
    })),
    Promise.all(Array.from({ length: 500 }, async (_, i) => {
      const id = (i % CLIENTS) + 1;
      const [row] = await sql<{ id: number; doubled: number }[]>`SELECT id, ${i}::int * 2 AS doubled FROM accounts WHERE id = ${id}`;
      return [row?.id, row?.doubled];
    })),
  ]);
  const ran = performance.now() - t0 - connected;
  const max = await sampler.stop();
  let wrong = 0;
  pgResults.forEach(([a, b]) => { if (a !== '10' || b !== '10') wrong++; });
  pjResults.forEach(([id, d], i) => { if (id !== (i % CLIENTS) + 1 || d !== i * 2) wrong++; });
  t.equal(wrong, 0, `all ${CLIENTS * 2 + 500} results correct`);
  const total = await watcher.query<{ s: string }>('SELECT sum(balance) AS s FROM accounts');
  t.equal(total.rows[0]!.s, String(CLIENTS * 10), 'every committed credit is there once');
  t.ok(max >= 1 && max <= POOL_SIZE, `at most ${POOL_SIZE} server connections on the compute (max seen ${max})`);
  t.comment(`connect ${Math.round(connected)} ms, transactions ${Math.round(ran)} ms`);
  const stats = (await (await fetch(`${stack.info.metrics_url}/pooler`)).json()) as { pools: { endpoint: string; clients: { total: number }; servers: { total: number }; pool_size: number }[] };
  const pool = stats.pools.find((p) => p.endpoint === ep)!;
  t.equal(pool.pool_size, POOL_SIZE);
  t.ok(pool.clients.total >= CLIENTS, `the admin view counts the pooled clients (${pool.clients.total})`);
  t.ok(pool.servers.total <= POOL_SIZE);
  // Scale to zero counts pooled clients, not server connections.
  const reported = await waitFor(async () => (await stack.api.getEndpoint(ep)).endpoint.connections >= CLIENTS, 5_000);
  t.ok(reported, 'the control plane sees the pooled clients as connections');
  await Promise.all(clients.map((c) => c.end()));
  await sql.end();
  const zero = await waitFor(async () => (await stack.api.getEndpoint(ep)).endpoint.connections <= 1, 5_000);
  t.ok(zero, 'and no longer once they left, although the pool keeps its server connections');
  t.ok((await serverConns()) >= 1, 'server connections stay open for the next clients');
});

/** Runs pgbench; resolves with its output and exit code. */
function pgbench(args: string[]): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve) => {
    const child = spawn(join(findPgBin(process.env), 'pgbench'), args, { env: { ...process.env, PGPASSWORD: stack.info.password } });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (out += d.toString()));
    child.on('exit', (code) => resolve({ code, out }));
  });
}

t.test('pgbench -M prepared and -M extended at -c 100 through the pooler: no failed transaction', async (t) => {
  const init = await pgbench(['-i', '-s', '1', '-q', stack.psqlConn()]);
  t.equal(init.code, 0, init.code === 0 ? 'pgbench -i' : init.out);
  // pgbench -i's own (direct) backend may still be on its way out.
  await waitFor(async () => (await serverConns()) <= POOL_SIZE, 5_000);
  for (const mode of ['prepared', 'extended']) {
    const sampler = sampleMax();
    const r = await pgbench(['-M', mode, '-c', '100', '-j', '2', '-T', '4', '-n', stack.psqlConn({ endpoint: pooler })]);
    const max = await sampler.stop();
    t.equal(r.code, 0, r.code === 0 ? `pgbench -M ${mode} exited 0` : r.out);
    const processed = Number(/number of transactions actually processed: (\d+)/.exec(r.out)?.[1] ?? 0);
    const failed = Number(/number of failed transactions: (\d+)/.exec(r.out)?.[1] ?? 0);
    t.ok(processed > 100, `-M ${mode}: ${processed} transactions (${/tps = ([\d.]+)/.exec(r.out)?.[1]} tps)`);
    t.equal(failed, 0, `-M ${mode}: 0 failed transactions`);
    t.ok(max <= POOL_SIZE, `-M ${mode}: at most ${POOL_SIZE} server connections (max seen ${max})`);
  }
  // The TPC-B-like script's sums agree: every transaction applied once to accounts, tellers and branches.
  const r = await watcher.query<{ a: string; b: string; h: string }>(
    `SELECT (SELECT sum(abalance) FROM pgbench_accounts) AS a, (SELECT sum(bbalance) FROM pgbench_branches) AS b, (SELECT sum(delta) FROM pgbench_history) AS h`,
  );
  t.equal(r.rows[0]!.a, r.rows[0]!.h);
  t.equal(r.rows[0]!.b, r.rows[0]!.h);
});

t.test('a client killed mid-transaction leaves no locks and no open transaction', async (t) => {
  const c = new pg.Client(stack.pgConfig({ endpoint: pooler }));
  c.on('error', () => {});
  await c.connect();
  await c.query('BEGIN');
  await c.query('SELECT * FROM accounts WHERE id = 1 FOR UPDATE');
  const pid = (await c.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid;
  (c as unknown as { connection: { stream: { destroy(): void } } }).connection.stream.destroy();
  const clean = await waitFor(async () => {
    const a = await watcher.query(`SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND state <> 'idle'`, [pid]);
    const l = await watcher.query(`SELECT 1 FROM pg_locks WHERE pid = $1 AND locktype = 'transactionid'`, [pid]);
    return a.rowCount === 0 && l.rowCount === 0;
  }, 5_000);
  t.ok(clean, `server connection ${pid} rolled back and idle`);
  await watcher.query(`SET lock_timeout = '2s'`);
  await watcher.query('UPDATE accounts SET balance = balance WHERE id = 1');
  await watcher.query(`RESET lock_timeout`);
});

t.test('garbage after a valid startup: FATAL 08P01, others unaffected', async (t) => {
  const other = new pg.Client(stack.pgConfig({ endpoint: pooler }));
  await other.connect();
  const victim = new pg.Client(stack.pgConfig({ endpoint: pooler }));
  const err = new Promise<{ code?: string; message: string }>((resolve) => victim.on('error', resolve));
  await victim.connect();
  const stream = (victim as unknown as { connection: { stream: { write(b: Buffer): void } } }).connection.stream;
  stream.write(Buffer.from('\x01\x00\x00\x00\x08garbage!garbage!'));
  const e = await err;
  t.equal(e.code, '08P01', e.message);
  t.equal((await other.query<{ x: number }>('SELECT 1 AS x')).rows[0]!.x, 1);
  await other.end();
  await victim.end().catch(() => {});
});

t.test('suspend closes pooled server connections; the next transaction wakes the compute and opens new ones', async (t) => {
  const c = new pg.Client(stack.pgConfig({ endpoint: pooler }));
  c.on('error', () => {});
  await c.connect();
  const pidBefore = (await c.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid;
  await stack.api.endpointAction(ep, 'stop');
  // The proxy learns through its heartbeat (every 200 ms here).
  await new Promise((r) => setTimeout(r, 600));
  const r = await c.query<{ pid: number; x: number }>('SELECT pg_backend_pid() AS pid, 7 AS x');
  t.equal(r.rows[0]!.x, 7, 'the pooled session survives a stop of its compute');
  t.not(r.rows[0]!.pid, pidBefore, 'on a new server connection');
  await c.end();
});
