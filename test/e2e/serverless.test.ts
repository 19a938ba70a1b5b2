// Acceptance (issue 4): the unmodified @neondatabase/serverless driver against the proxy's HTTP
// port, on one stack for the file.
//
// SQL over HTTP: `neon()` and Drizzle's neon-http against POST /sql — tagged templates,
// fullResults, arrayMode, transactions with isolation level and read-only, NeonDbError codes, type
// round trips identical to node-postgres over TCP, TLS, CORS, and hostile requests.
//
// WebSocket: Client, Pool and Drizzle's neon-serverless, with `ws` as the WebSocket constructor —
// a stopped endpoint wakes, parameterised queries, an interactive transaction with rollback, 20
// concurrent queries on a pool, end() returns promptly, pipelined and SCRAM logins, TLS (wss) with
// the endpoint from the Host header or from ?address=, and hostile frames.
import t from 'tap';
import pg from 'pg';
import { readFileSync } from 'node:fs';
import { connect as netConnect } from 'node:net';
import WebSocket from 'ws';
import { Client, neon, neonConfig, NeonDbError, Pool } from '@neondatabase/serverless';
import { sql as dsql } from 'drizzle-orm';
import { drizzle as drizzleHttp } from 'drizzle-orm/neon-http';
import { drizzle as drizzleWs } from 'drizzle-orm/neon-serverless';
import { integer, pgTable, text } from 'drizzle-orm/pg-core';
import { fetchWithCa } from '../helpers/https-fetch.ts';
import { startTestStack, waitFor } from '../helpers/stack.ts';

// One stack for both drivers' tests (they use their own tables: http_items and typed, ws_items).
const stack = await startTestStack(t);

/** `ws` with our CA trusted and, optionally, a Host header naming the endpoint. */
function wsWith(ca: string, host?: string): typeof WebSocket {
  return class extends WebSocket {
    constructor(url: string | URL, protocols?: string | string[]) {
      super(url, protocols, { ca, ...(host ? { headers: { host } } : {}) });
    }
  } as typeof WebSocket;
}

const timed = async <T>(fn: () => Promise<T>): Promise<{ value: T; ms: number }> => {
  const t0 = performance.now();
  const value = await fn();
  return { value, ms: performance.now() - t0 };
};

t.test('@neondatabase/serverless neon() over HTTP', async (t) => {
  const { info } = stack;
  const ca = readFileSync(info.ca_cert, 'utf8');
  const host = `${info.endpoint_id}.localtest.me`;
  const cs = `postgresql://${info.role}:${info.password}@${host}/${info.database}`;
  const url = `http://127.0.0.1:${info.http_port}/sql`;
  // fetchEndpoint and fetchFunction are global settings of the driver.
  neonConfig.fetchEndpoint = url;
  t.teardown(() => { neonConfig.fetchFunction = undefined; });
  const sql = neon(cs);

  await t.test('tagged templates, fullResults, arrayMode', async (t) => {
    const rows = await sql`SELECT ${21}::int * 2 AS v, ${'x'} || 'y' AS s`;
    t.same(rows, [{ v: 42, s: 'xy' }]);
    const full = await sql.query('SELECT generate_series(1, $1::int) AS n', [3], { fullResults: true });
    t.equal(full.command, 'SELECT');
    t.equal(full.rowCount, 3);
    t.same(full.rows, [{ n: 1 }, { n: 2 }, { n: 3 }]);
    t.same(full.fields.map((f) => [f.name, f.dataTypeID]), [['n', 23]]);
    const arr = await sql.query('SELECT 1 AS a, 2 AS b', [], { arrayMode: true });
    t.same(arr, [[1, 2]]);
    await sql`CREATE TABLE IF NOT EXISTS http_items (id int PRIMARY KEY, name text)`;
    const ins = await sql.query('INSERT INTO http_items VALUES ($1, $2), ($3, $4)', [1, 'a', 2, 'b'], { fullResults: true });
    t.match(ins, { command: 'INSERT', rowCount: 2 });
  });

  await t.test('sql.transaction: one transaction, isolation level and read-only', async (t) => {
    const [a, b] = await sql.transaction([
      sql`INSERT INTO http_items VALUES (3, 'c')`,
      sql`SELECT count(*)::int AS n, current_setting('transaction_isolation') AS iso FROM http_items`,
    ], { isolationLevel: 'Serializable' });
    t.same(a, []);
    t.same(b, [{ n: 3, iso: 'serializable' }]);
    const ro = await sql.transaction([sql`SELECT current_setting('transaction_read_only') AS ro`], { readOnly: true, isolationLevel: 'RepeatableRead' });
    t.same(ro, [[{ ro: 'on' }]]);
    await t.rejects(sql.transaction([sql`INSERT INTO http_items VALUES (4, 'd')`], { readOnly: true }), { code: '25006' }, 'a write in a read-only transaction');
    await t.rejects(sql.transaction([sql`INSERT INTO http_items VALUES (5, 'e')`, sql`SELECT 1/0`]), { code: '22012' });
    const n = await sql`SELECT count(*)::int AS n FROM http_items WHERE id IN (4, 5)`;
    t.same(n, [{ n: 0 }], 'failed transactions left nothing behind');
  });

  await t.test('errors surface as NeonDbError with their SQLSTATE', async (t) => {
    try {
      await sql`SELECT * FROM no_such_table`;
      t.fail('no error');
    } catch (err) {
      t.ok(err instanceof NeonDbError, 'NeonDbError');
      t.match(err, { code: '42P01', message: /relation "no_such_table" does not exist/, position: '15' });
    }
    const wrong = neon(`postgresql://${info.role}:wrong-password@${host}/${info.database}`);
    await t.rejects(wrong`SELECT 1`, { code: '28P01', message: /password authentication failed for user/ });
    const ghost = neon(`postgresql://${info.role}:${info.password}@ep-no-such-endpoint-1.localtest.me/${info.database}`);
    await t.rejects(ghost`SELECT 1`, { code: '28P01' }, 'an unknown endpoint looks like a wrong password');
    const nodb = neon(`postgresql://${info.role}:${info.password}@${host}/no_such_db`);
    await t.rejects(nodb`SELECT 1`, { code: '3D000' });
  });

  await t.test('type round trips match node-postgres over TCP', async (t) => {
    await sql`CREATE TABLE IF NOT EXISTS typed (
      i2 int2, i4 int4, i8 int8, num numeric, b bool, tx text, by bytea, j json, jb jsonb, ts timestamptz,
      ia int4[], ta text[], n text, f8 float8, d date)`;
    await sql`INSERT INTO typed VALUES (-32768, 2147483647, 9223372036854775807, 12345678901234567890.000000001, true, 'tab	"quote" \\back',
      '\\x00ff10'::bytea, '{"a":[1,2,{"b":null}]}', '{"z":1,"a":"é"}', '2024-02-29 23:59:59.123456+05:30', '{1,NULL,3}', '{"a b","c,d",NULL,"\\""}', NULL, 'NaN', '2024-01-02')`;
    const viaHttp = await sql`SELECT * FROM typed`;
    const c = new pg.Client(stack.pgConfig());
    await c.connect();
    const viaTcp = (await c.query('SELECT * FROM typed')).rows;
    await c.end();
    t.same(viaHttp, viaTcp, 'the same JavaScript values as pg over TCP');
    t.type(viaHttp[0]!.by, Buffer);
    t.type(viaHttp[0]!.ts, Date);
    t.equal(viaHttp[0]!.i8, '9223372036854775807', 'int8 stays a string');
    // Parameters of every kind round-trip too.
    const params = await sql`SELECT ${null}::text AS n, ${'é"\\'}::text AS s, ${[1, null, 3]}::int[] AS a, ${{ k: [1, 'x'] }}::jsonb AS o, ${true}::bool AS b, ${Buffer.from([0, 255])} AS by, ${new Date('2024-01-02T03:04:05.678Z')}::timestamptz AS ts`;
    t.same(params, [{ n: null, s: 'é"\\', a: [1, null, 3], o: { k: [1, 'x'] }, b: true, by: Buffer.from([0, 255]), ts: new Date('2024-01-02T03:04:05.678Z') }]);
  });

  await t.test('Drizzle ORM through drizzle-orm/neon-http', async (t) => {
    const db = drizzleHttp({ client: sql });
    const items = pgTable('http_items', { id: integer('id').primaryKey(), name: text('name') });
    await db.insert(items).values({ id: 20, name: 'twenty' });
    const rows = await db.select().from(items).orderBy(items.id);
    t.same(rows.map((r) => r.id), [1, 2, 3, 20]);
    const [one] = await db.select({ name: items.name }).from(items).limit(1);
    t.same(one, { name: 'a' });
  });

  await t.test('TLS on the same port; CORS preflight', async (t) => {
    neonConfig.fetchEndpoint = `https://127.0.0.1:${info.http_port}/sql`;
    neonConfig.fetchFunction = fetchWithCa(ca);
    try {
      t.same(await sql`SELECT 'over tls' AS v`, [{ v: 'over tls' }]);
    } finally {
      neonConfig.fetchEndpoint = url;
      neonConfig.fetchFunction = undefined;
    }
    const pre = await fetch(url, { method: 'OPTIONS', headers: { origin: 'https://app.example', 'access-control-request-method': 'POST', 'access-control-request-headers': 'neon-connection-string' } });
    t.equal(pre.status, 204);
    t.equal(pre.headers.get('access-control-allow-origin'), '*');
    t.match(pre.headers.get('access-control-allow-headers') ?? '', /Neon-Connection-String/);
  });

  await t.test('bad requests: clear errors, nothing else disturbed', async (t) => {
    const post = (body: string, headers: Record<string, string> = { 'Neon-Connection-String': cs }) => fetch(url, { method: 'POST', body, headers });
    const nonJson = await post('not json');
    t.equal(nonJson.status, 400);
    t.match(await nonJson.json(), { message: /JSON/i });
    const noCs = await post(JSON.stringify({ query: 'SELECT 1', params: [] }), {});
    t.equal(noCs.status, 400);
    t.match(await noCs.json(), { message: /Neon-Connection-String/ });
    const badCs = await post(JSON.stringify({ query: 'SELECT 1', params: [] }), { 'Neon-Connection-String': 'not a url' });
    t.equal(badCs.status, 400);
    const huge = await post(JSON.stringify({ query: 'SELECT $1::text', params: ['x'.repeat(11 * 1024 * 1024)] }));
    t.equal(huge.status, 413, 'oversized body');
    const noQuery = await post(JSON.stringify({ params: [] }));
    t.equal(noQuery.status, 400);
    t.same(await sql`SELECT 'still fine' AS v`, [{ v: 'still fine' }]);
  });
});

t.test('@neondatabase/serverless over WebSocket', async (t) => {
  const { info } = stack;
  const ca = readFileSync(info.ca_cert, 'utf8');
  const host = `${info.endpoint_id}.localtest.me`;
  const cs = `postgresql://${info.role}:${info.password}@${host}/${info.database}`;
  const port = info.http_port;
  t.teardown(() => {
    neonConfig.webSocketConstructor = undefined;
  });

  await t.test('a stopped endpoint wakes; queries, a rolled-back transaction, end() promptly (wss, endpoint from ?address=)', async (t) => {
    await stack.api.endpointAction(info.endpoint_id, 'stop');
    t.equal((await stack.api.getEndpoint(info.endpoint_id)).endpoint.state, 'stopped');
    neonConfig.webSocketConstructor = wsWith(ca);
    neonConfig.useSecureWebSocket = true;
    neonConfig.pipelineConnect = 'password';
    neonConfig.wsProxy = `127.0.0.1:${port}/v2`;
    const client = new Client(cs);
    // With pipelining, connect() resolves at once: the first query's answer is the proof.
    const first = await timed(async () => {
      await client.connect();
      return client.query<{ v: number; s: string }>('SELECT $1::int * 2 AS v, $2::text AS s', [21, 'ünïcode']);
    });
    t.comment(`cold connect + first query over wss: ${Math.round(first.ms)} ms`);
    t.same(first.value.rows, [{ v: 42, s: 'ünïcode' }], 'parameterised query');
    t.equal((await stack.api.getEndpoint(info.endpoint_id)).endpoint.state, 'active', 'the endpoint woke');
    await client.query('CREATE TABLE IF NOT EXISTS ws_items (id int PRIMARY KEY, name text)');
    await client.query('BEGIN');
    await client.query('INSERT INTO ws_items VALUES ($1, $2)', [1, 'kept?']);
    const inside = await client.query<{ n: number }>('SELECT count(*)::int AS n FROM ws_items');
    t.equal(inside.rows[0]!.n, 1, 'visible inside the transaction');
    await client.query('ROLLBACK');
    const after = await client.query<{ n: number }>('SELECT count(*)::int AS n FROM ws_items');
    t.equal(after.rows[0]!.n, 0, 'gone after ROLLBACK');
    await t.rejects(client.query('SELECT 1/0'), { code: '22012' }, 'errors keep their SQLSTATE');
    t.same((await client.query('SELECT 1 AS one')).rows, [{ one: 1 }], 'the session survives an error');
    const ended = await timed(() => client.end());
    t.ok(ended.ms < 1_000, `client.end() returns promptly (${Math.round(ended.ms)} ms)`);
  });

  await t.test('a Pool: 20 concurrent queries, then end()', async (t) => {
    neonConfig.webSocketConstructor = wsWith(ca);
    neonConfig.wsProxy = `127.0.0.1:${port}/v2`;
    const pool = new Pool({ connectionString: cs, max: 5 });
    const results = await Promise.all(Array.from({ length: 20 }, (_, i) => pool.query<{ i: number; b: number }>('SELECT $1::int AS i, pg_backend_pid() AS b', [i])));
    t.same(results.map((r) => r.rows[0]!.i), Array.from({ length: 20 }, (_, i) => i), 'every query answered, in order');
    const backends = new Set(results.map((r) => r.rows[0]!.b));
    t.ok(backends.size > 1 && backends.size <= 5, `spread over the pool's connections (${backends.size})`);
    const ended = await timed(() => pool.end());
    t.ok(ended.ms < 1_000, `pool.end() returns promptly (${Math.round(ended.ms)} ms)`);
    t.ok(await waitFor(async () => (await stack.api.getEndpoint(info.endpoint_id)).endpoint.connections === 0, 5_000, 100), 'the proxy reports the connections gone');
  });

  await t.test('endpoint from the Host header (the driver default <host>/v2), plain ws from loopback, SCRAM without pipelining', async (t) => {
    for (const [pipelineConnect, coalesceWrites] of [['password', true], ['password', false], [false, true]] as const) {
      // coalesceWrites off: the pipelined password arrives in its own frame right behind the StartupMessage.
      neonConfig.pipelineConnect = pipelineConnect;
      neonConfig.coalesceWrites = coalesceWrites;
      neonConfig.useSecureWebSocket = false;
      neonConfig.webSocketConstructor = wsWith(ca, `${host}:${port}`);
      neonConfig.wsProxy = () => `127.0.0.1:${port}/v2`;
      const c = new Client(cs);
      await c.connect();
      const r = await c.query<{ u: string }>('SELECT current_user AS u');
      t.equal(r.rows[0]!.u, info.role, `pipelineConnect=${String(pipelineConnect)} coalesceWrites=${coalesceWrites}`);
      await c.end();
    }
    neonConfig.coalesceWrites = true;
    const metrics = await (await fetch(`${info.metrics_url}/metrics`)).text();
    t.match(metrics, /xenon_proxy_authentications_total\{method="password",outcome="ok"\} [1-9]/, 'pipelined logins use the cleartext password');
    t.match(metrics, /xenon_proxy_authentications_total\{method="scram",outcome="ok"\} [1-9]/, 'non-pipelined logins use SCRAM');
    t.match(metrics, /xenon_proxy_sessions_opened_total\{protocol="ws",kind="direct"\} [1-9]/, 'WebSocket sessions are counted');
    neonConfig.pipelineConnect = 'password';
  });

  await t.test('wrong password and unknown endpoint: 28P01, nothing woken', async (t) => {
    neonConfig.useSecureWebSocket = true;
    neonConfig.webSocketConstructor = wsWith(ca);
    neonConfig.wsProxy = `127.0.0.1:${port}/v2`;
    // A pipelined login learns of the failure after connect() resolved: the 28P01 arrives as the
    // client's 'error' event or as the first query's rejection, depending on timing.
    for (const [what, url] of [
      ['wrong password', `postgresql://${info.role}:wrong-password@${host}/${info.database}`],
      ['unknown endpoint', `postgresql://${info.role}:${info.password}@ep-no-such-endpoint-1.localtest.me/${info.database}`],
    ] as const) {
      const c = new Client(url);
      const errors: { code?: string; message: string }[] = [];
      c.on('error', (err: Error & { code?: string }) => errors.push(err));
      await c.connect().then(() => c.query('SELECT 1')).catch((err: Error & { code?: string }) => errors.push(err));
      t.ok(errors.some((e) => e.code === '28P01' && /password authentication failed for user/.test(e.message)), `${what}: 28P01 (${errors.map((e) => e.code ?? e.message).join(', ')})`);
    }
  });

  await t.test('Drizzle ORM through drizzle-orm/neon-serverless', async (t) => {
    neonConfig.webSocketConstructor = wsWith(ca);
    neonConfig.wsProxy = `127.0.0.1:${port}/v2`;
    const pool = new Pool({ connectionString: cs });
    const db = drizzleWs({ client: pool });
    const items = pgTable('ws_items', { id: integer('id').primaryKey(), name: text('name') });
    await db.insert(items).values([{ id: 10, name: 'ten' }, { id: 11, name: 'eleven' }]);
    const rows = await db.select().from(items).where(dsql`${items.id} >= ${10}`).orderBy(items.id);
    t.same(rows, [{ id: 10, name: 'ten' }, { id: 11, name: 'eleven' }]);
    await t.rejects(db.transaction(async (tx) => {
      await tx.insert(items).values({ id: 12, name: 'rolled back' });
      throw new Error('abort');
    }), /abort/);
    const n = await db.execute(dsql`SELECT count(*)::int AS n FROM ws_items WHERE id = 12`);
    t.same(n.rows, [{ n: 0 }], 'a failed Drizzle transaction rolls back');
    await pool.end();
  });

  await t.test('hostile WebSocket input: text frames, garbage, oversized startup; others unaffected', async (t) => {
    const open = (): Promise<WebSocket> =>
      new Promise((resolve, reject) => {
        const ws = new WebSocket(`ws://127.0.0.1:${port}/v2?address=${host}:5432`);
        ws.once('open', () => resolve(ws));
        ws.once('error', reject);
      });
    const closed = (ws: WebSocket) =>
      new Promise<{ code: number; reason: string; data: Buffer }>((resolve) => {
        const chunks: Buffer[] = [];
        ws.on('message', (d: Buffer) => chunks.push(Buffer.from(d)));
        ws.once('close', (code, reason) => resolve({ code, reason: reason.toString(), data: Buffer.concat(chunks) }));
      });
    const healthy = new Pool({ connectionString: cs, max: 1 });
    neonConfig.webSocketConstructor = wsWith(ca);
    neonConfig.wsProxy = `127.0.0.1:${port}/v2`;
    t.same((await healthy.query('SELECT 1 AS x')).rows, [{ x: 1 }]);

    const text = await open();
    const textClosed = closed(text);
    text.send('SELECT 1');
    const tc = await textClosed;
    t.equal(tc.code, 1003, 'a text frame closes with 1003 (unsupported data)');
    t.match(tc.reason, /binary frames/);

    const garbage = await open();
    const gClosed = closed(garbage);
    garbage.send(Buffer.from('GET / HTTP/1.1\r\n\r\n'));
    const g = await gClosed;
    t.equal(String.fromCharCode(g.data[0] ?? 0), 'E', 'garbage instead of a startup packet gets an ErrorResponse');
    t.match(g.data.toString('latin1'), /C08P01/);

    const big = await open();
    const bClosed = closed(big);
    const hdr = Buffer.alloc(8);
    hdr.writeInt32BE(100_000, 0);
    hdr.writeInt32BE(196608, 4);
    big.send(hdr);
    t.match((await bClosed).data.toString('latin1'), /startup packet too large/);

    // A path new URL() cannot parse ('//', '//[') must not take the proxy down.
    for (const path of ['//', '//[', '//a:b@']) {
      const odd = await new Promise<string>((resolve) => {
        // A WebSocket client would normalise the URL: write the request line through a raw socket.
        const s = netConnect(port, '127.0.0.1', () => s.write(`GET ${path} HTTP/1.1\r\nHost: ${host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n`));
        let got = '';
        s.on('data', (d: Buffer) => { got += d.toString('latin1'); if (got.includes('\r\n\r\n')) s.destroy(); });
        s.on('close', () => resolve(got));
        s.on('error', () => resolve(got));
      });
      t.match(odd, /^HTTP\/1\.1 101 /, `upgrade on ${JSON.stringify(path)} is served`);
    }
    const notFound = await fetch(`http://127.0.0.1:${port}/nope`);
    t.equal(notFound.status, 404);
    t.match(await notFound.text(), /WebSocket upgrades are accepted on any path/);

    t.same((await healthy.query('SELECT 2 AS x')).rows, [{ x: 2 }], 'the healthy client never noticed');
    await healthy.end();
  });
});
