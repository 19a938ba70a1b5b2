// Batches in the transaction pooler: when clients queue for a server connection, the queued
// clients' autocommit SELECTs are written behind the one that got it (XENON_POOLER_PIPELINE_DEPTH,
// default 4). Each test holds the only server connection of a pool of one with an open
// transaction, lets clients queue, then commits, so the batch that forms is known.
import t, { type Test } from 'tap';
import pg from 'pg';
import { createCa, createServerCert } from '../../certs/generate.ts';
import { pipelinable } from '../../proxy/pooler/client.ts';
import { dataRows, query, startAppPostgres, startPoolerProxy, until, type PoolerHarness } from '../helpers/pooler.ts';

const EP = 'ep-batch-1';
const { db, admin, secret } = await startAppPostgres(t, 'xenon-pooler-batch-');
const ca = createCa();
const cert = createServerCert(ca, '*.localtest.me', [{ dns: '*.localtest.me' }]);
const startPooler = (t: Test, env: Record<string, string> = {}): Promise<PoolerHarness> => startPoolerProxy(t, { db, secret, ca: ca.certPem, cert, endpoint: EP }, env, 1);

/** A query that keeps the compute busy for a while (about a second here) without pg_sleep, which is never batched. */
const SLOW = 'SELECT count(*)::int AS n FROM generate_series(1, 12000000)';
const codeOf = (p: Promise<unknown>): Promise<string> => p.then(() => 'ok', (e: { code?: string; message?: string }) => e.code ?? e.message ?? 'error');
const keyOf = (c: pg.Client): { processID: number; secretKey: number } => c as unknown as { processID: number; secretKey: number };

/** Opens `n` clients, has the holder take the only server connection in a transaction, runs `queries` (one per client) so they queue. */
async function queued(h: PoolerHarness, queries: string[]) {
  const holder = await h.client();
  const cs = await Promise.all(queries.map(() => h.client()));
  await holder.query('BEGIN');
  await holder.query('SELECT txid_current()');
  const before = h.stats().clients.waiting;
  const results: Promise<pg.QueryResult>[] = [];
  for (let i = 0; i < queries.length; i++) {
    results.push(cs[i]!.query(queries[i]!));
    // One at a time, so the queue's order is the order here.
    if (!(await until(() => h.stats().clients.waiting === before + i + 1))) throw new Error(`client ${i} did not queue`);
  }
  return { holder, cs, results };
}

t.test('which queries may be batched', async (t) => {
  const yes = ['SELECT 1', 'select abalance from pgbench_accounts where aid = 42;', '  SELECT a, b FROM t WHERE x = $$a$$  ', 'SELECT now()\n'];
  const no = [
    'BEGIN', 'SELECT 1; BEGIN', 'SELECT 1; SELECT 2', 'COMMIT', 'INSERT INTO t VALUES (1)', 'VALUES (1)', 'WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x',
    'SELECT * FROM t FOR UPDATE', 'SELECT * FROM t FOR NO KEY UPDATE', 'SELECT * FROM t for share', 'SELECT * INTO t2 FROM t',
    'SELECT pg_sleep(1)', 'SELECT pg_advisory_xact_lock(1)', 'SELECT pg_advisory_lock(1)', "SELECT set_config('a.b', 'c', false)",
    'SELECT 1 -- comment', 'SELECT /* c */ 1', "SELECT dblink_connect('x')", 'SET x = 1', 'SELECT * FROM pg_temp.t', `SELECT '${'x'.repeat(5000)}'`,
  ];
  for (const sql of yes) t.ok(pipelinable(query(sql)), sql);
  for (const sql of no) t.notOk(pipelinable(query(sql)), sql.slice(0, 60));
  const p = query('SELECT 1');
  p[0] = 0x50;
  t.notOk(pipelinable(p), 'only simple Query messages');
});

t.test('queued autocommit SELECTs go out in batches of four on one server connection, each client gets its own answer, none runs in another transaction', async (t) => {
  const h = await startPooler(t);
  const n = 12;
  const { holder, results } = await queued(h, Array.from({ length: n }, (_, i) => `SELECT ${i} AS n, pg_current_xact_id_if_assigned()::text AS x, pg_backend_pid() AS pid`));
  const holderPid = (await holder.query('SELECT pg_backend_pid() AS pid')).rows[0].pid;
  await holder.query('COMMIT');
  const rows = (await Promise.all(results)).map((r) => r.rows[0]);
  t.same(rows.map((r) => r.n), Array.from({ length: n }, (_, i) => i), 'every client got the answer to its own query');
  t.ok(rows.every((r) => r.x === null), 'none ran inside a transaction');
  t.ok(rows.every((r) => r.pid === holderPid), 'all on the one server connection');
  const s = h.stats();
  t.equal(s.pipelined, 9, 'three batches: the first in the queue and the three after it');
  t.equal(s.servers.total, 1);
  const { rows: act } = await admin.query(`SELECT count(*)::int AS n FROM pg_stat_activity WHERE usename = 'app'`);
  t.equal(act[0].n, 1, 'one server connection on the compute');
  // The clients go on normally, transactions included.
  const c = (await Promise.all([h.client()]))[0]!;
  await c.query('BEGIN');
  t.not((await c.query('SELECT txid_current()::text AS x')).rows[0].x, null);
  await c.query('COMMIT');
});

t.test('a query that may not be batched ends the batch (the queue stays first come, first served) and what follows never runs in its transaction', async (t) => {
  const h = await startPooler(t);
  const { holder, cs, results } = await queued(h, ['SELECT 1 AS v', 'BEGIN', 'SELECT 3 AS v, pg_current_xact_id_if_assigned()::text AS x', 'SELECT 4 AS v, pg_current_xact_id_if_assigned()::text AS x']);
  await holder.query('COMMIT');
  t.equal(h.stats().pipelined, 0, 'nothing was written behind the first: BEGIN came next');
  t.same((await results[0]!).rows, [{ v: 1 }]);
  await results[1];
  // The client in a transaction holds the connection; the two SELECTs wait for it.
  t.ok(await until(() => h.stats().clients.waiting === 2));
  const xid = (await cs[1]!.query('SELECT txid_current()::text AS x')).rows[0].x;
  await cs[1]!.query('COMMIT');
  const [r3, r4] = await Promise.all([results[2]!, results[3]!]);
  t.same(r3.rows, [{ v: 3, x: null }]);
  t.same(r4.rows, [{ v: 4, x: null }]);
  t.ok(xid, 'the transaction had its own xid');
  t.equal(h.stats().pipelined, 1, 'the two SELECTs after it went out as one batch');
});

t.test('a cancel for a query waiting in a batch cancels that query when it runs, and no other', async (t) => {
  const h = await startPooler(t);
  const { holder, cs, results } = await queued(h, [SLOW, SLOW, 'SELECT 3 AS v']);
  await holder.query('COMMIT');
  t.equal(h.stats().pipelined, 2);
  const k = keyOf(cs[1]!);
  t.equal(await h.proxy.pooler.cancel(k.processID, k.secretKey), true, 'accepted while it waits on the wire');
  const [a, b, c] = await Promise.all(results.map(codeOf));
  t.equal(a, 'ok', 'the query in front ran to the end');
  t.equal(b, '57014', 'the cancelled query was cancelled');
  t.equal(c, 'ok', 'the query behind it ran');
  t.same((await results[0]!).rows, [{ n: 12_000_000 }]);
  t.same((await results[2]!).rows, [{ v: 3 }]);
  t.ok(h.stats().pipeline_pauses >= 1, 'a slow batched query paused batching');
  t.equal(h.stats().pipeline_retries, 0);
});

t.test('a batched query that fails with 57014 while a cancel meant for another was on its way runs again, once', async (t) => {
  // statement_timeout makes the second query fail with 57014 on its own; the cancel for the first
  // marked it as exposed, so its first failure is taken for the cancel's and it runs again.
  const h = await startPooler(t);
  const holder = await h.client({ statement_timeout: 400 });
  const cs = await Promise.all([0, 1, 2].map(() => h.client({ statement_timeout: 400 })));
  await holder.query('BEGIN');
  const results: Promise<pg.QueryResult>[] = [];
  for (const [i, sql] of [SLOW, SLOW, 'SELECT 3 AS v'].entries()) {
    results.push(cs[i]!.query(sql));
    t.ok(await until(() => h.stats().clients.waiting === i + 1));
  }
  await holder.query('COMMIT');
  t.equal(h.stats().pipelined, 2);
  const k = keyOf(cs[0]!);
  t.equal(await h.proxy.pooler.cancel(k.processID, k.secretKey), true);
  const codes = await Promise.all(results.map(codeOf));
  t.same(codes, ['57014', '57014', 'ok']);
  t.equal(h.stats().pipeline_retries, 1, 'the exposed query ran twice; its own timeout then stood');
  t.same((await results[2]!).rows, [{ v: 3 }]);
});

t.test('clients that leave while their query is in a batch: the others get their answers and the connection is kept', async (t) => {
  const h = await startPooler(t);
  // Raw sessions all: clients with other startup parameters (pg sends some) are not batched together.
  const holder = await h.raw();
  holder.send(query('BEGIN'));
  await holder.until('Z');
  const [head, a, gone, b] = await Promise.all([h.raw(), h.raw(), h.raw(), h.raw()]);
  const sent: [typeof head, string][] = [[head, SLOW], [a, `SELECT 'a'`], [gone, 'SELECT 2'], [b, `SELECT 'b'`]];
  for (const [i, [s, sql]] of sent.entries()) {
    s.send(query(sql));
    t.ok(await until(() => h.stats().clients.waiting === i + 1));
  }
  holder.send(query('COMMIT'));
  await holder.until('Z');
  t.equal(h.stats().pipelined, 3);
  // The head of the batch and one in the middle leave while the slow query runs.
  head.socket.destroy();
  gone.socket.destroy();
  t.same(dataRows(await a.until('Z')), ['a']);
  t.same(dataRows(await b.until('Z')), ['b']);
  t.equal(h.stats().servers.total, 1, 'the server connection was kept');
  t.ok(await until(() => h.stats().clients.total === 3));
  holder.send(query(`SELECT 'next ' || coalesce(pg_current_xact_id_if_assigned()::text, 'none')`));
  t.same(dataRows(await holder.until('Z')), ['next none'], 'the next query runs, outside any transaction');
});

t.test('a server connection lost in the middle of a batch fails every query of it, and the pool opens a new one', async (t) => {
  const h = await startPooler(t);
  const { holder, results } = await queued(h, [SLOW, 'SELECT 2', 'SELECT 3']);
  const pid = (await holder.query('SELECT pg_backend_pid() AS pid')).rows[0].pid;
  await holder.query('COMMIT');
  t.equal(h.stats().pipelined, 2);
  await admin.query('SELECT pg_terminate_backend($1)', [pid]);
  const codes = await Promise.all(results.map(codeOf));
  t.equal(codes[0], '57P01', 'the running query: the compute\'s own error');
  t.same(codes.slice(1), ['08006', '08006'], 'the ones behind it: connection lost');
  const c = await h.client();
  t.same((await c.query('SELECT 1 AS v')).rows, [{ v: 1 }], 'a new server connection serves');
});

t.test('XENON_POOLER_PIPELINE_DEPTH=1 turns batching off', async (t) => {
  const h = await startPooler(t, { XENON_POOLER_PIPELINE_DEPTH: '1' });
  const { holder, results } = await queued(h, ['SELECT 1', 'SELECT 2', 'SELECT 3']);
  await holder.query('COMMIT');
  await Promise.all(results);
  t.equal(h.stats().pipelined, 0);
});

t.test('many clients on two server connections mixing batchable SELECTs, failing SELECTs, transactions and reconnects: every answer is the asker\'s own', async (t) => {
  const h = await startPoolerProxy(t, { db, secret, ca: ca.certPem, cert, endpoint: EP }, {}, 2);
  let wrong = 0;
  let checked = 0;
  const note = (ok: boolean, what: string): void => {
    checked++;
    if (!ok && wrong++ < 5) t.fail(what);
  };
  const worker = async (id: number): Promise<void> => {
    let c = await h.client();
    for (let i = 0; i < 25; i++) {
      const r = (id * 31 + i * 17) % 10;
      if (r < 6) {
        const row = (await c.query(`SELECT ${id} AS id, ${i} AS i, pg_current_xact_id_if_assigned()::text AS x`)).rows[0];
        note(row.id === id && row.i === i && row.x === null, `client ${id} step ${i}: got ${JSON.stringify(row)}`);
      } else if (r < 7) {
        const code = await codeOf(c.query(`SELECT ${id} / (${i} - ${i}) AS boom`));
        note(code === '22012', `client ${id} step ${i}: division by zero expected, got ${code}`);
      } else if (r < 9) {
        await c.query('BEGIN');
        const x = (await c.query('SELECT txid_current()::text AS x')).rows[0].x;
        const again = (await c.query(`SELECT ${id} AS id, pg_current_xact_id_if_assigned()::text AS x`)).rows[0];
        await c.query('COMMIT');
        note(again.id === id && again.x === x, `client ${id} step ${i}: its transaction ${x}, saw ${JSON.stringify(again)}`);
      } else {
        await c.end();
        c = await h.client();
      }
    }
    await c.end();
  };
  await Promise.all(Array.from({ length: 60 }, (_, id) => worker(id)));
  t.equal(wrong, 0, `${checked} answers checked`);
  t.ok(h.stats().pipelined > 0, `batches formed (${h.stats().pipelined} queries batched)`);
  t.ok(h.stats().servers.total <= 2);
});
