/** The proxy's Prometheus metrics (prom-client), served on the metrics port with `/healthz`. */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

export type ProxyMetrics = ReturnType<typeof createProxyMetrics>;

export function createProxyMetrics(registry: Registry = new Registry()) {
  collectDefaultMetrics({ register: registry, prefix: 'xenon_proxy_process_' });
  const r = [registry];
  return {
    registry,
    connectionsOpened: new Counter({ name: 'xenon_proxy_connections_opened_total', help: 'Client connections accepted', labelNames: ['protocol'], registers: r }),
    connectionsClosed: new Counter({ name: 'xenon_proxy_connections_closed_total', help: 'Client connections closed', labelNames: ['protocol'], registers: r }),
    connectionsActive: new Gauge({ name: 'xenon_proxy_connections_active', help: 'Client connections open now', labelNames: ['protocol'], registers: r }),
    sessionsOpened: new Counter({ name: 'xenon_proxy_sessions_opened_total', help: 'Authenticated sessions handed to a compute, by protocol and endpoint kind (direct | pooler)', labelNames: ['protocol', 'kind'], registers: r }),
    sessionsActive: new Gauge({ name: 'xenon_proxy_sessions_active', help: 'Authenticated sessions piped to a compute now, by protocol and endpoint kind', labelNames: ['protocol', 'kind'], registers: r }),
    authentications: new Counter({ name: 'xenon_proxy_authentications_total', help: 'Client authentications by method (scram | scram-plus | password) and outcome', labelNames: ['method', 'outcome'], registers: r }),
    rateLimited: new Counter({ name: 'xenon_proxy_rate_limited_total', help: 'Attempts refused by a limit (endpoint_connect | failed_auth | cancel | max_connections)', labelNames: ['limit'], registers: r }),
    connectSeconds: new Histogram({
      name: 'xenon_proxy_connect_duration_seconds',
      help: 'Time per connect phase (tls, auth, wake, connect) and in total, cold or warm',
      labelNames: ['phase', 'cold'],
      buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
      registers: r,
    }),
    errors: new Counter({ name: 'xenon_proxy_errors_total', help: 'Errors by kind and code', labelNames: ['kind', 'code'], registers: r }),
    tlsFailures: new Counter({ name: 'xenon_proxy_tls_handshake_failures_total', help: 'TLS handshakes that failed', registers: r }),
    bytes: new Counter({ name: 'xenon_proxy_bytes_total', help: 'Bytes piped, by direction', labelNames: ['direction'], registers: r }),
    cancelRequests: new Counter({ name: 'xenon_proxy_cancel_requests_total', help: 'Cancel requests by outcome', labelNames: ['outcome'], registers: r }),
    computeRetries: new Counter({ name: 'xenon_proxy_compute_connect_retries_total', help: 'Compute connects retried after a failure (re-wake)', registers: r }),
    poolerWaitSeconds: new Histogram({
      name: 'xenon_proxy_pooler_wait_seconds',
      help: 'How long pooled clients waited for a server connection (only waits that happened)',
      buckets: [0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
      registers: r,
    }),
  };
}
