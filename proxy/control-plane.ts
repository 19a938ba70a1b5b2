/**
 * The proxy's view of the control plane, with caches (lru-cache): role secrets and access rules
 * for 4 minutes, wake answers for as long as the control plane says (`cache_ttl_ms`). Concurrent
 * lookups of one key share one request (lru-cache `fetch`), so a burst of connections to a
 * sleeping endpoint sends one wake.
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

type AccessEntry = { access: EndpointAccess | null };

export class CachedControlPlane {
  private readonly access: LRUCache<string, AccessEntry, { endpoint: string; role: string }>;
  /** Settled wake answers only: deleting one never aborts a wake in flight. */
  private readonly wakes: LRUCache<string, ComputeInfo>;
  private readonly wakesInFlight = new Map<string, Promise<ComputeInfo>>();

  constructor(
    readonly api: ControlPlaneApi,
    opts: CachedControlPlaneOptions,
  ) {
    this.access = new LRUCache<string, AccessEntry, { endpoint: string; role: string }>({
      max: opts.maxEntries ?? 10_000,
      ttl: opts.accessTtlMs,
      fetchMethod: async (_key, _stale, { context, options }) => {
        const access = await api.getEndpointAccess(context.endpoint, context.role);
        if (!access) options.ttl = opts.negativeTtlMs;
        return { access };
      },
    });
    this.wakes = new LRUCache<string, ComputeInfo>({ max: opts.maxEntries ?? 10_000, ttl: opts.maxWakeCacheMs || 1 });
    this.maxWakeCacheMs = opts.maxWakeCacheMs;
  }

  private readonly maxWakeCacheMs: number;

  /** null when the endpoint does not exist. */
  async getEndpointAccess(endpoint: string, role: string): Promise<EndpointAccess | null> {
    const entry = await this.access.fetch(`${endpoint}\0${role}`, { context: { endpoint, role } });
    return entry!.access;
  }

  /** The compute's address; `cached` when no control-plane call was needed. */
  async wakeCompute(endpoint: string): Promise<ComputeInfo & { cached: boolean }> {
    const cached = this.wakes.get(endpoint);
    if (cached) return { ...cached, cold: false, cached: true };
    let pending = this.wakesInFlight.get(endpoint);
    if (!pending) {
      pending = this.api.wakeCompute(endpoint).then((info) => {
        const ttl = Math.min(this.maxWakeCacheMs, info.cache_ttl_ms);
        if (ttl > 0) this.wakes.set(endpoint, info, { ttl });
        return info;
      }).finally(() => this.wakesInFlight.delete(endpoint));
      this.wakesInFlight.set(endpoint, pending);
    }
    return { ...(await pending), cached: false };
  }

  /** Drop a wake answer whose address failed, so the next wake asks again. */
  invalidateWake(endpoint: string): void {
    this.wakes.delete(endpoint);
  }

  invalidateAccess(endpoint: string, role: string): void {
    this.access.delete(`${endpoint}\0${role}`);
  }
}
