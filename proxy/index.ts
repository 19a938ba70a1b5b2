/**
 * The Postgres-facing edge: TCP listener (TLS after SSLRequest or direct), SCRAM with the client,
 * limits, wake, pipe; the HTTP port for edge runtimes (WebSocket sessions, SQL over HTTP); live
 * connection counts to the control plane; `/metrics` and `/healthz`.
 */
import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import type { SecureContext } from 'node:tls';
import { CertStore } from '../certs/index.ts';
import { XenonError } from '../lib/errors.ts';
import { listen, Router, startHttpServer, type HttpServerHandle } from '../lib/http.ts';
import type { Logger } from '../lib/logger.ts';
import type { ControlPlaneApi } from '../wake-compute/api.ts';
import { ControlPlaneClient } from '../wake-compute/client.ts';
import { MemoryCancelMap, type CancelMap } from './cancellation.ts';
import type { ProxyConfig } from './config.ts';
import { PasswordVerifier, type ProxyLimits } from './auth/access.ts';
import { handleClient } from './connection.ts';
import { KeyedLeakyBucket } from './rate-limit.ts';
import { startServerless, type ServerlessHandle } from './serverless/server.ts';
import { SqlOverHttp } from './serverless/sql-over-http.ts';
import { ConnectionTracker } from './connections.ts';
import { RequestContext } from './context.ts';
import { CachedControlPlane } from './control-plane.ts';
import { createProxyMetrics, type ProxyMetrics } from './metrics.ts';
import { backend } from './pgwire/index.ts';
import { Pooler } from './pooler/index.ts';

export interface ProxyDeps {
  logger: Logger;
  /** Defaults to the HTTP client of `config.controlPlaneUrl`. */
  controlPlane?: ControlPlaneApi;
  /** Defaults to a CertStore on `config.certFile`/`keyFile` that reloads on change. */
  secureContext?: () => SecureContext;
  cancels?: CancelMap;
  metrics?: ProxyMetrics;
}

export interface ProxyHandle {
  address: AddressInfo;
  /** The HTTP port: WebSocket sessions and SQL over HTTP. */
  httpAddress: AddressInfo;
  metricsUrl: string;
  metrics: ProxyMetrics;
  tracker: ConnectionTracker;
  cp: CachedControlPlane;
  pooler: Pooler;
  /** Client sockets open now. */
  readonly openConnections: number;
  close(): Promise<void>;
}

export async function startProxy(config: ProxyConfig, deps: ProxyDeps): Promise<ProxyHandle> {
  const logger = deps.logger;
  const metrics = deps.metrics ?? createProxyMetrics();
  let certs: CertStore | undefined;
  let secureContext = deps.secureContext;
  if (!secureContext) {
    certs = await CertStore.load({ cert: config.certFile, key: config.keyFile }, {
      onReload: (ok, err) => (ok ? logger.info('TLS certificates reloaded') : logger.warn('TLS certificate reload failed; keeping the old ones', { err })),
    });
    const store = certs;
    secureContext = () => store.context;
  }
  const api = deps.controlPlane ?? new ControlPlaneClient(config.controlPlaneUrl);
  let sql: SqlOverHttp | undefined;
  let pooler: Pooler | undefined;
  const cp = new CachedControlPlane(api, { accessTtlMs: config.accessCacheTtlMs, negativeTtlMs: Math.min(config.accessCacheTtlMs, 30_000), maxWakeCacheMs: config.maxWakeCacheMs });
  const tracker = new ConnectionTracker(api, {
    proxyId: config.proxyId,
    intervalMs: config.reportIntervalMs,
    logger: logger.child({ component: 'connections' }),
    onInvalidate: (inv) => {
      for (const e of inv.wake) {
        cp.invalidateWake(e);
        sql?.invalidate(e);
        pooler?.invalidate(e);
      }
      for (const e of inv.access) cp.invalidateEndpointAccess(e);
    },
  });
  tracker.start();
  const cancels = deps.cancels ?? new MemoryCancelMap();
  const sockets = new Set<Socket>();
  const limits: ProxyLimits = {
    connect: new KeyedLeakyBucket(config.connectRate),
    failedAuth: new KeyedLeakyBucket(config.failedAuthRate),
    cancel: new KeyedLeakyBucket(config.cancelRate),
    pendingAuth: new Map(),
  };
  const passwords = new PasswordVerifier();
  pooler = new Pooler(config.pooler, { cp, metrics, logger: logger.child({ component: 'pooler' }) });
  const sessionDeps = { config, cp, tracker, cancels, metrics, secureContext, limits, passwords, pooler };
  const rejectDeps = {
    ...sessionDeps,
    config: { ...config, startupTimeoutMs: Math.min(config.startupTimeoutMs, 2_000), idleStartupTimeoutMs: Math.min(config.idleStartupTimeoutMs, 1_000), tlsHandshakeTimeoutMs: Math.min(config.tlsHandshakeTimeoutMs, 1_000) },
  };

  const server: Server = createServer({ noDelay: true }, (socket) => {
    const peer = `${socket.remoteAddress}:${socket.remotePort}`;
    // Over the cap, a client still gets a readable 53300 after its handshake (short timeouts);
    // far over it (twice the cap), sockets are closed unread: that is an attack, not a burst.
    let reject: XenonError | undefined;
    if (sockets.size >= config.maxClientConnections) {
      reject = new XenonError('PROXY_TOO_MANY_CONNECTIONS');
      metrics.rateLimited.inc({ limit: 'max_connections' });
      if (sockets.size >= 2 * config.maxClientConnections) {
        metrics.errors.inc({ kind: reject.kind, code: reject.code });
        socket.on('error', () => {});
        socket.destroy();
        return;
      }
    }
    sockets.add(socket);
    metrics.connectionsOpened.inc({ protocol: 'tcp' });
    metrics.connectionsActive.inc({ protocol: 'tcp' });
    socket.once('close', () => {
      sockets.delete(socket);
      metrics.connectionsClosed.inc({ protocol: 'tcp' });
      metrics.connectionsActive.dec({ protocol: 'tcp' });
    });
    const ctx = new RequestContext(peer, 'tcp', logger);
    handleClient(socket, reject ? rejectDeps : sessionDeps, ctx, { reject }).catch((err: Error) => {
      // handleClient answers every error itself; this is a last line of defence.
      logger.error('unhandled connection error', { err });
      socket.destroy();
    });
  });
  server.on('error', (err) => logger.error('listener error', { err }));
  const address = await listen(server, config.port, config.host);
  let http: HttpServerHandle;
  let serverless: ServerlessHandle;
  try {
    sql = new SqlOverHttp({ config, cp, tracker, limits, metrics, passwords, logger: logger.child({ component: 'sql' }) });
    serverless = await startServerless(config, { ...sessionDeps, logger, sql, tcpConnections: () => sockets.size }, secureContext);
    const admin = new Router();
    const p = pooler;
    admin.get('/pooler', () => p.stats());
    http = await startHttpServer({ host: config.metricsHost, port: config.metricsPort, router: admin, registry: metrics.registry, logger });
  } catch (err) {
    pooler.close();
    server.close();
    tracker.stop();
    certs?.close();
    throw err;
  }
  logger.info('proxy listening', { address: `${address.address}:${address.port}`, http: `${serverless.address.address}:${serverless.address.port}`, metrics: http.url, domain: config.domain });
  return {
    address,
    httpAddress: serverless.address,
    metricsUrl: http.url,
    metrics,
    tracker,
    cp,
    pooler,
    get openConnections() { return sockets.size; },
    async close() {
      tracker.stop();
      await new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const s of sockets) s.destroy();
      });
      await serverless.close();
      pooler?.close();
      // One last report so the control plane sees this proxy's connections gone.
      await tracker.report().catch(() => {});
      await http.close();
      certs?.close();
    },
  };
}

export { loadProxyConfig, type ProxyConfig } from './config.ts';
