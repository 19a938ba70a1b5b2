/**
 * Profiling aid for the pooler's hot path (not part of `npm run bench`): the proxy in-process
 * (control-plane double) in front of a throwaway Postgres, pgbench -S through `-pooler` for
 * PROFILE_SECONDS (10) with PROFILE_CLIENTS (200). Run with `node --cpu-prof --import tsx
 * test/bench/pooler-profile.ts` and open the .cpuprofile; prints TPS and the proxy's CPU per
 * transaction.
 */
import { spawn } from 'node:child_process';
import { createSecureContext } from 'node:tls';
import pg from 'pg';
import { createCa, createServerCert } from '../../certs/generate.ts';
import { createLogger } from '../../lib/logger.ts';
import { findPgBin } from '../../lib/postgres.ts';
import { join } from 'node:path';
import { loadProxyConfig, startProxy } from '../../proxy/index.ts';
import { startTestPostgres } from '../helpers/postgres.ts';
import type { ComputeInfo, EndpointAccess } from '../../wake-compute/api.ts';

const SECONDS = Number(process.env.PROFILE_SECONDS ?? 10);
const CLIENTS = Number(process.env.PROFILE_CLIENTS ?? 200);
const MODE = process.env.PROFILE_MODE ?? 'simple';
const teardowns: (() => unknown)[] = [];
const EP = 'ep-prof-1';

try {
  const db = await startTestPostgres({ teardown: (f) => teardowns.push(f) }, 'xenon-prof-', { max_connections: 300 });
  const admin = new pg.Client(db.admin());
  await admin.connect();
  await admin.query(`CREATE ROLE app LOGIN PASSWORD 'app-password' SUPERUSER`);
  const { rows } = await admin.query<{ s: string }>(`SELECT rolpassword AS s FROM pg_authid WHERE rolname = 'app'`);
  await admin.end();
  const access: EndpointAccess = { endpoint_id: EP, project_id: 'p', branch_id: 'b', role_secret: rows[0]!.s, allowed_ips: [], connection_rate_limit: null, pool_size: 20 };
  const ca = createCa();
  const cert = createServerCert(ca, '*.localtest.me', [{ dns: '*.localtest.me' }]);
  const secureContext = createSecureContext({ cert: cert.certPem, key: cert.keyPem });
  const proxy = await startProxy(loadProxyConfig({ XENON_PROXY_PORT: '0', XENON_PROXY_METRICS_PORT: '0', XENON_PROXY_HTTP_PORT: '0', XENON_PROXY_REPORT_INTERVAL_MS: '60000', XENON_PROXY_CONNECT_RATE_BURST: '100000' }, []), {
    logger: createLogger({ level: 'warn', service: 'prof', stream: { write: () => {} } }),
    controlPlane: {
      getEndpointAccess: async (e: string) => (e === EP ? access : null),
      wakeCompute: async (): Promise<ComputeInfo> => ({ endpoint_id: EP, host: '127.0.0.1', port: db.port, cold: false, cache_ttl_ms: 600_000 }),
      reportConnections: async () => ({ ok: true as const, invalidate: [], invalidate_access: [] }),
    },
    secureContext: () => secureContext,
  });
  teardowns.push(() => proxy.close());
  const conn = (ep: string): string => `host=${ep}.localtest.me hostaddr=127.0.0.1 port=${proxy.address.port} user=app dbname=postgres sslmode=require`;
  const run = (args: string[]): Promise<string> => new Promise((resolve) => {
    const c = spawn(join(findPgBin(process.env), 'pgbench'), args, { env: { ...process.env, PGPASSWORD: 'app-password' } });
    let out = '';
    c.stdout.on('data', (d: Buffer) => (out += d));
    c.stderr.on('data', (d: Buffer) => (out += d));
    c.on('exit', () => resolve(out));
  });
  await run(['-i', '-s', '10', '-q', conn(EP)]);
  if (process.env.PROFILE_PGBOUNCER) {
    // The same run through PgBouncer (transaction mode, pool 20, client TLS) for comparison.
    const { mkdtempSync, writeFileSync, chownSync, existsSync, readFileSync } = await import('node:fs');
    const { tmpdir } = await import('node:os');
    const { pgRunAs } = await import('../../lib/postgres.ts');
    const { freePort } = await import('../helpers/stack.ts');
    const dir = mkdtempSync(join(tmpdir(), 'xenon-prof-bouncer-'));
    const { rmSync } = await import('node:fs');
    teardowns.push(() => rmSync(dir, { recursive: true, force: true }));
    const port = await freePort();
    writeFileSync(join(dir, 'server.pem'), cert.certPem);
    writeFileSync(join(dir, 'server-key.pem'), cert.keyPem);
    writeFileSync(join(dir, 'userlist.txt'), '"app" "app-password"\n');
    writeFileSync(join(dir, 'pgbouncer.ini'), ['[databases]', `postgres = host=127.0.0.1 port=${db.port} dbname=postgres`, '[pgbouncer]', 'listen_addr = 127.0.0.1', `listen_port = ${port}`, 'unix_socket_dir =',
      'auth_type = scram-sha-256', `auth_file = ${dir}/userlist.txt`, 'pool_mode = transaction', 'max_client_conn = 400', 'default_pool_size = 20', 'server_tls_sslmode = disable',
      'client_tls_sslmode = require', `client_tls_cert_file = ${dir}/server.pem`, `client_tls_key_file = ${dir}/server-key.pem`, `logfile = ${dir}/pgbouncer.log`, ''].join('\n'));
    const runAs = pgRunAs(process.env);
    if (runAs) for (const f of ['', 'server.pem', 'server-key.pem', 'userlist.txt', 'pgbouncer.ini']) chownSync(join(dir, f), runAs.uid, runAs.gid);
    const b = spawn('/usr/sbin/pgbouncer', [...(runAs ? ['-u', runAs.user] : []), join(dir, 'pgbouncer.ini')], { stdio: 'ignore' });
    teardowns.push(() => new Promise<void>((r) => { if (b.exitCode !== null) return r(); b.once('exit', () => r()); b.kill('SIGINT'); }));
    for (let i = 0; i < 100 && !(existsSync(join(dir, 'pgbouncer.log')) && readFileSync(join(dir, 'pgbouncer.log'), 'utf8').includes('process up')); i++) await new Promise((r) => setTimeout(r, 50));
    const out = await run(['-S', '-M', MODE, '-c', String(CLIENTS), '-j', '2', '-T', String(SECONDS), '-n', `host=127.0.0.1 port=${port} user=app dbname=postgres sslmode=require`]);
    console.log(`pgbouncer: tps ${/tps = ([\d.]+)/.exec(out)?.[1]}`);
  }
  const cpu0 = process.cpuUsage();
  const out = await run(['-S', '-M', MODE, '-c', String(CLIENTS), '-j', '2', '-T', String(SECONDS), '-n', conn(`${EP}-pooler`)]);
  const cpu = process.cpuUsage(cpu0);
  const tx = Number(/actually processed: (\d+)/.exec(out)?.[1]);
  console.log(`tps ${/tps = ([\d.]+)/.exec(out)?.[1]} · proxy CPU per transaction ${((cpu.user + cpu.system) / tx).toFixed(1)} µs (user ${(cpu.user / tx).toFixed(1)})`);
} finally {
  for (const f of teardowns.reverse()) await f();
}
