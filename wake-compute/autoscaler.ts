/**
 * Vertical autoscaling (as Neon's autoscaler-agent, inside the control plane): every
 * `intervalMs` each active, sized endpoint's compute is sampled through its driver — CPU time
 * used since the last sample against the CPU it has, memory in use against its memory — and
 * moved between the endpoint's `min_cu` and `max_cu`:
 * - up (doubled, at most `max_cu`) as soon as one sample is hot: CPU above 70% of its share, or
 *   memory above 75%;
 * - down (halved, at least `min_cu`) after three cold samples in a row: CPU below 20% and memory
 *   below 40%.
 * A size pinned by hand (`cu_override`) wins. Decisions are lifecycle events (`resized`) and
 * metrics; the current size is the endpoint's `cu` in the API.
 */
import { Counter, Gauge, type Registry } from 'prom-client';
import type { Logger } from '../lib/logger.ts';
import type { ComputeDriver } from '../vm/index.ts';
import type { ComputeManager } from './lifecycle.ts';
import type { EndpointRow, MetadataStore } from './store.ts';

const UP_CPU = 0.7;
const UP_MEM = 0.75;
const DOWN_CPU = 0.2;
const DOWN_MEM = 0.4;
const DOWN_AFTER = 3;

/** Snapped to the 0.25 CU grid, within [lo, hi]. */
export function clampCu(cu: number, lo: number, hi: number): number {
  return Math.min(hi, Math.max(lo, Math.round(cu * 4) / 4));
}

export interface Load {
  /** CPU used over the interval as a share of the compute's CPU (1 = all of it). */
  cpu: number;
  /** Memory in use as a share of the compute's memory (undefined: the driver cannot see it). */
  memory?: number;
}

/**
 * The next size for a compute at `cu` under `load`; `coldStreak` counts cold samples before
 * this one. Pure: the policy above, tested on its own.
 */
export function decide(cu: number, lo: number, hi: number, load: Load, coldStreak: number): { cu: number; coldStreak: number; why: string } {
  const pct = (v: number): string => `${Math.round(v * 100)}%`;
  const mem = load.memory === undefined ? 'memory unknown' : `memory ${pct(load.memory)}`;
  if (load.cpu > UP_CPU || (load.memory ?? 0) > UP_MEM) {
    return { cu: clampCu(cu * 2, lo, hi), coldStreak: 0, why: `cpu ${pct(load.cpu)}, ${mem}` };
  }
  const cold = load.cpu < DOWN_CPU && (load.memory === undefined || load.memory < DOWN_MEM);
  if (!cold) return { cu, coldStreak: 0, why: 'steady' };
  if (coldStreak + 1 < DOWN_AFTER) return { cu, coldStreak: coldStreak + 1, why: 'cold' };
  return { cu: clampCu(cu / 2, lo, hi), coldStreak: 0, why: `cpu ${pct(load.cpu)}, ${mem} for ${DOWN_AFTER} samples` };
}

export interface AutoscalerOptions {
  store: MetadataStore;
  driver: ComputeDriver;
  manager: ComputeManager;
  logger: Logger;
  registry: Registry;
  intervalMs: number;
}

export class Autoscaler {
  private timer: NodeJS.Timeout | undefined;
  private running = false;
  private readonly last = new Map<string, { at: number; cpuSeconds: number; coldStreak: number }>();
  private readonly decisions: Counter<'direction'>;

  constructor(private readonly o: AutoscalerOptions) {
    this.decisions = new Counter({ name: 'xenon_autoscaler_decisions_total', help: 'Compute resizes by the autoscaler or by hand', labelNames: ['direction'], registers: [o.registry] });
    const manager = o.manager;
    new Gauge({
      name: 'xenon_compute_cu', help: 'Size of each running, sized compute in compute units', labelNames: ['endpoint'], registers: [o.registry],
      collect() {
        this.reset();
        for (const c of manager.activeComputes()) this.set({ endpoint: c.id }, c.cu);
      },
    });
  }

  start(): void {
    if (this.o.intervalMs <= 0 || !this.o.driver.resize || !this.o.driver.usage) {
      if (this.o.intervalMs > 0) this.o.logger.info('autoscaling off: the compute driver cannot resize', { driver: this.o.driver.kind });
      return;
    }
    this.timer = setInterval(() => void this.tick(), this.o.intervalMs);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
  }

  /** One round over the active computes (exported for tests; never two at once). */
  async tick(): Promise<void> {
    if (this.running) return;
    this.running = true;
    try {
      const active = this.o.manager.activeComputes();
      // Samples of computes no longer active: a new start begins from a new baseline.
      for (const id of this.last.keys()) if (!active.some((c) => c.id === id)) this.last.delete(id);
      for (const c of active) {
        const row = await this.o.store.findEndpoint(c.id).catch(() => undefined);
        if (!row || row.min_cu === null || row.max_cu === null) continue;
        await this.step(row, c.cu).catch((err: Error) => this.o.logger.warn('autoscaling step failed', { endpoint: c.id, err: err.message }));
      }
    } finally {
      this.running = false;
    }
  }

  private async step(row: EndpointRow, cu: number): Promise<void> {
    const lo = row.min_cu!;
    const hi = row.max_cu!;
    if (row.cu_override !== null) {
      await this.resize(row.id, cu, row.cu_override, 'set by hand');
      return;
    }
    const usage = await this.o.driver.usage!(row.id);
    if (!usage) return;
    const now = Date.now();
    const prev = this.last.get(row.id);
    this.last.set(row.id, { at: now, cpuSeconds: usage.cpuSeconds, coldStreak: prev?.coldStreak ?? 0 });
    if (!prev || usage.cpuSeconds < prev.cpuSeconds || now <= prev.at) return; // first sample, or a new compute
    const load: Load = {
      cpu: (usage.cpuSeconds - prev.cpuSeconds) / ((now - prev.at) / 1000) / Math.max(0.01, usage.size.cpu),
      ...(usage.memoryUsedMiB !== undefined && usage.size.memoryMiB > 0 ? { memory: usage.memoryUsedMiB / usage.size.memoryMiB } : {}),
    };
    const d = decide(cu, lo, hi, load, prev.coldStreak);
    this.last.get(row.id)!.coldStreak = d.coldStreak;
    // Measured on `row` and `cu`: a pin, new bounds or another resize since then make it stale.
    await this.resize(row.id, cu, d.cu, d.why, async (current) => {
      if (current !== cu) return false;
      const now = await this.o.store.findEndpoint(row.id).catch(() => undefined);
      return !!now && now.cu_override === null && now.min_cu === lo && now.max_cu === hi;
    });
  }

  private async resize(id: string, from: number, to: number, why: string, stillWanted?: (current: number) => Promise<boolean>): Promise<void> {
    if (to === from) return;
    if (await this.o.manager.resize(id, to, why, stillWanted)) this.decisions.inc({ direction: to > from ? 'up' : 'down' });
  }

  /** After an update of the endpoint's size: a pin or new bounds take effect on the running compute now. */
  async apply(row: EndpointRow): Promise<void> {
    const cu = this.o.manager.cu(row.id);
    if (cu === null || row.min_cu === null || row.max_cu === null) return;
    const to = row.cu_override ?? clampCu(cu, row.min_cu, row.max_cu);
    await this.resize(row.id, cu, to, row.cu_override !== null ? 'set by hand' : 'new bounds');
  }
}
