// Acceptance: wake on connect, scale to zero (suspend, then stop), single-flight cold starts,
// and failed authentication that never wakes a compute; psql and node-postgres reach an endpoint
// by hostname over verified TLS through the proxy, a restart of the whole stack keeps projects,
// roles and data, and a cancel goes through the proxy.
import t from 'tap';
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { connect } from 'node:net';
import { join } from 'node:path';
import pg from 'pg';
import { psql, startTestStack, waitFor, type TestStack } from '../helpers/stack.ts';

/** pid and port of the endpoint's postmaster, from its lock file (undefined when it is not running). */
function postmaster(stack: TestStack, branchId: string): { pid: number; port: number } | undefined {
  try {
    const lines = readFileSync(join(stack.dirs.data, 'computes', branchId, 'pgdata', 'postmaster.pid'), 'utf8').split('\n');
    return { pid: Number(lines[0]), port: Number(lines[3]) };
  } catch {
    return undefined;
  }
}

function alive(pid: number): boolean {
  try { process.kill(pid, 0); return true; } catch { return false; }
}

/** Does a Postgres on `port` answer an SSLRequest within `ms`? (A frozen one cannot.) */
function answers(port: number, ms: number): Promise<boolean> {
  return new Promise((res) => {
    const s = connect(port, '127.0.0.1', () => s.write(Buffer.from([0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])));
    const timer = setTimeout(() => { s.destroy(); res(false); }, ms);
    s.once('data', () => { clearTimeout(timer); s.destroy(); res(true); });
    s.once('error', () => { clearTimeout(timer); res(false); });
  });
}

async function query(stack: TestStack, sql: string, o: Parameters<TestStack['pgConfig']>[0] = {}): Promise<pg.QueryResult> {
  const c = new pg.Client(stack.pgConfig(o));
  await c.connect();
  try { return await c.query(sql); } finally { await c.end(); }
}

async function startEvents(stack: TestStack): Promise<number> {
  return (await stack.api.endpointEvents(stack.info.endpoint_id)).events.filter((e) => e.event === 'start').length;
}

// One stack for the file (default settings: the proxy's access cache keeps its 4-minute TTL). The
// tests run in order on it: the restart of the stack after the lifecycle tests, and the password
// reset of the owner role last.
const stack = await startTestStack(t);

t.test('lifecycle', async (t) => {
  const ep = stack.info.endpoint_id;
  const branch = (await stack.api.getEndpoint(ep)).endpoint.branch_id;
  await query(stack, 'CREATE TABLE kept (v text); INSERT INTO kept VALUES ($$before sleep$$)');

  await t.test('a stopped endpoint cold-starts on the first connection', async (t) => {
    await stack.api.endpointAction(ep, 'stop');
    t.equal((await stack.api.getEndpoint(ep)).endpoint.state, 'stopped');
    t.equal(postmaster(stack, branch), undefined, 'no postmaster while stopped');
    const before = await startEvents(stack);
    const { rows } = await query(stack, 'SELECT v FROM kept');
    t.same(rows, [{ v: 'before sleep' }]);
    t.equal(await startEvents(stack), before + 1, 'exactly one start');
    t.equal((await stack.api.getEndpoint(ep)).endpoint.state, 'active');
  });

  await t.test('idle: suspended after suspend_timeout, stopped after stop_timeout, woken again with data', async (t) => {
    await stack.api.updateEndpoint(ep, { suspend_timeout_seconds: 1, stop_timeout_seconds: 2 });
    const held = new pg.Client(stack.pgConfig());
    await held.connect();
    const pm = postmaster(stack, branch)!;
    t.ok(pm && alive(pm.pid), 'compute running');
    // While a client is connected, the endpoint stays active however long it is idle.
    await new Promise((r) => setTimeout(r, 1_800));
    t.equal((await stack.api.getEndpoint(ep)).endpoint.state, 'active', 'an open connection keeps it active');
    t.equal((await stack.api.getEndpoint(ep)).endpoint.connections, 1, 'the proxy reported the connection');
    await held.end();

    t.ok(await waitFor(async () => (await stack.api.getEndpoint(ep)).endpoint.state === 'suspended', 10_000), 'suspended');
    t.ok(alive(pm.pid), 'postmaster still exists while suspended (memory kept)');
    t.equal(await answers(pm.port, 300), false, 'a suspended compute does not answer');

    t.ok(await waitFor(async () => (await stack.api.getEndpoint(ep)).endpoint.state === 'stopped', 10_000), 'stopped');
    t.ok(await waitFor(() => !alive(pm.pid), 5_000), 'its postgres is gone');
    t.equal(postmaster(stack, branch), undefined, 'lock file removed: clean shutdown');

    const { rows } = await query(stack, 'SELECT v FROM kept');
    t.same(rows, [{ v: 'before sleep' }], 'the next connection wakes it and the rows are there');
    await stack.api.updateEndpoint(ep, { suspend_timeout_seconds: 300, stop_timeout_seconds: 600 });
  });

  await t.test('a suspended endpoint resumes on connect', async (t) => {
    const pm = postmaster(stack, branch)!;
    await stack.api.endpointAction(ep, 'suspend');
    t.equal(await answers(pm.port, 300), false, 'frozen');
    await new Promise((r) => setTimeout(r, 500)); // the proxy's heartbeat carries the invalidation
    const t0 = performance.now();
    const { rows } = await query(stack, 'SELECT 1 AS one');
    t.same(rows, [{ one: 1 }]);
    t.ok(performance.now() - t0 < 900, `resume + connect took ${Math.round(performance.now() - t0)} ms`);
    t.equal(postmaster(stack, branch)!.pid, pm.pid, 'same postmaster: resumed, not restarted');
  });

  await t.test('50 concurrent connections to a stopped endpoint: one start, all succeed', async (t) => {
    await stack.api.endpointAction(ep, 'stop');
    const before = await startEvents(stack);
    const results = await Promise.allSettled(Array.from({ length: 50 }, (_, i) => query(stack, `SELECT ${i} AS i`)));
    const ok = results.filter((r) => r.status === 'fulfilled').length;
    const errors = results.flatMap((r) => (r.status === 'rejected' ? [String(r.reason)] : []));
    t.equal(ok, 50, `all 50 succeeded ${errors.slice(0, 3).join('; ')}`);
    t.equal(await startEvents(stack), before + 1, 'exactly one compute start');
  });

  await t.test('wrong password, unknown role, unknown endpoint: 28P01 and nothing wakes', async (t) => {
    await stack.api.endpointAction(ep, 'stop');
    const before = await startEvents(stack);
    const attempts: [string, Parameters<TestStack['pgConfig']>[0], string][] = [
      ['wrong password', { password: 'not-the-password' }, stack.info.role],
      ['unknown role', { user: 'nobody' }, 'nobody'],
      ['unknown endpoint', { endpoint: 'ep-unknown-thing-000000' }, stack.info.role],
    ];
    for (const [what, cfg, user] of attempts) {
      const err = await query(stack, 'SELECT 1', cfg).then(() => undefined, (e: unknown) => e as pg.DatabaseError);
      t.equal(err?.code, '28P01', `${what}: 28P01`);
      t.equal(err?.message, `password authentication failed for user "${user}"`, `${what}: the same message as a wrong password`);
    }
    await new Promise((r) => setTimeout(r, 300));
    t.equal((await stack.api.getEndpoint(ep)).endpoint.state, 'stopped', 'endpoint still stopped');
    t.equal(await startEvents(stack), before, 'no compute start');
    t.equal(postmaster(stack, branch), undefined, 'no postmaster');
  });
});

t.test('a change the compute refuses is rolled back and explained', async (t) => {
  const { project_id: project } = stack.info;
  await stack.api.createRole(project, 'main', { name: 'owner_of_things', password: 'things-password' });
  await query(stack, 'GRANT CREATE ON SCHEMA public TO owner_of_things'); // as the database owner
  await query(stack, 'CREATE TABLE things (id int)', { user: 'owner_of_things', password: 'things-password' });
  const res = await fetch(`${stack.info.api_url}/v1/projects/${project}/branches/main/roles/owner_of_things`, { method: 'DELETE' });
  t.equal(res.status, 400);
  const body = (await res.json()) as { error: { code: string; message: string } };
  t.equal(body.error.code, 'CP_BAD_REQUEST');
  t.match(body.error.message, /the compute refused the change: role "owner_of_things" cannot be dropped because some objects depend on it/);
  t.ok((await stack.api.listRoles(project, 'main')).roles.some((r) => r.name === 'owner_of_things'), 'the role is still in the metadata');
  t.same((await query(stack, 'SELECT count(*)::int AS n FROM things', { user: 'owner_of_things', password: 'things-password' })).rows, [{ n: 0 }], 'and can still log in');
  // The endpoint keeps starting normally afterwards.
  await stack.api.endpointAction(stack.info.endpoint_id, 'stop');
  t.same((await query(stack, 'SELECT 1 AS one')).rows, [{ one: 1 }]);
  const events = (await stack.api.endpointEvents(stack.info.endpoint_id)).events.map((e) => e.event);
  t.notOk(events.includes('spec_failed'), 'nothing left half-applied');
});

t.test('no escalation: roles cannot grant themselves server-program rights; a client leaving mid-wake leaves nothing behind', async (t) => {
  const ep = stack.info.endpoint_id;
  const err = await query(stack, 'GRANT pg_execute_server_program TO CURRENT_USER').then(() => undefined, (e: pg.DatabaseError) => e);
  t.equal(err?.code, '42501', 'permission denied');
  const copy = await query(stack, `COPY (SELECT 1) TO PROGRAM 'true'`).then(() => undefined, (e: pg.DatabaseError) => e);
  t.equal(copy?.code, '42501', 'COPY TO PROGRAM is refused');

  await stack.api.endpointAction(ep, 'stop');
  await new Promise((r) => setTimeout(r, 300));
  // Authenticate, then vanish while the proxy is waking the compute.
  const c = new pg.Client(stack.pgConfig());
  // An abrupt TCP reset (not a clean close) on the socket under pg's TLS stream.
  const conn = (c as unknown as { connection: { once(e: string, f: () => void): void; stream: { _parent: { resetAndDestroy(): void } } } }).connection;
  conn.once('authenticationSASLFinal', () => conn.stream._parent.resetAndDestroy());
  c.on('error', () => {});
  await c.connect().catch(() => {});
  t.ok(await waitFor(async () => (await stack.api.getEndpoint(ep)).endpoint.state === 'active', 10_000), 'the wake itself completed');
  t.ok(await waitFor(async () => (await stack.api.getEndpoint(ep)).endpoint.connections === 0, 5_000), 'no live connection is left counted');
  const { rows } = await query(stack, `SELECT count(*)::int AS n FROM pg_stat_activity WHERE usename = current_user AND pid <> pg_backend_pid()`);
  t.same(rows, [{ n: 0 }], 'no compute session was kept for the departed client');
});

t.test('psql and pg by hostname, and a restart keeps everything', async (t) => {
  t.match(stack.info.connection_string, /^postgresql:\/\/neondb_owner:[^@]+@ep-[a-z]+-[a-z]+-\d{6}\.localtest\.me:\d+\/neondb\?sslmode=verify-full&sslrootcert=/);

  const r1 = await psql(stack.psqlConn(), 'CREATE TABLE items (id int PRIMARY KEY, name text); INSERT INTO items VALUES (1, $$one$$), (2, $$two$$); SELECT count(*) FROM items;');
  t.equal(r1.code, 0, `psql succeeded: ${r1.stderr}`);
  t.equal(r1.stdout.split('\n').pop(), '2');

  // The client's connection is TLS (verify-full passed, so the certificate covers the endpoint's name).
  const ssl = await psql(stack.psqlConn(), '\\conninfo');
  t.equal(ssl.code, 0, ssl.stderr);
  t.match(ssl.stdout, /SSL connection \(protocol: TLSv1\.[23]/);

  const c = new pg.Client(stack.pgConfig());
  await c.connect();
  await c.query('INSERT INTO items VALUES ($1, $2)', [3, 'three']);
  const { rows } = await c.query<{ n: string }>('SELECT count(*) AS n FROM items');
  t.equal(rows[0]!.n, '3', 'pg sees psql\'s rows and its own');
  const who = await c.query<{ u: string; d: string }>('SELECT current_user AS u, current_database() AS d');
  t.same(who.rows[0], { u: stack.info.role, d: 'neondb' });
  await c.end();

  // sslmode=verify-full with the wrong name fails certificate verification (no endpoint leaks).
  const wrong = await psql(stack.psqlConn({ extra: '' }).replace(/host=\S+/, 'host=localhost.example.com'), 'SELECT 1');
  t.not(wrong.code, 0, 'a host the certificate does not cover is refused by libpq');
  t.match(wrong.stderr, /does not match host name/);

  // Restart everything on the same state dir.
  const before = stack.info;
  t.equal(await stack.stop(), 0, 'xenon up exits 0 on Ctrl-C');
  await stack.restart();
  t.equal(stack.info.endpoint_id, before.endpoint_id, 'same endpoint after restart');
  t.equal(stack.info.password, before.password, 'same role password after restart');
  const projects = await stack.api.listProjects();
  t.same(projects.projects.map((p) => p.id), [before.project_id], 'projects kept');
  const r2 = await psql(stack.psqlConn(), 'SELECT string_agg(name, $$,$$ ORDER BY id) FROM items');
  t.equal(r2.code, 0, r2.stderr);
  t.equal(r2.stdout, 'one,two,three', 'rows kept across a restart of the stack');
});

t.test('cancel: psql interrupted during pg_sleep(30) is cancelled through the proxy', async (t) => {
  // The proxy's cancel counters below count from its restart in the test above.
  const t0 = Date.now();
  const child = spawn('psql', [stack.psqlConn(), '-X', '-c', 'SELECT pg_sleep(30)'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  // Wait until the query runs on the compute, then Ctrl-C (libpq sends a CancelRequest to the proxy).
  const running = async (): Promise<boolean> => {
    const c = new pg.Client(stack.pgConfig());
    await c.connect();
    try {
      const { rows } = await c.query<{ n: number }>(`SELECT count(*)::int AS n FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'`);
      return rows[0]!.n === 1;
    } finally { await c.end(); }
  };
  t.ok(await waitFor(running, 10_000, 100), 'the sleep is running');
  const sentAt = Date.now();
  child.kill('SIGINT');
  const code = await new Promise<number | null>((r) => child.once('exit', r));
  t.not(code, 0);
  t.match(stderr, /canceling statement due to user request/);
  t.ok(Date.now() - sentAt < 1_000, `cancelled ${Date.now() - sentAt} ms after Ctrl-C`);
  t.ok(Date.now() - t0 < 15_000);
  const metrics = await (await fetch(`${stack.info.metrics_url}/metrics`)).text();
  t.match(metrics, /xenon_proxy_cancel_requests_total\{outcome="forwarded"\} 1/);

  // A cancel key nobody owns is ignored (and does not crash anything).
  await new Promise<void>((res) => {
    const s = connect(stack.info.proxy_port, '127.0.0.1', () => {
      const b = Buffer.alloc(16);
      b.writeInt32BE(16, 0); b.writeInt32BE(80877102, 4); b.writeInt32BE(12345, 8); b.writeInt32BE(67890, 12);
      s.write(b);
    });
    s.on('close', () => res());
    s.on('error', () => res());
  });
  const after = await (await fetch(`${stack.info.metrics_url}/metrics`)).text();
  t.match(after, /xenon_proxy_cancel_requests_total\{outcome="unknown_key"\} 1/);
});

t.test('a password reset reaches the proxy within a heartbeat, despite its 4-minute secret cache', async (t) => {
  // The stack's default access cache TTL (240 s). Last in the file: the owner's password changes.
  const { project_id: project, role } = stack.info;
  const old = stack.info.password;
  t.same((await query(stack, 'SELECT 1 AS one')).rows, [{ one: 1 }], 'the secret is now cached at the proxy');
  const fresh = 'a-brand-new-password';
  await stack.api.createRole(project, 'main', { name: 'helper_role', password: 'helper-password' });
  const reset = await fetch(`${stack.info.api_url}/v1/projects/${project}/branches/main/roles/${role}/reset_password`, {
    method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ password: fresh }),
  });
  t.equal(reset.status, 200);
  t.ok(await waitFor(async () => {
    try { await query(stack, 'SELECT 1', { password: fresh }); return true; } catch { return false; }
  }, 3_000, 100), 'the new password works within a few heartbeats');
  const err = await query(stack, 'SELECT 1', { password: old }).then(() => undefined, (e: pg.DatabaseError) => e);
  t.equal(err?.code, '28P01', 'the old password is refused');
  t.same((await query(stack, 'SELECT current_user AS u', { user: 'helper_role', password: 'helper-password' })).rows, [{ u: 'helper_role' }], 'a role created while running works');
});
