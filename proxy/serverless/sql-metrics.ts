/** SQL over HTTP metrics, created once per prom-client registry. */
import { Counter, Gauge, Histogram, type Registry } from 'prom-client';

export type SqlMetrics = ReturnType<typeof create>;

function create(registry: Registry) {
  const r = [registry];
  return {
    requests: new Counter({ name: 'xenon_proxy_sql_requests_total', help: 'SQL-over-HTTP requests by HTTP status (499: the client went away)', labelNames: ['status'], registers: r }),
    duration: new Histogram({
      name: 'xenon_proxy_sql_request_duration_seconds',
      help: 'SQL-over-HTTP request time, from the request to the response, cold (the compute was started or resumed) or warm',
      labelNames: ['cold'],
      buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
      registers: r,
    }),
    poolConnections: new Gauge({ name: 'xenon_proxy_sql_pool_connections', help: 'Pooled SQL-over-HTTP compute connections by state (idle | busy)', labelNames: ['state'], registers: r }),
    acquisitions: new Counter({
      name: 'xenon_proxy_sql_pool_acquisitions_total',
      help: 'Pool acquisitions: hit (a pooled connection), miss (a new connection), wait (the pool was full)',
      labelNames: ['result'],
      registers: r,
    }),
  };
}

const byRegistry = new WeakMap<Registry, SqlMetrics>();

export function sqlMetrics(registry: Registry): SqlMetrics {
  let m = byRegistry.get(registry);
  if (!m) {
    m = create(registry);
    m.poolConnections.set({ state: 'idle' }, 0);
    m.poolConnections.set({ state: 'busy' }, 0);
    byRegistry.set(registry, m);
  }
  return m;
}
