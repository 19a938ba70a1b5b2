// The transaction pooler (issue 7) in-process against a real Postgres, with a control-plane double:
// transactions multiplexed on few server connections, named prepared statements across server
// connections (pg and postgres.js), pipelined extended batches, Describe of a statement not yet
// on the server, Close/DEALLOCATE, duplicate names, session-state hygiene, startup parameters,
// the wait queue's 53300, cancellation, a client killed mid-transaction, bad input, invalidation
// and the admin view.
import t from 'tap';
import pg from 'pg';
import postgres from 'postgres';
import WebSocket from 'ws';
import { Client as NeonClient, neonConfig } from '@neondatabase/serverless';
import { createSecureContext } from 'node:tls';
import { createCa, createServerCert } from '../../certs/generate.ts';
import { createLogger } from '../../lib/logger.ts';
import { bind, close, dataRows, describe, errorOf, execute, flush, msg, parse, PoolerControlPlane, query, rawPoolerSession, startAppPostgres, sync, tagOf, typesOf, type RawSession } from '../helpers/pooler.ts';
import { loadProxyConfig, startProxy } from '../../proxy/index.ts';

const EP = 'ep-pool-1';
const POOLER = `${EP}-pooler`;


const { db, admin, secret } = await startAppPostgres(t, 'xenon-pooler-');
const cp = new PoolerControlPlane({ endpoint_id: EP, project_id: 'p', branch_id: 'b', role_secret: secret, allowed_ips: [], connection_rate_limit: null, pool_size: 3 }, db.port);
const ca = createCa();
const cert = createServerCert(ca, '*.localtest.me', [{ dns: '*.localtest.me' }]);
const config = loadProxyConfig({
  XENON_PROXY_PORT: '0',
  XENON_PROXY_METRICS_PORT: '0',
  XENON_PROXY_HTTP_PORT: '0',
  XENON_PROXY_REPORT_INTERVAL_MS: '60000',
  XENON_POOLER_QUERY_WAIT_TIMEOUT_MS: '1500',
  XENON_POOLER_MAX_PREPARED_STATEMENTS: '4',
  XENON_POOLER_ORPHAN_DRAIN_MS: '1000',
  XENON_PROXY_CONNECT_RATE_BURST: '5000',
}, []);
const proxy = await startProxy(config, {
  logger: createLogger({ level: 'warn', service: 'pooler-test', stream: { write: () => {} } }),
  controlPlane: cp,
  secureContext: () => createSecureContext({ cert: cert.certPem, key: cert.keyPem }),
});
t.teardown(() => proxy.close());

const cfg = (o: Partial<pg.ClientConfig> = {}): pg.ClientConfig => ({
  host: '127.0.0.1',
  port: proxy.address.port,
  user: 'app',
  password: 'app-password',
  database: 'app',
  ssl: { ca: ca.certPem, servername: `${POOLER}.localtest.me` },
  ...o,
});
async function client(o: Partial<pg.ClientConfig> = {}): Promise<pg.Client> {
  const c = new pg.Client(cfg(o));
  c.on('error', () => {});
  await c.connect();
  return c;
}
/** Backends of role app in database app (the pool's server connections). */
async function serverPids(): Promise<number[]> {
  const r = await admin.query<{ pid: number }>(`SELECT pid FROM pg_stat_activity WHERE usename = 'app' AND datname = 'app' AND backend_type = 'client backend'`);
  return r.rows.map((x) => x.pid);
}
const stats = () => proxy.pooler.stats().pools.find((p) => p.endpoint === EP && p.database === 'app')!;

{
  const c = await client();
  await c.query('CREATE TABLE items (id int PRIMARY KEY, name text, n int NOT NULL DEFAULT 0)');
  await c.query(`INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 100) g`);
  await c.end();
}

t.test('transactions of many clients share the pool (size 3 from the control plane)', async (t) => {
  const clients = await Promise.all(Array.from({ length: 30 }, () => client()));
  const results = await Promise.all(clients.map(async (c, i) => {
    const out: number[] = [];
    for (let k = 0; k < 5; k++) {
      await c.query('BEGIN');
      const r = await c.query<{ id: number; pid: number }>('SELECT id, pg_backend_pid() AS pid FROM items WHERE id = $1', [((i + k) % 100) + 1]);
      await c.query('COMMIT');
      out.push(r.rows[0]!.id);
    }
    return out;
  }));
  results.forEach((out, i) => t.same(out, [0, 1, 2, 3, 4].map((k) => ((i + k) % 100) + 1)));
  const pids = await serverPids();
  t.ok(pids.length <= 3, `at most 3 server connections (${pids.length})`);
  t.equal(stats().pool_size, 3);
  t.ok(stats().transactions >= 150, 'transactions counted');
  await Promise.all(clients.map((c) => c.end()));
  t.equal(stats().clients.total, 0, 'clients gone from the stats');
});

t.test('named prepared statements (pg) work on whichever server connection a transaction lands', async (t) => {
  const clients = await Promise.all(Array.from({ length: 12 }, () => client()));
  const before = stats().prepares;
  await Promise.all(clients.map(async (c, i) => {
    for (let k = 0; k < 6; k++) {
      const id = ((i * 7 + k) % 100) + 1;
      const r = await c.query<{ name: string }>({ name: 'by-id', text: 'SELECT name FROM items WHERE id = $1', values: [id] });
      t.equal(r.rows[0]?.name, `item ${id}`);
      const r2 = await c.query<{ s: number }>({ name: 'sum', text: 'SELECT $1::int + $2::int AS s', values: [i, k] });
      t.equal(r2.rows[0]?.s, i + k);
    }
  }));
  // Statements are named on the servers by their text: 12 clients share one preparation per server.
  t.ok(stats().prepares - before <= 2 * 3, `at most one Parse per statement and server connection (${stats().prepares - before})`);
  await Promise.all(clients.map((c) => c.end()));
});

t.test('postgres.js with its default prepared statements', async (t) => {
  const sql = postgres({ host: '127.0.0.1', port: proxy.address.port, user: 'app', password: 'app-password', database: 'app', ssl: { ca: ca.certPem, servername: `${POOLER}.localtest.me` }, max: 8, onnotice: () => {} });
  t.teardown(() => sql.end());
  const out = await Promise.all(Array.from({ length: 80 }, async (_, i) => {
    const id = (i % 100) + 1;
    const [row] = await sql<{ name: string }[]>`SELECT name FROM items WHERE id = ${id}`;
    const [row2] = await sql<{ x: number }[]>`SELECT ${i}::int * 2 AS x`;
    return [row?.name, row2?.x];
  }));
  out.forEach(([name, x], i) => {
    t.equal(name, `item ${(i % 100) + 1}`);
    t.equal(x, i * 2);
  });
  await sql.begin(async (tx) => {
    await tx`UPDATE items SET n = n + 1 WHERE id = 1`;
    const [r] = await tx<{ n: number }[]>`SELECT n FROM items WHERE id = 1`;
    t.equal(r?.n, 1);
  });
  t.ok((await serverPids()).length <= 3);
});

t.test('a raw protocol session: pipelining, Describe before Bind, Close, duplicate names, DEALLOCATE', async (t) => {
  const s = await rawSession();
  t.teardown(() => s.socket.destroy());
  // Parse + Describe S + Sync of a named statement.
  s.send(parse('q1', 'SELECT $1::int + 1 AS x'), describe('S', 'q1'), sync());
  t.same(types(await s.until('Z')), ['1', 't', 'T', 'Z']);
  // A pipelined batch of three executions in two Syncs (may land on another server connection).
  s.send(bind('', 'q1', ['41']), execute(), bind('', 'q1', ['1']), execute(), sync(), bind('', 'q1', ['9']), execute(), sync());
  const m = await s.until('Z', 2);
  t.same(types(m), ['2', 'D', 'C', '2', 'D', 'C', 'Z', '2', 'D', 'C', 'Z']);
  t.same(dataRows(m), ['42', '2', '10']);
  // A duplicate name is refused as Postgres refuses it; the batch is skipped up to Sync.
  s.send(parse('q1', 'SELECT 2'), bind('', 'q1', ['1']), execute(), sync());
  const dup = await s.until('Z');
  t.same(types(dup), ['E', 'Z']);
  t.match(errorOf(dup), { C: '42P05', M: 'prepared statement "q1" already exists' });
  // Close, then the name is free again and unknown to Bind (26000 names it).
  s.send(close('S', 'q1'), sync());
  t.same(types(await s.until('Z')), ['3', 'Z']);
  s.send(bind('', 'q1', []), execute(), sync());
  const gone = await s.until('Z');
  t.match(errorOf(gone), { C: '26000', M: 'prepared statement "q1" does not exist' });
  // DEALLOCATE by SQL of a protocol-level statement.
  s.send(parse('Q2', 'SELECT 7'), sync());
  t.same(types(await s.until('Z')), ['1', 'Z']);
  s.send(query('DEALLOCATE "Q2"'));
  const d = await s.until('Z');
  t.same(types(d), ['C', 'Z']);
  t.equal(tagOf(d), 'DEALLOCATE');
  s.send(describe('S', 'Q2'), sync());
  t.match(errorOf(await s.until('Z')), { C: '26000' });
  // Inside a transaction too (the server answers an empty query; we turn it into the tag).
  s.send(parse('q3', 'SELECT 3'), sync(), query('BEGIN'));
  await s.until('Z', 2);
  s.send(query('DEALLOCATE q3'));
  const d2 = await s.until('Z');
  t.equal(tagOf(d2), 'DEALLOCATE');
  t.equal(d2.at(-1)!.body[0], 0x54, 'still in the transaction (T)');
  s.send(query('COMMIT'));
  await s.until('Z');
  // COPY FROM STDIN inside the pooled session.
  s.send(query('CREATE TABLE IF NOT EXISTS cp (x int)'));
  await s.until('Z');
  s.send(query('COPY cp FROM STDIN'));
  t.same(types(await s.until('G')), ['G']);
  s.send(msg(0x64, Buffer.from('1\n2\n3\n')), msg(0x63), query('SELECT count(*) FROM cp'));
  const copied = await s.until('Z', 2);
  t.same(types(copied), ['C', 'Z', 'T', 'D', 'C', 'Z']);
  t.same(dataRows(copied), ['3']);
  // Unnamed statements and an error in the middle of a pipelined batch.
  s.send(parse('', 'SELECT 1/0'), bind('', '', []), execute(), sync(), parse('', 'SELECT 5'), bind('', '', []), execute(), sync());
  const e = await s.until('Z', 2);
  t.same(types(e), ['1', 'E', 'Z', '1', '2', 'D', 'C', 'Z'], 'constant folding fails at Bind; the second batch runs');
  t.match(errorOf(e), { C: '22012' });
});

t.test('more statements than the per-server LRU holds (4): evicted ones are prepared again', async (t) => {
  const c = await client();
  const before = stats().injected_prepares;
  for (let round = 0; round < 3; round++) {
    for (let k = 0; k < 8; k++) {
      const r = await c.query<{ v: number }>({ name: `s${k}`, text: `SELECT ${k}::int + $1::int AS v`, values: [round] });
      t.equal(r.rows[0]?.v, k + round);
    }
  }
  t.ok(stats().injected_prepares - before >= 8, `evicted statements were prepared again before their Bind (${stats().injected_prepares - before})`);
  await c.end();
});

t.test('session state is reset between clients (SET, temp tables, advisory locks)', async (t) => {
  const a = await client();
  const resetsBefore = stats().resets;
  await a.query(`SET search_path = nowhere`);
  await a.query(`CREATE TEMP TABLE mine (x int)`);
  await a.query(`SELECT pg_advisory_lock(42)`);
  // Others never see a's session state.
  const others = await Promise.all(Array.from({ length: 6 }, () => client()));
  for (const o of others) {
    const r = await o.query<{ sp: string; tmp: string | null; locks: string }>(
      `SELECT current_setting('search_path') AS sp, to_regclass('pg_temp.mine')::text AS tmp, (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid())::text AS locks`,
    );
    t.not(r.rows[0]!.sp, 'nowhere');
    t.equal(r.rows[0]!.tmp, null);
    t.equal(r.rows[0]!.locks, '0');
  }
  t.ok(stats().resets > resetsBefore, 'server connections were reset (DISCARD ALL)');
  const locks = await admin.query(`SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND objid = 42`);
  t.equal(locks.rowCount, 0, 'the advisory lock was released by the reset');
  await Promise.all([a, ...others].map((c) => c.end()));
});

t.test('startup parameters follow the client onto every server connection', async (t) => {
  const a = await client({ application_name: 'alpha', options: '-c search_path=public,pg_catalog -c statement_timeout=1234' });
  const b = await client({ application_name: 'beta' });
  for (let i = 0; i < 5; i++) {
    const [ra, rb] = await Promise.all([
      a.query<{ app: string; sp: string; st: string }>(`SELECT current_setting('application_name') AS app, current_setting('search_path') AS sp, current_setting('statement_timeout') AS st`),
      b.query<{ app: string; st: string }>(`SELECT current_setting('application_name') AS app, current_setting('statement_timeout') AS st`),
    ]);
    t.equal(ra.rows[0]!.app, 'alpha');
    t.match(ra.rows[0]!.sp, /^public, ?pg_catalog$/);
    t.equal(ra.rows[0]!.st, '1234ms');
    t.equal(rb.rows[0]!.app, 'beta');
    t.equal(rb.rows[0]!.st, '0', 'a setting of another client does not leak');
  }
  await Promise.all([a.end(), b.end()]);
});

t.test('waiting clients get 53300 after the wait timeout, and the session stays usable', async (t) => {
  const holders = await Promise.all(Array.from({ length: 3 }, () => client()));
  await Promise.all(holders.map((h) => h.query('BEGIN')));
  const w = await client();
  const t0 = performance.now();
  const err = await w.query('SELECT 1').catch((e: { code?: string; message: string }) => e);
  t.equal((err as { code?: string }).code, '53300');
  t.match((err as Error).message, /no server connection of the pool became free within 1500 ms/);
  t.ok(performance.now() - t0 >= 1400);
  await Promise.all(holders.map((h) => h.query('COMMIT')));
  t.equal((await w.query<{ x: number }>('SELECT 1 AS x')).rows[0]!.x, 1, 'the same session works once a server is free');
  await Promise.all([...holders, w].map((c) => c.end()));
});

t.test('cancel reaches the server connection running the query', async (t) => {
  const c = await client();
  const p = c.query('SELECT pg_sleep(20)').catch((e: { code?: string }) => e);
  await new Promise((r) => setTimeout(r, 300));
  const t0 = performance.now();
  const canceller = new pg.Client(cfg());
  // pg's cancel: a new connection with a CancelRequest carrying our key.
  await (c as unknown as { connection: unknown }).connection;
  const cancelled = await new Promise((resolve) => {
    const con = new (pg as unknown as { Connection: new (o: object) => { connect(port: number, host: string): void; on(e: string, f: () => void): void; cancel(pid: number, key: number): void; end(): void } }).Connection({ ssl: { ca: ca.certPem, servername: `${POOLER}.localtest.me` } });
    con.on('connect', () => con.cancel((c as unknown as { processID: number }).processID, (c as unknown as { secretKey: number }).secretKey));
    con.on('sslconnect', () => con.cancel((c as unknown as { processID: number }).processID, (c as unknown as { secretKey: number }).secretKey));
    con.on('end', () => resolve(true));
    con.on('error', () => resolve(false));
    con.connect(proxy.address.port, '127.0.0.1');
  });
  void canceller;
  t.ok(cancelled);
  const err = await p;
  t.equal((err as { code?: string }).code, '57014', 'query cancelled');
  t.ok(performance.now() - t0 < 5_000);
  t.equal((await c.query<{ x: number }>('SELECT 1 AS x')).rows[0]!.x, 1);
  await c.end();
});

t.test('a client killed mid-transaction leaves no lock and no open transaction', async (t) => {
  const c = await client();
  await c.query('BEGIN');
  await c.query('SELECT * FROM items WHERE id = 5 FOR UPDATE');
  const pid = (await c.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid;
  (c as unknown as { connection: { stream: { destroy(): void } } }).connection.stream.destroy();
  let clean = false;
  for (let i = 0; i < 50 && !clean; i++) {
    await new Promise((r) => setTimeout(r, 50));
    const r = await admin.query(`SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND state <> 'idle'`, [pid]);
    const l = await admin.query(`SELECT 1 FROM pg_locks l JOIN pg_class c ON c.oid = l.relation WHERE c.relname = 'items' AND l.pid = $1`, [pid]);
    clean = r.rowCount === 0 && l.rowCount === 0;
  }
  t.ok(clean, 'the server connection was rolled back');
  // And another client can take the row lock at once.
  const o = await client({ statement_timeout: 2000 });
  await o.query('BEGIN');
  await o.query('SELECT * FROM items WHERE id = 5 FOR UPDATE');
  await o.query('ROLLBACK');
  await o.end();
});

t.test('bad input: clean errors, servers reset, others unaffected', async (t) => {
  const bystander = await client();
  await t.test('garbage after a valid startup', async (t) => {
    const s = await rawSession();
    s.socket.write(Buffer.from('this is not a postgres message at all'));
    const m = await s.untilClosed();
    t.match(errorOf(m), { S: 'FATAL', C: '08P01' });
  });
  await t.test('a Sync-less extended batch in a transaction, then disconnect', async (t) => {
    const s = await rawSession();
    s.send(query('BEGIN'));
    await s.until('Z');
    s.send(parse('', 'UPDATE items SET n = n + 100 WHERE id = 7'), bind('', '', []), execute(), flush());
    await s.until('C');
    s.socket.destroy();
    await new Promise((r) => setTimeout(r, 300));
    const r = await bystander.query<{ n: number }>('SELECT n FROM items WHERE id = 7');
    t.equal(r.rows[0]!.n, 0, 'the update was rolled back');
    const busy = await admin.query(`SELECT 1 FROM pg_stat_activity WHERE usename = 'app' AND state LIKE 'idle in transaction%'`);
    t.equal(busy.rowCount, 0, 'no server connection left in a transaction');
  });
  await t.test('an over-long message', async (t) => {
    const s = await rawSession();
    const head = Buffer.alloc(5);
    head[0] = 0x53; // Sync with a 1 MB body: Postgres caps it at 10,000 bytes
    head.writeInt32BE(1_000_004, 1);
    s.socket.write(head);
    const m = await s.untilClosed();
    t.match(errorOf(m), { S: 'FATAL', C: '08P01', M: 'message too large' });
  });
  t.equal((await bystander.query<{ x: number }>('SELECT 41 + 1 AS x')).rows[0]!.x, 42, 'a bystander is unaffected');
  await bystander.end();
});

t.test('COPY in and out through the pooler', async (t) => {
  const c = await client();
  await c.query('CREATE TABLE IF NOT EXISTS copied (x int)');
  const r = await c.query(`COPY (SELECT g FROM generate_series(1, 1000) g) TO STDOUT`);
  t.equal(r.rowCount, 1000);
  await c.query('DROP TABLE copied');
  await c.end();
});

t.test('invalidation closes idle server connections; the next transaction opens new ones', async (t) => {
  const c = await client();
  await c.query('SELECT 1');
  const before = await serverPids();
  t.ok(before.length > 0);
  proxy.pooler.invalidate(EP);
  let closed = false;
  for (let i = 0; i < 40 && !closed; i++) {
    await new Promise((r) => setTimeout(r, 50));
    const now = await serverPids();
    closed = !now.some((p) => before.includes(p));
  }
  t.ok(closed, 'old server connections closed');
  t.equal((await c.query<{ x: number }>('SELECT 2 AS x')).rows[0]!.x, 2);
  await c.end();
});

t.test('WebSocket sessions (@neondatabase/serverless) on a -pooler endpoint', async (t) => {
  neonConfig.webSocketConstructor = WebSocket;
  neonConfig.useSecureWebSocket = false;
  neonConfig.pipelineConnect = 'password';
  neonConfig.wsProxy = `127.0.0.1:${proxy.httpAddress.port}/v2`;
  t.teardown(() => { neonConfig.webSocketConstructor = undefined; });
  const before = stats().transactions;
  const c = new NeonClient(`postgresql://app:app-password@${POOLER}.localtest.me/app`);
  await c.connect();
  const r = await c.query<{ name: string }>('SELECT name FROM items WHERE id = $1', [3]);
  t.equal(r.rows[0]?.name, 'item 3');
  await c.query('BEGIN');
  await c.query('UPDATE items SET n = n WHERE id = 3');
  await c.query('COMMIT');
  t.ok(stats().transactions - before >= 2, 'served by the pool');
  await c.end();
});

t.test('max_client_conn: pooled clients beyond it get 53300 at connect', async (t) => {
  const small = await startProxy(loadProxyConfig({
    XENON_PROXY_PORT: '0', XENON_PROXY_METRICS_PORT: '0', XENON_PROXY_HTTP_PORT: '0', XENON_PROXY_REPORT_INTERVAL_MS: '60000', XENON_POOLER_MAX_CLIENT_CONN: '2',
  }, []), {
    logger: createLogger({ level: 'warn', service: 'pooler-test', stream: { write: () => {} } }),
    controlPlane: cp,
    secureContext: () => createSecureContext({ cert: cert.certPem, key: cert.keyPem }),
  });
  t.teardown(() => small.close());
  const a = await client({ port: small.address.port });
  const b = await client({ port: small.address.port });
  const err = await client({ port: small.address.port }).then(() => null, (e: { code?: string; message: string }) => e);
  t.equal(err?.code, '53300');
  t.match(err?.message, /too many pooled client connections to this proxy \(2\)/);
  // A direct session is not a pooled client.
  const d = await client({ port: small.address.port, ssl: { ca: ca.certPem, servername: `${EP}.localtest.me` } });
  t.equal((await d.query<{ x: number }>('SELECT 1 AS x')).rows[0]!.x, 1);
  await Promise.all([a.end(), b.end(), d.end()]);
  const c = await client({ port: small.address.port });
  await c.end();
  t.pass('room again once clients left');
});

t.test('admin view and metrics', async (t) => {
  const res = await fetch(`${proxy.metricsUrl}/pooler`);
  const body = (await res.json()) as { pools: { endpoint: string; pool_size: number; transactions: number }[] };
  const p = body.pools.find((x) => x.endpoint === EP);
  t.ok(p && p.transactions > 0);
  const text = await (await fetch(`${proxy.metricsUrl}/metrics`)).text();
  t.match(text, /xenon_proxy_pooler_servers\{endpoint="ep-pool-1",state="idle"\} \d+/);
  t.match(text, /xenon_proxy_pooler_transactions_total\{endpoint="ep-pool-1"\} [1-9]/);
  t.match(text, /xenon_proxy_sessions_opened_total\{protocol="tcp",kind="pooler"\} [1-9]/);
});

// ---- a raw protocol client over TLS (test/helpers/pooler.ts)
function rawSession(): Promise<RawSession> {
  return rawPoolerSession({ port: proxy.address.port, ca: ca.certPem, servername: `${POOLER}.localtest.me` });
}
const types = typesOf;
