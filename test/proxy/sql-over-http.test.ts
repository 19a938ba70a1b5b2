// SQL over HTTP (`POST /sql`) in-process against a real Postgres compute, with a small scripted
// control-plane double and a plain HTTP server calling the handler: result shapes (raw text,
// array/object mode, JSON-native values), batches in one transaction with the isolation headers,
// Postgres and proxy errors as 400 JSON, 413/507 limits, parameters of every kind, the pool
// (reuse, reset, invalidation, waiting), client disconnects cancelling the query, metrics, logs,
// and the unmodified @neondatabase/serverless driver end to end.
import t from 'tap';
import pg from 'pg';
import { createServer, request, type IncomingHttpHeaders, type Server } from 'node:http';
import { connect as netConnect, createServer as createNetServer, type AddressInfo, type Socket } from 'node:net';
import { Registry } from 'prom-client';
import { neon, neonConfig, NeonDbError } from '@neondatabase/serverless';
import { createLogger } from '../../lib/logger.ts';
import { findFreePort } from '../../lib/postgres.ts';
import { PasswordVerifier } from '../../proxy/auth/access.ts';
import { loadProxyConfig } from '../../proxy/config.ts';
import { ConnectionTracker } from '../../proxy/connections.ts';
import { CachedControlPlane } from '../../proxy/control-plane.ts';
import { createProxyMetrics } from '../../proxy/metrics.ts';
import { KeyedLeakyBucket } from '../../proxy/rate-limit.ts';
import { SqlOverHttp } from '../../proxy/serverless/sql-over-http.ts';
import { arrayLiteral, lenientDecode, parseConnectionString } from '../../proxy/serverless/sql-request.ts';
import type { ComputeInfo, ControlPlaneApi, EndpointAccess } from '../../wake-compute/api.ts';
import { startTestPostgres } from '../helpers/postgres.ts';

const EP = 'ep-sql-1';
const EP_LOCKED = 'ep-locked-2';
const PASSWORD = 'app-password';
const PCT_PASSWORD = 'p@ss:w/rd?#% é';
// What the driver writes for PCT_PASSWORD (its URL serialisation leaves a raw % alone).
const PCT_IN_URL = 'p%40ss%3Aw%2Frd%3F%23%%20%C3%A9';

class ScriptedControlPlane implements ControlPlaneApi {
  wakes = 0;
  /** Ports to answer wakes with, in order (then the last one again). */
  ports: number[] = [];
  ttlMs = 60_000;
  constructor(private readonly secrets: Record<string, string>, private readonly allowed: Record<string, string[]>) {}
  async getEndpointAccess(endpoint: string, role: string): Promise<EndpointAccess | null> {
    if (!(endpoint in this.allowed)) return null;
    return { endpoint_id: endpoint, project_id: 'p', branch_id: 'b', role_secret: this.secrets[role] ?? null, allowed_ips: this.allowed[endpoint]!, connection_rate_limit: null };
  }
  async wakeCompute(endpoint: string): Promise<ComputeInfo> {
    const port = this.ports[Math.min(this.wakes, this.ports.length - 1)]!;
    this.wakes++;
    return { endpoint_id: endpoint, host: '127.0.0.1', port, cold: this.wakes === 1, cache_ttl_ms: this.ttlMs };
  }
  async reportConnections() {
    return { ok: true as const, invalidate: [], invalidate_access: [] };
  }
}

const delay = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

t.test('SQL over HTTP', async (t) => {
  const db = await startTestPostgres(t, 'xenon-sql-http-');
  const port = db.port;
  const admin = new pg.Client(db.admin());
  await admin.connect();
  t.teardown(() => admin.end());
  await admin.query(`CREATE ROLE app LOGIN PASSWORD '${PASSWORD}'`);
  await admin.query(`CREATE ROLE pct LOGIN PASSWORD '${PCT_PASSWORD}'`);
  await admin.query('CREATE TABLE items (id int PRIMARY KEY, name text)');
  await admin.query('GRANT ALL ON items TO app');
  await admin.query('CREATE SCHEMA other AUTHORIZATION app');
  const secretOf = async (role: string): Promise<string> =>
    (await admin.query<{ s: string }>('SELECT rolpassword AS s FROM pg_authid WHERE rolname = $1', [role])).rows[0]!.s;

  const api = new ScriptedControlPlane({ app: await secretOf('app'), pct: await secretOf('pct') }, { [EP]: [], [EP_LOCKED]: ['10.9.9.9'] });
  api.ports = [port];
  const config = loadProxyConfig({
    XENON_SQL_MAX_REQUEST_BYTES: '65536',
    XENON_SQL_MAX_RESPONSE_BYTES: '65536',
    XENON_SQL_POOL_MAX: '3',
    XENON_SQL_POOL_IDLE_MS: '60000',
    XENON_SQL_QUERY_TIMEOUT_MS: '30000',
    XENON_PROXY_FAILED_AUTH_BURST: '1000',
    XENON_PROXY_COMPUTE_CONNECT_TIMEOUT_MS: '1000',
  }, []);
  const cp = new CachedControlPlane(api, { accessTtlMs: 60_000, negativeTtlMs: 60_000, maxWakeCacheMs: 60_000 });
  const logLines: string[] = [];
  const logger = createLogger({ level: 'debug', service: 'proxy-test', stream: { write: (l: string) => logLines.push(l) } });
  const tracker = new ConnectionTracker(api, { proxyId: 'test', intervalMs: 60_000, logger });
  const metrics = createProxyMetrics(new Registry());
  const sql = new SqlOverHttp({
    config,
    cp,
    tracker,
    limits: {
      connect: new KeyedLeakyBucket(config.connectRate),
      failedAuth: new KeyedLeakyBucket(config.failedAuthRate),
      cancel: new KeyedLeakyBucket(config.cancelRate),
      pendingAuth: new Map(),
    },
    metrics,
    passwords: new PasswordVerifier(),
    logger,
  }, { acquireTimeoutMs: 1000 });
  const server: Server = createServer((req, res) => {
    sql.handle(req, res, '127.0.0.1').catch((err: Error) => {
      res.writeHead(500);
      res.end(String(err));
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  t.teardown(async () => {
    await sql.close();
    server.closeAllConnections();
    await new Promise((r) => server.close(r));
  });
  const httpPort = (server.address() as AddressInfo).port;
  const url = `http://127.0.0.1:${httpPort}/sql`;
  const connStr = (user = 'app', pw = PASSWORD, ep = EP, db = 'postgres'): string => `postgresql://${user}:${pw}@${ep}.localtest.me/${db}`;
  const RAW = { 'Neon-Raw-Text-Output': 'true', 'Neon-Array-Mode': 'true' };

  interface Reply { status: number; body: any; headers: Headers }
  const post = async (body: unknown, headers: Record<string, string> = RAW, cs: string | null = connStr()): Promise<Reply> => {
    const h: Record<string, string> = { ...headers };
    if (cs !== null) h['Neon-Connection-String'] = cs;
    const r = await fetch(url, { method: 'POST', headers: h, body: typeof body === 'string' ? body : JSON.stringify(body) });
    const text = await r.text();
    let parsed: unknown = text;
    try { parsed = JSON.parse(text); } catch { /* not JSON */ }
    return { status: r.status, body: parsed, headers: r.headers };
  };
  const one = async (query: string, params: unknown[] = [], headers: Record<string, string> = RAW): Promise<Reply> => post({ query, params }, headers);
  // A request arriving while the previous one's connection still runs DISCARD ALL gets another
  // connection (the pool does not make it wait for the reset): to see reuse, let resets finish.
  const settled = async (): Promise<void> => {
    for (let i = 0; i < 200 && sql.poolStats.busy > 0; i++) await delay(5);
  };
  const pidOf = async (): Promise<string> => {
    await settled();
    const r = await one('SELECT pg_backend_pid()::text AS pid');
    return r.body.rows[0][0] as string;
  };
  const sqlBackends = async (): Promise<{ pid: number; state: string; query: string; usename: string }[]> =>
    (await admin.query(`SELECT pid, state, query, usename FROM pg_stat_activity WHERE application_name = 'xenon-sql-over-http'`)).rows;

  await t.test('single query: raw text output, array mode', async (t) => {
    const r = await one(`SELECT 1::int AS a, 'x'::text AS b, NULL::int AS c, true AS d, '{"k": [1, 2]}'::jsonb AS j, 12345678901234::int8 AS big, 1.50::numeric AS n, '2024-01-02 03:04:05+00'::timestamptz AS ts`);
    t.equal(r.status, 200);
    t.equal(r.headers.get('access-control-allow-origin'), '*');
    t.match(r.headers.get('content-type'), /application\/json/);
    t.same(r.body.rows, [['1', 'x', null, 't', '{"k": [1, 2]}', '12345678901234', '1.50', '2024-01-02 03:04:05+00']]);
    t.same(r.body.fields.map((f: { name: string }) => f.name), ['a', 'b', 'c', 'd', 'j', 'big', 'n', 'ts']);
    t.same(r.body.fields.map((f: { dataTypeID: number }) => f.dataTypeID), [23, 25, 23, 16, 3802, 20, 1700, 1184]);
    t.same(Object.keys(r.body.fields[0]), ['name', 'dataTypeID', 'tableID', 'columnID', 'dataTypeSize', 'dataTypeModifier', 'format']);
    t.match(r.body.fields[0], { tableID: 0, columnID: 0, dataTypeSize: 4, dataTypeModifier: -1, format: 'text' });
    t.equal(r.body.command, 'SELECT');
    t.equal(r.body.rowCount, 1);
    t.equal(r.body.rowAsArray, true);

    const ddl = await one('CREATE TEMP TABLE tt (x int)');
    t.equal(ddl.status, 200);
    t.same(ddl.body.fields, [], 'fields is an array even without rows');
    t.same(ddl.body.rows, []);
    t.equal(ddl.body.command, 'CREATE');
    t.equal(ddl.body.rowCount, null);

    const ins = await one('INSERT INTO items VALUES (1, $1), (2, $2)', ['one', 'two']);
    t.equal(ins.body.command, 'INSERT');
    t.equal(ins.body.rowCount, 2, 'INSERT 0 2: the count, not the oid');
    const del = await one('DELETE FROM items');
    t.match(del.body, { command: 'DELETE', rowCount: 2 });
    const table = await one('SELECT id, name FROM items');
    t.equal(table.body.fields[0].tableID > 0, true, 'tableID of a real column');
    t.equal(table.body.fields[0].columnID, 1);
  });

  await t.test('object mode and JSON-native values', async (t) => {
    const obj = await one(`SELECT 1 AS x, 'a' AS y, 2 AS x`, [], { 'Neon-Raw-Text-Output': 'true' });
    t.equal(obj.status, 200);
    t.same(obj.body.rows, [{ x: '2', y: 'a' }], 'objects keyed by name; a later duplicate wins');
    t.equal(obj.body.rowAsArray, false);

    const native = await one(
      `SELECT true AS b, false AS f, 7::int2 AS i2, 42 AS i4, 26::oid AS o, 1.5::float4 AS f4, 2.25::float8 AS f8,
              'NaN'::float8 AS nan, 'Infinity'::float8 AS inf, 9007199254740993::int8 AS i8, 1.50::numeric AS n,
              '{"a": [1, null]}'::jsonb AS jb, '[1, "x"]'::json AS js, '2024-01-02'::date AS d, ARRAY[1, 2] AS arr,
              '\\x0102'::bytea AS by, NULL::int AS nul`,
      [],
      {},
    );
    t.equal(native.status, 200);
    t.same(native.body.rows, [{
      b: true, f: false, i2: 7, i4: 42, o: 26, f4: 1.5, f8: 2.25, nan: 'NaN', inf: 'Infinity', i8: '9007199254740993', n: '1.50',
      jb: { a: [1, null] }, js: [1, 'x'], d: '2024-01-02', arr: '{1,2}', by: '\\x0102', nul: null,
    }]);
    const nativeArray = await one('SELECT 1 AS a, true AS b', [], { 'Neon-Array-Mode': 'true' });
    t.same(nativeArray.body.rows, [[1, true]]);
  });

  await t.test('parameters of every kind', async (t) => {
    const arr = ['a"b', 'c\\d', null, 'NULL', '', 'x,y', '{z}', ' s '];
    const r = await one(
      `SELECT $1::text IS NULL AS is_null, $2::text AS s, $3::int AS i, $4::float8 AS f, $5::bool AS b, $6::jsonb AS o,
              $7::text[] IS NOT DISTINCT FROM ARRAY['a"b', E'c\\\\d', NULL, 'NULL', '', 'x,y', '{z}', ' s ']::text[] AS arr_ok,
              $8::int[] AS nested, $9::text AS unicode, $10::text AS numtext, $11::int AS strnum, $12::jsonb[] AS objs`,
      [null, 'str', 42, 1.5, true, { a: [1, 'x'], b: null }, arr, [[1, 2], [3, null]], 'é€😀', 10, '11', [{ k: 'v"' }, null]],
    );
    t.equal(r.status, 200, JSON.stringify(r.body));
    t.same(r.body.rows, [['t', 'str', '42', '1.5', 't', '{"a": [1, "x"], "b": null}', 't', '{{1,2},{3,NULL}}', 'é€😀', '10', '11', '{"{\\"k\\": \\"v\\\\\\"\\"}",NULL}']]);
    const back = await one('SELECT ($1::text[])[1] AS first, ($1::text[])[3] IS NULL AS third_null, array_length($1::text[], 1) AS n', [arr]);
    t.same(back.body.rows, [['a"b', 't', '8']]);
    // Strings as the driver sends them (already serialised client-side) are used as they are.
    const driverStyle = await one('SELECT $1::int[] AS a, $2::bytea AS b', ['{"1","2",NULL}', '\\x0102']);
    t.same(driverStyle.body.rows, [['{1,2,NULL}', '\\x0102']]);
    t.equal(arrayLiteral([['a', null], ['"', '\\']]), '{{"a",NULL},{"\\"","\\\\"}}');
    t.equal(lenientDecode(PCT_IN_URL), PCT_PASSWORD);
    t.equal(lenientDecode('100%'), '100%');
  });

  await t.test('connection strings: lenient parsing', async (t) => {
    t.match(parseConnectionString(`postgresql://app:${PCT_IN_URL}@ep-a-1.localtest.me:5432/neondb?sslmode=require&application_name=pkg%3Anpm`), {
      endpoint: 'ep-a-1', user: 'app', database: 'neondb', passwords: [PCT_PASSWORD, PCT_IN_URL],
    });
    t.match(parseConnectionString('postgres://u@EP-B-pooler.example.com/d%20b'), { endpoint: 'ep-b', user: 'u', database: 'd b', passwords: [''] });
    const r = await post({ query: 'SELECT current_user' }, RAW, connStr('pct', PCT_IN_URL));
    t.equal(r.status, 200, 'a password with an unescaped % authenticates');
    t.same(r.body.rows, [['pct']]);
  });

  await t.test('batches: one transaction with the isolation headers', async (t) => {
    const ok = await post({ queries: [
      { query: 'INSERT INTO items VALUES ($1, $2)', params: [10, 'ten'] },
      { query: 'INSERT INTO items VALUES ($1, $2) RETURNING id', params: [11, 'eleven'] },
      { query: 'SELECT current_setting($1) AS iso, current_setting($2) AS ro, current_setting($3) AS d', params: ['transaction_isolation', 'transaction_read_only', 'transaction_deferrable'] },
    ] }, { ...RAW, 'Neon-Batch-Isolation-Level': 'RepeatableRead' });
    t.equal(ok.status, 200, JSON.stringify(ok.body));
    t.equal(ok.body.results.length, 3);
    t.match(ok.body.results[0], { command: 'INSERT', rowCount: 1, rows: [] });
    t.same(ok.body.results[1].rows, [['11']]);
    t.same(ok.body.results[2].rows, [['repeatable read', 'off', 'off']]);

    const ro = await post({ queries: [
      { query: 'SELECT current_setting($1) AS iso, current_setting($2) AS ro, current_setting($3) AS d', params: ['transaction_isolation', 'transaction_read_only', 'transaction_deferrable'] },
    ] }, { ...RAW, 'Neon-Batch-Isolation-Level': 'Serializable', 'Neon-Batch-Read-Only': 'true', 'Neon-Batch-Deferrable': 'true' });
    t.same(ro.body.results[0].rows, [['serializable', 'on', 'on']]);

    const before = await pidOf();
    const write = await post({ queries: [
      { query: 'SELECT 1' },
      { query: 'INSERT INTO items VALUES (12, $1)', params: ['twelve'] },
    ] }, { ...RAW, 'Neon-Batch-Read-Only': 'true' });
    t.equal(write.status, 400);
    t.equal(write.body.code, '25006', write.body.message);
    t.match(write.body.message, /read-only transaction/);

    const partial = await post({ queries: [
      { query: 'INSERT INTO items VALUES (13, $1)', params: ['thirteen'] },
      { query: 'SELECT * FROM nope' },
    ] });
    t.equal(partial.status, 400);
    t.equal(partial.body.code, '42P01');
    const rows = await admin.query('SELECT id FROM items ORDER BY id');
    t.same(rows.rows.map((r) => r.id), [10, 11], 'nothing of the failed batches was committed');
    // The pool may hold a second idle connection by now (one opened while the first was being
    // reset): what matters is that the failed batches' connection was rolled back and kept.
    await settled();
    const kept = await sqlBackends();
    t.ok(kept.some((b) => String(b.pid) === before && b.state === 'idle'), `the connection was rolled back and kept (backend ${before} idle among ${JSON.stringify(kept.map((b) => [b.pid, b.state]))})`);

    const bad = await post({ queries: [{ query: 'SELECT 1' }] }, { ...RAW, 'Neon-Batch-Isolation-Level': 'Chaos' });
    t.equal(bad.status, 400);
    t.equal(bad.body.code, '22023');
    const empty = await post({ queries: [] });
    t.same(empty.body, { results: [] });
    await admin.query('DELETE FROM items');
  });

  await t.test('Postgres errors: 400 with the error fields', async (t) => {
    const r = await one('SELECT * FROM nope');
    t.equal(r.status, 400);
    t.match(r.body, { message: 'relation "nope" does not exist', code: '42P01', position: '15', severity: 'ERROR', routine: String, file: String, line: String });
    t.equal(r.headers.get('access-control-allow-origin'), '*');
    const dup = await one('INSERT INTO items VALUES (1, $1), (1, $1)', ['x']);
    t.match(dup.body, { code: '23505', constraint: 'items_pkey', table: 'items', schema: 'public', detail: /already exists/ });
    const multi = await one('SELECT 1; SELECT 2');
    t.equal(multi.body.code, '42601', 'one statement per query (extended protocol), as Neon');
    const divide = await one('SELECT 1/0');
    t.equal(divide.body.code, '22012');
  });

  await t.test('authentication on every request: 28P01 alike for every cause', async (t) => {
    const failed = async () => (await metrics.authentications.get()).values.find((v) => v.labels.outcome === 'failed')?.value ?? 0;
    const before = await failed();
    const wakes = api.wakes;
    const wrong = await post({ query: 'SELECT 1' }, RAW, connStr('app', 'wrong'));
    t.equal(wrong.status, 400);
    t.same(wrong.body, { message: 'password authentication failed for user "app"', code: '28P01' });
    const unknownEp = await post({ query: 'SELECT 1' }, RAW, connStr('app', PASSWORD, 'ep-nope-9'));
    t.same(unknownEp.body, wrong.body, 'an unknown endpoint answers like a bad password');
    const unknownRole = await post({ query: 'SELECT 1' }, RAW, connStr('ghost', PASSWORD));
    t.same(unknownRole.body, { message: 'password authentication failed for user "ghost"', code: '28P01' });
    const noPassword = await post({ query: 'SELECT 1' }, RAW, `postgresql://app@${EP}.localtest.me/postgres`);
    t.equal(noPassword.body.code, '28P01');
    t.equal((await failed()) - before, 4, 'failures counted');
    t.equal(api.wakes, wakes, 'nothing woken');
    const locked = await post({ query: 'SELECT 1' }, RAW, connStr('app', PASSWORD, EP_LOCKED));
    t.equal(locked.status, 400);
    t.equal(locked.body.code, '28000');
    t.match(locked.body.message, /IP address 127\.0\.0\.1 are not allowed/);
  });

  await t.test('bad requests: 400 with a message and a code', async (t) => {
    const missing = await post({ query: 'SELECT 1' }, RAW, null);
    t.equal(missing.status, 400);
    t.equal(missing.body.code, '08P01');
    t.match(missing.body.message, /missing Neon-Connection-String/);
    for (const cs of ['not a url', 'mysql://a:b@ep-x.localtest.me/db', 'postgresql://ep-x.localtest.me/db', `postgresql://app:pw@${EP}.localtest.me`, 'postgresql://app:pw@bad_label.localtest.me/db']) {
      const r = await post({ query: 'SELECT 1' }, RAW, cs);
      t.equal(r.status, 400, cs);
      t.equal(r.body.code, '08P01', cs);
      t.match(r.body.message, /invalid Neon-Connection-String/, cs);
      t.notOk(r.body.message.includes('pw'), 'the password is not echoed');
    }
    const notJson = await post('{"query": "SELECT 1"');
    t.equal(notJson.status, 400);
    t.equal(notJson.body.code, '08P01');
    t.match(notJson.body.message, /not valid JSON/);
    for (const body of ['[1]', '"x"', '{"query": 1}', '{"query": "SELECT 1", "params": "x"}', '{"queries": {}}', '{"queries": [1]}', '{}']) {
      const r = await post(body);
      t.equal(r.status, 400, body);
      t.equal(r.body.code, '08P01', body);
    }
    const badHeader = await one('SELECT 1', [], { 'Neon-Raw-Text-Output': 'maybe' });
    t.equal(badHeader.body.code, '22023');
  });

  await t.test('request body over the limit: 413 without reading it all', async (t) => {
    const big = JSON.stringify({ query: 'SELECT $1::text', params: ['x'.repeat(100_000)] });
    const raw = (chunked: boolean): Promise<{ status: number; body: string; headers: IncomingHttpHeaders }> => new Promise((resolve, reject) => {
      const headers: Record<string, string | number> = { 'Neon-Connection-String': connStr(), ...RAW };
      if (!chunked) headers['content-length'] = Buffer.byteLength(big);
      const req = request(url, { method: 'POST', headers }, (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (d: string) => (body += d));
        res.on('end', () => resolve({ status: res.statusCode!, body, headers: res.headers }));
      });
      req.on('error', reject);
      if (chunked) {
        // Many small writes: the server refuses once the total passes the limit.
        for (let i = 0; i < big.length; i += 8192) req.write(big.slice(i, i + 8192));
        req.end();
      } else {
        req.end(big);
      }
    });
    for (const chunked of [false, true]) {
      const r = await raw(chunked);
      t.equal(r.status, 413, chunked ? 'chunked' : 'content-length');
      t.match(JSON.parse(r.body), { code: '54000', message: /request body too large: the limit is 65536 bytes/ });
      t.not(r.headers.connection, 'close', 'the rest of the body is discarded, the connection kept');
    }
    for (let i = 0; i < 3; i++) {
      // A refusal without reading the body, then a large one: the client never sees a reset.
      t.equal((await post({ query: 'SELECT 1' }, RAW, null)).status, 400);
      const viaFetch = await post(big);
      t.equal(viaFetch.status, 413);
    }
    // A declared size past what is worth discarding: answered at once, then the connection closed.
    const huge = await new Promise<{ status: number; connection: string | undefined }>((resolve, reject) => {
      const req = request(url, { method: 'POST', headers: { 'Neon-Connection-String': connStr(), 'content-length': 100 * 1024 * 1024 } }, (res) => {
        res.resume();
        resolve({ status: res.statusCode!, connection: res.headers.connection });
        req.destroy();
      });
      req.on('error', (err) => { if (!req.destroyed) reject(err); });
      req.write('x'.repeat(1024));
    });
    t.same(huge, { status: 413, connection: 'close' });
    t.equal((await one('SELECT 1')).status, 200, 'the next request is fine');
  });

  await t.test('response over the limit: 507, the query is stopped', async (t) => {
    const r = await one(`SELECT repeat('x', 1000) FROM generate_series(1, 100000)`);
    t.equal(r.status, 507);
    t.match(r.body, { code: '54000', message: /response too large/ });
    let active = 1;
    for (let i = 0; i < 50 && active > 0; i++) {
      active = (await sqlBackends()).filter((b) => b.query.includes('generate_series') && b.state === 'active').length;
      if (active) await delay(20);
    }
    t.equal(active, 0, 'the compute is not still producing rows');
    const wide = await one(`SELECT repeat('y', 70000) AS v`);
    t.equal(wide.status, 507, 'a single large row too');
    const justUnder = await one(`SELECT repeat('z', 60000) AS v`);
    t.equal(justUnder.status, 200);
    const escaped = await one(`SELECT repeat(E'\\x01', 20000) AS v`);
    t.equal(escaped.status, 507, 'the exact JSON size is checked too (\\u0001 takes 6 bytes)');
  });

  await t.test('pool: reuse, reset between requests, no session state leaks', async (t) => {
    const one = async (query: string, params: unknown[] = []): Promise<Reply> => {
      await settled();
      return post({ query, params });
    };
    const pidOf = async (): Promise<string> => (await one('SELECT pg_backend_pid()::text AS pid')).body.rows[0][0] as string;
    const pid = await pidOf();
    t.equal(await pidOf(), pid, 'the second request reuses the connection');
    const set = await one('SET search_path TO other');
    t.equal(set.status, 200);
    t.equal(set.body.command, 'SET');
    const show = await one('SELECT current_setting($1) AS sp, current_setting($2) AS st, pg_backend_pid()::text AS pid', ['search_path', 'statement_timeout']);
    t.same(show.body.rows, [['"$user", public', '30s', pid]], 'search_path reset, statement_timeout kept, same backend');
    await one('CREATE TEMP TABLE leak (x int)');
    t.equal((await one('SELECT * FROM leak')).body.code, '42P01', 'temp tables do not survive');
    await one(`SELECT set_config('app.user', 'alice', false)`);
    t.same((await one(`SELECT current_setting('app.user', true) AS v`)).body.rows, [['']]);
    await one('PREPARE p AS SELECT 1');
    t.equal((await one('EXECUTE p')).body.code, '26000', 'prepared statements are deallocated');

    const begun = await one('BEGIN');
    t.equal(begun.status, 200);
    const after = await pidOf();
    t.not(after, pid, 'a connection left inside a transaction is dropped, not reused');
    t.equal(await pidOf(), after);
    t.equal(tracker.get(EP), 0, 'live connection count balanced');
  });

  await t.test('concurrency: at most sqlPoolMaxPerEndpoint connections, then wait, then 53300', async (t) => {
    const waitsBefore = (await metrics.registry.getSingleMetric('xenon_proxy_sql_pool_acquisitions_total')!.get()).values.find((v) => v.labels.result === 'wait')?.value ?? 0;
    // Requests block on an advisory lock the admin session holds, until it lets go.
    const blocked = async (): Promise<number> =>
      (await sqlBackends()).filter((b) => b.query.includes('pg_advisory_xact_lock_shared') && b.state === 'active').length;
    const hold = async (): Promise<Promise<Reply>[]> => {
      await admin.query('SELECT pg_advisory_lock(7)');
      return [0, 1, 2].map(() => one('SELECT pg_advisory_xact_lock_shared(7)::text, pg_backend_pid()::text'));
    };
    const holders = await hold();
    for (let i = 0; i < 300 && (await blocked()) < 3; i++) await delay(10);
    t.equal(await blocked(), 3, 'three requests hold the three connections');
    const waiter = one('SELECT pg_backend_pid()::text');
    await delay(300);
    await admin.query('SELECT pg_advisory_unlock(7)');
    const results = await Promise.all([...holders, waiter]);
    t.same(results.map((r) => r.status), [200, 200, 200, 200]);
    const pids = new Set(results.slice(0, 3).map((r) => r.body.rows[0].at(-1)));
    t.equal(pids.size, 3, 'three connections');
    t.ok(pids.has(results[3]!.body.rows[0][0]), 'the fourth request waited for one of them');
    const backends = await sqlBackends();
    t.ok(backends.filter((b) => b.usename === 'app').length <= 3, JSON.stringify(backends));
    const waits = (await metrics.registry.getSingleMetric('xenon_proxy_sql_pool_acquisitions_total')!.get()).values.find((v) => v.labels.result === 'wait')?.value ?? 0;
    t.ok(waits > waitsBefore, 'counted as a wait');

    const hogs = await hold();
    for (let i = 0; i < 300 && (await blocked()) < 3; i++) await delay(10);
    const t0 = performance.now();
    const refused = await one('SELECT 1');
    t.equal(refused.status, 400);
    t.equal(refused.body.code, '53300');
    t.match(refused.body.message, /no connection became free within 1000 ms/);
    t.ok(performance.now() - t0 >= 950, 'after the acquire timeout');
    await admin.query('SELECT pg_advisory_unlock(7)');
    t.same((await Promise.all(hogs)).map((r) => r.status), [200, 200, 200]);
    t.equal(tracker.get(EP), 0);
  });

  await t.test('invalidate: idle connections closed, busy ones dropped on release', async (t) => {
    const pid = await pidOf();
    t.ok(sql.poolStats.idle >= 1);
    sql.invalidate(EP);
    t.equal(sql.poolStats.idle, 0);
    let gone = false;
    for (let i = 0; i < 50 && !gone; i++) {
      gone = !(await sqlBackends()).some((b) => String(b.pid) === pid);
      if (!gone) await delay(20);
    }
    t.ok(gone, 'the backend is gone');
    await pidOf();
    const slow = one('SELECT pg_sleep(0.3)::text, pg_backend_pid()::text');
    for (let i = 0; i < 100; i++) {
      if ((await sqlBackends()).some((b) => b.query.includes('pg_sleep(0.3)') && b.state === 'active')) break;
      await delay(10);
    }
    sql.invalidate(EP);
    const r = await slow;
    t.equal(r.status, 200, 'the running request finishes');
    const busyPid = r.body.rows[0][1];
    await delay(50);
    t.not(await pidOf(), busyPid, 'and its connection was not reused');
  });

  await t.test('a backend terminated mid-query: the error passes through, the connection is dropped', async (t) => {
    const slow = one('SELECT pg_sleep(5)');
    let pid: number | undefined;
    for (let i = 0; i < 100 && !pid; i++) {
      pid = (await sqlBackends()).find((b) => b.query.includes('pg_sleep(5)') && b.state === 'active')?.pid;
      if (!pid) await delay(10);
    }
    t.ok(pid, 'running');
    await admin.query('SELECT pg_terminate_backend($1)', [pid]);
    const r = await slow;
    t.equal(r.status, 400);
    t.equal(r.body.code, '57P01', r.body.message);
    const next = await pidOf();
    t.not(next, String(pid), 'a fresh connection next time');
    t.equal(tracker.get(EP), 0);
  });

  await t.test('the connection to the compute breaks mid-query: 57P03', async (t) => {
    // A TCP relay in front of the compute that can be cut.
    const relays = new Set<Socket>();
    const relay = createNetServer((client) => {
      const upstream = netConnect(port, '127.0.0.1');
      relays.add(client).add(upstream);
      client.pipe(upstream).pipe(client);
      client.on('error', () => upstream.destroy());
      upstream.on('error', () => client.destroy());
    });
    await new Promise<void>((r) => relay.listen(0, '127.0.0.1', () => r()));
    t.teardown(() => relay.close());
    cp.invalidateWake(EP);
    api.ports = [(relay.address() as AddressInfo).port];
    const slow = one('SELECT pg_sleep(0.5)');
    await delay(200);
    for (const s of relays) s.destroy();
    const r = await slow;
    t.equal(r.status, 400);
    t.match(r.body, { code: '57P03', message: 'the connection to the compute node was lost while running the query' });
    t.equal(tracker.get(EP), 0);
    cp.invalidateWake(EP);
    sql.invalidate(EP);
    api.ports = [port];
  });

  await t.test('a client that disconnects mid-query cancels it', async (t) => {
    await new Promise<void>((resolve) => {
      const req = request(url, { method: 'POST', headers: { 'Neon-Connection-String': connStr(), ...RAW } });
      req.on('error', () => resolve());
      req.end(JSON.stringify({ query: 'SELECT pg_sleep(10)' }));
      void (async () => {
        let running = 0;
        for (let i = 0; i < 300 && !running; i++) {
          running = (await sqlBackends()).filter((b) => b.query.includes('pg_sleep(10)') && b.state === 'active').length;
          if (!running) await delay(10);
        }
        t.equal(running, 1, 'the query runs');
        await delay(100);
        req.destroy();
        resolve();
      })();
    });
    const t0 = performance.now();
    let active = 1;
    while (active > 0 && performance.now() - t0 < 3_000) {
      active = (await sqlBackends()).filter((b) => b.query.includes('pg_sleep(10)') && b.state === 'active').length;
      if (active) await delay(25);
    }
    t.equal(active, 0, 'cancelled');
    t.ok(performance.now() - t0 < 1_000, `within a second (${Math.round(performance.now() - t0)} ms)`);
    await delay(50);
    t.equal(tracker.get(EP), 0, 'live connection count balanced');
    t.equal((await one('SELECT 1')).status, 200);
  });

  await t.test('an unreachable compute address is woken again; then 57P03', async (t) => {
    const dead = await findFreePort(30000, 39999);
    cp.invalidateWake(EP);
    sql.invalidate(EP);
    api.wakes = 0;
    api.ports = [dead, port];
    const r = await one('SELECT 1');
    t.equal(r.status, 200, JSON.stringify(r.body));
    t.equal(api.wakes, 2, 'one fresh wake after the failure');
    cp.invalidateWake(EP);
    sql.invalidate(EP);
    api.wakes = 0;
    api.ports = [dead];
    const down = await one('SELECT 1');
    t.equal(down.status, 400);
    t.equal(down.body.code, '57P03');
    t.match(down.body.message, /could not connect to the compute node/);
    t.equal(tracker.get(EP), 0);
    cp.invalidateWake(EP);
    api.ports = [port];
    t.equal((await one('SELECT 1')).status, 200);
    const noDb = await post({ query: 'SELECT 1' }, RAW, connStr('app', PASSWORD, EP, 'nodb'));
    t.match(noDb.body, { code: '3D000', message: 'database "nodb" does not exist' }, 'errors from the compute itself pass through');
  });

  await t.test('the unmodified @neondatabase/serverless driver', async (t) => {
    neonConfig.fetchEndpoint = () => url;
    const db = neon(connStr());
    t.same(await db`SELECT ${1}::int AS one, ${'a'} AS s`, [{ one: 1, s: 'a' }]);
    const full = await db.query('SELECT $1::int AS n, now() AS ts', [5], { fullResults: true });
    t.equal(full.command, 'SELECT');
    t.equal(full.rowCount, 1);
    t.equal(full.rows[0]!.n, 5);
    t.ok(full.rows[0]!.ts instanceof Date, 'types parsed client-side from the text output');
    t.same(await db.query('SELECT 1 AS a, 2 AS b', [], { arrayMode: true }), [[1, 2]]);
    const [a, b] = await db.transaction([db`INSERT INTO items VALUES (${100}, ${'x'}) RETURNING id`, db`SELECT count(*)::int AS n FROM items`]);
    t.same(a, [{ id: 100 }]);
    t.same(b, [{ n: 1 }]);
    const ro = await db.transaction((tx) => [tx`SELECT current_setting('transaction_isolation') AS i`], { isolationLevel: 'Serializable', readOnly: true });
    t.same(ro[0], [{ i: 'serializable' }]);
    try {
      await db.transaction([db`INSERT INTO items VALUES (${101}, ${'y'})`], { readOnly: true });
      t.fail('should throw');
    } catch (err) {
      t.ok(err instanceof NeonDbError);
      t.equal((err as NeonDbError).code, '25006');
    }
    try {
      await db`SELECT * FROM nope`;
      t.fail('should throw');
    } catch (err) {
      t.ok(err instanceof NeonDbError, 'a NeonDbError');
      t.equal((err as NeonDbError).code, '42P01');
      t.equal((err as NeonDbError).position, '15');
    }
    try {
      await neon(connStr('app', 'bad'))`SELECT 1`;
      t.fail('should throw');
    } catch (err) {
      t.ok(err instanceof NeonDbError);
      t.equal((err as NeonDbError).code, '28P01');
    }
    const pct = neon(`postgresql://pct:${encodeURIComponent(PCT_PASSWORD)}@${EP}.localtest.me/postgres`);
    t.same(await pct`SELECT current_user AS u`, [{ u: 'pct' }]);
    await admin.query('DELETE FROM items');
  });

  await t.test('warm request latency (plain HTTP on loopback, keep-alive)', async (t) => {
    for (let i = 0; i < 10; i++) await one('SELECT 1');
    const ms: number[] = [];
    for (let i = 0; i < 100; i++) {
      const t0 = performance.now();
      const r = await one('SELECT $1::int AS n', [i]);
      ms.push(performance.now() - t0);
      if (r.status !== 200) t.fail(JSON.stringify(r.body));
    }
    ms.sort((a, b) => a - b);
    const p50 = ms[49]!;
    const p99 = ms[98]!;
    t.comment(`warm SELECT over HTTP: p50 ${p50.toFixed(2)} ms, p99 ${p99.toFixed(2)} ms`);
    t.ok(p50 < 200, `p50 ${p50.toFixed(2)} ms`);
  });

  await t.test('metrics', async (t) => {
    // The last response's connection may still be being reset.
    for (let i = 0; i < 100 && sql.poolStats.busy > 0; i++) await delay(10);
    const text = await metrics.registry.metrics();
    t.match(text, /xenon_proxy_sql_requests_total\{status="200"\} \d+/);
    for (const s of ['400', '413', '507', '499']) t.match(text, new RegExp(`xenon_proxy_sql_requests_total\\{status="${s}"\\} \\d+`), s);
    t.match(text, /xenon_proxy_sql_request_duration_seconds_count\{cold="false"\} \d+/);
    t.match(text, /xenon_proxy_sql_request_duration_seconds_count\{cold="true"\} \d+/);
    t.match(text, /xenon_proxy_sql_pool_connections\{state="idle"\} [1-9]/);
    t.match(text, /xenon_proxy_sql_pool_connections\{state="busy"\} 0/);
    for (const r of ['hit', 'miss', 'wait']) t.match(text, new RegExp(`xenon_proxy_sql_pool_acquisitions_total\\{result="${r}"\\} [1-9]`), r);
    t.match(text, /xenon_proxy_authentications_total\{method="password",outcome="ok"\} [1-9]/);
    const idle = sql.poolStats.idle;
    t.match(text, new RegExp(`xenon_proxy_sql_pool_connections\\{state="idle"\\} ${idle}\\b`), 'the gauge matches the pool');
  });

  await t.test('logs: one line per request, never a password', async (t) => {
    const records = logLines.map((l) => JSON.parse(l) as Record<string, unknown>);
    const reqs = records.filter((r) => r.msg === 'sql request');
    t.ok(reqs.length > 50);
    t.match(reqs.find((r) => r.status === 200), { endpoint: EP, role: 'app', peer: '127.0.0.1', ms: Number, cold: Boolean, pool: /hit|miss|wait/ });
    const all = logLines.join('');
    t.notOk(all.includes(PASSWORD), 'the password never appears');
    t.notOk(all.includes(PCT_IN_URL) || all.includes(PCT_PASSWORD), 'nor the other one');
  });

  await t.test('hostile shapes: results without rows still cost, huge batches, NUL in names, over-long requests', async (t) => {
    const zeroColumns = await one('SELECT FROM generate_series(1, 100000)');
    t.equal(zeroColumns.status, 507, 'rows of no columns count against the response limit');
    const wideEmpty = 'SELECT * FROM (VALUES (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)) AS v (a1, a2, a3, a4, a5, a6, a7, a8, a9, a10) LIMIT 0';
    t.equal((await one(wideEmpty)).status, 200, 'one empty result is fine');
    const empties = await post({ queries: Array.from({ length: 200 }, () => ({ query: wideEmpty, params: [] })) });
    t.equal(empties.status, 507, `field descriptions of empty results count too (${JSON.stringify(empties.body).slice(0, 200)})`);
    const huge = await post({ queries: Array.from({ length: 1001 }, () => ({ query: 'SELECT 1', params: [] })) });
    t.equal(huge.status, 400);
    t.match(huge.body, { code: '54000', message: /at most 1000 queries/ });
    for (const [what, cs] of [
      ['database', connStr('app', PASSWORD, EP, 'postgres%00replication%00database')],
      ['user', connStr('app%00search_path%00evil')],
    ] as const) {
      const r = await post({ query: 'SELECT 1', params: [] }, RAW, cs);
      t.equal(r.status, 400, `a NUL in the ${what} name is refused`);
      t.match(r.body.message, /control characters/);
    }
    // A whole request gets the statement timeout once, even a batch that turns it off.
    const quick = new SqlOverHttp({ ...sql.deps, config: { ...config, sqlQueryTimeoutMs: 500 } }, {});
    const srv = createServer((req, res) => void quick.handle(req, res, '127.0.0.1'));
    await new Promise<void>((r) => srv.listen(0, '127.0.0.1', () => r()));
    const t0 = performance.now();
    const slow = await fetch(`http://127.0.0.1:${(srv.address() as AddressInfo).port}/sql`, {
      method: 'POST',
      headers: { 'Neon-Connection-String': connStr(), ...RAW },
      body: JSON.stringify({ queries: [{ query: 'SET LOCAL statement_timeout = 0', params: [] }, { query: 'SELECT pg_sleep(0.3)', params: [] }, { query: 'SELECT pg_sleep(0.3)', params: [] }, { query: 'SELECT pg_sleep(5)', params: [] }] }),
    });
    const ms = performance.now() - t0;
    t.equal(slow.status, 400);
    t.match(await slow.json(), { code: '57014', message: /took longer than 500 ms/ });
    t.ok(ms < 2_000, `cancelled at the deadline (${Math.round(ms)} ms)`);
    await quick.close();
    srv.closeAllConnections();
    await new Promise((res) => srv.close(res));
  });

  await t.test('close() closes every pooled connection', async (t) => {
    const other = new SqlOverHttp({ ...sql.deps }, {});
    const srv = createServer((req, res) => void other.handle(req, res, '127.0.0.1'));
    await new Promise<void>((r) => srv.listen(0, '127.0.0.1', () => r()));
    const r = await fetch(`http://127.0.0.1:${(srv.address() as AddressInfo).port}/sql`, {
      method: 'POST',
      headers: { 'Neon-Connection-String': connStr(), ...RAW },
      body: JSON.stringify({ query: `SELECT pg_backend_pid()::text` }),
    });
    const pid = ((await r.json()) as { rows: string[][] }).rows[0]![0]!;
    await delay(20);
    t.equal(other.poolStats.idle, 1);
    await other.close();
    srv.closeAllConnections();
    await new Promise((res) => srv.close(res));
    let gone = false;
    for (let i = 0; i < 50 && !gone; i++) {
      gone = !(await sqlBackends()).some((b) => String(b.pid) === pid);
      if (!gone) await delay(20);
    }
    t.ok(gone);
  });
});
