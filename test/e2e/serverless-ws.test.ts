// Acceptance (issue 4, WebSocket): the unmodified @neondatabase/serverless driver — Client, Pool
// and Drizzle's neon-serverless — over the proxy's HTTP port, with `ws` as the WebSocket
// constructor: a stopped endpoint wakes, parameterised queries, an interactive transaction with
// rollback, 20 concurrent queries on a pool, end() returns promptly, pipelined and SCRAM logins,
// TLS (wss) with the endpoint from the Host header or from ?address=, and hostile frames.
import t from 'tap';
import { readFileSync } from 'node:fs';
import { connect as netConnect } from 'node:net';
import WebSocket from 'ws';
import { Client, Pool, neonConfig } from '@neondatabase/serverless';
import { drizzle } from 'drizzle-orm/neon-serverless';
import { sql as dsql } from 'drizzle-orm';
import { integer, pgTable, text } from 'drizzle-orm/pg-core';
import { startTestStack, waitFor, type TestStack } from '../helpers/stack.ts';

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

t.test('@neondatabase/serverless over WebSocket', async (t) => {
  const stack: TestStack = await startTestStack(t);
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
    const db = drizzle({ client: pool });
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
