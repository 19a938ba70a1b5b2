// Acceptance for the proxy edge (issue 3): endpoint identification without SNI (options, password
// hack), direct TLS with ALPN, SCRAM-SHA-256-PLUS, startup parameters, the limits (IP allowlist,
// per-endpoint connection rate, failed authentications per address, cancel rate), timeouts, and
// the /metrics families — all against the real stack with real clients.
import t from 'tap';
import pg from 'pg';
import { connect as netConnect, Socket } from 'node:net';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import { readFileSync } from 'node:fs';
import parsePrometheus, { type PrometheusFamily } from 'parse-prometheus-text-format';
import { psql, startTestStack, waitFor, type TestStack } from '../helpers/stack.ts';
import { pgSasl, type PgSaslSession } from '../helpers/pg-sasl.ts';
import { Parser, serialize, type BackendMessage, type DatabaseError, type DataRowMessage } from '../../proxy/pgwire/index.ts';

const ENV = {
  XENON_PROXY_FAILED_AUTH_BURST: '3',
  XENON_PROXY_FAILED_AUTH_PER_SECOND: '0.01',
  XENON_PROXY_CANCEL_RATE_BURST: '2',
  XENON_PROXY_CANCEL_RATE_PER_SECOND: '0.01',
  XENON_PROXY_STARTUP_IDLE_TIMEOUT_MS: '1500',
  XENON_PROXY_TLS_HANDSHAKE_TIMEOUT_MS: '1000',
};

/** A pg socket whose connections leave from `localAddress` (a loopback alias: 127.0.0.0/8 is all ours). */
function fromAddress(localAddress: string): () => Socket {
  return () => {
    const s = new Socket();
    const connect = s.connect.bind(s) as (o: { port: number; host: string; localAddress: string }) => Socket;
    (s as unknown as { connect: (port: number, host: string) => Socket }).connect = (port, host) => connect({ port, host, localAddress });
    return s;
  };
}

/** Tries a pg connection; resolves with the SQLSTATE and message of a failure, or 'ok' after SELECT 1. */
async function tryPg(cfg: pg.ClientConfig): Promise<{ code: string; message: string }> {
  const c = new pg.Client(cfg);
  c.on('error', () => {});
  try {
    await c.connect();
    await c.query('SELECT 1');
    return { code: 'ok', message: '' };
  } catch (err) {
    const e = err as { code?: string; message: string };
    return { code: e.code ?? 'none', message: e.message };
  } finally {
    await c.end().catch(() => {});
  }
}

interface RawResult {
  alpn: string | false | null | undefined;
  mechanism?: string;
  rows: string[];
  error?: { code?: string; message: string };
  closed: boolean;
}

/**
 * A hand-driven client on a TLS socket opened directly (no SSLRequest: PostgreSQL 17's
 * `sslnegotiation=direct`): StartupMessage, SCRAM with pg's own client code (channel binding
 * when offered), then `SELECT 42`.
 */
function directTls(stack: TestStack, o: { alpn?: string[]; servername?: string; password?: string } = {}): Promise<RawResult> {
  const ca = readFileSync(stack.info.ca_cert);
  return new Promise((resolve) => {
    const result: RawResult = { alpn: undefined, rows: [], closed: false };
    const sock: TLSSocket = tlsConnect({
      host: '127.0.0.1',
      port: stack.info.proxy_port,
      ca,
      servername: o.servername ?? `${stack.info.endpoint_id}.localtest.me`,
      ...(o.alpn ? { ALPNProtocols: o.alpn } : {}),
    });
    let session: PgSaslSession | undefined;
    let ready = 0;
    const timer = setTimeout(() => sock.destroy(), 15_000);
    const done = (): void => { clearTimeout(timer); resolve(result); };
    sock.on('error', (err) => { result.error ??= { message: err.message }; });
    sock.on('close', () => { result.closed = true; done(); });
    sock.on('secureConnect', () => {
      result.alpn = sock.alpnProtocol;
      sock.write(serialize.startup({ user: stack.info.role, database: stack.info.database }));
    });
    const parser = new Parser();
    sock.on('data', (chunk: Buffer) => parser.parse(chunk, (msg: BackendMessage) => {
      void (async () => {
        const m = msg as BackendMessage & Record<string, unknown>;
        if (msg.name === 'authenticationSASL') {
          session = pgSasl.startSession(m.mechanisms as string[], sock);
          result.mechanism = session.mechanism;
          sock.write(serialize.sendSASLInitialResponseMessage(session.mechanism, session.response));
        } else if (msg.name === 'authenticationSASLContinue') {
          await pgSasl.continueSession(session!, o.password ?? stack.info.password, m.data as string, sock);
          sock.write(serialize.sendSCRAMClientFinalMessage(session!.response));
        } else if (msg.name === 'authenticationSASLFinal') {
          pgSasl.finalizeSession(session!, m.data as string);
        } else if (msg.name === 'readyForQuery') {
          if (ready++ === 0) sock.write(serialize.query('SELECT 42'));
          else sock.end(serialize.end());
        } else if (msg.name === 'dataRow') {
          result.rows.push(String((msg as DataRowMessage).fields[0]));
        } else if (msg.name === 'error') {
          const e = msg as DatabaseError;
          result.error = { code: e.code, message: e.message };
        }
      })().catch((err: Error) => { result.error = { message: err.message }; sock.destroy(); });
    }));
  });
}

/** A psql run with extra environment (e.g. PGPASSWORD carrying the password hack). */
function psqlWith(stack: TestStack, conn: string, sql: string, env: Record<string, string> = {}) {
  const saved = { ...process.env };
  Object.assign(process.env, env);
  try {
    return psql(conn, sql);
  } finally {
    for (const k of Object.keys(env)) if (saved[k] === undefined) delete process.env[k]; else process.env[k] = saved[k];
  }
}

t.test('proxy edge', async (t) => {
  const stack = await startTestStack(t, ENV);
  const { info } = stack;
  const noSni = `host=127.0.0.1 port=${info.proxy_port} user=${info.role} dbname=${info.database} sslmode=verify-ca sslrootcert=${info.ca_cert}`;
  const other = await stack.api.createProject({ name: 'bystander' });
  const otherCfg = (o: Partial<pg.ClientConfig> = {}): pg.ClientConfig => ({
    ...stack.pgConfig({ endpoint: other.endpoint.id, user: other.role.name, password: other.password, database: other.database.name }),
    ...o,
  });

  await t.test('endpoint from options, the password hack, and the errors that say how', async (t) => {
    const viaOptions = await psql(`${noSni} password=${info.password} options='endpoint=${info.endpoint_id}'`, 'SELECT 1');
    t.equal(viaOptions.code, 0, `options=endpoint=…: ${viaOptions.stderr}`);
    const dashed = await psql(`${noSni} password=${info.password} options='--endpoint=${info.endpoint_id} -c search_path=pg_catalog'`, 'SHOW search_path');
    t.equal(dashed.code, 0, dashed.stderr);
    t.equal(dashed.stdout, 'pg_catalog', '--endpoint= form; the rest of options reaches the compute');

    for (const sep of [';', '$']) {
      const r = await psqlWith(stack, noSni, 'SELECT current_user', { PGPASSWORD: `endpoint=${info.endpoint_id}${sep}${info.password}` });
      t.equal(r.code, 0, `password hack with ${JSON.stringify(sep)}: ${r.stderr}`);
      t.equal(r.stdout, info.role);
    }
    // node-postgres answers the cleartext request with the password as given.
    const pgHack = await tryPg({ ...stack.pgConfig(), ssl: { ca: readFileSync(info.ca_cert, 'utf8'), rejectUnauthorized: true, checkServerIdentity: () => undefined }, password: `endpoint=${info.endpoint_id};${info.password}` });
    t.equal(pgHack.code, 'ok', `pg with the password hack and no SNI: ${pgHack.message}`);

    const wrong = await psqlWith(stack, noSni, 'SELECT 1', { PGPASSWORD: `endpoint=${info.endpoint_id};not-the-password` });
    t.not(wrong.code, 0);
    t.match(wrong.stderr, /password authentication failed for user/, 'a wrong password behind the hack: 28P01');

    const missing = await psqlWith(stack, noSni, 'SELECT 1', { PGPASSWORD: info.password });
    t.not(missing.code, 0);
    t.match(missing.stderr, /endpoint ID is not specified/, 'no endpoint anywhere');
    t.match(missing.stderr, /options=endpoint%3D/, 'the message says how to pass it');

    const mismatch = await psql(stack.psqlConn({ extra: `options='endpoint=${other.endpoint.id}'` }), 'SELECT 1');
    t.not(mismatch.code, 0);
    t.match(mismatch.stderr, new RegExp(`hostname \\(${info.endpoint_id}\\) and in options \\(${other.endpoint.id}\\) differ`), 'SNI and options disagree: both named');

    const bad = await psql(`${noSni} password=${info.password} options='endpoint=ep_bad!'`, 'SELECT 1');
    t.match(bad.stderr, /invalid endpoint ID "ep_bad!"/);

    const plain = await psql(`host=127.0.0.1 port=${info.proxy_port} user=${info.role} password=${info.password} dbname=${info.database} sslmode=disable options='endpoint=${info.endpoint_id}'`, 'SELECT 1');
    t.match(plain.stderr, /connection is insecure \(try using sslmode=require\)/, 'plaintext is refused by default');

    const pooler = await psql(stack.psqlConn({ endpoint: `${info.endpoint_id}-pooler` }), 'SELECT 1');
    t.equal(pooler.code, 0, `the -pooler hostname is recognised (pooling itself comes later): ${pooler.stderr}`);
  });

  await t.test('direct TLS (sslnegotiation=direct) needs ALPN "postgresql"', async (t) => {
    const ok = await directTls(stack, { alpn: ['postgresql'] });
    t.equal(ok.alpn, 'postgresql', 'ALPN negotiated');
    t.same(ok.rows, ['42'], `query through a direct TLS connection (${ok.error?.message ?? 'no error'})`);
    t.equal(ok.mechanism, 'SCRAM-SHA-256-PLUS', 'channel binding chosen over TLS');

    const noAlpn = await directTls(stack, {});
    t.equal(noAlpn.error?.code, '08P01', `no ALPN: ${noAlpn.error?.message}`);
    t.match(noAlpn.error?.message ?? '', /ALPN protocol "postgresql"/);
    t.same(noAlpn.rows, []);

    const http = await directTls(stack, { alpn: ['http/1.1'] });
    t.equal(http.alpn, undefined, 'another ALPN protocol: the handshake fails');
    t.match(http.error?.message ?? '', /no application protocol/i);

    const wrongPw = await directTls(stack, { alpn: ['postgresql'], password: 'nope-nope' });
    t.equal(wrongPw.error?.code, '28P01', 'SCRAM still decides');
  });

  await t.test('SCRAM-SHA-256-PLUS with libpq and node-postgres', async (t) => {
    const required = await psql(stack.psqlConn({ extra: 'channel_binding=require' }), 'SELECT 1');
    t.equal(required.code, 0, `psql channel_binding=require: ${required.stderr}`);
    const pgPlus = await tryPg({ ...stack.pgConfig(), enableChannelBinding: true } as pg.ClientConfig);
    t.equal(pgPlus.code, 'ok', `pg enableChannelBinding: ${pgPlus.message}`);
    const disabled = await psql(stack.psqlConn({ extra: 'channel_binding=disable' }), 'SELECT 1');
    t.equal(disabled.code, 0, `plain SCRAM over TLS still works: ${disabled.stderr}`);
  });

  await t.test('startup parameters reach the compute; replication is refused', async (t) => {
    const c = new pg.Client({ ...stack.pgConfig(), application_name: 'edge-test', options: '-c statement_timeout=1234' } as pg.ClientConfig);
    await c.connect();
    const { rows } = await c.query<{ a: string; s: string; dd: string }>("SELECT current_setting('application_name') a, current_setting('statement_timeout') s, current_setting('extra_float_digits') dd");
    await c.end();
    t.same(rows[0], { a: 'edge-test', s: '1234ms', dd: '1' }, 'application_name, options and pg\'s extra_float_digits forwarded');
    const tz = await psqlWith(stack, stack.psqlConn(), 'SHOW TimeZone', { PGTZ: 'Asia/Tokyo' });
    t.equal(tz.stdout, 'Asia/Tokyo', 'PGTZ (a TimeZone option) forwarded');
    const repl = await psql(stack.psqlConn({ extra: 'replication=database' }), 'IDENTIFY_SYSTEM');
    t.not(repl.code, 0);
    t.match(repl.stderr, /replication connections are not supported through the proxy/);
  });

  await t.test('IP allowlist from the control plane', async (t) => {
    await t.rejects(stack.api.updateProject(info.project_id, { allowed_ips: ['10.0.0.0/33'] }), /invalid CIDR/, 'bad entries are refused by the API');
    await t.rejects(stack.api.updateProject(info.project_id, { allowed_ips: ['10.0.0.9-10.0.0.1'] }), /first address is after the last/);
    await stack.api.updateProject(info.project_id, { allowed_ips: ['10.0.0.0/8', '2001:db8::/32', '127.0.0.7'] });
    // The proxies drop the cached answer on their next report.
    t.ok(await waitFor(async () => (await tryPg(stack.pgConfig())).code === '28000', 5_000, 100), 'refused once the allowlist applies');
    const refused = await tryPg(stack.pgConfig());
    t.match(refused.message, /connections from IP address 127\.0\.0\.1 are not allowed to endpoint/, 'the message names the address');
    const fromListed = await tryPg({ ...stack.pgConfig(), stream: fromAddress('127.0.0.7') } as pg.ClientConfig);
    t.equal(fromListed.code, 'ok', `a listed single address gets in: ${fromListed.message}`);
    t.equal((await tryPg(otherCfg())).code, 'ok', 'another project is not affected');

    await stack.api.updateProject(info.project_id, { allowed_ips: ['127.0.0.2-127.0.0.9'] });
    t.ok(await waitFor(async () => (await tryPg({ ...stack.pgConfig(), stream: fromAddress('127.0.0.5') } as pg.ClientConfig)).code === 'ok', 5_000, 100), 'a range');
    t.equal((await tryPg(stack.pgConfig())).code, '28000', '127.0.0.1 is outside the range');
    await stack.api.updateProject(info.project_id, { allowed_ips: [] });
    t.ok(await waitFor(async () => (await tryPg(stack.pgConfig())).code === 'ok', 5_000, 100), 'an empty list allows everyone again');
  });

  await t.test('connection-attempt rate limit per endpoint, overridable per endpoint', async (t) => {
    await stack.api.updateEndpoint(info.endpoint_id, { connection_rate_limit: { per_second: 0.2, burst: 3 } });
    t.ok(await waitFor(async () => (await tryPg(stack.pgConfig())).code === '53300', 5_000, 50), 'the override applies (bucket of 3 drained at 0.2/s)');
    const limited = await tryPg(stack.pgConfig());
    t.equal(limited.code, '53300');
    t.match(limited.message, /too many connection attempts to this endpoint/);
    t.equal((await tryPg(otherCfg())).code, 'ok', 'another endpoint is not affected');
    const ep = await stack.api.getEndpoint(info.endpoint_id);
    t.same(ep.endpoint.connection_rate_limit, { per_second: 0.2, burst: 3 }, 'the API shows the override');
    await t.rejects(stack.api.updateEndpoint(info.endpoint_id, { connection_rate_limit: { per_second: 0, burst: 1 } }), /connection_rate_limit must be/);
    await stack.api.updateEndpoint(info.endpoint_id, { connection_rate_limit: null });
    t.ok(await waitFor(async () => (await tryPg(stack.pgConfig())).code === 'ok', 5_000, 100), 'back to the default limit');
  });

  await t.test('failed authentications per source address', async (t) => {
    const attacker = (password: string) => tryPg({ ...stack.pgConfig({ password }), stream: fromAddress('127.0.0.3') } as pg.ClientConfig);
    for (let i = 0; i < 3; i++) t.equal((await attacker('wrong-password')).code, '28P01', `failure ${i + 1}: 28P01`);
    const blocked = await attacker(info.password);
    t.equal(blocked.code, '53300', 'then even the right password is refused before any check');
    t.match(blocked.message, /too many failed authentication attempts from 127\.0\.0\.3/);
    const bystander = await tryPg({ ...stack.pgConfig(), stream: fromAddress('127.0.0.4') } as pg.ClientConfig);
    t.equal(bystander.code, 'ok', 'another address is let through');
  });

  await t.test('idle and TLS handshake timeouts in startup', async (t) => {
    const ssl = Buffer.alloc(8);
    ssl.writeInt32BE(8, 0);
    ssl.writeInt32BE(80877103, 4);
    // Both wait out their timeout: side by side.
    const [silent, stalled] = await Promise.all([rawExchange(stack, [], 5_000), rawExchange(stack, [ssl], 5_000)]);
    t.ok(silent.closedMs >= 1_400 && silent.closedMs < 4_000, `a silent client is dropped after the idle timeout (${Math.round(silent.closedMs)} ms)`);
    t.match(silent.data.toString('latin1'), /C08006\0Mno data from the client for 1500 ms/);
    t.equal(stalled.data.toString('latin1'), 'S', 'SSLRequest answered');
    t.ok(stalled.closedMs >= 900 && stalled.closedMs < 3_000, `no ClientHello: closed after the TLS handshake timeout (${Math.round(stalled.closedMs)} ms)`);
  });

  await t.test('cancel requests are rate-limited per source network', async (t) => {
    const cancel = Buffer.alloc(16);
    cancel.writeInt32BE(16, 0);
    cancel.writeInt32BE(80877102, 4);
    cancel.writeInt32BE(1, 8);
    cancel.writeInt32BE(2, 12);
    for (let i = 0; i < 4; i++) await rawExchange(stack, [cancel], 2_000, '127.0.1.9');
    const m = await scrape(stack);
    t.equal(sample(m, 'xenon_proxy_cancel_requests_total', { outcome: 'rate_limited' }), 2, 'the 3rd and 4th from 127.0.1.0/24 are dropped');
    await rawExchange(stack, [cancel], 2_000, '127.0.2.9');
    const after = await scrape(stack);
    t.equal(sample(after, 'xenon_proxy_cancel_requests_total', { outcome: 'rate_limited' }), 2, 'another network is not limited');
  });

  await t.test('/metrics: the families with sane values', async (t) => {
    const text = await (await fetch(`${info.metrics_url}/metrics`)).text();
    const m = parsePrometheus(text) as Family[];
    for (const name of ['xenon_proxy_connections_opened_total', 'xenon_proxy_connections_closed_total', 'xenon_proxy_connections_active', 'xenon_proxy_sessions_opened_total',
      'xenon_proxy_sessions_active', 'xenon_proxy_connect_duration_seconds', 'xenon_proxy_errors_total', 'xenon_proxy_bytes_total', 'xenon_proxy_cancel_requests_total',
      'xenon_proxy_rate_limited_total', 'xenon_proxy_tls_handshake_failures_total', 'xenon_proxy_authentications_total']) {
      t.ok(m.some((f) => f.name === name), `family ${name} parsed`);
    }
    t.ok((sample(m, 'xenon_proxy_connections_opened_total', { protocol: 'tcp' }) ?? 0) > 20, 'connections opened');
    t.ok((sample(m, 'xenon_proxy_connections_closed_total', { protocol: 'tcp' }) ?? 0) > 20, 'connections closed');
    t.ok((sample(m, 'xenon_proxy_sessions_opened_total', { protocol: 'tcp', kind: 'direct' }) ?? 0) > 5, 'sessions by kind: direct');
    t.ok((sample(m, 'xenon_proxy_sessions_opened_total', { protocol: 'tcp', kind: 'pooler' }) ?? 0) >= 1, 'sessions by kind: pooler');
    for (const phase of ['tls', 'auth', 'wake', 'connect', 'total']) {
      // parse-prometheus-text-format keeps only unlabelled histograms' counts: read the _count line itself.
      const count = new RegExp(`^xenon_proxy_connect_duration_seconds_count\\{phase="${phase}",cold="false"\\} (\\d+)$`, 'm').exec(text);
      t.ok(Number(count?.[1] ?? 0) > 0, `connect latency histogram: ${phase} (${count?.[1]})`);
    }
    t.ok((sample(m, 'xenon_proxy_authentications_total', { method: 'scram-plus', outcome: 'ok' }) ?? 0) > 0, 'auth: scram-plus');
    t.ok((sample(m, 'xenon_proxy_authentications_total', { method: 'scram', outcome: 'ok' }) ?? 0) > 0, 'auth: scram');
    t.ok((sample(m, 'xenon_proxy_authentications_total', { method: 'password', outcome: 'ok' }) ?? 0) >= 3, 'auth: password hack');
    t.ok((sample(m, 'xenon_proxy_authentications_total', { method: 'scram', outcome: 'failed' }) ?? 0) >= 3, 'auth failures (pg without channel binding)');
    t.ok((sample(m, 'xenon_proxy_authentications_total', { method: 'password', outcome: 'failed' }) ?? 0) >= 1, 'auth failures (password hack)');
    for (const limit of ['endpoint_connect', 'failed_auth', 'cancel']) t.ok((sample(m, 'xenon_proxy_rate_limited_total', { limit }) ?? 0) >= 1, `rate-limit rejections: ${limit}`);
    t.ok((sample(m, 'xenon_proxy_errors_total', { kind: 'user', code: 'PROXY_IP_NOT_ALLOWED' }) ?? 0) >= 1, 'errors by kind and code');
    t.ok((sample(m, 'xenon_proxy_errors_total', { kind: 'rateLimit', code: 'PROXY_RATE_LIMITED' }) ?? 0) >= 1);
    t.ok((sample(m, 'xenon_proxy_tls_handshake_failures_total', {}) ?? 0) >= 2, 'TLS handshake failures (wrong ALPN, stalled handshake)');
    t.ok((sample(m, 'xenon_proxy_bytes_total', { direction: 'to_compute' }) ?? 0) > 100, 'bytes to the compute');
    t.ok((sample(m, 'xenon_proxy_bytes_total', { direction: 'to_client' }) ?? 0) > 100, 'bytes to the client');
    t.ok((sample(m, 'xenon_proxy_cancel_requests_total', { outcome: 'unknown_key' }) ?? 0) >= 2, 'cancel requests');
    t.equal(sample(m, 'xenon_proxy_sessions_active', { protocol: 'tcp', kind: 'direct' }), 0, 'no session left active');
    const health = await fetch(`${info.metrics_url}/healthz`);
    t.equal(health.status, 200, '/healthz');
  });
});

type Family = PrometheusFamily;

async function scrape(stack: TestStack): Promise<Family[]> {
  const text = await (await fetch(`${stack.info.metrics_url}/metrics`)).text();
  return parsePrometheus(text) as Family[];
}

/** The value of one counter or gauge sample with exactly these labels. */
function sample(families: Family[], name: string, labels: Record<string, string>): number | undefined {
  const fam = families.find((f) => f.name === name);
  const match = fam?.metrics.find((m) => Object.entries(labels).every(([k, v]) => m.labels?.[k] === v) && Object.keys(m.labels ?? {}).length === Object.keys(labels).length);
  return match ? Number(match.value) : undefined;
}

/** Writes `pieces` on a raw TCP connection and collects the reply until the proxy closes. */
function rawExchange(stack: TestStack, pieces: Buffer[], limitMs: number, localAddress = '127.0.0.1'): Promise<{ data: Buffer; closedMs: number }> {
  return new Promise((resolve) => {
    const t0 = performance.now();
    const s = netConnect({ port: stack.info.proxy_port, host: '127.0.0.1', localAddress }, () => { for (const p of pieces) s.write(p); });
    const chunks: Buffer[] = [];
    const timer = setTimeout(() => s.destroy(), limitMs);
    s.on('data', (d: Buffer) => chunks.push(d));
    s.on('error', () => {});
    s.on('close', () => { clearTimeout(timer); resolve({ data: Buffer.concat(chunks), closedMs: performance.now() - t0 }); });
  });
}
