/**
 * The proxy's view of the control plane, with caches: role secrets and access rules for
 * 4 minutes, wake answers for as long as the control plane says (`cache_ttl_ms`). Concurrent
 * lookups of one key share one request, so a burst of connections to a sleeping endpoint sends
 * one wake. The control plane invalidates entries through its heartbeat replies (a suspended
 * compute, a changed password).
 */
import { LRUCache } from 'lru-cache';
import type { ComputeInfo, ControlPlaneApi, EndpointAccess } from '../wake-compute/api.ts';

export interface CachedControlPlaneOptions {
  accessTtlMs: number;
  /** How long "no such endpoint" is remembered. */
  negativeTtlMs: number;
  maxWakeCacheMs: number;
  maxEntries?: number;
}

/**
 * Settled values in an LRU, lookups in flight in a map beside it: deleting a key never aborts a
 * lookup in flight, and a lookup that started before a delete does not cache its (maybe stale)
 * answer.
 */
class SingleFlightCache<V> {
  private readonly lru: LRUCache<string, { value: V }>;
  private readonly inFlight = new Map<string, Promise<V>>();
  private epoch = 0;

  constructor(max: number) {
    this.lru = new LRUCache<string, { value: V }>({ max, ttl: 1, ttlAutopurge: false, allowStale: false });
  }

  async get(key: string, load: () => Promise<V>, ttlOf: (v: V) => number): Promise<{ value: V; cached: boolean }> {
    const hit = this.lru.get(key);
    if (hit) return { value: hit.value, cached: true };
    let pending = this.inFlight.get(key);
    if (!pending) {
      const epoch = this.epoch;
      pending = load()
        .then((value) => {
          const ttl = ttlOf(value);
          if (ttl > 0 && epoch === this.epoch) this.lru.set(key, { value }, { ttl });
          return value;
        })
        .finally(() => this.inFlight.delete(key));
      this.inFlight.set(key, pending);
    }
    return { value: await pending, cached: false };
  }

  delete(pred: (key: string) => boolean): void {
    this.epoch++;
    for (const key of [...this.lru.keys()]) if (pred(key)) this.lru.delete(key);
  }
}

const accessKey = (endpoint: string, role: string): string => `${endpoint}\0${role}`;

export class CachedControlPlane {
  private readonly access: SingleFlightCache<EndpointAccess | null>;
  private readonly wakes: SingleFlightCache<ComputeInfo>;

  constructor(
    readonly api: ControlPlaneApi,
    private readonly opts: CachedControlPlaneOptions,
  ) {
    this.access = new SingleFlightCache(opts.maxEntries ?? 10_000);
    this.wakes = new SingleFlightCache(opts.maxEntries ?? 10_000);
  }

  /** null when the endpoint does not exist. */
  async getEndpointAccess(endpoint: string, role: string): Promise<EndpointAccess | null> {
    const { value } = await this.access.get(
      accessKey(endpoint, role),
      () => this.api.getEndpointAccess(endpoint, role),
      (a) => (a ? this.opts.accessTtlMs : this.opts.negativeTtlMs),
    );
    return value;
  }

  /** The compute's address; `cached` when no control-plane call was needed. */
  async wakeCompute(endpoint: string): Promise<ComputeInfo & { cached: boolean }> {
    const { value, cached } = await this.wakes.get(
      endpoint,
      () => this.api.wakeCompute(endpoint),
      (info) => Math.min(this.opts.maxWakeCacheMs, info.cache_ttl_ms),
    );
    return cached ? { ...value, cold: false, cached } : { ...value, cached };
  }

  /** Drop a wake answer whose address failed or went stale, so the next wake asks again. */
  invalidateWake(endpoint: string): void {
    this.wakes.delete((k) => k === endpoint);
  }

  invalidateAccess(endpoint: string, role: string): void {
    const key = accessKey(endpoint, role);
    this.access.delete((k) => k === key);
  }

  /** Drop every role's access entry of an endpoint (roles or rules changed). */
  invalidateEndpointAccess(endpoint: string): void {
    const prefix = accessKey(endpoint, '');
    this.access.delete((k) => k.startsWith(prefix));
  }
}
