/**
 * Leaky-bucket limits kept per key (an endpoint, a source address or network): each attempt adds
 * one unit to its key's bucket, the bucket drains at `perSecond`, and an attempt that would take
 * it above `burst` is refused (and adds nothing). Buckets live in a bounded LRU, so a flood of
 * distinct keys costs bounded memory (an evicted bucket is simply empty again).
 */
import { isIPv4 } from 'node:net';
import { LRUCache } from 'lru-cache';

export interface BucketLimit {
  perSecond: number;
  burst: number;
}

interface Bucket {
  level: number;
  at: number;
}

export class KeyedLeakyBucket {
  private readonly buckets: LRUCache<string, Bucket>;

  constructor(
    readonly defaults: BucketLimit,
    opts: { maxKeys?: number; now?: () => number } = {},
  ) {
    this.buckets = new LRUCache({ max: opts.maxKeys ?? 100_000 });
    if (opts.now) this.now = opts.now;
  }

  private now: () => number = () => performance.now();

  /** The bucket's level now, after draining. */
  private drained(key: string, limit: BucketLimit): Bucket {
    const t = this.now();
    const b = this.buckets.get(key);
    if (!b) return { level: 0, at: t };
    return { level: Math.max(0, b.level - ((t - b.at) / 1000) * limit.perSecond), at: t };
  }

  /** Counts one attempt for `key`; false (and nothing counted) when its bucket is full. */
  take(key: string, limit: BucketLimit = this.defaults): boolean {
    const b = this.drained(key, limit);
    if (b.level + 1 > limit.burst) return false;
    b.level += 1;
    this.buckets.set(key, b);
    return true;
  }

  /** True when the next {@link take} would be refused; counts nothing. */
  full(key: string, limit: BucketLimit = this.defaults): boolean {
    return this.drained(key, limit).level + 1 > limit.burst;
  }

  /** Seconds until `key` may try again (0 when it may now). */
  retryAfterSeconds(key: string, limit: BucketLimit = this.defaults): number {
    const over = this.drained(key, limit).level + 1 - limit.burst;
    return over <= 0 ? 0 : Math.ceil(over / limit.perSecond);
  }

  get size(): number {
    return this.buckets.size;
  }
}

/** An address without the IPv4-mapped IPv6 prefix (`::ffff:1.2.3.4` → `1.2.3.4`). */
export function plainAddress(ip: string | undefined): string {
  if (!ip) return 'unknown';
  const m = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(ip);
  return m ? m[1]! : ip;
}

/**
 * The network a source address belongs to for per-network limits: the /24 of an IPv4 address,
 * the /64 of an IPv6 one (what one customer or one attacker typically holds).
 */
export function sourceNetwork(ip: string | undefined): string {
  const a = plainAddress(ip);
  if (isIPv4(a)) return a.split('.').slice(0, 3).join('.') + '.0/24';
  if (!a.includes(':')) return a;
  // Expand '::' so the first four groups are the /64.
  const [head = '', tail = ''] = a.split('::');
  const h = head ? head.split(':') : [];
  const t = a.includes('::') ? (tail ? tail.split(':') : []) : [];
  const groups = a.includes('::') ? [...h, ...Array(Math.max(0, 8 - h.length - t.length)).fill('0'), ...t] : h;
  return groups.slice(0, 4).map((g) => g.toLowerCase().replace(/^0+(?=.)/, '')).join(':') + '::/64';
}
