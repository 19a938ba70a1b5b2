// Regression tests for the transaction pooler (issue 7) from a review: each test below failed
// before its fix. Every test starts its own proxy (mostly with a pool of one server connection,
// so the next client lands on the connection the previous one used) in front of one Postgres.
import t, { type Test } from 'tap';
import pg from 'pg';
import postgres from 'postgres';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createCa, createServerCert } from '../../certs/generate.ts';
import { bind, close, copyData, copyDone, dataRows, errorOf, execute, flush, i16, i32, msg, parse, query, startAppPostgres, sleep, startPoolerProxy, sync, typesOf, until, type Msg, type PoolerHarness } from '../helpers/pooler.ts';
import type { PooledClient } from '../../proxy/pooler/client.ts';

const EP = 'ep-pool-1';


const { db, secret } = await startAppPostgres(t, 'xenon-pooler-review-');
const appAdmin = new pg.Client({ ...db.admin(), database: 'app' });
await appAdmin.connect();
t.teardown(() => appAdmin.end());
const ca = createCa();
const cert = createServerCert(ca, '*.localtest.me', [{ dns: '*.localtest.me' }]);

type Harness = PoolerHarness;
const startPooler = (t: Test, env: Record<string, string> = {}, poolSize = 1): Promise<Harness> =>
  startPoolerProxy(t, { db, secret, ca: ca.certPem, cert, endpoint: EP }, env, poolSize);

const types = (m: Msg[]): string => typesOf(m).join('');
const pooledClients = (h: Harness): PooledClient[] => [...h.pool().clients];

await appAdmin.query(`CREATE TABLE users (name text); INSERT INTO users VALUES ('real'); GRANT ALL ON users TO app`);
await appAdmin.query(`CREATE TABLE cp (x int); GRANT ALL ON cp TO app`);

t.test('temporary tables made without CREATE TEMP are session state: the next client never sees them', async (t) => {
  const h = await startPooler(t);
  const a = await h.client();
  await a.query(`SELECT 'shadow'::text AS name INTO TEMP users`);
  await a.query(`CREATE TABLE pg_temp.accounts AS SELECT 1 AS id`);
  await a.query(`/* leading comment */ SET search_path = nowhere, public`);
  await a.end();
  await sleep(100);
  const b = await h.client();
  t.same((await b.query('SELECT name FROM users')).rows, [{ name: 'real' }], 'the real table, not the temp one');
  t.same((await b.query(`SELECT relname FROM pg_class WHERE relpersistence = 't' AND relkind = 'r'`)).rows, []);
  t.not((await b.query(`SELECT current_setting('search_path') AS sp`)).rows[0].sp, 'nowhere, public');
  t.ok(h.stats().resets >= 1);
});

t.test('a cancel never reaches the query of the client that gets the server connection next', async (t) => {
  const h = await startPooler(t);
  const a = await h.client();
  const b = await h.client();
  let bCancelled = 0;
  let bOk = 0;
  let aCancelled = 0;
  let stop = false;
  const loop = (async () => {
    while (!stop) {
      try {
        await b.query('SELECT pg_sleep(0.005)');
        bOk++;
      } catch (e) {
        if ((e as { code?: string }).code === '57014') bCancelled++;
        else throw e;
      }
    }
  })();
  for (let i = 0; i < 80; i++) {
    const p = a.query('SELECT pg_sleep(0.01)').catch((e: { code?: string }) => { if (e.code === '57014') aCancelled++; });
    await sleep(5 + Math.random() * 10);
    const key = a as unknown as { processID: number; secretKey: number };
    void h.proxy.pooler.cancel(key.processID, key.secretKey);
    await p;
  }
  stop = true;
  await loop;
  t.equal(bCancelled, 0, `the other client's queries were not cancelled (${bOk} ran; ${aCancelled} of A's were cancelled)`);
  t.ok(aCancelled > 0, 'cancels reached A\'s queries');
});

t.test('a cancel from a client waiting for a server connection answers its wait with 57014', async (t) => {
  const h = await startPooler(t);
  const a = await h.client();
  await a.query('BEGIN');
  const b = await h.raw();
  b.send(query('SELECT 1'), query('SELECT 2 AS v'));
  t.ok(await until(() => h.stats().clients.waiting === 1));
  t.equal(await h.proxy.pooler.cancel(b.key.pid, b.key.secret), true);
  const m = await b.until('Z');
  t.equal(types(m), 'EZ');
  t.equal(errorOf(m).C, '57014');
  await a.query('COMMIT');
  const m2 = await b.until('Z');
  t.same(dataRows(m2), ['2'], 'what followed runs');
});

t.test('a waiter queued behind one that left is still served', async (t) => {
  const h = await startPooler(t);
  const a = await h.client();
  const b = await h.client();
  const c = await h.client();
  await a.query('BEGIN');
  b.query('SELECT 1').catch(() => {});
  t.ok(await until(() => h.stats().clients.waiting === 1));
  const pc = c.query(`SELECT 'c' AS x`);
  t.ok(await until(() => h.stats().clients.waiting === 2));
  (b as unknown as { connection: { stream: { destroy(): void } } }).connection.stream.destroy();
  await sleep(600); // the sweeper runs meanwhile
  t.equal(h.stats().clients.waiting, 1, 'c still waits');
  await a.query('COMMIT');
  const r = await Promise.race([pc.then((x) => x.rows), sleep(8_000).then(() => 'no answer')]);
  t.same(r, [{ x: 'c' }]);
});

t.test('an LRU eviction skipped after an error: the statement is still usable (no 42P05, no internal names)', async (t) => {
  const h = await startPooler(t, { XENON_POOLER_MAX_PREPARED_STATEMENTS: '1' });
  const s = await h.raw();
  s.send(parse('s1', 'SELECT 1 AS one'), sync());
  t.equal(types(await s.until('Z')), '1Z');
  // The eviction Close for s1 comes after the failing Bind: the compute skips it.
  s.send(bind('', 'nope', []), parse('s2', 'SELECT 2 AS two'), sync());
  const m2 = await s.until('Z');
  t.equal(errorOf(m2).C, '26000');
  for (let i = 0; i < 2; i++) {
    s.send(bind('', 's1', []), execute(), sync());
    const m = await s.until('Z');
    t.equal(types(m), '2DCZ', JSON.stringify(errorOf(m)));
    t.same(dataRows(m), ['1']);
  }
  // s2 came after the error: the compute skipped it, as Postgres would.
  s.send(bind('', 's2', []), execute(), sync());
  t.match(errorOf(await s.until('Z')), { C: '26000', M: 'prepared statement "s2" does not exist' });
});

t.test('COPY FROM STDIN in the extended protocol with a Sync right after Execute', async (t) => {
  const h = await startPooler(t);
  await appAdmin.query('TRUNCATE cp');
  const c = await h.raw();
  c.send(parse('', 'COPY cp FROM STDIN'), bind('', '', []), execute(), sync());
  t.equal(types(await c.until('G')), '12G');
  c.send(copyData('1\n'), flush(), copyData('2\n'), sync(), copyDone(), sync());
  t.equal(types(await c.until('Z')), 'CZ');
  c.send(query('SELECT count(*) FROM cp'));
  const r = await c.until('Z');
  t.equal(types(r), 'TDCZ');
  t.same(dataRows(r), ['2']);
  // All of it pipelined at once, and an error inside the copy.
  c.send(parse('', 'COPY cp FROM STDIN'), bind('', '', []), execute(), sync(), copyData('3\n'), copyDone(), sync());
  t.equal(types(await c.until('Z')), '12GCZ');
  c.send(parse('', 'COPY cp FROM STDIN'), bind('', '', []), execute(), sync(), copyData('oops\n'), copyDone(), sync());
  const bad = await c.until('Z');
  t.equal(types(bad), '12GEZ');
  t.equal(errorOf(bad).C, '22P02');
  t.ok(await until(() => h.stats().servers.idle === 1), 'the connection is back in the pool');
  // postgres.js streams a COPY the same way.
  const cfg = h.cfg();
  const sql = postgres({ host: cfg.host, port: cfg.port, user: 'app', pass: 'app-password', database: 'app', ssl: cfg.ssl as object, max: 1, onnotice: () => {} });
  t.teardown(() => sql.end({ timeout: 1 }).catch(() => {}));
  const w = await sql`copy cp from stdin`.writable();
  await pipeline(Readable.from(['4\n', '5\n']), w);
  t.same(await sql`select count(*)::int as n from cp`, [{ n: 5 }]);
});

t.test('skipped messages are undone last first: Close then Parse of one name after an error', async (t) => {
  const h = await startPooler(t);
  const s = await h.raw();
  s.send(parse('s1', 'SELECT 1 AS v'), sync());
  await s.until('Z');
  s.send(bind('', 'nope', []), close('S', 's1'), parse('s1', 'SELECT 2 AS v'), sync());
  t.equal(errorOf(await s.until('Z')).C, '26000');
  s.send(bind('', 's1', []), execute(), sync());
  const r = await s.until('Z');
  t.equal(types(r), '2DCZ', 'the Close was skipped: s1 is still SELECT 1, as in Postgres');
  t.same(dataRows(r), ['1']);
});

t.test('a pipelined DISCARD ALL drops the statements of the server connection from when it is sent', async (t) => {
  const h = await startPooler(t);
  const s = await h.raw();
  s.send(parse('s3', 'SELECT 3 AS v'), sync());
  await s.until('Z');
  s.send(query('DISCARD ALL'), parse('s3', 'SELECT 3 AS v'), bind('', 's3', []), execute(), sync());
  const d = await s.until('Z', 2);
  t.equal(types(d), 'CZ12DCZ', JSON.stringify(errorOf(d)));
  t.same(dataRows(d), ['3']);
  // DEALLOCATE ALL passed through with another statement: the same.
  s.send(query('DEALLOCATE ALL; SELECT 1'), parse('s4', 'SELECT 3 AS v'), bind('', 's4', []), execute(), sync());
  const e = await s.until('Z', 2);
  t.equal(types(e), 'CTDCZ12DCZ', JSON.stringify(errorOf(e)));
});

t.test('errors never name the server-side statements (xenon_…)', async (t) => {
  const h = await startPooler(t);
  const s = await h.raw();
  s.send(parse('mine', 'SELECT 5 AS v'), sync());
  await s.until('Z');
  // Drop it behind the pooler's back, in a transaction that commits (the pooler cannot know).
  s.send(query('BEGIN'), query(`DO $$ BEGIN EXECUTE 'DEALLOCATE ALL'; END $$`));
  await s.until('Z', 2);
  s.send(bind('', 'mine', []), execute(), sync());
  const m = await s.until('Z');
  t.equal(errorOf(m).C, '26000');
  t.notMatch(JSON.stringify(errorOf(m)), /xenon_/);
  t.match(errorOf(m).M, /"mine"/);
  s.send(query('COMMIT'));
  await s.until('Z');
  s.send(bind('', 'mine', []), execute(), sync());
  t.same(dataRows(await s.until('Z')), ['5'], 'prepared again next time');
});

t.test('a duplicate-name Parse leaves the client\'s unnamed statement alone', async (t) => {
  const h = await startPooler(t);
  const s = await h.raw();
  s.send(parse('s1', 'SELECT 1'), sync());
  await s.until('Z');
  // (A simple Query drops the unnamed statement: only extended-protocol messages after it.)
  s.send(query('BEGIN'), query('SAVEPOINT sp'), parse('', 'SELECT 42 AS v'), sync());
  await s.until('Z', 3);
  s.send(parse('s1', 'SELECT 1'), sync());
  t.equal(errorOf(await s.until('Z')).C, '42P05');
  s.send(parse('rb', 'ROLLBACK TO sp'), bind('', 'rb', []), execute(), bind('', '', []), execute(), sync());
  const r = await s.until('Z');
  t.equal(types(r), '12C2DCZ', JSON.stringify(errorOf(r)));
  t.same(dataRows(r), ['42']);
  s.send(query('COMMIT'));
  await s.until('Z');
});

t.test('FunctionCall (an advisory lock by OID) makes the server connection reset', async (t) => {
  const h = await startPooler(t);
  const { rows } = await appAdmin.query(`SELECT 'pg_advisory_lock(bigint)'::regprocedure::oid::int AS o`);
  const s = await h.raw();
  s.send(msg(0x46, i32(rows[0].o), i16(0), i16(1), i32(1), Buffer.from('7'), i16(0)));
  t.equal(types(await s.until('Z')), 'VZ');
  s.socket.destroy();
  await sleep(200);
  const b = await h.client();
  t.same((await b.query(`SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()`)).rows, []);
});

t.test('max_client_conn holds when clients authenticate together; the endpoint count goes back to 0', async (t) => {
  const h = await startPooler(t, { XENON_POOLER_MAX_CLIENT_CONN: '1' });
  const rs = await Promise.allSettled([h.client(), h.client(), h.client()]);
  t.equal(rs.filter((r) => r.status === 'fulfilled').length, 1);
  for (const r of rs) if (r.status === 'rejected') t.equal((r.reason as { code?: string }).code, '53300');
  for (const r of rs) if (r.status === 'fulfilled') await r.value.end();
  t.ok(await until(() => h.proxy.pooler.clients === 0 && !h.proxy.tracker.get(EP)), `tracker count back to 0 (${h.proxy.tracker.get(EP)})`);
  await h.client(); // the slot is free again
});

t.test('a waiting client is not read without limit', async (t) => {
  const h = await startPooler(t, { XENON_POOLER_QUERY_WAIT_TIMEOUT_MS: '60000' });
  const a = await h.client();
  await a.query('BEGIN');
  const b = await h.raw();
  b.send(query('SELECT 1'));
  t.ok(await until(() => h.stats().clients.waiting === 1));
  const chunk = Buffer.concat(Array.from({ length: 1000 }, () => query('SELECT ' + 'x'.repeat(1000))));
  for (let i = 0; i < 20; i++) b.socket.write(chunk); // 20 MB
  await sleep(1000);
  const pc = pooledClients(h).find((c) => c.waiting)!;
  t.ok(pc.reader.buffered < 8 * 1024 * 1024, `buffered ${pc.reader.buffered}`);
  t.ok(pc.socket.isPaused(), 'its socket is paused');
  b.socket.destroy();
  await a.query('COMMIT');
});

t.test('answers given by the pooler respect the client\'s backpressure', async (t) => {
  const h = await startPooler(t);
  const c = await h.raw();
  c.socket.pause(); // never reads
  const syncs = Buffer.concat(Array.from({ length: 100_000 }, () => sync()));
  for (let i = 0; i < 20; i++) {
    c.socket.write(syncs); // 10 MB of lone Syncs, each answered with ReadyForQuery (6 bytes)
    await sleep(5);
  }
  await sleep(1000);
  const pc = pooledClients(h).at(-1)!;
  t.ok(pc.socket.isPaused(), 'reading from it stopped');
  t.ok(pc.socket.writableLength < 8 * 1024 * 1024, `queued for it: ${pc.socket.writableLength}`);
  // Once it reads again everything is answered.
  const want = 20 * 100_000;
  c.socket.resume();
  t.ok(await until(() => c.msgs.length >= want, 20_000), `answers: ${c.msgs.length}`);
});

t.test('a waiting client whose held Parse got answered locally does not park the server connection', async (t) => {
  const h = await startPooler(t, { XENON_POOLER_QUERY_WAIT_TIMEOUT_MS: '2000' });
  const a = await h.raw();
  a.send(query('BEGIN'));
  await a.until('Z');
  const b = await h.raw();
  b.send(parse('s1', 'SELECT 77'));
  t.ok(await until(() => h.stats().clients.waiting === 1));
  a.send(parse('x', 'SELECT 77'), sync());
  await a.until('Z');
  b.send(sync());
  t.equal(types(await b.until('Z')), '1Z');
  t.equal(h.stats().clients.waiting, 0, 'it left the queue');
  a.send(query('COMMIT'));
  await a.until('Z');
  t.ok(await until(() => h.stats().servers.idle === 1), JSON.stringify(h.stats().servers));
  const c = await h.client();
  t.same((await c.query('SELECT 1 AS v')).rows, [{ v: 1 }]);
});

t.test('the per-client statement cap counts bytes too (54000 beyond 64 MiB)', async (t) => {
  const h = await startPooler(t);
  const s = await h.raw();
  const big = (n: number) => `SELECT '${'y'.repeat(n)}' AS v`;
  s.send(parse('b1', big(40 * 1024 * 1024)), sync());
  t.equal(types(await s.until('Z', 1, 30_000)), '1Z');
  s.send(parse('b2', big(30 * 1024 * 1024)), sync());
  const m = await s.until('Z', 1, 30_000);
  t.equal(types(m), 'EZ');
  t.equal(errorOf(m).C, '54000');
  s.send(close('S', 'b1'), parse('b2', big(30 * 1024 * 1024)), sync());
  t.equal(types(await s.until('Z', 1, 30_000)), '31Z', 'room again after a Close');
});

t.test('a client that leaves while its server is paused for its backpressure: the server is drained and reused', async (t) => {
  const h = await startPooler(t, { XENON_POOLER_ORPHAN_DRAIN_MS: '4000' });
  const s = await h.raw();
  s.socket.pause();
  s.send(query(`SELECT repeat('x', 1000) FROM generate_series(1, 200000)`));
  const srv = () => [...h.pool().servers][0]!;
  t.ok(await until(() => h.pool().servers.size === 1 && srv().paused), 'paused by backpressure');
  s.socket.destroy();
  t.ok(await until(() => h.pool().idle.length === 1, 3_500), 'back in the pool before the drain timeout');
  t.equal(h.stats().servers_closed, 0);
});

t.test('the same statement text under different startup search_paths is prepared separately', async (t) => {
  await appAdmin.query(`CREATE SCHEMA IF NOT EXISTS sa AUTHORIZATION app; CREATE SCHEMA IF NOT EXISTS sb AUTHORIZATION app;
    CREATE TABLE IF NOT EXISTS sa.t (a text); CREATE TABLE IF NOT EXISTS sb.t (b int, c int);
    TRUNCATE sa.t, sb.t; INSERT INTO sa.t VALUES ('in a'); INSERT INTO sb.t VALUES (1, 2); GRANT ALL ON sa.t, sb.t TO app`);
  const h = await startPooler(t);
  const a = await h.client({ options: '-c search_path=sa' });
  const b = await h.client({ options: '-c search_path=sb' });
  t.same((await a.query({ name: 'q', text: 'SELECT * FROM t' })).rows, [{ a: 'in a' }]);
  t.same((await b.query({ name: 'q', text: 'SELECT * FROM t' })).rows, [{ b: 1, c: 2 }]);
  t.same((await a.query({ name: 'q', text: 'SELECT * FROM t' })).rows, [{ a: 'in a' }]);
});

t.test('DEALLOCATE in an aborted transaction fails with 25P02 and keeps the statement, as in Postgres', async (t) => {
  const h = await startPooler(t);
  const s = await h.raw();
  s.send(parse('d1', 'SELECT 9 AS v'), sync(), query('BEGIN'), query('SELECT 1/0'));
  await s.until('Z', 3);
  s.send(query('DEALLOCATE d1'));
  const m = await s.until('Z');
  t.equal(types(m), 'EZ');
  t.equal(errorOf(m).C, '25P02');
  s.send(query('ROLLBACK'), bind('', 'd1', []), execute(), sync());
  const r = await s.until('Z', 2);
  t.same(dataRows(r), ['9'], 'd1 still exists');
  s.send(query('DEALLOCATE ALL'));
  t.equal(types(await s.until('Z')), 'CZ');
});

t.test('the compute lost between an answered Parse + Flush and its Sync: the client is told (08006)', async (t) => {
  const h = await startPooler(t);
  const s = await h.raw();
  s.send(query('SELECT 1'));
  await s.until('Z');
  s.send(parse('', 'SELECT pg_backend_pid()'), flush());
  t.equal(types(await s.until('1')), '1');
  const pid = (await appAdmin.query(`SELECT pid FROM pg_stat_activity WHERE usename = 'app' AND datname = 'app' AND backend_type = 'client backend'`)).rows[0].pid;
  await appAdmin.query('SELECT pg_terminate_backend($1)', [pid]);
  // (The compute's own FATAL 57P01 may come first; a compute that just vanishes sends nothing.)
  t.ok(await until(() => s.closed), 'the session ends: its batch cannot be finished');
  const codes = s.msgs.filter((m) => m.type === 'E').map((m) => errorOf([m]).C);
  t.ok(codes.includes('08006'), `errors: ${codes.join(', ')}`);
});

t.test('a client that leaves right after sending an extended COPY FROM STDIN: the copy is ended and the server reused', async (t) => {
  const h = await startPooler(t, { XENON_POOLER_ORPHAN_DRAIN_MS: '4000' });
  const c = await h.raw();
  c.send(query('SELECT 1'));
  await c.until('Z');
  c.send(parse('', 'COPY cp FROM STDIN'), bind('', '', []), execute(), sync());
  c.socket.end(); // leaves before the CopyInResponse arrives
  await sleep(300);
  const b = await h.client();
  const r = await Promise.race([b.query('SELECT 1 AS v').then((x) => x.rows), sleep(2_500).then(() => 'waited for the drain timeout')]);
  t.same(r, [{ v: 1 }], 'the server connection came back before the drain timeout');
  t.equal(h.stats().servers_closed, 0);
});
