/**
 * What every way in (TCP, WebSocket, SQL over HTTP) checks before and around a password: the
 * failed-authentication limit of the source address, the endpoint's connection-attempt limit, the
 * project's IP allowlist — and cleartext password verification against the role's SCRAM secret,
 * with PBKDF2 results cached so a client sending its password on every request (SQL over HTTP)
 * or every connection (WebSocket) pays the key derivation once.
 */
import { createHmac, randomBytes } from 'node:crypto';
import { LRUCache } from 'lru-cache';
import { XenonError } from '../../lib/errors.ts';
import { IpAllowlist } from '../../lib/ip-allowlist.ts';
import { clientKeyFromPassword, parseScramSecret, type ScramSecret } from '../../lib/scram.ts';
import type { EndpointAccess } from '../../wake-compute/api.ts';
import type { ProxyConfig } from '../config.ts';
import type { CachedControlPlane } from '../control-plane.ts';
import type { ProxyMetrics } from '../metrics.ts';
import { sourceNetwork, type KeyedLeakyBucket } from '../rate-limit.ts';
import { isIPv6 } from 'node:net';
import { mockSecret } from './scram.ts';

/** The proxy's leaky buckets, shared by every connection and request. */
export interface ProxyLimits {
  /** Connection attempts per endpoint. */
  connect: KeyedLeakyBucket;
  /** Failed authentications per source address. */
  failedAuth: KeyedLeakyBucket;
  /** CancelRequests per source network. */
  cancel: KeyedLeakyBucket;
  /** Authentications under way per source (see {@link beginAuth}). */
  pendingAuth: Map<string, number>;
}

/**
 * At most this many authentications at once per source: failures are counted when they happen,
 * so without a bound a client could run thousands of guesses in parallel before the first one
 * counts. Legitimate pools open far fewer connections at once than this.
 */
export const MAX_PENDING_AUTH_PER_SOURCE = 100;

/**
 * The key of a source for authentication limits: the address for IPv4, the /64 for IPv6 (one
 * host usually holds a whole /64 and could otherwise change address on every guess).
 */
export function authSource(peerIp: string): string {
  return isIPv6(peerIp) ? sourceNetwork(peerIp) : peerIp;
}

export interface AccessDeps {
  config: Pick<ProxyConfig, 'connectRate' | 'mockSecretKey'>;
  cp: CachedControlPlane;
  limits: ProxyLimits;
  metrics: ProxyMetrics;
}

/** Refuses an address that failed authentication too often — before any password is looked at. */
export function checkFailedAuthLimit(deps: AccessDeps, peerIp: string): void {
  const source = authSource(peerIp);
  if (!deps.limits.failedAuth.full(source)) return;
  deps.metrics.rateLimited.inc({ limit: 'failed_auth' });
  const wait = deps.limits.failedAuth.retryAfterSeconds(source);
  const msg = `too many failed authentication attempts from ${peerIp}; try again in ${wait} s`;
  throw new XenonError('PROXY_AUTH_RATE_LIMITED', msg, { userMessage: msg });
}

/**
 * Starts an authentication from `peerIp`: the failed-authentication limit, then the bound on
 * authentications under way from the same source. Returns the function that ends it (call it
 * once, whatever the outcome).
 */
export function beginAuth(deps: AccessDeps, peerIp: string): () => void {
  checkFailedAuthLimit(deps, peerIp);
  const source = authSource(peerIp);
  const pending = deps.limits.pendingAuth;
  const n = pending.get(source) ?? 0;
  if (n >= MAX_PENDING_AUTH_PER_SOURCE) {
    deps.metrics.rateLimited.inc({ limit: 'failed_auth' });
    const msg = `too many authentications at once from ${peerIp}; try again later`;
    throw new XenonError('PROXY_AUTH_RATE_LIMITED', msg, { userMessage: msg });
  }
  pending.set(source, n + 1);
  let ended = false;
  return () => {
    if (ended) return;
    ended = true;
    const left = (pending.get(source) ?? 1) - 1;
    if (left <= 0) pending.delete(source);
    else pending.set(source, left);
  };
}

/** Allowlists built from cached access answers (the same array until the answer is refreshed). */
const allowlists = new WeakMap<readonly string[], IpAllowlist>();
function allowlistOf(access: EndpointAccess): IpAllowlist {
  let l = allowlists.get(access.allowed_ips);
  if (!l) allowlists.set(access.allowed_ips, (l = new IpAllowlist(access.allowed_ips)));
  return l;
}

export interface EndpointAccessCheck {
  /** null when the endpoint does not exist (authenticate against the mock secret). */
  access: EndpointAccess | null;
  /** The role's secret; null for unknown endpoints and roles. */
  secret: ScramSecret | null;
  /** What to authenticate against: the secret, or a mock one that matches no password. */
  checkAgainst: ScramSecret;
}

/**
 * Fetches the endpoint's access answer (cached) and applies the connection-attempt limit (the
 * control plane's per-endpoint override, else the default) and the IP allowlist. SQL over HTTP
 * passes `connectionAttempt: false`: its requests run on pooled compute connections (bounded by
 * the pool size), so they are not connection attempts.
 */
export async function checkEndpointAccess(
  deps: AccessDeps,
  endpoint: string,
  role: string,
  peerIp: string,
  o: { connectionAttempt?: boolean } = {},
): Promise<EndpointAccessCheck> {
  const access = await deps.cp.getEndpointAccess(endpoint, role);
  const rl = access?.connection_rate_limit;
  if ((o.connectionAttempt ?? true) && !deps.limits.connect.take(endpoint, rl ? { perSecond: rl.per_second, burst: rl.burst } : deps.config.connectRate)) {
    deps.metrics.rateLimited.inc({ limit: 'endpoint_connect' });
    throw new XenonError('PROXY_RATE_LIMITED');
  }
  if (access && !allowlistOf(access).allows(peerIp)) {
    const msg = `connections from IP address ${peerIp} are not allowed to endpoint ${endpoint}`;
    throw new XenonError('PROXY_IP_NOT_ALLOWED', msg, { userMessage: msg });
  }
  const secret = access?.role_secret ? parseScramSecret(access.role_secret) : null;
  return { access, secret, checkAgainst: secret ?? mockSecret(deps.config.mockSecretKey, endpoint, role) };
}

/** Counts a failed authentication and returns the error to send (28P01, same text for every cause). */
export function authFailed(deps: AccessDeps, peerIp: string, user: string, method: string): XenonError {
  deps.metrics.authentications.inc({ method, outcome: 'failed' });
  deps.limits.failedAuth.take(authSource(peerIp));
  const msg = `password authentication failed for user "${user}"`;
  return new XenonError('AUTH_FAILED', msg, { userMessage: msg });
}

/**
 * Cleartext passwords checked against SCRAM secrets. A match is remembered as HMAC(random
 * per-process key, secret, password) → ClientKey, so the cache holds no password and no unsalted
 * hash of one, and an entry dies with the secret (a password reset changes the secret). Misses
 * are not cached: wrong passwords pay PBKDF2 every time, and the failed-auth limit bounds them.
 */
export class PasswordVerifier {
  private readonly key = randomBytes(32);
  private readonly cache: LRUCache<string, Buffer>;
  hits = 0;
  misses = 0;

  constructor(opts: { max?: number; ttlMs?: number } = {}) {
    this.cache = new LRUCache({ max: opts.max ?? 10_000, ttl: opts.ttlMs ?? 10 * 60_000 });
  }

  /** The ClientKey when `password` matches `secret`, else null. */
  async verify(secret: ScramSecret, password: string): Promise<Buffer | null> {
    const id = createHmac('sha256', this.key)
      .update(secret.salt).update('\0').update(secret.storedKey).update('\0').update(String(secret.iterations)).update('\0')
      .update(password, 'utf8')
      .digest('base64');
    const hit = this.cache.get(id);
    if (hit) {
      this.hits++;
      return hit;
    }
    this.misses++;
    const clientKey = await clientKeyFromPassword(secret, password);
    if (clientKey) this.cache.set(id, clientKey);
    return clientKey;
  }
}
