// The proxy in-process against a real Postgres compute, with a small scripted control-plane double
// (the e2e tests use the real control plane). Wake/connect retries (issue 3, part 5): backoff on
// retryable wake answers, no retry on final ones, a failing cached address invalidated and
// re-woken, connect timeouts retried, compute errors passed through without a re-wake. Also
// NegotiateProtocolVersion, the per-proxy connection cap, and what the logs say (and never say).
import t from 'tap';
import pg from 'pg';
import { createServer, type Server } from 'node:net';
import { connect as tlsConnect, createSecureContext } from 'node:tls';
import { connect as netConnect } from 'node:net';
import { createCa, createServerCert } from '../../certs/generate.ts';
import { XenonError } from '../../lib/errors.ts';
import { createLogger } from '../../lib/logger.ts';
import { findFreePort } from '../../lib/postgres.ts';
import { startTestPostgres } from '../helpers/postgres.ts';
import { loadProxyConfig, startProxy } from '../../proxy/index.ts';
import type { ComputeInfo, ControlPlaneApi, EndpointAccess } from '../../wake-compute/api.ts';

type WakeStep = ComputeInfo | XenonError;

/** A control plane that answers wakes from a script (then repeats the last step). */
class ScriptedControlPlane implements ControlPlaneApi {
  wakes = 0;
  script: WakeStep[] = [];
  constructor(private readonly access: EndpointAccess) {}
  async getEndpointAccess(endpoint: string): Promise<EndpointAccess | null> {
    return endpoint === this.access.endpoint_id ? this.access : null;
  }
  async wakeCompute(): Promise<ComputeInfo> {
    const step = this.script[Math.min(this.wakes, this.script.length - 1)]!;
    this.wakes++;
    if (step instanceof XenonError) throw step;
    return step;
  }
  async reportConnections() {
    return { ok: true as const, invalidate: [], invalidate_access: [] };
  }
}

const EP = 'ep-retry-1';

t.test('wake and connect retries', async (t) => {
  const db = await startTestPostgres(t, 'xenon-retry-');
  let port = db.port;
  const admin = new pg.Client(db.admin());
  await admin.connect();
  await admin.query(`CREATE ROLE app LOGIN PASSWORD 'app-password' CONNECTION LIMIT 1`);
  const { rows } = await admin.query<{ s: string }>(`SELECT rolpassword AS s FROM pg_authid WHERE rolname = 'app'`);
  await admin.end();

  const cp = new ScriptedControlPlane({ endpoint_id: EP, project_id: 'p', branch_id: 'b', role_secret: rows[0]!.s, allowed_ips: [], connection_rate_limit: null });
  const ca = createCa();
  const cert = createServerCert(ca, '*.localtest.me', [{ dns: '*.localtest.me' }]);
  const config = loadProxyConfig({
    XENON_PROXY_PORT: '0',
    XENON_PROXY_METRICS_PORT: '0',
    XENON_PROXY_HTTP_PORT: '0',
    XENON_PROXY_COMPUTE_CONNECT_TIMEOUT_MS: '400',
    XENON_PROXY_COMPUTE_CONNECT_ATTEMPTS: '4',
    XENON_PROXY_REPORT_INTERVAL_MS: '60000',
  }, []);
  const logLines: string[] = [];
  const proxy = await startProxy(config, {
    logger: createLogger({ level: 'debug', service: 'proxy-test', stream: { write: (l: string) => logLines.push(l) } }),
    controlPlane: cp,
    secureContext: () => createSecureContext({ cert: cert.certPem, key: cert.keyPem }),
  });
  t.teardown(() => proxy.close());
  const clientCfg = (o: Partial<pg.ClientConfig> = {}): pg.ClientConfig => ({
    host: '127.0.0.1',
    port: proxy.address.port,
    user: 'app',
    password: 'app-password',
    database: 'postgres',
    ssl: { ca: ca.certPem, servername: `${EP}.localtest.me` },
    ...o,
  });
  const info = (p: number, ttl = 0): ComputeInfo => ({ endpoint_id: EP, host: '127.0.0.1', port: p, cold: false, cache_ttl_ms: ttl });
  const retries = async (): Promise<number> => (await proxy.metrics.computeRetries.get()).values[0]?.value ?? 0;
  const attempt = async (o: Partial<pg.ClientConfig> = {}): Promise<{ code: string; message: string; ms: number }> => {
    const c = new pg.Client(clientCfg(o));
    c.on('error', () => {});
    const t0 = performance.now();
    try {
      await c.connect();
      await c.query('SELECT 1');
      return { code: 'ok', message: '', ms: performance.now() - t0 };
    } catch (err) {
      const e = err as { code?: string; message: string };
      return { code: e.code ?? 'none', message: e.message, ms: performance.now() - t0 };
    } finally {
      await c.end().catch(() => {});
    }
  };

  await t.test('retryable wake answers are retried with backoff', async (t) => {
    cp.wakes = 0;
    cp.script = [new XenonError('CP_UNAVAILABLE'), new XenonError('CP_COMPUTE_START_FAILED'), info(port)];
    const before = await retries();
    const r = await attempt();
    t.equal(r.code, 'ok', r.message);
    t.equal(cp.wakes, 3, 'woken three times');
    t.equal((await retries()) - before, 2, 'two retries counted');
    t.ok(r.ms >= 100, `with backoff between them (${Math.round(r.ms)} ms)`);
  });

  await t.test('a final wake answer is not retried', async (t) => {
    cp.wakes = 0;
    cp.script = [new XenonError('CP_ENDPOINT_DISABLED')];
    const r = await attempt();
    t.equal(r.code, '57P03');
    t.match(r.message, /the endpoint is disabled/);
    t.equal(cp.wakes, 1);
  });

  await t.test('refused and silent computes: retried with a re-wake each time, then 57P03', async (t) => {
    // Nothing listens on deadPort; the silent server accepts and never answers.
    const deadPort = await findFreePort(30000, 39999);
    const silent: Server = createServer(() => {});
    await new Promise<void>((r) => silent.listen(0, '127.0.0.1', () => r()));
    t.teardown(() => silent.close());
    const silentPort = (silent.address() as { port: number }).port;

    cp.wakes = 0;
    cp.script = [info(deadPort), info(silentPort), info(port)];
    const r = await attempt();
    t.equal(r.code, 'ok', `refused, then timed out, then the real compute: ${r.message}`);
    t.equal(cp.wakes, 3);
    t.ok(r.ms >= 400, `the silent compute cost its connect timeout (${Math.round(r.ms)} ms)`);

    cp.wakes = 0;
    cp.script = [info(deadPort)];
    const gaveUp = await attempt();
    t.equal(gaveUp.code, '57P03', `after every attempt: ${gaveUp.message}`);
    t.match(gaveUp.message, /could not connect to the compute node/);
    t.equal(cp.wakes, 4, 'XENON_PROXY_COMPUTE_CONNECT_ATTEMPTS wakes');
  });

  await t.test('a cached address that fails is invalidated and woken again at once', async (t) => {
    cp.wakes = 0;
    cp.script = [info(port, 60_000)];
    t.equal((await attempt()).code, 'ok');
    t.equal((await attempt()).code, 'ok');
    t.equal(cp.wakes, 1, 'the second connection used the cached answer');
    // The compute restarts on another port (as after a stop and a cold start).
    await db.restart();
    port = db.port;
    cp.script = [info(port, 60_000)];
    const r = await attempt();
    t.equal(r.code, 'ok', r.message);
    t.equal(cp.wakes, 2, 'one fresh wake after the cached address failed');
    t.ok(r.ms < 1_000, `no backoff for a stale cached address (${Math.round(r.ms)} ms)`);
  });

  await t.test('errors from the compute itself reach the client as they are, without a re-wake', async (t) => {
    const wakesBefore = cp.wakes;
    const retriesBefore = await retries();
    const db = await attempt({ database: 'nope' });
    t.equal(db.code, '3D000');
    t.match(db.message, /database "nope" does not exist/);
    // CONNECTION LIMIT 1: a second session of the role is refused by Postgres.
    const holder = new pg.Client(clientCfg());
    await holder.connect();
    const full = await attempt();
    await holder.end();
    t.equal(full.code, '53300');
    t.match(full.message, /too many connections for role "app"/);
    t.equal(cp.wakes, wakesBefore, 'no wake (cached answer, and no re-wake)');
    t.equal(await retries(), retriesBefore, 'no retry');
  });

  await t.test('NegotiateProtocolVersion for protocol 3.1 and _pq_ options', async (t) => {
    cp.script = [info(port)];
    const data = await new Promise<Buffer>((resolve) => {
      let got = Buffer.alloc(0);
      const s = tlsConnect({ host: '127.0.0.1', port: proxy.address.port, ca: ca.certPem, servername: `${EP}.localtest.me`, ALPNProtocols: ['postgresql'] }, () => {
        const params = Buffer.from('user\0app\0database\0postgres\0_pq_.compression\0on\0\0');
        const head = Buffer.alloc(8);
        head.writeInt32BE(8 + params.length, 0);
        head.writeInt32BE((3 << 16) | 1, 4);
        s.write(Buffer.concat([head, params]));
      });
      s.on('data', (d: Buffer) => {
        got = Buffer.concat([got, d]);
        if (got.includes(Buffer.from('SCRAM-SHA-256\0\0'))) s.destroy();
      });
      s.on('close', () => resolve(got));
      s.on('error', () => {});
    });
    // 'v', length, newest minor supported (0), one unrecognised option, its name; then 'R' (SASL).
    t.equal(String.fromCharCode(data[0]!), 'v', 'NegotiateProtocolVersion first');
    const len = data.readInt32BE(1);
    t.equal(data.readInt32BE(5), 196608, 'protocol 3.0 offered (the full version word, as Postgres sends it)');
    t.equal(data.readInt32BE(9), 1, 'one unrecognised option');
    t.equal(data.subarray(13, 1 + len).toString('latin1'), '_pq_.compression\0', 'named');
    t.equal(String.fromCharCode(data[1 + len]!), 'R', 'then authentication goes on');
    t.equal(data.readInt32BE(1 + len + 5), 10, 'AuthenticationSASL');
  });

  await t.test('the per-proxy connection cap', async (t) => {
    const capped = await startProxy(loadProxyConfig({ XENON_PROXY_PORT: '0', XENON_PROXY_METRICS_PORT: '0', XENON_PROXY_HTTP_PORT: '0', XENON_PROXY_MAX_CONNECTIONS: '1' }, []), {
      logger: createLogger({ level: 'silent' }),
      controlPlane: cp,
      secureContext: () => createSecureContext({ cert: cert.certPem, key: cert.keyPem }),
    });
    t.teardown(() => capped.close());
    const hog = netConnect(capped.address.port, '127.0.0.1');
    hog.on('error', () => {});
    await new Promise((r) => hog.once('connect', r));
    t.ok(await new Promise((r) => { const poll = () => (capped.openConnections === 1 ? r(true) : setTimeout(poll, 10)); poll(); }));
    const r = await attempt({ port: capped.address.port });
    t.equal(r.code, '53300');
    t.match(r.message, /too many connections to the proxy/);
    hog.destroy();
    await new Promise((r2) => setTimeout(r2, 50));
    t.equal((await attempt({ port: capped.address.port })).code, 'ok', 'a slot freed is usable again');
  });

  await t.test('logs: one JSON line per event, per-connection fields and timings, never a secret', async (t) => {
    const records = logLines.map((l) => JSON.parse(l) as Record<string, unknown>);
    const started = records.filter((r) => r.msg === 'session started');
    t.ok(started.length >= 5, 'session started lines');
    for (const r of started) {
      t.match(r, { sessionId: /^[0-9a-f-]{36}$/, endpoint: EP, role: 'app', peer: /^127\.0\.0\.1:\d+$/, tls: true, auth: 'scram', endpointFrom: 'sni' }, 'identifies the session');
      for (const k of ['tlsMs', 'authMs', 'wakeMs', 'connectMs', 'totalMs']) t.type(r[k], 'number', `${k}`);
    }
    t.ok(records.some((r) => r.msg === 'session ended' && typeof r.bytesToClient === 'number'), 'session ended with byte counts');
    t.ok(records.some((r) => r.msg === 'compute connect failed; waking again' && r.endpoint === EP), 'retries are logged');
    const all = logLines.join('');
    t.notOk(all.includes('app-password'), 'the password never appears');
    t.notOk(all.includes(rows[0]!.s.split('$')[2]!.split(':')[0]!), 'nor the stored key');
    t.notOk(/"p=|c=biws|r=[A-Za-z0-9+/]{20}/.test(all), 'nor SCRAM messages');
  });
});
