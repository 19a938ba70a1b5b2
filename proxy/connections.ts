/**
 * Live client connections per endpoint, reported to the control plane: a full snapshot every
 * `intervalMs` (heartbeat; the control plane forgets a proxy whose reports stop) and soon after
 * any change, so idle timers start and stop promptly. Drives scale to zero.
 */
import type { Logger } from '../lib/logger.ts';
import type { ControlPlaneApi } from '../wake-compute/api.ts';

export class ConnectionTracker {
  private readonly counts = new Map<string, number>();
  /** Endpoints that went to zero since the last report: reported as 0 once, then dropped. */
  private readonly zeroed = new Set<string>();
  private timer?: NodeJS.Timeout;
  private soon?: NodeJS.Timeout;
  private failing = false;
  private reporting?: Promise<void>;
  /** A change happened while a report was in flight: send another when it finishes. */
  private again = false;

  constructor(
    private readonly api: Pick<ControlPlaneApi, 'reportConnections'>,
    private readonly opts: {
      proxyId: string;
      intervalMs: number;
      changeDelayMs?: number;
      logger: Logger;
      /** What the control plane says the proxy's caches must drop. */
      onInvalidate?: (inv: { wake: string[]; access: string[] }) => void;
    },
  ) {}

  start(): void {
    this.timer = setInterval(() => void this.report(), this.opts.intervalMs);
    this.timer.unref();
  }

  get(endpoint: string): number {
    return this.counts.get(endpoint) ?? 0;
  }

  snapshot(): Record<string, number> {
    return Object.fromEntries(this.counts);
  }

  inc(endpoint: string): void {
    const n = (this.counts.get(endpoint) ?? 0) + 1;
    this.counts.set(endpoint, n);
    this.zeroed.delete(endpoint);
    if (n === 1) this.changed();
  }

  dec(endpoint: string): void {
    const n = (this.counts.get(endpoint) ?? 0) - 1;
    if (n > 0) {
      this.counts.set(endpoint, n);
      return;
    }
    this.counts.delete(endpoint);
    this.zeroed.add(endpoint);
    this.changed();
  }

  private changed(): void {
    if (this.soon) return;
    this.soon = setTimeout(() => {
      this.soon = undefined;
      void this.report();
    }, this.opts.changeDelayMs ?? 10);
    this.soon.unref();
  }

  /** Sends one snapshot now (serialised: one report in flight at a time). */
  async report(): Promise<void> {
    if (this.reporting) {
      this.again = true;
      return this.reporting;
    }
    const counts = this.snapshot();
    for (const e of this.zeroed) counts[e] = 0;
    this.zeroed.clear();
    this.reporting = this.api
      .reportConnections({ proxy_id: this.opts.proxyId, counts, ttl_seconds: Math.max(1, Math.ceil((this.opts.intervalMs * 3) / 1000)) })
      .then(
        (res) => {
          if (res?.invalidate?.length || res?.invalidate_access?.length) {
            this.opts.onInvalidate?.({ wake: res.invalidate ?? [], access: res.invalidate_access ?? [] });
          }
          if (this.failing) this.opts.logger.info('connection reports reach the control plane again');
          this.failing = false;
        },
        (err: Error) => {
          if (!this.failing) this.opts.logger.warn('could not report connection counts', { err });
          this.failing = true;
        },
      )
      .finally(() => {
        this.reporting = undefined;
        if (this.again) {
          this.again = false;
          void this.report();
        }
      });
    return this.reporting;
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    if (this.soon) clearTimeout(this.soon);
  }
}
