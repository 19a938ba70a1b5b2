/** Prometheus metrics of one safekeeper (its own Registry). */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

export interface TimelineGaugeSource {
  timelineId: string;
  flushLsn(): bigint;
  lagBytes(): number;
  streaming(): boolean;
}

export function createSafekeeperMetrics(registry: Registry, timelines: () => Iterable<TimelineGaugeSource>, opts: { defaults?: boolean } = {}) {
  if (opts.defaults !== false) collectDefaultMetrics({ register: registry, prefix: 'xenon_safekeeper_process_' });
  const flushLsn = new Gauge({
    name: 'xenon_safekeeper_flush_lsn',
    help: 'WAL position (bytes) fdatasync\'ed on this safekeeper, per timeline',
    labelNames: ['timeline_id'],
    registers: [registry],
    collect() {
      this.reset();
      for (const t of timelines()) this.set({ timeline_id: t.timelineId }, Number(t.flushLsn()));
    },
  });
  const lag = new Gauge({
    name: 'xenon_safekeeper_lag_bytes',
    help: 'Bytes of WAL the compute has that this safekeeper has not flushed yet, per timeline',
    labelNames: ['timeline_id'],
    registers: [registry],
    collect() {
      this.reset();
      for (const t of timelines()) this.set({ timeline_id: t.timelineId }, t.lagBytes());
    },
  });
  const streaming = new Gauge({
    name: 'xenon_safekeeper_streaming',
    help: '1 while a replication stream from the compute is up, per timeline',
    labelNames: ['timeline_id'],
    registers: [registry],
    collect() {
      this.reset();
      for (const t of timelines()) this.set({ timeline_id: t.timelineId }, t.streaming() ? 1 : 0);
    },
  });
  return {
    registry,
    flushLsn,
    lag,
    streaming,
    fsyncSeconds: new Histogram({
      name: 'xenon_safekeeper_fsync_seconds',
      help: 'Latency of one fdatasync of a WAL segment',
      buckets: [0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1],
      registers: [registry],
    }),
    batchMessages: new Histogram({
      name: 'xenon_safekeeper_flush_batch_messages',
      help: 'XLogData messages made durable by one group-commit flush',
      buckets: [1, 2, 4, 8, 16, 32, 64, 128, 256],
      registers: [registry],
    }),
    bytesWritten: new Counter({
      name: 'xenon_safekeeper_wal_bytes_written_total',
      help: 'Bytes of WAL written to segment files',
      labelNames: ['timeline_id'],
      registers: [registry],
    }),
    peerRecoveredBytes: new Counter({
      name: 'xenon_safekeeper_peer_recovered_bytes_total',
      help: 'Bytes of WAL fetched from peer safekeepers because the compute no longer had them',
      labelNames: ['timeline_id'],
      registers: [registry],
    }),
    reconnects: new Counter({
      name: 'xenon_safekeeper_reconnects_total',
      help: 'Replication connections to a compute started again after a failure or end',
      labelNames: ['timeline_id'],
      registers: [registry],
    }),
  };
}

export type SafekeeperMetrics = ReturnType<typeof createSafekeeperMetrics>;
