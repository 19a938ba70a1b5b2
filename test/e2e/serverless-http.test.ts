// Acceptance (issue 4, SQL over HTTP): the unmodified @neondatabase/serverless `neon()` and
// Drizzle's neon-http against the proxy's POST /sql — tagged templates, fullResults, arrayMode,
// transactions with isolation level and read-only, NeonDbError codes, type round trips identical
// to node-postgres over TCP, TLS, CORS, and hostile requests.
import t from 'tap';
import pg from 'pg';
import { readFileSync } from 'node:fs';
import { neon, neonConfig, NeonDbError } from '@neondatabase/serverless';
import { drizzle } from 'drizzle-orm/neon-http';
import { integer, pgTable, text } from 'drizzle-orm/pg-core';
import { fetchWithCa } from '../helpers/https-fetch.ts';
import { startTestStack, type TestStack } from '../helpers/stack.ts';

t.test('@neondatabase/serverless neon() over HTTP', async (t) => {
  const stack: TestStack = await startTestStack(t);
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
    const db = drizzle({ client: sql });
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
