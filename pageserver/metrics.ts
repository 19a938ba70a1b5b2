/** Prometheus metrics of the pageserver (its own Registry, served at `/metrics`). */
import { Counter, Gauge, Registry, collectDefaultMetrics } from 'prom-client';

export interface StoreStats {
  timelines: number;
  bytes: number;
}

export function createPageserverMetrics(registry: Registry, stats: () => Promise<StoreStats>, opts: { defaults?: boolean } = {}) {
  if (opts.defaults !== false) collectDefaultMetrics({ register: registry, prefix: 'xenon_pageserver_process_' });
  let last: Promise<StoreStats> | undefined;
  // One scan serves both gauges of a scrape.
  const cached = (): Promise<StoreStats> => {
    last ??= stats().finally(() => setTimeout(() => (last = undefined), 1000).unref());
    return last;
  };
  return {
    registry,
    timelines: new Gauge({
      name: 'xenon_pageserver_timelines',
      help: 'Timelines (of every tenant) the pageserver holds',
      registers: [registry],
      async collect() {
        this.set((await cached()).timelines);
      },
    }),
    bytesStored: new Gauge({
      name: 'xenon_pageserver_stored_bytes',
      help: 'Bytes of images and WAL listed in the timelines\' indexes',
      registers: [registry],
      async collect() {
        this.set((await cached()).bytes);
      },
    }),
    planRequests: new Counter({
      name: 'xenon_pageserver_start_plans_total',
      help: 'Start plans asked for, by outcome (crash | archive | error code)',
      labelNames: ['outcome'],
      registers: [registry],
    }),
    resolverRequests: new Counter({
      name: 'xenon_pageserver_wal_requests_total',
      help: 'WAL resolver requests, by outcome (store | safekeeper | not_found | missing | error)',
      labelNames: ['outcome'],
      registers: [registry],
    }),
    gcRemovals: new Counter({
      name: 'xenon_pageserver_gc_removed_total',
      help: 'Files removed by GC, by kind (image | wal)',
      labelNames: ['kind'],
      registers: [registry],
    }),
  };
}

export type PageserverMetrics = ReturnType<typeof createPageserverMetrics>;
