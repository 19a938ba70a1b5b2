// Acceptance: the control plane's `/v1` API (wake-compute/api.ts) against the real stack — roles and
// databases as clients see them through the proxy, changes made while the compute sleeps, request
// validation and the uniform error body (docs/errors.md), endpoint settings, disabling and lifecycle
// events, projects from creation to deletion, the proxy-facing API, health and metrics.
//
// The proxy caches role secrets (XENON_PROXY_ACCESS_CACHE_MS, 4 minutes by default). This file runs
// the stack with a 250 ms cache so password resets and role deletions are visible after a short,
// deterministic wait (`settle()`: the cache TTL plus a heartbeat), instead of 4 minutes, whether or
// not the control plane also invalidates the proxy's entries. Not 0: with the lru-cache based cache
// this was written against, a ttl of 0 means "never expires" (role secrets cached for the proxy's life).
import t, { type Test } from 'tap';
import { existsSync, readFileSync } from 'node:fs';
import http from 'node:http';
import { join } from 'node:path';
import pg from 'pg';
import { parseScramSecret, verifyPassword } from '../../lib/scram.ts';
import type { Endpoint, LifecycleEvent, Role } from '../../wake-compute/api.ts';
import { ROOT, psql, startTestStack, waitFor, type TestStack } from '../helpers/stack.ts';

/** XENON_PROXY_ACCESS_CACHE_MS for this stack. */
const ACCESS_CACHE_MS = 250;
/** How long the proxy may still answer from its access cache (plus margin), and carry a heartbeat (200 ms). */
const settle = (): Promise<void> => sleep(ACCESS_CACHE_MS + 300);
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** An endpoint id that matches ENDPOINT_ID_RE but does not exist. */
const NO_ENDPOINT = 'ep-absent-thing-000000';
const NO_PROJECT = 'absent-thing-000000';

// ---------------------------------------------------------------- docs/errors.md

interface DocRow { sqlstate: string; http: number; retryable: boolean }

/** code → row of the table in docs/errors.md: the statuses asserted here are the documented ones. */
const DOCS: ReadonlyMap<string, DocRow> = (() => {
  const rows = new Map<string, DocRow>();
  for (const line of readFileSync(join(ROOT, 'docs', 'errors.md'), 'utf8').split('\n')) {
    const m = /^\| `([A-Z_]+)` \| ([0-9A-Z]{5}) \| (\d{3}) \| \w+ \| (yes|no) \|/.exec(line);
    if (m) rows.set(m[1]!, { sqlstate: m[2]!, http: Number(m[3]), retryable: m[4] === 'yes' });
  }
  return rows;
})();

// ---------------------------------------------------------------- raw HTTP

interface Raw {
  status: number;
  contentType: string | null;
  text: string;
  /** Parsed body, or undefined when it is not JSON. */
  json: unknown;
}

async function send(stack: TestStack, method: string, path: string, body?: string, base = stack.info.api_url): Promise<Raw> {
  const res = await fetch(base + path, {
    method,
    headers: body === undefined ? {} : { 'content-type': 'application/json' },
    body,
    signal: AbortSignal.timeout(30_000),
  });
  const text = await res.text();
  let json: unknown;
  try { json = JSON.parse(text); } catch { json = undefined; }
  return { status: res.status, contentType: res.headers.get('content-type'), text, json };
}

const call = (stack: TestStack, method: string, path: string, body?: unknown): Promise<Raw> =>
  send(stack, method, path, body === undefined ? undefined : JSON.stringify(body));

/**
 * Asserts the uniform error body `{ error: { code, message, retryable } }` with the HTTP status and
 * retryable flag docs/errors.md gives `code`; returns the message.
 */
function isError(t: Test, r: Raw, code: string, what: string): string {
  const doc = DOCS.get(code);
  t.ok(doc, `${code} is in docs/errors.md`);
  if (r.status < 400) {
    t.fail(`${what}: expected ${code} (HTTP ${doc?.http}), got HTTP ${r.status}: ${r.text.slice(0, 200)}`);
    return '';
  }
  t.equal(r.status, doc?.http, `${what}: HTTP ${doc?.http} (${r.text.slice(0, 200)})`);
  t.match(r.contentType ?? '', /^application\/json/, `${what}: a JSON body`);
  const body = r.json as { error?: { code?: unknown; message?: unknown; retryable?: unknown } } | undefined;
  t.same(Object.keys(body ?? {}), ['error'], `${what}: the body is { error }`);
  t.same(Object.keys(body?.error ?? {}).sort(), ['code', 'message', 'retryable'], `${what}: error has code, message, retryable`);
  t.equal(body?.error?.code, code, `${what}: code ${code}`);
  t.equal(body?.error?.retryable, doc?.retryable, `${what}: retryable as documented`);
  const message = typeof body?.error?.message === 'string' ? body.error.message : '';
  t.ok(message.length > 0, `${what}: a message`);
  return message;
}

/** A request on a given agent (so a test can pin the keep-alive connection), with a time limit. */
function httpRequest(agent: http.Agent, url: string, method: string, body: Buffer | undefined, timeoutMs: number): Promise<{ status: number; text: string; headers: http.IncomingHttpHeaders }> {
  return new Promise((resolve, reject) => {
    let done = false;
    const req = http.request(url, { method, agent, headers: body ? { 'content-type': 'application/json', 'content-length': String(body.length) } : {} }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (text += d));
      res.on('error', () => {});
      res.on('end', () => {
        done = true;
        clearTimeout(timer);
        resolve({ status: res.statusCode ?? 0, text, headers: res.headers });
      });
    });
    const timer = setTimeout(() => req.destroy(new Error(`${method} ${url}: no answer in ${timeoutMs} ms`)), timeoutMs);
    // A server may close after answering before it read the whole body: the answer is what counts.
    req.on('error', (err) => { if (!done) { clearTimeout(timer); reject(err); } });
    req.end(body);
  });
}

// ---------------------------------------------------------------- Postgres through the proxy

type ConnOpts = Parameters<TestStack['pgConfig']>[0];

async function query<R extends pg.QueryResultRow>(stack: TestStack, sql: string, o: ConnOpts = {}, values: unknown[] = []): Promise<R[]> {
  const c = new pg.Client(stack.pgConfig(o));
  await c.connect();
  try { return (await c.query<R>(sql, values)).rows; } finally { await c.end(); }
}

/** The error a connection attempt ends with, or undefined when it connects (then it is closed again). */
async function connectError(stack: TestStack, o: ConnOpts): Promise<pg.DatabaseError | undefined> {
  const c = new pg.Client(stack.pgConfig(o));
  c.on('error', () => {});
  try {
    await c.connect();
  } catch (err) {
    return err as pg.DatabaseError;
  }
  await c.end();
  return undefined;
}

/** pid of the branch's postmaster from its lock file (undefined when it is not running). */
function postmasterPid(stack: TestStack, branchId: string): number | undefined {
  try {
    return Number(readFileSync(join(stack.dirs.data, 'computes', branchId, 'pgdata', 'postmaster.pid'), 'utf8').split('\n')[0]);
  } catch {
    return undefined;
  }
}

function alive(pid: number): boolean {
  try { process.kill(pid, 0); return true; } catch { return false; }
}

// ---------------------------------------------------------------- the tests

t.test('the /v1 API against the real stack', async (t) => {
  const stack = await startTestStack(t, { XENON_PROXY_ACCESS_CACHE_MS: String(ACCESS_CACHE_MS) });
  const api = stack.api;
  const P = stack.info.project_id;
  const EP = stack.info.endpoint_id;
  const owner = { user: stack.info.role, password: stack.info.password };
  const branch = (await api.getEndpoint(EP)).endpoint.branch_id;
  const rolesPath = `/v1/projects/${P}/branches/main/roles`;
  const dbsPath = `/v1/projects/${P}/branches/main/databases`;
  const roleNames = async (): Promise<string[]> => (await api.listRoles(P, 'main')).roles.map((r) => r.name);
  const dbNames = async (): Promise<string[]> => (await api.listDatabases(P, 'main')).databases.map((d) => d.name);
  /** Asks the compute itself (as the project's owner role). */
  const onCompute = async (sql: string, values: unknown[]): Promise<number> =>
    (await query<{ n: number }>(stack, sql, owner, values))[0]!.n;

  await t.test('roles: create, log in, generated and reset passwords, conflicts, listing, delete', async (t) => {
    // A role with a given password can log in over TLS and is who the session says it is.
    const alice = await api.createRole(P, 'main', { name: 'alice', password: 'alice-password-1' });
    t.equal(alice.role.name, 'alice');
    t.equal(alice.role.branch_id, branch, 'on the main branch');
    t.same(Object.keys(alice.role).sort(), ['branch_id', 'created_at', 'name'], 'the created role carries no secret');
    const c = new pg.Client(stack.pgConfig({ user: 'alice', password: 'alice-password-1' }));
    await c.connect();
    const stream = (c as unknown as { connection: { stream: { encrypted?: boolean } } }).connection.stream;
    t.equal(stream.encrypted, true, 'the client connection is TLS');
    t.same((await c.query('SELECT current_user AS u, current_database() AS d')).rows, [{ u: 'alice', d: stack.info.database }]);
    await c.end();

    // No password in the request: one is generated, returned once, and works (with libpq too).
    const bob = await call(stack, 'POST', rolesPath, { name: 'bob' });
    t.equal(bob.status, 201, 'created');
    const bobPassword = (bob.json as { password?: unknown }).password;
    t.type(bobPassword, 'string', 'a generated password is returned');
    t.ok(typeof bobPassword === 'string' && bobPassword.length >= 16, 'and it is long enough to be a real password');
    const who = await psql(stack.psqlConn({ user: 'bob', password: String(bobPassword) }), 'SELECT current_user');
    t.equal(who.code, 0, `psql as bob: ${who.stderr}`);
    t.equal(who.stdout, 'bob');

    // Creating an existing role: 409, and the existing one is untouched.
    isError(t, await call(stack, 'POST', rolesPath, { name: 'alice', password: 'another-password' }), 'CP_CONFLICT', 'alice again');
    isError(t, await call(stack, 'POST', rolesPath, { name: stack.info.role, password: 'another-password' }), 'CP_CONFLICT', 'the project owner again');
    await settle();
    t.equal(await connectError(stack, { user: 'alice', password: 'alice-password-1' }), undefined, 'a rejected re-create does not change the password');

    // reset_password: the old password stops working, the new one works.
    const reset = await call(stack, 'POST', `${rolesPath}/alice/reset_password`, { password: 'alice-password-2' });
    t.equal(reset.status, 200, reset.text);
    t.match(reset.json, { role: { name: 'alice' }, password: 'alice-password-2' });
    await settle();
    const old = await connectError(stack, { user: 'alice', password: 'alice-password-1' });
    t.equal(old?.code, '28P01', 'the old password fails with 28P01');
    t.equal(old?.message, 'password authentication failed for user "alice"');
    t.same(await query(stack, 'SELECT current_user AS u', { user: 'alice', password: 'alice-password-2' }), [{ u: 'alice' }], 'the new password works');
    // And with a generated one.
    const reset2 = await call(stack, 'POST', `${rolesPath}/alice/reset_password`);
    t.equal(reset2.status, 200, reset2.text);
    const generated = String((reset2.json as { password?: unknown }).password);
    t.not(generated, 'alice-password-2', 'a new password is generated');
    await settle();
    t.equal((await connectError(stack, { user: 'alice', password: 'alice-password-2' }))?.code, '28P01', 'the previous password fails');
    t.equal(await connectError(stack, { user: 'alice', password: generated }), undefined, 'the generated password works');
    isError(t, await call(stack, 'POST', `${rolesPath}/nobody/reset_password`, { password: 'some-password' }), 'CP_NOT_FOUND', 'reset of an unknown role');

    // Listing never shows a secret (nor a password).
    const listed = await send(stack, 'GET', rolesPath);
    t.equal(listed.status, 200);
    const roles = (listed.json as { roles: Role[] }).roles;
    t.same(roles.map((r) => r.name).sort(), ['alice', 'bob', stack.info.role].sort(), 'every role is listed');
    for (const r of roles) t.same(Object.keys(r).sort(), ['branch_id', 'created_at', 'name'], `role ${r.name}: no secret field`);
    t.notMatch(listed.text, /SCRAM-SHA-256|secret/i, 'no secret anywhere in the listing');
    t.notOk(listed.text.includes(String(bobPassword)) || listed.text.includes(generated), 'no password in the listing');

    // Delete: bob can no longer log in, and the compute dropped him.
    const del = await call(stack, 'DELETE', `${rolesPath}/bob`);
    t.equal(del.status, 200, del.text);
    t.match(del.json, { role: { name: 'bob', branch_id: branch } });
    t.notOk((await roleNames()).includes('bob'), 'bob is gone from the list');
    await settle();
    const gone = await connectError(stack, { user: 'bob', password: String(bobPassword) });
    t.equal(gone?.code, '28P01', 'a deleted role cannot log in');
    t.equal(await onCompute('SELECT count(*)::int AS n FROM pg_roles WHERE rolname = $1', ['bob']), 0, 'the compute dropped the role');
    isError(t, await call(stack, 'DELETE', `${rolesPath}/bob`), 'CP_NOT_FOUND', 'delete of a role that is gone');

    // A role that owns a database cannot be deleted; the answer names the database.
    await api.createDatabase(P, 'main', { name: 'alice_db', owner_name: 'alice' });
    const owns = isError(t, await call(stack, 'DELETE', `${rolesPath}/alice`), 'CP_BAD_REQUEST', 'delete of a database owner');
    t.match(owns, /alice_db/, 'the message names the database');
    t.ok((await roleNames()).includes('alice'), 'alice is still there');
    t.equal(await connectError(stack, { user: 'alice', password: generated }), undefined, 'and can still log in');
    t.equal((await call(stack, 'DELETE', `${dbsPath}/alice_db`)).status, 200, 'the database deleted first');
    t.equal((await call(stack, 'DELETE', `${rolesPath}/alice`)).status, 200, 'then the role can go');
  });

  await t.test('databases: create, connect to it, list, delete (the compute\'s 3D000 passes through)', async (t) => {
    await api.createRole(P, 'main', { name: 'carol', password: 'carol-password' });
    const created = await call(stack, 'POST', dbsPath, { name: 'carol_db', owner_name: 'carol' });
    t.equal(created.status, 201, created.text);
    t.match(created.json, { database: { name: 'carol_db', owner_name: 'carol', branch_id: branch } });
    const carol = { user: 'carol', password: 'carol-password', database: 'carol_db' };
    t.same(await query(stack, 'SELECT current_database() AS d, current_user AS u', carol), [{ d: 'carol_db', u: 'carol' }]);
    t.equal(
      await onCompute('SELECT count(*)::int AS n FROM pg_database WHERE datname = $1 AND pg_get_userbyid(datdba) = $2', ['carol_db', 'carol']),
      1, 'the compute has the database, owned by carol',
    );
    const listed = (await api.listDatabases(P, 'main')).databases.find((d) => d.name === 'carol_db');
    t.match(listed, { name: 'carol_db', owner_name: 'carol', branch_id: branch }, 'listed');

    isError(t, await call(stack, 'POST', dbsPath, { name: 'carol_db', owner_name: 'carol' }), 'CP_CONFLICT', 'the same database again');
    isError(t, await call(stack, 'POST', dbsPath, { name: 'orphan_db', owner_name: 'nobody' }), 'CP_BAD_REQUEST', 'an owner that does not exist');
    t.notOk((await dbNames()).includes('orphan_db'), 'nothing created for an unknown owner');

    const del = await call(stack, 'DELETE', `${dbsPath}/carol_db`);
    t.equal(del.status, 200, del.text);
    t.match(del.json, { database: { name: 'carol_db' } });
    const err = await connectError(stack, carol);
    t.equal(err?.code, '3D000', 'the compute\'s own SQLSTATE reaches the client');
    t.equal(err?.message, 'database "carol_db" does not exist', 'and its own message');
    t.equal(err?.severity, 'FATAL');
    t.notOk((await dbNames()).includes('carol_db'), 'gone from the list');
    t.equal(await onCompute('SELECT count(*)::int AS n FROM pg_database WHERE datname = $1', ['carol_db']), 0, 'gone from the compute');
    isError(t, await call(stack, 'DELETE', `${dbsPath}/carol_db`), 'CP_NOT_FOUND', 'delete again');
    t.equal(await connectError(stack, { user: 'carol', password: 'carol-password' }), undefined, 'carol still logs in to the default database');
  });

  await t.test('roles and databases changed while stopped or suspended are there at the next start', async (t) => {
    await api.endpointAction(EP, 'stop');
    t.equal(postmasterPid(stack, branch), undefined, 'stopped: no postmaster');
    const dave = await api.createRole(P, 'main', { name: 'dave', password: 'dave-password' });
    t.equal(dave.role.name, 'dave');
    await api.createDatabase(P, 'main', { name: 'dave_db', owner_name: 'dave' });
    t.equal((await api.getEndpoint(EP)).endpoint.state, 'stopped', 'the API call did not start the compute');
    t.same(
      await query(stack, 'SELECT current_user AS u, current_database() AS d', { user: 'dave', password: 'dave-password', database: 'dave_db' }),
      [{ u: 'dave', d: 'dave_db' }],
      'the role and database created while stopped work after the wake',
    );

    await api.endpointAction(EP, 'suspend');
    t.equal((await api.getEndpoint(EP)).endpoint.state, 'suspended');
    await api.createRole(P, 'main', { name: 'erin', password: 'erin-password' });
    await settle();
    t.same(await query(stack, 'SELECT current_user AS u', { user: 'erin', password: 'erin-password' }), [{ u: 'erin' }], 'a role created while suspended works');
  });

  await t.test('validation: every bad request is a 400 (or 404/405/413) with the uniform error body', async (t) => {
    const projectsBefore = (await api.listProjects()).projects.length;
    const rolesBefore = await roleNames();

    // Bodies that are not a JSON object.
    t.match(isError(t, await send(stack, 'POST', '/v1/projects', '{not json'), 'CP_BAD_REQUEST', 'non-JSON body'), /JSON/);
    for (const body of ['[1,2]', '[]', '"a string"', 'null', '42']) {
      t.match(isError(t, await send(stack, 'POST', '/v1/projects', body), 'CP_BAD_REQUEST', `body ${body}`), /JSON object/);
    }
    isError(t, await send(stack, 'POST', rolesPath, '[{"name":"arr"}]'), 'CP_BAD_REQUEST', 'a role as a JSON array');
    isError(t, await send(stack, 'PATCH', `/v1/endpoints/${EP}`, '[]'), 'CP_BAD_REQUEST', 'PATCH with a JSON array');

    // Role names.
    const badNames: [string, unknown][] = [
      ['starts with a digit', '1abc'],
      ['pg_ prefix', 'pg_x'],
      ['the admin role', 'cloud_admin'],
      ['100 characters', 'a'.repeat(100)],
      ['64 characters', 'a'.repeat(64)],
      ['a double quote', 'a"b'],
      ['a single quote', "a'b"],
      ['a space', 'a b'],
      ['empty', ''],
      ['not a string', 5],
    ];
    for (const [what, name] of badNames) {
      t.match(isError(t, await call(stack, 'POST', rolesPath, { name, password: 'password-123' }), 'CP_BAD_REQUEST', `role name: ${what}`), /name/);
    }
    t.match(isError(t, await call(stack, 'POST', rolesPath, { password: 'password-123' }), 'CP_BAD_REQUEST', 'no role name'), /name is required/);
    t.equal((await call(stack, 'POST', rolesPath, { name: 'a'.repeat(63), password: 'password-123' })).status, 201, '63 characters is fine');
    await api.createRole(P, 'main', { name: 'Mixed_Case-1$', password: 'password-123' }).then(
      () => t.pass('letters, digits, _, - and $ are fine'),
      (err: Error) => t.fail(`Mixed_Case-1$: ${err.message}`),
    );

    // Passwords.
    for (const [what, password] of [['7 characters', '1234567'], ['a number', 12345678], ['257 characters', 'p'.repeat(257)]] as const) {
      t.match(isError(t, await call(stack, 'POST', rolesPath, { name: 'shortpw', password }), 'CP_BAD_REQUEST', `password: ${what}`), /password/);
    }
    isError(t, await call(stack, 'POST', `${rolesPath}/erin/reset_password`, { password: 'short' }), 'CP_BAD_REQUEST', 'reset to a short password');
    t.equal(await connectError(stack, { user: 'erin', password: 'erin-password' }), undefined, 'a rejected reset changes nothing');
    t.same((await roleNames()).filter((n) => !rolesBefore.includes(n)).sort(), ['Mixed_Case-1$', 'a'.repeat(63)].sort(), 'no role was created by a rejected request');

    // Timeouts and flags.
    const before = (await api.getEndpoint(EP)).endpoint;
    for (const [key, value] of [
      ['suspend_timeout_seconds', -1], ['suspend_timeout_seconds', 1.5], ['suspend_timeout_seconds', '5'],
      ['stop_timeout_seconds', -1], ['stop_timeout_seconds', 604_801], ['disabled', 'yes'],
    ] as const) {
      t.match(isError(t, await call(stack, 'PATCH', `/v1/endpoints/${EP}`, { [key]: value }), 'CP_BAD_REQUEST', `PATCH ${key}: ${JSON.stringify(value)}`), key);
    }
    const after = (await api.getEndpoint(EP)).endpoint;
    t.same(
      [after.suspend_timeout_seconds, after.stop_timeout_seconds, after.disabled],
      [before.suspend_timeout_seconds, before.stop_timeout_seconds, before.disabled],
      'rejected PATCHes changed nothing',
    );
    for (const [what, body] of [
      ['suspend_timeout_seconds -1', { suspend_timeout_seconds: -1 }],
      ['suspend_timeout_seconds 1.5', { suspend_timeout_seconds: 1.5 }],
      ['suspend_timeout_seconds "5"', { suspend_timeout_seconds: '5' }],
      ['a short role_password', { role_password: 'short' }],
      ['a reserved role_name', { role_name: 'pg_owner' }],
      ['a bad database_name', { database_name: 'my db' }],
    ] as const) {
      isError(t, await call(stack, 'POST', '/v1/projects', body), 'CP_BAD_REQUEST', `new project with ${what}`);
    }
    isError(t, await call(stack, 'POST', `/v1/projects/${P}/endpoints`, {}), 'CP_BAD_REQUEST', 'new endpoint without branch_id');
    t.equal((await api.listProjects()).projects.length, projectsBefore, 'no project was created by a rejected request');

    // A body over 1 MiB: 413, and the connection stays usable (or is closed) — never wedged.
    const big = JSON.stringify({ name: 'x'.repeat((1 << 20) + 1) });
    isError(t, await send(stack, 'POST', '/v1/projects', big), 'CP_PAYLOAD_TOO_LARGE', 'a 1 MiB body');
    const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
    try {
      const huge = Buffer.from(JSON.stringify({ name: 'x'.repeat(2 << 20) }));
      const first = await httpRequest(agent, `${stack.info.api_url}/v1/projects`, 'POST', huge, 10_000);
      t.equal(first.status, 413, 'a 2 MiB body on a keep-alive connection: 413');
      const next = await httpRequest(agent, `${stack.info.api_url}/healthz`, 'GET', undefined, 5_000).catch((err: Error) => err);
      t.equal(next instanceof Error ? next.message : next.status, 200, 'the next request on the same keep-alive agent is answered promptly');
    } finally {
      agent.destroy();
    }
    t.equal((await api.listProjects()).projects.length, projectsBefore, 'no project from the oversized bodies');

    // Routes and methods.
    for (const path of ['/v1/nope', '/v2/projects', `/v1/projects/${P}/branches/main/nope`, '/']) {
      isError(t, await send(stack, 'GET', path), 'HTTP_NOT_FOUND', `GET ${path}`);
    }
    for (const [method, path] of [['PUT', '/v1/projects'], ['GET', `/v1/endpoints/${EP}/start`], ['DELETE', '/v1/proxy/connections'], ['PUT', `/v1/projects/${P}`], ['POST', '/healthz']] as const) {
      isError(t, await send(stack, method, path), 'HTTP_METHOD_NOT_ALLOWED', `${method} ${path}`);
    }

    // Unknown projects and endpoints: 404, naming what was not found.
    for (const [method, path] of [
      ['GET', `/v1/projects/${NO_PROJECT}`], ['DELETE', `/v1/projects/${NO_PROJECT}`],
      ['GET', `/v1/projects/${NO_PROJECT}/endpoints`], ['GET', `/v1/projects/${NO_PROJECT}/branches`],
      ['GET', `/v1/projects/${NO_PROJECT}/branches/main/roles`], ['GET', `/v1/projects/${NO_PROJECT}/branches/main/databases`],
    ] as const) {
      t.match(isError(t, await send(stack, method, path), 'CP_NOT_FOUND', `${method} ${path}`), NO_PROJECT, `${method} ${path}: names the project`);
    }
    t.match(isError(t, await send(stack, 'GET', `/v1/projects/${P}/branches/br-absent-000000`), 'CP_NOT_FOUND', 'an unknown branch'), 'br-absent-000000');
    for (const [method, path] of [
      ['GET', `/v1/endpoints/${NO_ENDPOINT}`], ['PATCH', `/v1/endpoints/${NO_ENDPOINT}`], ['DELETE', `/v1/endpoints/${NO_ENDPOINT}`],
      ['POST', `/v1/endpoints/${NO_ENDPOINT}/start`], ['POST', `/v1/endpoints/${NO_ENDPOINT}/suspend`], ['POST', `/v1/endpoints/${NO_ENDPOINT}/stop`],
      ['GET', `/v1/endpoints/${NO_ENDPOINT}/events`],
    ] as const) {
      const body = method === 'PATCH' ? JSON.stringify({ suspend_timeout_seconds: 10 }) : undefined;
      t.match(isError(t, await send(stack, method, path, body), 'CP_ENDPOINT_NOT_FOUND', `${method} ${path}`), NO_ENDPOINT, `${method} ${path}: names the endpoint`);
    }
  });

  await t.test('names Postgres itself reserves are refused, and never break the branch', async (t) => {
    const p = await api.createProject({ name: 'reserved-names' });
    const path = `/v1/projects/${p.project.id}/branches/main`;
    // postgres, template0 and template1 are the compute's own databases (the control plane itself
    // connects to "postgres" to apply roles and databases); a later delete would try to drop them.
    // CREATE ROLE refuses "public" and "none". Metadata the compute cannot apply must never be stored:
    // every later role/database change and every compute start would fail on it. (Databases first:
    // today an accepted reserved role poisons every later request on the branch.)
    for (const name of ['postgres', 'template0', 'template1']) {
      isError(t, await call(stack, 'POST', `${path}/databases`, { name, owner_name: p.role.name }), 'CP_BAD_REQUEST', `database ${name}`);
    }
    for (const name of ['public', 'none']) {
      isError(t, await call(stack, 'POST', `${path}/roles`, { name, password: 'password-123' }), 'CP_BAD_REQUEST', `role ${name}`);
    }
    t.equal((await call(stack, 'POST', `${path}/roles`, { name: 'after', password: 'password-123' })).status, 201, 'roles can still be created on the branch');
    await api.endpointAction(p.endpoint.id, 'stop');
    const started = await call(stack, 'POST', `/v1/endpoints/${p.endpoint.id}/start`);
    t.equal(started.status, 200, `the branch's compute still starts: ${started.text.slice(0, 200)}`);
    await api.deleteProject(p.project.id);
  });

  await t.test('endpoints: settings, conflicts, lifecycle events, disable and enable', async (t) => {
    const patched = await api.updateEndpoint(EP, { suspend_timeout_seconds: 123, stop_timeout_seconds: 456 });
    t.match(patched.endpoint, { id: EP, suspend_timeout_seconds: 123, stop_timeout_seconds: 456, disabled: false });
    t.match((await api.getEndpoint(EP)).endpoint, { suspend_timeout_seconds: 123, stop_timeout_seconds: 456 }, 'GET reflects the PATCH');
    t.match((await api.listEndpoints(P)).endpoints.find((e) => e.id === EP), { suspend_timeout_seconds: 123, stop_timeout_seconds: 456 }, 'so does the list');
    t.match((await api.updateEndpoint(EP, { stop_timeout_seconds: 0 })).endpoint, { suspend_timeout_seconds: 123, stop_timeout_seconds: 0 }, 'a partial PATCH keeps the other fields');
    await api.updateEndpoint(EP, { suspend_timeout_seconds: 300, stop_timeout_seconds: 600 });

    // One read-write endpoint per branch.
    for (const branchRef of [branch, 'main']) {
      isError(t, await call(stack, 'POST', `/v1/projects/${P}/endpoints`, { branch_id: branchRef }), 'CP_CONFLICT', `a second endpoint for ${branchRef}`);
    }
    isError(t, await call(stack, 'POST', `/v1/projects/${P}/endpoints`, { branch_id: 'br-absent-000000' }), 'CP_NOT_FOUND', 'an endpoint for an unknown branch');
    t.same((await api.listEndpoints(P)).endpoints.map((e) => e.id), [EP], 'still exactly one endpoint');

    // Events, in order, for the actions performed here.
    await api.endpointAction(EP, 'start');
    const lastId = (await api.endpointEvents(EP)).events.at(-1)?.id ?? 0;
    t.equal((await api.endpointAction(EP, 'stop')).endpoint.state, 'stopped');
    t.equal((await api.endpointAction(EP, 'start')).endpoint.state, 'active');
    t.equal((await api.endpointAction(EP, 'suspend')).endpoint.state, 'suspended');
    t.equal((await api.endpointAction(EP, 'start')).endpoint.state, 'active', 'start of a suspended endpoint resumes it');
    t.equal((await api.endpointAction(EP, 'stop')).endpoint.state, 'stopped');
    const events = (await api.endpointEvents(EP)).events;
    const mine = events.filter((e) => e.id > lastId);
    t.same(mine.map((e) => e.event), ['stop', 'start', 'started', 'suspend', 'resume', 'stop'], 'stop, start, started, suspend, resume, stop');
    t.ok(mine.every((e: LifecycleEvent) => e.endpoint_id === EP), 'all of this endpoint');
    t.ok(events.every((e, i) => i === 0 || (e.id > events[i - 1]!.id && Date.parse(e.at) >= Date.parse(events[i - 1]!.at))), 'ids and times ascend');

    // Disabled: the compute stops, clients get 57P03 "the endpoint is disabled", nothing starts.
    const held = new pg.Client(stack.pgConfig());
    held.on('error', () => {});
    await held.connect();
    const pid = postmasterPid(stack, branch);
    t.ok(pid !== undefined && alive(pid), 'running before it is disabled');
    const disabled = await api.updateEndpoint(EP, { disabled: true });
    t.match(disabled.endpoint, { disabled: true, state: 'stopped' }, 'disabling stops it');
    t.ok(await waitFor(() => !alive(pid!), 5_000), 'its postmaster is gone');
    const heldErr = await held.query('SELECT 1').then(() => undefined, (e: Error) => e);
    t.ok(heldErr, 'an open session ends when the endpoint is disabled');
    await held.end().catch(() => {});
    const starts = (await api.endpointEvents(EP)).events.filter((e) => e.event === 'start').length;
    await settle(); // the proxy's heartbeat brings the invalidation of its cached address
    const err = await connectError(stack, {});
    t.equal(err?.code, '57P03', 'SQLSTATE 57P03');
    t.equal(err?.message, 'the endpoint is disabled');
    t.equal(err?.severity, 'FATAL');
    isError(t, await send(stack, 'POST', `/v1/endpoints/${EP}/start`), 'CP_ENDPOINT_DISABLED', 'start of a disabled endpoint');
    isError(t, await send(stack, 'POST', `/v1/proxy/endpoints/${EP}/wake`), 'CP_ENDPOINT_DISABLED', 'wake of a disabled endpoint');
    const still = (await api.getEndpoint(EP)).endpoint;
    t.match(still, { disabled: true, state: 'stopped' }, 'still stopped');
    t.equal((await api.endpointEvents(EP)).events.filter((e) => e.event === 'start').length, starts, 'no start was attempted');

    const enabled = await api.updateEndpoint(EP, { disabled: false });
    t.equal(enabled.endpoint.disabled, false);
    t.same(await query(stack, 'SELECT 1 AS one'), [{ one: 1 }], 'clients get in again');
    t.match((await api.getEndpoint(EP)).endpoint, { disabled: false, state: 'active' });
  });

  await t.test('projects: create, connect with what it returns, list, delete', async (t) => {
    const created = await call(stack, 'POST', '/v1/projects', {
      name: 'second', role_name: 'app', role_password: 'app-password-1', database_name: 'appdb', suspend_timeout_seconds: 120,
    });
    t.equal(created.status, 201, created.text.slice(0, 300));
    const p = created.json as {
      project: { id: string; name: string; default_branch_id: string };
      branch: { id: string; name: string; project_id: string };
      endpoint: Endpoint;
      role: Record<string, unknown>;
      database: { name: string; owner_name: string };
      password: string;
      connection_uri: string;
    };
    t.match(p.project, { name: 'second', default_branch_id: p.branch.id });
    t.match(p.branch, { name: 'main', project_id: p.project.id });
    t.match(p.endpoint, { project_id: p.project.id, branch_id: p.branch.id, state: 'active', suspend_timeout_seconds: 120, disabled: false, host: `${p.endpoint.id}.localtest.me` });
    t.same(Object.keys(p.role).sort(), ['branch_id', 'created_at', 'name'], 'the role carries no secret');
    t.equal(p.role.name, 'app');
    t.match(p.database, { name: 'appdb', owner_name: 'app' });
    t.equal(p.password, 'app-password-1');

    const uri = new URL(p.connection_uri);
    t.equal(uri.protocol, 'postgresql:');
    t.equal(decodeURIComponent(uri.username), 'app');
    t.equal(decodeURIComponent(uri.password), 'app-password-1');
    t.equal(uri.hostname, `${p.endpoint.id}.localtest.me`);
    t.equal(uri.pathname, '/appdb');
    t.equal(uri.searchParams.get('sslmode'), 'verify-full');
    t.equal(uri.port, String(stack.info.proxy_port), 'connection_uri names the port the proxy listens on');
    const creds = { endpoint: uri.hostname.split('.')[0]!, user: decodeURIComponent(uri.username), password: decodeURIComponent(uri.password), database: uri.pathname.slice(1) };
    t.same(await query(stack, 'SELECT current_user AS u, current_database() AS d', creds), [{ u: 'app', d: 'appdb' }], 'the connection_uri\'s credentials work through the proxy');
    t.equal((await connectError(stack, { user: 'app', password: 'app-password-1' }))?.code, '28P01', 'its role does not exist on another project\'s endpoint');

    t.ok((await api.listProjects()).projects.some((x) => x.id === p.project.id), 'listed');
    t.match((await api.getProject(p.project.id)).project, { id: p.project.id, name: 'second' });

    // Delete: the compute stops, its data goes, the endpoint looks like a wrong password.
    const pid = postmasterPid(stack, p.branch.id);
    t.ok(pid !== undefined && alive(pid), 'its compute runs');
    const dataDir = join(stack.dirs.data, 'computes', p.branch.id);
    t.ok(existsSync(dataDir), 'its data directory exists');
    const del = await call(stack, 'DELETE', `/v1/projects/${p.project.id}`);
    t.equal(del.status, 200, del.text);
    t.match(del.json, { project: { id: p.project.id } });
    t.ok(await waitFor(() => !alive(pid!), 5_000), 'its postmaster is gone');
    t.notOk(existsSync(dataDir), 'its data directory is removed');
    await settle();
    const err = await connectError(stack, creds);
    t.equal(err?.code, '28P01', 'its endpoint answers 28P01');
    t.equal(err?.message, 'password authentication failed for user "app"', 'like a wrong password');
    t.match(isError(t, await send(stack, 'GET', `/v1/projects/${p.project.id}`), 'CP_NOT_FOUND', 'the deleted project'), p.project.id);
    isError(t, await send(stack, 'GET', `/v1/endpoints/${p.endpoint.id}`), 'CP_ENDPOINT_NOT_FOUND', 'its endpoint');
    isError(t, await send(stack, 'DELETE', `/v1/projects/${p.project.id}`), 'CP_NOT_FOUND', 'delete again');
    t.notOk((await api.listProjects()).projects.some((x) => x.id === p.project.id), 'gone from the list');
    t.same(await query(stack, 'SELECT 1 AS one'), [{ one: 1 }], 'the default project is unaffected');
  });

  await t.test('the proxy-facing API', async (t) => {
    const access = await send(stack, 'GET', `/v1/proxy/endpoints/${EP}/access?role=${encodeURIComponent(stack.info.role)}`);
    t.equal(access.status, 200, access.text);
    const a = access.json as { endpoint_id: string; project_id: string; branch_id: string; role_secret: string | null; allowed_ips: string[] };
    t.match(a, { endpoint_id: EP, project_id: P, branch_id: branch, allowed_ips: [] });
    t.type(a.role_secret, 'string');
    t.match(a.role_secret, /^SCRAM-SHA-256\$\d+:[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+:[A-Za-z0-9+/=]+$/, 'a Postgres SCRAM secret');
    const secret = parseScramSecret(a.role_secret ?? '');
    t.ok(secret && verifyPassword(secret, stack.info.password), 'the secret of the role\'s password');
    t.notOk(secret && verifyPassword(secret, 'not-the-password'), 'and of no other');

    const unknownRole = await send(stack, 'GET', `/v1/proxy/endpoints/${EP}/access?role=nobody`);
    t.equal(unknownRole.status, 200);
    t.match(unknownRole.json, { endpoint_id: EP, role_secret: null }, 'unknown role: role_secret null');
    t.match((await send(stack, 'GET', `/v1/proxy/endpoints/${EP}/access`)).json, { role_secret: null }, 'no role: role_secret null');

    isError(t, await send(stack, 'GET', `/v1/proxy/endpoints/${NO_ENDPOINT}/access?role=x`), 'CP_ENDPOINT_NOT_FOUND', 'unknown endpoint');
    for (const bad of ['../etc', 'EP-UPPER', `${EP}/../x`, 'ep-', `${EP.toUpperCase()}`]) {
      isError(t, await send(stack, 'GET', `/v1/proxy/endpoints/${encodeURIComponent(bad)}/access?role=x`), 'CP_ENDPOINT_NOT_FOUND', `malformed endpoint id ${bad}`);
    }
    t.equal((await send(stack, 'GET', '/v1/proxy/endpoints/../etc/access?role=x')).status, 404, 'an unencoded ../ (normalised away by the client) is a 404 too');
    isError(t, await send(stack, 'POST', `/v1/proxy/endpoints/${NO_ENDPOINT}/wake`), 'CP_ENDPOINT_NOT_FOUND', 'wake of an unknown endpoint');

    const bad: [string, unknown][] = [
      ['empty', {}],
      ['missing proxy_id', { counts: {}, ttl_seconds: 5 }],
      ['empty proxy_id', { proxy_id: '', counts: {}, ttl_seconds: 5 }],
      ['numeric proxy_id', { proxy_id: 7, counts: {}, ttl_seconds: 5 }],
      ['missing counts', { proxy_id: 'test', ttl_seconds: 5 }],
      ['null counts', { proxy_id: 'test', counts: null, ttl_seconds: 5 }],
      ['negative count', { proxy_id: 'test', counts: { [EP]: -1 }, ttl_seconds: 5 }],
      ['non-integer count', { proxy_id: 'test', counts: { [EP]: 1.5 }, ttl_seconds: 5 }],
      ['string count', { proxy_id: 'test', counts: { [EP]: '3' }, ttl_seconds: 5 }],
      ['ttl 0', { proxy_id: 'test', counts: { [EP]: 5 }, ttl_seconds: 0 }],
      ['negative ttl', { proxy_id: 'test', counts: { [EP]: 5 }, ttl_seconds: -5 }],
      ['string ttl', { proxy_id: 'test', counts: { [EP]: 5 }, ttl_seconds: '5' }],
      ['missing ttl', { proxy_id: 'test', counts: { [EP]: 5 } }],
      ['an array', [{ proxy_id: 'test', counts: { [EP]: 5 }, ttl_seconds: 5 }]],
    ];
    for (const [what, body] of bad) isError(t, await call(stack, 'POST', '/v1/proxy/connections', body), 'CP_BAD_REQUEST', `connection report: ${what}`);
    t.equal((await api.getEndpoint(EP)).endpoint.connections, 0, 'no rejected report was counted');
  });

  await t.test('health and metrics', async (t) => {
    const health = await send(stack, 'GET', '/healthz');
    t.equal(health.status, 200);
    t.same(health.json, { status: 'ok' });
    const proxyHealth = await send(stack, 'GET', '/healthz', undefined, stack.info.metrics_url);
    t.equal(proxyHealth.status, 200);
    t.same(proxyHealth.json, { status: 'ok' });

    await query(stack, 'SELECT 1'); // the default endpoint is active
    const cp = await send(stack, 'GET', '/metrics');
    t.equal(cp.status, 200);
    t.match(cp.contentType ?? '', /^text\/plain/);
    const started = /^xenon_compute_transitions_total\{from="starting",to="active"\} (\d+)$/m.exec(cp.text);
    t.ok(started && Number(started[1]) >= 1, 'xenon_compute_transitions_total counts starts');
    const active = /^xenon_endpoints\{state="active"\} (\d+)$/m.exec(cp.text);
    let activeNow = 0;
    for (const p of (await api.listProjects()).projects) activeNow += (await api.listEndpoints(p.id)).endpoints.filter((e) => e.state === 'active').length;
    t.ok(active, 'xenon_endpoints{state="active"} is exported');
    t.equal(Number(active?.[1]), activeNow, 'and counts the active endpoints');

    const wakeCount = async (): Promise<number> => {
      const text = (await send(stack, 'GET', '/metrics', undefined, stack.info.metrics_url)).text;
      let n = 0;
      for (const m of text.matchAll(/^xenon_proxy_connect_duration_seconds_bucket\{([^}]*)\} (\d+)$/gm)) {
        if (m[1]!.includes('phase="wake"') && m[1]!.includes('le="+Inf"')) n += Number(m[2]);
      }
      return n;
    };
    const before = await wakeCount();
    await query(stack, 'SELECT 1');
    t.equal(await wakeCount(), before + 1, 'xenon_proxy_connect_duration_seconds_bucket{phase="wake"} observed the connection');
  });
});
