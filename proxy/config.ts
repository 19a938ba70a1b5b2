/** Proxy configuration: the only file of proxy/ that reads `process.env`. */
import { randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { ConfigSource, parseFlags, stateDirFrom, type Env } from '../lib/config.ts';
import type { LogLevel } from '../lib/logger.ts';

export interface ProxyConfig {
  readonly host: string;
  readonly port: number;
  readonly metricsHost: string;
  readonly metricsPort: number;
  readonly domain: string;
  readonly certFile: string;
  readonly keyFile: string;
  readonly controlPlaneUrl: string;
  /** Refuse plaintext sessions (`connection is insecure`). */
  readonly requireTls: boolean;
  readonly startupTimeoutMs: number;
  readonly authTimeoutMs: number;
  readonly computeConnectTimeoutMs: number;
  readonly computeConnectAttempts: number;
  readonly accessCacheTtlMs: number;
  readonly maxWakeCacheMs: number;
  readonly reportIntervalMs: number;
  readonly maxClientConnections: number;
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
    metricsHost: c.string('XENON_PROXY_METRICS_HOST', '127.0.0.1'),
    metricsPort: c.int('XENON_PROXY_METRICS_PORT', 7001, { min: 0, max: 65535, flag: 'metrics-port' }),
    domain: c.string('XENON_DOMAIN', 'localtest.me', 'domain').toLowerCase(),
    certFile: c.string('XENON_TLS_CERT', join(stateDir, 'certs', 'server.pem')),
    keyFile: c.string('XENON_TLS_KEY', join(stateDir, 'certs', 'server-key.pem')),
    controlPlaneUrl: c.string('XENON_CONTROL_PLANE_URL', 'http://127.0.0.1:3000', 'control-plane'),
    requireTls: c.bool('XENON_PROXY_REQUIRE_TLS', true),
    startupTimeoutMs: c.int('XENON_PROXY_STARTUP_TIMEOUT_MS', 10_000, { min: 10 }),
    authTimeoutMs: c.int('XENON_PROXY_AUTH_TIMEOUT_MS', 30_000, { min: 10 }),
    computeConnectTimeoutMs: c.int('XENON_PROXY_COMPUTE_CONNECT_TIMEOUT_MS', 5_000, { min: 10 }),
    computeConnectAttempts: c.int('XENON_PROXY_COMPUTE_CONNECT_ATTEMPTS', 4, { min: 1, max: 20 }),
    accessCacheTtlMs: c.int('XENON_PROXY_ACCESS_CACHE_MS', 240_000, { min: 0 }),
    maxWakeCacheMs: c.int('XENON_WAKE_CACHE_MS', 30_000, { min: 0 }),
    reportIntervalMs: c.int('XENON_PROXY_REPORT_INTERVAL_MS', 1_000, { min: 50 }),
    maxClientConnections: c.int('XENON_PROXY_MAX_CONNECTIONS', 10_000, { min: 1 }),
    proxyId: c.string('XENON_PROXY_ID', `${hostname()}-${process.pid}-${randomBytes(3).toString('hex')}`),
    mockSecretKey: mock ? Buffer.from(mock, 'utf8') : randomBytes(32),
    logLevel: c.logLevel(),
    exitWithParent: c.bool('XENON_EXIT_WITH_PARENT', false),
  });
}
