/** Proxy configuration: the only file of proxy/ that reads `process.env`. */
import { randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { ConfigSource, parseFlags, stateDirFrom, type Env } from '../lib/config.ts';
import type { LogLevel } from '../lib/logger.ts';
import type { BucketLimit } from './rate-limit.ts';
import type { PoolerSettings } from './pooler/pool.ts';

export interface ProxyConfig {
  readonly host: string;
  readonly port: number;
  /** WebSocket (`/v2`, any path) and SQL over HTTP (`/sql`): TLS, or plain HTTP from loopback peers. */
  readonly httpHost: string;
  readonly httpPort: number;
  /** Plain HTTP (no TLS) from loopback peers on the HTTP port; other peers must use TLS. */
  readonly httpAllowPlainLocal: boolean;
  /** SQL over HTTP: largest request body, largest response (413 / 507 beyond). */
  readonly sqlMaxRequestBytes: number;
  readonly sqlMaxResponseBytes: number;
  /** SQL over HTTP: compute connections kept per (endpoint, database, role), and how long idle. */
  readonly sqlPoolMaxPerEndpoint: number;
  readonly sqlPoolIdleMs: number;
  /** SQL over HTTP: statement timeout of one request. */
  readonly sqlQueryTimeoutMs: number;
  readonly metricsHost: string;
  readonly metricsPort: number;
  readonly domain: string;
  readonly certFile: string;
  readonly keyFile: string;
  readonly controlPlaneUrl: string;
  /** Refuse plaintext sessions (`connection is insecure`). */
  readonly requireTls: boolean;
  /** From accept to a complete StartupMessage. */
  readonly startupTimeoutMs: number;
  /** The TLS handshake alone (SSLRequest or direct). */
  readonly tlsHandshakeTimeoutMs: number;
  /** Silence from a client the proxy is waiting on, anywhere before the session is piped. */
  readonly idleStartupTimeoutMs: number;
  /** From the StartupMessage to the end of authentication. */
  readonly authTimeoutMs: number;
  /** Connection attempts per endpoint (leaky bucket); the control plane may override per endpoint. */
  readonly connectRate: BucketLimit;
  /** Failed authentications per source address before further attempts are refused. */
  readonly failedAuthRate: BucketLimit;
  /** CancelRequests per source network (/24, /64). */
  readonly cancelRate: BucketLimit;
  readonly computeConnectTimeoutMs: number;
  readonly computeConnectAttempts: number;
  readonly accessCacheTtlMs: number;
  readonly maxWakeCacheMs: number;
  readonly reportIntervalMs: number;
  readonly maxClientConnections: number;
  /** The transaction pooler of `-pooler` endpoints (docs/pooler.md). */
  readonly pooler: PoolerSettings;
  readonly proxyId: string;
  /** Key for the per-(endpoint, role) salts of mock secrets; random per process by default. */
  readonly mockSecretKey: Buffer;
  readonly logLevel: LogLevel;
  /** Stop when stdin closes (set by `xenon up` for its children). */
  readonly exitWithParent: boolean;
}

export function loadProxyConfig(env: Env = process.env, argv: readonly string[] = process.argv.slice(2)): ProxyConfig {
  const c = new ConfigSource(env, parseFlags(argv));
  const stateDir = stateDirFrom(env);
  const mock = c.optionalString('XENON_PROXY_MOCK_SECRET_KEY');
  return Object.freeze({
    host: c.string('XENON_PROXY_HOST', '127.0.0.1', 'host'),
    port: c.int('XENON_PROXY_PORT', 4432, { min: 0, max: 65535, flag: 'port' }),
    httpHost: c.string('XENON_PROXY_HTTP_HOST', c.string('XENON_PROXY_HOST', '127.0.0.1', 'host')),
    httpPort: c.int('XENON_PROXY_HTTP_PORT', 4444, { min: 0, max: 65535, flag: 'http-port' }),
    httpAllowPlainLocal: c.bool('XENON_PROXY_HTTP_ALLOW_PLAIN_LOCAL', true),
    sqlMaxRequestBytes: c.int('XENON_SQL_MAX_REQUEST_BYTES', 10 * 1024 * 1024, { min: 1024 }),
    sqlMaxResponseBytes: c.int('XENON_SQL_MAX_RESPONSE_BYTES', 10 * 1024 * 1024, { min: 1024 }),
    sqlPoolMaxPerEndpoint: c.int('XENON_SQL_POOL_MAX', 10, { min: 1, max: 1000 }),
    sqlPoolIdleMs: c.int('XENON_SQL_POOL_IDLE_MS', 60_000, { min: 100 }),
    sqlQueryTimeoutMs: c.int('XENON_SQL_QUERY_TIMEOUT_MS', 120_000, { min: 100 }),
    metricsHost: c.string('XENON_PROXY_METRICS_HOST', '127.0.0.1'),
    metricsPort: c.int('XENON_PROXY_METRICS_PORT', 7001, { min: 0, max: 65535, flag: 'metrics-port' }),
    domain: c.string('XENON_DOMAIN', 'localtest.me', 'domain').toLowerCase(),
    certFile: c.string('XENON_TLS_CERT', join(stateDir, 'certs', 'server.pem')),
    keyFile: c.string('XENON_TLS_KEY', join(stateDir, 'certs', 'server-key.pem')),
    controlPlaneUrl: c.string('XENON_CONTROL_PLANE_URL', 'http://127.0.0.1:3000', 'control-plane'),
    requireTls: c.bool('XENON_PROXY_REQUIRE_TLS', true),
    startupTimeoutMs: c.int('XENON_PROXY_STARTUP_TIMEOUT_MS', 10_000, { min: 10 }),
    tlsHandshakeTimeoutMs: c.int('XENON_PROXY_TLS_HANDSHAKE_TIMEOUT_MS', 5_000, { min: 10 }),
    idleStartupTimeoutMs: c.int('XENON_PROXY_STARTUP_IDLE_TIMEOUT_MS', 5_000, { min: 10 }),
    authTimeoutMs: c.int('XENON_PROXY_AUTH_TIMEOUT_MS', 30_000, { min: 10 }),
    connectRate: {
      perSecond: c.number('XENON_PROXY_CONNECT_RATE_PER_SECOND', 100, { min: 0.001 }),
      burst: c.int('XENON_PROXY_CONNECT_RATE_BURST', 300, { min: 1 }),
    },
    failedAuthRate: {
      perSecond: c.number('XENON_PROXY_FAILED_AUTH_PER_SECOND', 0.1, { min: 0.001 }),
      burst: c.int('XENON_PROXY_FAILED_AUTH_BURST', 10, { min: 1 }),
    },
    cancelRate: {
      perSecond: c.number('XENON_PROXY_CANCEL_RATE_PER_SECOND', 50, { min: 0.001 }),
      burst: c.int('XENON_PROXY_CANCEL_RATE_BURST', 100, { min: 1 }),
    },
    computeConnectTimeoutMs: c.int('XENON_PROXY_COMPUTE_CONNECT_TIMEOUT_MS', 5_000, { min: 10 }),
    computeConnectAttempts: c.int('XENON_PROXY_COMPUTE_CONNECT_ATTEMPTS', 4, { min: 1, max: 20 }),
    accessCacheTtlMs: c.int('XENON_PROXY_ACCESS_CACHE_MS', 240_000, { min: 0 }),
    maxWakeCacheMs: c.int('XENON_WAKE_CACHE_MS', 30_000, { min: 0 }),
    reportIntervalMs: c.int('XENON_PROXY_REPORT_INTERVAL_MS', 1_000, { min: 50 }),
    maxClientConnections: c.int('XENON_PROXY_MAX_CONNECTIONS', 10_000, { min: 1 }),
    pooler: Object.freeze({
      defaultPoolSize: c.int('XENON_POOLER_DEFAULT_POOL_SIZE', 20, { min: 1, max: 10_000 }),
      maxClientConn: c.int('XENON_POOLER_MAX_CLIENT_CONN', 10_000, { min: 1 }),
      queryWaitTimeoutMs: c.int('XENON_POOLER_QUERY_WAIT_TIMEOUT_MS', 120_000, { min: 10 }),
      serverIdleTimeoutMs: c.int('XENON_POOLER_SERVER_IDLE_TIMEOUT_MS', 600_000, { min: 100 }),
      maxPreparedStatements: c.int('XENON_POOLER_MAX_PREPARED_STATEMENTS', 1_000, { min: 1, max: 1_000_000 }),
      maxMessageBytes: c.int('XENON_POOLER_MAX_MESSAGE_BYTES', 64 * 1024 * 1024, { min: 16 * 1024, max: 1024 * 1024 * 1024 - 5 }),
      orphanDrainMs: c.int('XENON_POOLER_ORPHAN_DRAIN_MS', 5_000, { min: 10 }),
      computeConnectTimeoutMs: c.int('XENON_PROXY_COMPUTE_CONNECT_TIMEOUT_MS', 5_000, { min: 10 }),
      computeConnectAttempts: c.int('XENON_PROXY_COMPUTE_CONNECT_ATTEMPTS', 4, { min: 1, max: 20 }),
      pipelineDepth: c.int('XENON_POOLER_PIPELINE_DEPTH', 4, { min: 1, max: 64 }),
    }),
    proxyId: c.string('XENON_PROXY_ID', `${hostname()}-${process.pid}-${randomBytes(3).toString('hex')}`),
    mockSecretKey: mock ? Buffer.from(mock, 'utf8') : randomBytes(32),
    logLevel: c.logLevel(),
    exitWithParent: c.bool('XENON_EXIT_WITH_PARENT', false),
  });
}
