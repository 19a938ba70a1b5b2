// Acceptance: the client matrix. Real clients — psql (SNI and options=endpoint), pgbench,
// node-postgres, postgres.js, Python psycopg2 and Java pgJDBC — reach one endpoint through the
// proxy over verified TLS, and each one does real work: a server-side prepared statement with
// parameters, committed and rolled-back transactions, COPY FROM STDIN / TO STDOUT with awkward
// data, a LISTEN/NOTIFY round trip, and a cancel of a running pg_sleep(30) that must fail with
// 57014 within a second of the cancel. One stack for the whole file; every client uses its own
// tables, channel and application_name, and an independent observer connection checks the results.
import t, { type Test } from 'tap';
import pg from 'pg';
import postgres from 'postgres';
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { prng } from '../helpers/prng.ts';
import { ROOT, startTestStack, waitFor } from '../helpers/stack.ts';

const DOMAIN = 'localtest.me';
const SLEEP = 'SELECT pg_sleep(30)';

// ---------------------------------------------------------------------------------------------
// Processes: every child is tracked and killed at teardown if it is still running.
const children = new Set<ChildProcess>();
t.teardown(() => {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
});

interface RunResult { code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string; ms: number }

function run(cmd: string, args: string[], o: { input?: Buffer | string; env?: NodeJS.ProcessEnv; timeoutMs?: number } = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const t0 = Date.now();
    const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'], env: { ...process.env, PGCONNECT_TIMEOUT: '30', ...o.env } });
    children.add(child);
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (d: Buffer) => out.push(d));
    child.stderr.on('data', (d: Buffer) => err.push(d));
    child.stdin.on('error', () => {});
    child.stdin.end(o.input ?? '');
    const timer = setTimeout(() => child.kill('SIGKILL'), o.timeoutMs ?? 60_000);
    child.once('error', (e) => { clearTimeout(timer); reject(e); });
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      children.delete(child);
      resolve({ code, signal, stdout: Buffer.concat(out).toString('utf8'), stderr: Buffer.concat(err).toString('utf8'), ms: Date.now() - t0 });
    });
  });
}

// ---------------------------------------------------------------------------------------------
// COPY data: rows with tabs, newlines, CRs, backslashes, quotes, NULLs, 2- to 4-byte UTF-8 and a
// few long values (several CopyData messages), in Postgres's canonical text format, so that
// COPY … TO STDOUT must give back exactly the bytes that went in.
interface Row { id: number; name: string; note: string | null; amount: string }
const rand = prng(20240611);
const pieces = ['plain', 'tab\there', 'new\nline', 'cr\rret', 'back\\slash', '"double"', "it's", 'comma,semi;', 'é ü ß', '✓ ✗', '😀🐘', '\\N literal', ' ', ''];
const ROWS: Row[] = Array.from({ length: 3_000 }, (_, i) => {
  const pick = (): string => pieces[Math.floor(rand() * pieces.length)]!;
  const long = i % 500 === 7 ? 'x'.repeat(5_000 + i) : '';
  const cents = Math.floor(rand() * 10_000_000);
  return {
    id: i + 1,
    name: `${pick()}${pick()}${long}`,
    note: i % 7 === 3 ? null : `${pick()} #${i}`,
    amount: `${i % 3 === 0 ? '-' : ''}${Math.floor(cents / 100)}.${String(cents % 100).padStart(2, '0')}`,
  };
});
const copyText = (v: string | null): string =>
  v === null ? '\\N' : v.replace(/\\/g, '\\\\').replace(/\t/g, '\\t').replace(/\n/g, '\\n').replace(/\r/g, '\\r');
const COPY_DATA = Buffer.from(ROWS.map((r) => [String(r.id), copyText(r.name), copyText(r.note), r.amount].join('\t') + '\n').join(''), 'utf8');
/** What the observer's digest query must find in a table loaded with ROWS. */
const ROWS_DIGEST = createHash('md5')
  .update(ROWS.map((r) => `${r.id}:${r.name}:${r.note ?? '<null>'}:${r.amount}`).join('|'), 'utf8')
  .digest('hex');
const COPY_COLUMNS = '(id int PRIMARY KEY, name text, note text, amount numeric)';

const work = mkdtempSync(join(tmpdir(), 'xenon-client-matrix-'));
t.teardown(() => rmSync(work, { recursive: true, force: true }));
const COPY_IN = join(work, 'copy-in.txt');
writeFileSync(COPY_IN, COPY_DATA);

// ---------------------------------------------------------------------------------------------
// One stack for the file, and an observer connection that checks what each client did.
const stack = await startTestStack(t);
const info = stack.info;
const observer = new pg.Client(stack.pgConfig());
observer.on('error', () => {});
await observer.connect();
t.teardown(() => observer.end());

async function tableRows(table: string): Promise<unknown[][]> {
  const r = await observer.query({ text: `SELECT id, v FROM ${table} ORDER BY id`, rowMode: 'array' });
  return r.rows;
}

/** Count and digest of a COPY table's decoded contents (compared with ROWS_DIGEST). */
async function copyTable(table: string): Promise<{ n: number; digest: string }> {
  const r = await observer.query<{ n: number; digest: string }>(
    `SELECT count(*)::int AS n, md5(string_agg(id || ':' || name || ':' || coalesce(note, '<null>') || ':' || amount, '|' ORDER BY id)) AS digest FROM ${table}`,
  );
  return r.rows[0]!;
}

/** Waits until a session of `appName` runs the sleep on the compute. */
function sleepRunning(appName: string): Promise<boolean> {
  return waitFor(async () => {
    const r = await observer.query<{ n: number }>(
      `SELECT count(*)::int AS n FROM pg_stat_activity WHERE application_name = $1 AND state = 'active' AND query = $2`,
      [appName, SLEEP],
    );
    return r.rows[0]!.n === 1;
  }, 10_000, 20);
}

const sentNotify = (client: string): string => `${client} payload ✓ é "q" ${Date.now()}`;

// ---------------------------------------------------------------------------------------------
// psql, twice: SNI (host=<endpoint>.<domain> hostaddr=127.0.0.1) and, with no SNI at all,
// host=127.0.0.1 with options=endpoint=<id> (verify-full: the certificate covers 127.0.0.1).

function psqlArgs(conn: string, sql: string[]): string[] {
  return [conn, '-X', '-A', '-t', '-v', 'ON_ERROR_STOP=1', '-v', 'VERBOSITY=verbose', ...sql.flatMap((s) => ['-c', s])];
}

const optionsConn = (app: string, endpoint = info.endpoint_id): string =>
  `host=127.0.0.1 port=${info.proxy_port} user=${info.role} password=${info.password} dbname=${info.database} sslmode=verify-full sslrootcert=${info.ca_cert} options=endpoint=${endpoint} application_name=${app}`;
const psqlForms = [
  { name: 'psql (SNI)', prefix: 'psql_sni', conn: (app: string) => stack.psqlConn({ extra: `application_name=${app}` }) },
  { name: 'psql (options=endpoint, no SNI)', prefix: 'psql_opt', conn: (app: string) => optionsConn(app) },
];

for (const form of psqlForms) {
  t.test(form.name, async (t) => {
    const app = `xm-${form.prefix}`;
    const conn = form.conn(app);
    const psql = (...sql: string[]): Promise<RunResult> => run('psql', psqlArgs(conn, sql));

    // (a) connect over verified TLS
    const who = await psql('SELECT current_user, current_database()', '\\conninfo');
    t.equal(who.code, 0, who.stderr);
    const lines = who.stdout.split('\n');
    t.equal(lines[0], `${info.role}|${info.database}`);
    t.match(who.stdout, /SSL connection \(protocol: TLSv1\.[23]/, 'TLS between psql and the proxy');
    if (form.prefix === 'psql_opt') {
      t.match(who.stdout, /on host "127\.0\.0\.1"/, 'connected by address: no SNI name to read the endpoint from');
      // The endpoint really comes from options: another id there is refused like any unknown endpoint.
      const wrong = await run('psql', psqlArgs(optionsConn(app, 'ep-nope-000000'), ['SELECT 1']));
      t.not(wrong.code, 0);
      t.match(wrong.stderr, /password authentication failed for user "neondb_owner"/);
    }

    // (b) server-side prepared statement with parameters (psql 15 has no \bind: SQL PREPARE/EXECUTE)
    const prep = await psql(
      `PREPARE xm_p(int, text) AS SELECT $1 * 2, $2 || '!', length($2)`,
      `EXECUTE xm_p(21, 'héllo wörld')`,
      `EXECUTE xm_p(-7, 'it''s')`,
      `SELECT name, from_sql FROM pg_prepared_statements`,
    );
    t.equal(prep.code, 0, prep.stderr);
    t.same(prep.stdout.trim().split('\n'), ['PREPARE', '42|héllo wörld!|11', "-14|it's!|4", 'xm_p|t']);

    // (c) transactions: one committed, one rolled back
    const tx = await psql(
      `CREATE TABLE ${form.prefix}_tx (id int PRIMARY KEY, v text)`,
      `BEGIN; INSERT INTO ${form.prefix}_tx VALUES (1, 'one'); INSERT INTO ${form.prefix}_tx VALUES (2, 'two'); COMMIT;`,
      `BEGIN; INSERT INTO ${form.prefix}_tx VALUES (3, 'three'); INSERT INTO ${form.prefix}_tx VALUES (4, 'four'); SELECT count(*) FROM ${form.prefix}_tx; ROLLBACK;`,
    );
    t.equal(tx.code, 0, tx.stderr);
    t.match(tx.stdout, /^4$/m, 'four rows inside the transaction before ROLLBACK');
    t.same(await tableRows(`${form.prefix}_tx`), [[1, 'one'], [2, 'two']], 'the commit is kept, the rollback is not');

    // (d) COPY FROM STDIN (psql's stdin) and COPY TO STDOUT
    const copyIn = await run('psql', psqlArgs(conn, [`CREATE TABLE ${form.prefix}_copy ${COPY_COLUMNS}`, `COPY ${form.prefix}_copy FROM STDIN`]), { input: COPY_DATA });
    t.equal(copyIn.code, 0, copyIn.stderr);
    t.match(copyIn.stdout, new RegExp(`^COPY ${ROWS.length}$`, 'm'));
    t.same(await copyTable(`${form.prefix}_copy`), { n: ROWS.length, digest: ROWS_DIGEST }, 'the server decoded every row as sent');
    const copyOut = await run('psql', [conn, '-X', '-v', 'ON_ERROR_STOP=1', '-c', `COPY (SELECT * FROM ${form.prefix}_copy ORDER BY id) TO STDOUT`]);
    t.equal(copyOut.code, 0, copyOut.stderr);
    t.ok(Buffer.from(copyOut.stdout, 'utf8').equals(COPY_DATA), `COPY TO STDOUT gives back the ${COPY_DATA.length} bytes that went in`);

    // (e) LISTEN in one psql, NOTIFY from another; the listener prints it after its next command
    const ch = `${form.prefix}_chan`;
    const payload = sentNotify(form.prefix);
    const listener = spawn('psql', [conn, '-X', '-A', '-t', '-v', 'ON_ERROR_STOP=1'], { stdio: ['pipe', 'pipe', 'pipe'] });
    children.add(listener);
    let heard = '';
    listener.stdout.on('data', (d: Buffer) => (heard += d.toString('utf8')));
    listener.stdin.write(`LISTEN ${ch};\n`);
    t.ok(await waitFor(() => heard.includes('LISTEN'), 10_000, 10), 'LISTEN done');
    const notify = await psql(`NOTIFY ${ch}, '${payload.replace(/'/g, "''")}'`);
    t.equal(notify.code, 0, notify.stderr);
    listener.stdin.write(`SELECT 'next';\n`);
    t.ok(await waitFor(() => heard.includes('Asynchronous notification'), 10_000, 10), 'notification arrived');
    t.match(heard, `Asynchronous notification "${ch}" with payload "${payload}" received from server process`);
    listener.stdin.end();
    t.equal(await new Promise((r) => listener.once('close', r)), 0);

    // (f) Ctrl-C during pg_sleep(30): libpq sends a CancelRequest to the proxy
    const sleeper = spawn('psql', psqlArgs(conn, [SLEEP]), { stdio: ['ignore', 'pipe', 'pipe'] });
    children.add(sleeper);
    let sleepErr = '';
    sleeper.stderr.on('data', (d: Buffer) => (sleepErr += d.toString('utf8')));
    const closed = new Promise<number | null>((r) => sleeper.once('close', r));
    t.ok(await sleepRunning(app), 'the sleep runs on the compute');
    const sentAt = Date.now();
    sleeper.kill('SIGINT');
    const code = await closed;
    const ms = Date.now() - sentAt;
    t.not(code, 0);
    t.match(sleepErr, /ERROR:\s+57014: canceling statement due to user request/);
    t.ok(ms < 1_000, `psql failed with 57014 ${ms} ms after the cancel`);
  });
}

// ---------------------------------------------------------------------------------------------
t.test('pgbench', async (t) => {
  const conn = stack.psqlConn({ extra: 'application_name=xm-pgbench' });
  const bench = (...args: string[]): Promise<RunResult> => run('pgbench', [...args, conn], { timeoutMs: 60_000 });
  /** The summary a run prints, with the checks every run must pass. */
  const summary = (r: RunResult, what: string): { processed: number; failed: number } => {
    t.equal(r.code, 0, `${what}: exit 0 ${r.stderr}`);
    t.notMatch(r.stderr, /error|abort/i, `${what}: no client errors`);
    const processed = Number(/number of transactions actually processed: (\d+)/.exec(r.stdout)?.[1] ?? NaN);
    const failed = Number(/number of failed transactions: (\d+)/.exec(r.stdout)?.[1] ?? NaN);
    t.ok(processed > 0, `${what}: ${processed} transactions`);
    t.equal(failed, 0, `${what}: no failed transactions`);
    return { processed, failed };
  };

  // init: client-side data generation is COPY FROM STDIN through the proxy
  const init = await bench('-i', '-s', '1', '-q');
  t.equal(init.code, 0, init.stderr);
  t.match(init.stderr, /done in [\d.]+ s/);
  const counts = await observer.query<{ a: number; b: number; h: number }>(
    'SELECT (SELECT count(*)::int FROM pgbench_accounts) AS a, (SELECT count(*)::int FROM pgbench_branches) AS b, (SELECT count(*)::int FROM pgbench_history) AS h',
  );
  t.same(counts.rows[0], { a: 100_000, b: 1, h: 0 }, 'scale 1 loaded');

  const simple = await bench('-S', '-M', 'simple', '-c', '4', '-j', '2', '-T', '2');
  t.match(simple.stdout, /query mode: simple/);
  summary(simple, '-S -M simple');

  const prepared = await bench('-S', '-M', 'prepared', '-c', '4', '-j', '2', '-T', '2');
  t.match(prepared.stdout, /query mode: prepared/);
  summary(prepared, '-S -M prepared');

  // The TPC-B-like script: BEGIN; UPDATE ×3; SELECT; INSERT; END — 2 clients × 50 transactions.
  const tpcb = await bench('-M', 'extended', '-c', '2', '-t', '50');
  t.match(tpcb.stdout, /transaction type: <builtin: TPC-B \(sort of\)>/);
  t.equal(summary(tpcb, 'tpcb-like -M extended').processed, 100);
  const hist = await observer.query<{ h: number; delta: string }>(
    'SELECT (SELECT count(*)::int FROM pgbench_history) AS h, (SELECT sum(delta) FROM pgbench_history)::text AS delta',
  );
  t.equal(hist.rows[0]!.h, 100, 'every committed transaction left its history row');
  const bal = await observer.query<{ ok: boolean }>('SELECT (SELECT sum(abalance) FROM pgbench_accounts) = (SELECT sum(delta) FROM pgbench_history) AS ok');
  t.equal(bal.rows[0]!.ok, true, 'account balances match the history (transactions were atomic)');

  // -C: a new connection (TLS + SCRAM + compute connection) for every transaction
  const reconnect = await bench('-S', '-C', '-c', '2', '-j', '2', '-T', '3');
  t.match(reconnect.stdout, /average connection time = [\d.]+ ms/);
  const { processed } = summary(reconnect, '-S -C');
  t.ok(processed >= 20, `-C: ${processed} connections in 3 s`);
});

// ---------------------------------------------------------------------------------------------
// node-postgres. pg has no COPY of its own: a Submittable (the interface pg-copy-streams uses)
// drives CopyIn/CopyOut on pg's connection.
interface PgConnection { query(text: string): void; sendCopyFromChunk(b: Buffer): void; endCopyFrom(): void }
class PgCopy implements pg.Submittable {
  readonly chunks: Buffer[] = [];
  command = '';
  private error?: Error;
  private settle!: (err?: Error) => void;
  readonly done = new Promise<void>((res, rej) => (this.settle = (e) => (e ? rej(e) : res())));
  constructor(readonly text: string, private readonly input?: Buffer) {}
  submit(connection: pg.Connection): void { (connection as unknown as PgConnection).query(this.text); }
  handleCopyInResponse(connection: PgConnection): void {
    const data = this.input ?? Buffer.alloc(0);
    for (let i = 0; i < data.length; i += 65_536) connection.sendCopyFromChunk(data.subarray(i, i + 65_536));
    connection.endCopyFrom();
  }
  // pg-protocol's chunk is a view into its read buffer, which it reuses: copy it.
  handleCopyData(msg: { chunk: Buffer }): void { this.chunks.push(Buffer.from(msg.chunk)); }
  handleCommandComplete(msg: { text: string }): void { this.command = msg.text; }
  handleError(err: Error): void { this.error = err; this.settle(err); }
  handleReadyForQuery(): void { this.settle(this.error); }
  handleRowDescription(): void {}
  handleDataRow(): void {}
  handleEmptyQuery(): void {}
  handlePortalSuspended(): void {}
}

t.test('node-postgres (pg)', async (t) => {
  const app = 'xm-pg';
  const cfg = { ...stack.pgConfig(), application_name: app };
  const open = async (): Promise<pg.Client> => {
    const c = new pg.Client(cfg);
    c.on('error', () => {});
    await c.connect();
    t.teardown(() => c.end().catch(() => {}));
    return c;
  };

  // (a)
  const c = await open();
  const who = await c.query<{ u: string; d: string }>('SELECT current_user AS u, current_database() AS d');
  t.same(who.rows[0], { u: info.role, d: info.database });
  t.ok((c as unknown as { connection: { stream: { encrypted?: boolean } } }).connection.stream.encrypted, 'TLS socket');

  // (b) a named (server-side) prepared statement, executed twice with parameters
  const text = `SELECT $1::int * 2 AS doubled, $2::text || '!' AS bang, length($2::text) AS len, $3::text IS NULL AS isnull`;
  const r1 = await c.query({ name: 'xm_pg', text, values: [21, 'héllo wörld', null] });
  const r2 = await c.query({ name: 'xm_pg', text, values: [-7, "it's", 'x'] });
  t.same([...r1.rows, ...r2.rows], [{ doubled: 42, bang: 'héllo wörld!', len: 11, isnull: true }, { doubled: -14, bang: "it's!", len: 4, isnull: false }]);
  const ps = await c.query({ text: 'SELECT name, from_sql FROM pg_prepared_statements ORDER BY name', rowMode: 'array' });
  t.same(ps.rows, [['xm_pg', false]], 'prepared on the server by the protocol, not by SQL');

  // (c)
  await c.query('CREATE TABLE pg_tx (id int PRIMARY KEY, v text)');
  await c.query('BEGIN');
  await c.query('INSERT INTO pg_tx VALUES ($1, $2)', [1, 'one']);
  await c.query('INSERT INTO pg_tx VALUES ($1, $2)', [2, 'two']);
  await c.query('COMMIT');
  await c.query('BEGIN');
  await c.query('INSERT INTO pg_tx VALUES ($1, $2)', [3, 'three']);
  await c.query('INSERT INTO pg_tx VALUES ($1, $2)', [4, 'four']);
  t.equal((await c.query<{ n: number }>('SELECT count(*)::int AS n FROM pg_tx')).rows[0]!.n, 4);
  await c.query('ROLLBACK');
  t.same(await tableRows('pg_tx'), [[1, 'one'], [2, 'two']]);

  // (d)
  await c.query(`CREATE TABLE pg_copy ${COPY_COLUMNS}`);
  const cin = c.query(new PgCopy('COPY pg_copy FROM STDIN', COPY_DATA));
  await cin.done;
  t.equal(cin.command, `COPY ${ROWS.length}`);
  t.same(await copyTable('pg_copy'), { n: ROWS.length, digest: ROWS_DIGEST });
  const cout = c.query(new PgCopy('COPY (SELECT * FROM pg_copy ORDER BY id) TO STDOUT'));
  await cout.done;
  t.equal(cout.command, `COPY ${ROWS.length}`);
  t.ok(Buffer.concat(cout.chunks).equals(COPY_DATA), 'COPY TO STDOUT round-trips the bytes');

  // (e)
  const listener = await open();
  const notifier = await open();
  const payload = sentNotify('pg');
  const heard = new Promise<pg.Notification>((res) => listener.on('notification', res));
  await listener.query('LISTEN pg_chan');
  const np = await notifier.query<{ pid: number }>('SELECT pg_backend_pid() AS pid, pg_notify($1, $2)', ['pg_chan', payload]);
  const n = await Promise.race([heard, new Promise<null>((r) => setTimeout(() => r(null), 10_000))]);
  t.same(n && { channel: n.channel, payload: n.payload, processId: n.processId }, { channel: 'pg_chan', payload, processId: np.rows[0]!.pid });

  // (f) pg's own cancel: a second connection to the proxy carrying the session's cancel key
  const victim = await open();
  const sleeping = victim.query(SLEEP).then(() => null, (e: Error & { code?: string }) => ({ e, at: Date.now() }));
  t.ok(await sleepRunning(app), 'the sleep runs on the compute');
  const active = (victim as unknown as { _activeQuery: unknown })._activeQuery;
  const canceller = new pg.Client(cfg) as pg.Client & { cancel(client: pg.Client, query: unknown): void; connection: pg.Connection };
  canceller.connection.on('error', () => {});
  const sentAt = Date.now();
  canceller.cancel(victim, active);
  const failed = await sleeping;
  t.ok(failed, 'the sleep failed');
  t.equal(failed?.e.code, '57014', String(failed?.e.message));
  t.ok(failed && failed.at - sentAt < 1_000, `pg failed with 57014 ${failed ? failed.at - sentAt : '∞'} ms after the cancel`);
  t.same((await victim.query('SELECT 1 AS one')).rows, [{ one: 1 }], 'the session survives');
});

// ---------------------------------------------------------------------------------------------
t.test('postgres.js', async (t) => {
  const app = 'xm-postgresjs';
  const cfg = stack.pgConfig();
  const sql = postgres({
    host: '127.0.0.1',
    port: info.proxy_port,
    user: info.role,
    password: info.password,
    database: info.database,
    ssl: cfg.ssl as { ca: string; servername: string; rejectUnauthorized: boolean },
    max: 4,
    connect_timeout: 30,
    onnotice: () => {},
    connection: { application_name: app },
  });
  t.teardown(() => sql.end({ timeout: 1 }));

  // (a)
  const who = await sql<{ u: string; d: string }[]>`SELECT current_user AS u, current_database() AS d`;
  t.same([...who], [{ u: info.role, d: info.database }]);

  // (b) postgres.js prepares parameterised queries as named statements by default
  const r = await sql.reserve();
  try {
    const rows = [];
    for (const [n, s] of [[21, 'héllo wörld'], [-7, "it's"]] as const) {
      rows.push(...await r`SELECT ${n}::int * 2 AS doubled, ${s}::text || '!' AS bang, length(${s}::text) AS len`);
    }
    t.same(rows, [{ doubled: 42, bang: 'héllo wörld!', len: 11 }, { doubled: -14, bang: "it's!", len: 4 }]);
    const ps = await r<{ statement: string; from_sql: boolean }[]>`SELECT statement, from_sql FROM pg_prepared_statements WHERE NOT from_sql`;
    t.ok(ps.some((p) => p.statement.startsWith('SELECT $1::int * 2 AS doubled')), 'a protocol-level prepared statement on the server');
  } finally {
    r.release();
  }

  // (c)
  await sql`CREATE TABLE pgjs_tx (id int PRIMARY KEY, v text)`;
  await sql.begin(async (tx) => {
    await tx`INSERT INTO pgjs_tx VALUES (${1}, ${'one'})`;
    await tx`INSERT INTO pgjs_tx VALUES (${2}, ${'two'})`;
  });
  let inside = -1;
  const rollback = await sql.begin(async (tx) => {
    await tx`INSERT INTO pgjs_tx VALUES (${3}, ${'three'})`;
    await tx`INSERT INTO pgjs_tx VALUES (${4}, ${'four'})`;
    inside = (await tx<{ n: number }[]>`SELECT count(*)::int AS n FROM pgjs_tx`)[0]!.n;
    throw new Error('roll it back');
  }).catch((e: Error) => e.message);
  t.equal(rollback, 'roll it back');
  t.equal(inside, 4);
  t.same(await tableRows('pgjs_tx'), [[1, 'one'], [2, 'two']]);

  // (d)
  await sql.unsafe(`CREATE TABLE pgjs_copy ${COPY_COLUMNS}`);
  const w = await sql`COPY pgjs_copy FROM STDIN`.writable();
  await pipeline(Readable.from([COPY_DATA.subarray(0, 100_001), COPY_DATA.subarray(100_001)]), w);
  t.same(await copyTable('pgjs_copy'), { n: ROWS.length, digest: ROWS_DIGEST });
  const got: Buffer[] = [];
  const rd = await sql`COPY (SELECT * FROM pgjs_copy ORDER BY id) TO STDOUT`.readable();
  await pipeline(rd, new Writable({ write(chunk: Buffer, _enc, cb) { got.push(chunk); cb(); } }));
  t.ok(Buffer.concat(got).equals(COPY_DATA), 'COPY TO STDOUT round-trips the bytes');

  // (e) sql.listen opens its own connection; sql.notify goes through the pool
  const payload = sentNotify('postgres.js');
  let resolveHeard!: (p: string) => void;
  const heard = new Promise<string>((res) => (resolveHeard = res));
  const sub = await sql.listen('pgjs_chan', (p) => resolveHeard(p));
  await sql.notify('pgjs_chan', payload);
  t.equal(await Promise.race([heard, new Promise<null>((r) => setTimeout(() => r(null), 10_000))]), payload);
  await sub.unlisten();

  // (f) query.cancel(): a CancelRequest on a new connection to the proxy
  const q = sql`SELECT pg_sleep(30)`;
  const sleeping = q.execute().then(() => null, (e: Error & { code?: string }) => ({ e, at: Date.now() }));
  t.ok(await sleepRunning(app), 'the sleep runs on the compute');
  const sentAt = Date.now();
  q.cancel();
  const failed = await sleeping;
  t.ok(failed, 'the sleep failed');
  t.equal(failed?.e.code, '57014', String(failed?.e.message));
  t.ok(failed && failed.at - sentAt < 1_000, `postgres.js failed with 57014 ${failed ? failed.at - sentAt : '∞'} ms after the cancel`);
  t.same([...await sql`SELECT 1 AS one`], [{ one: 1 }]);
});

// ---------------------------------------------------------------------------------------------
// psycopg2 and pgJDBC run driver programs (test/e2e/clients/) that report what they observed as
// JSON; the assertions are here.

interface Observed {
  driver: string;
  connect: { user: string; database: string; ssl_in_use?: boolean; ssl_protocol?: string };
  prepared: { rows: unknown[][]; server_statements: unknown[][] };
  tx: { inside_before_rollback: number; rows: unknown[][] };
  copy: { in: number; out: number };
  notify: { sent: string; received: { channel: string; payload: string; from_notifier: boolean }[] };
  cancel: { sqlstate?: string; message?: string; ms?: number; was_active: boolean; after: string; completed?: boolean };
  plaintext?: { error?: string; sqlstate?: string };
  timings_ms: Record<string, number>;
}

function driverEnv(prefix: string): NodeJS.ProcessEnv {
  return {
    XM_PREFIX: prefix,
    XM_PORT: String(info.proxy_port),
    XM_USER: info.role,
    XM_PASSWORD: info.password,
    XM_DATABASE: info.database,
    XM_ENDPOINT: info.endpoint_id,
    XM_DOMAIN: DOMAIN,
    XM_CA: info.ca_cert,
    XM_COPY_IN: COPY_IN,
    XM_COPY_OUT: join(work, `${prefix}-copy-out.txt`),
  };
}

async function checkDriver(t: Test, prefix: string, res: RunResult): Promise<void> {
  t.equal(res.code, 0, `driver exited 0: ${res.stderr}`);
  let o: Observed;
  try {
    o = JSON.parse(res.stdout) as Observed;
  } catch {
    t.fail(`driver printed no JSON: ${res.stdout} ${res.stderr}`);
    return;
  }
  t.comment(`${o.driver}: ${JSON.stringify(o.timings_ms)} (process ${res.ms} ms)`);
  // (a)
  t.same({ user: o.connect.user, database: o.connect.database }, { user: info.role, database: info.database }, JSON.stringify(o.connect));
  // (b) both prepared executions, with the values computed from the parameters
  t.same(o.prepared.rows?.map((r) => r.slice(0, 3)), [[42, 'héllo wörld!', 11], [-14, "it's!", 4]], JSON.stringify(o.prepared));
  // (c)
  t.equal(o.tx.inside_before_rollback, 4, JSON.stringify(o.tx));
  t.same(o.tx.rows, [[1, 'one'], [2, 'two']]);
  t.same(await tableRows(`${prefix}_tx`), [[1, 'one'], [2, 'two']], 'the observer sees the commit and not the rollback');
  // (d)
  t.same(o.copy, { in: ROWS.length, out: ROWS.length }, JSON.stringify(o.copy));
  t.same(await copyTable(`${prefix}_copy`), { n: ROWS.length, digest: ROWS_DIGEST });
  let copied = Buffer.alloc(0);
  try { copied = readFileSync(driverEnv(prefix).XM_COPY_OUT!); } catch { /* checked below */ }
  t.ok(copied.equals(COPY_DATA), `COPY TO STDOUT round-trips the ${COPY_DATA.length} bytes (got ${copied.length})`);
  // (e)
  t.same(o.notify.received, [{ channel: `${prefix}_chan`, payload: o.notify.sent, from_notifier: true }], JSON.stringify(o.notify));
  t.match(o.notify.sent, /payload ✓/);
  // (f)
  t.equal(o.cancel.was_active, true, 'the sleep ran on the compute before the cancel');
  t.equal(o.cancel.sqlstate, '57014', JSON.stringify(o.cancel));
  t.ok(typeof o.cancel.ms === 'number' && o.cancel.ms < 1_000, `failed ${o.cancel.ms} ms after the cancel`);
  t.equal(o.cancel.after, 'still here', 'the session survives the cancel');
  // Process-level evidence that TLS and the extended protocol were really used, per driver.
  return checkExtra(t, prefix, o);
}

function checkExtra(t: Test, prefix: string, o: Observed): void {
  if (prefix === 'py') {
    t.equal(o.connect.ssl_in_use, true, 'libpq reports TLS');
    t.match(o.connect.ssl_protocol, /^TLSv1\.[23]$/);
    // psycopg2 interpolates client-side; the statement is a server-side SQL PREPARE.
    t.same(o.prepared.server_statements, [['xm_py', "PREPARE xm_py(int, text) AS SELECT $1 * 2, $2 || '!', length($2), $2 IS NULL", true]]);
    t.same(o.prepared.rows.map((r) => r[3]), [false, false]);
  } else {
    // The proxy requires TLS: pgJDBC with sslmode=disable is refused (so the others were TLS).
    t.equal(o.plaintext?.sqlstate, '28000', JSON.stringify(o.plaintext));
    t.match(o.plaintext?.error, /connection is insecure/);
    // prepareThreshold=1: the statement is a protocol-level named statement on the server.
    t.ok(o.prepared.server_statements.some((s) => /^S_\d+$/.test(String(s[0])) && String(s[1]).startsWith('SELECT $1::int * 2') && s[2] === false), JSON.stringify(o.prepared.server_statements));
    t.same(o.prepared.rows.map((r) => r[3]), [true, true], 'a NULL parameter arrives as NULL');
  }
}

t.test('psycopg2 (Python, libpq hostaddr + SNI)', async (t) => {
  const res = await run('/usr/bin/python3', [join(ROOT, 'test/e2e/clients/psycopg2_matrix.py')], { env: driverEnv('py'), timeoutMs: 90_000 });
  await checkDriver(t, 'py', res);
});

t.test('pgJDBC (Java, options=endpoint, verify-full)', async (t) => {
  const res = await run('java', ['-cp', '/usr/share/java/postgresql.jar', join(ROOT, 'test/e2e/clients/JdbcMatrix.java')], { env: driverEnv('jdbc'), timeoutMs: 90_000 });
  await checkDriver(t, 'jdbc', res);
});

// Every client's cancel above (psql ×2, pg, postgres.js, psycopg2, pgJDBC) reached the proxy as a
// CancelRequest with a key the proxy had issued, and was forwarded to the compute.
t.test('each cancel was forwarded by the proxy', async (t) => {
  const metrics = await (await fetch(`${info.metrics_url}/metrics`)).text();
  const count = (outcome: string): number => Number(new RegExp(`xenon_proxy_cancel_requests_total\\{outcome="${outcome}"\\} (\\d+)`).exec(metrics)?.[1] ?? 0);
  t.equal(count('forwarded'), 6, 'six cancels forwarded');
  t.equal(count('unknown_key'), 0, 'no client sent a key the proxy does not know');
});
