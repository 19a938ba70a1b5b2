/**
 * The transaction pooler for `-pooler` endpoints (docs/pooler.md): clients authenticate at the
 * proxy as usual, then share a few server connections per (endpoint, database, role), one
 * transaction at a time. This file is its surface for the rest of the proxy: starting a pooled
 * session, cancel-key lookups, invalidation when a compute goes away, stats and metrics.
 */
import { randomBytes } from 'node:crypto';
import type { Duplex } from 'node:stream';
import { Counter, Gauge } from 'prom-client';
import { XenonError } from '../../lib/errors.ts';
import type { Logger } from '../../lib/logger.ts';
import type { ScramSecret } from '../../lib/scram.ts';
import { splitOptions } from '../auth/credentials.ts';
import { cancelKey } from '../cancellation.ts';
import type { CachedControlPlane } from '../control-plane.ts';
import type { ProxyMetrics } from '../metrics.ts';
import { backend } from '../pgwire/index.ts';
import { PooledClient } from './client.ts';
import { Pool, type PoolCounters, type PoolerSettings } from './pool.ts';

export type { PoolerSettings } from './pool.ts';
export { PooledClient } from './client.ts';

export interface PoolerDeps {
  cp: CachedControlPlane;
  metrics: ProxyMetrics;
  logger: Logger;
}

export interface PooledSessionOptions {
  socket: Duplex;
  endpoint: string;
  database: string;
  user: string;
  clientKey: Buffer;
  secret: ScramSecret;
  /** The endpoint's `pool_size` (null: the proxy's default). */
  poolSize: number | null;
  /** Startup parameters as they would go to the compute (user and database included). */
  params: Record<string, string>;
  logger: Logger;
}

export interface PoolStats {
  endpoint: string;
  database: string;
  user: string;
  pool_size: number;
  clients: { total: number; active: number; waiting: number; idle: number };
  servers: { total: number; active: number; idle: number; opening: number };
  wait: { count: number; avg_ms: number; max_ms: number; timeouts: number };
  transactions: number;
  servers_opened: number;
  servers_closed: number;
  prepares: number;
  injected_prepares: number;
  local_prepares: number;
  resets: number;
  pipelined: number;
  pipeline_retries: number;
  pipeline_pauses: number;
}

/** Parameters reported with ParameterStatus that a client may set at startup. */
const PARAM_NAMES = new Map([
  ['application_name', 'application_name'],
  ['client_encoding', 'client_encoding'],
  ['datestyle', 'DateStyle'],
  ['intervalstyle', 'IntervalStyle'],
  ['timezone', 'TimeZone'],
  ['standard_conforming_strings', 'standard_conforming_strings'],
]);

/**
 * The settings a client asked for at startup (every parameter but user and database, plus
 * `-c name=value` and `--name=value` from `options`), applied on each server connection it gets.
 */
export function startupSettings(params: Record<string, string>): Map<string, string> {
  const out = new Map<string, string>();
  for (const [k, v] of Object.entries(params)) {
    if (k === 'user' || k === 'database') continue;
    if (k === 'options') {
      const words = splitOptions(v);
      for (let i = 0; i < words.length; i++) {
        let w = words[i]!;
        if (w === '-c' && i + 1 < words.length) w = words[++i]!;
        else if (w.startsWith('-c')) w = w.slice(2);
        else if (w.startsWith('--')) w = w.slice(2);
        else continue;
        const eq = w.indexOf('=');
        if (eq > 0) out.set(w.slice(0, eq).replaceAll('-', '_'), w.slice(eq + 1));
      }
      continue;
    }
    out.set(k, v);
  }
  return out;
}

export class Pooler {
  private readonly pools = new Map<string, Pool>();
  /** Cancel keys of pooled clients (kept in this process: they map to whatever server runs the client's query now). */
  private readonly byKey = new Map<bigint, PooledClient>();
  private clientCount = 0;
  private readonly sweeper: NodeJS.Timeout;

  constructor(
    readonly settings: PoolerSettings,
    private readonly deps: PoolerDeps,
  ) {
    this.sweeper = setInterval(() => {
      const now = Date.now();
      for (const p of [...this.pools.values()]) {
        p.closeIdle(now);
        this.dropIfUnused(p);
      }
    }, Math.max(100, Math.min(10_000, settings.serverIdleTimeoutMs / 2)));
    this.sweeper.unref();
    this.registerMetrics();
  }

  get clients(): number {
    return this.clientCount;
  }

  private pool(endpoint: string, database: string, user: string): Pool {
    const key = `${endpoint}\0${database}\0${user}`;
    let p = this.pools.get(key);
    if (!p || p.closed) {
      p = new Pool(endpoint, database, user, { ...this.deps, settings: this.settings });
      this.pools.set(key, p);
    }
    return p;
  }

  /** Forgets a pool with no clients and no server connections (its counters go with it). */
  private dropIfUnused(p: Pool): void {
    if (p.clients.size || p.servers.size || p.opening || p.waiting) return;
    const key = `${p.endpoint}\0${p.database}\0${p.user}`;
    if (this.pools.get(key) === p) this.pools.delete(key);
    p.close();
  }

  /** Refuses a client beyond `maxClientConn` (53300), before any compute work. */
  checkCapacity(): void {
    if (this.clientCount >= this.settings.maxClientConn) {
      this.deps.metrics.rateLimited.inc({ limit: 'pooler_clients' });
      const msg = `too many pooled client connections to this proxy (${this.settings.maxClientConn})`;
      throw new XenonError('PROXY_TOO_MANY_CONNECTIONS', msg, { userMessage: msg });
    }
  }

  /**
   * Prepares a pooled session after authentication: the pool accepts the (database, role) (the
   * first client of a pool opens a server connection; errors such as 3D000 reach the client), and
   * returns what to greet the client with and how to start routing.
   */
  async open(o: PooledSessionOptions): Promise<{ greeting: Buffer; start: (early: Buffer, onClose: () => void) => PooledClient; abandon: () => void }> {
    this.checkCapacity();
    // The slot is taken now (clients authenticating together must not all pass the check): it
    // passes to the client in start(), or is given back by abandon().
    this.clientCount++;
    let reserved = true;
    const abandon = (): void => {
      if (!reserved) return;
      reserved = false;
      this.clientCount--;
    };
    const pool = this.pool(o.endpoint, o.database, o.user);
    pool.size = o.poolSize ?? this.settings.defaultPoolSize;
    pool.setCredentials(o.clientKey, o.secret);
    let serverParams: [string, string][];
    try {
      serverParams = await pool.ready();
    } catch (err) {
      abandon();
      // A database that does not exist (say) must not leave an empty pool behind for each name tried.
      this.dropIfUnused(pool);
      throw err;
    }
    const settings = startupSettings(o.params);
    const out: Buffer[] = [backend.authenticationOk()];
    for (const [k, v] of serverParams) {
      const mine = [...settings].find(([name]) => PARAM_NAMES.get(name.toLowerCase()) === k);
      out.push(backend.parameterStatus(k, mine ? mine[1] : v));
    }
    let key: bigint;
    let processId: number;
    let secretKey: number;
    do {
      const b = randomBytes(8);
      processId = b.readInt32BE(0);
      secretKey = b.readInt32BE(4);
      key = cancelKey(processId, secretKey);
    } while (this.byKey.has(key));
    out.push(backend.backendKeyData(processId, secretKey), backend.readyForQuery('I'));
    return {
      greeting: Buffer.concat(out),
      abandon,
      start: (early, onClose) => {
        if (!reserved) throw new XenonError('INTERNAL', 'pooled session started after it was abandoned');
        reserved = false;
        const client = new PooledClient(o.socket, pool, {
          params: settings,
          orphanDrainMs: this.settings.orphanDrainMs,
          maxMessageBytes: this.settings.maxMessageBytes,
          onClose: () => {
            this.clientCount--;
            pool.clients.delete(client);
            this.byKey.delete(key);
            onClose();
          },
        });
        pool.clients.add(client);
        this.byKey.set(key, client);
        client.start(early);
        return client;
      },
    };
  }

  /** A CancelRequest with a pooled client's key: cancels on the server connection running its query now. Undefined when the key is not a pooled client's. */
  cancel(processId: number, secretKey: number): Promise<boolean> | undefined {
    const c = this.byKey.get(cancelKey(processId, secretKey));
    return c ? c.pool.cancel(c) : undefined;
  }

  /** The endpoint's compute was suspended, stopped or restarted. */
  invalidate(endpoint: string): void {
    for (const p of this.pools.values()) if (p.endpoint === endpoint) p.invalidate();
  }

  stats(): { clients: number; max_client_conn: number; pools: PoolStats[] } {
    const pools: PoolStats[] = [];
    for (const p of this.pools.values()) {
      const c: PoolCounters = p.counters;
      let active = 0;
      for (const cl of p.clients) if (cl.server || cl.following) active++;
      pools.push({
        endpoint: p.endpoint,
        database: p.database,
        user: p.user,
        pool_size: p.size,
        clients: { total: p.clients.size, active, waiting: p.waiting, idle: p.clients.size - active - p.waiting },
        servers: { total: p.servers.size, active: p.active, idle: p.idle.length, opening: p.opening },
        wait: { count: c.waits, avg_ms: c.waits ? round(c.waitMsTotal / c.waits) : 0, max_ms: round(c.waitMsMax), timeouts: c.waitTimeouts },
        transactions: c.transactions,
        servers_opened: c.serversOpened,
        servers_closed: c.serversClosed,
        prepares: c.parses,
        injected_prepares: c.injectedParses,
        local_prepares: c.localParses,
        resets: c.resets,
        pipelined: c.pipelined,
        pipeline_retries: c.pipelineRetries,
        pipeline_pauses: c.pipelinePauses,
      });
    }
    return { clients: this.clientCount, max_client_conn: this.settings.maxClientConn, pools };
  }

  private registerMetrics(): void {
    const registers = [this.deps.metrics.registry];
    const byEndpoint = (): Map<string, PoolStats[]> => {
      const m = new Map<string, PoolStats[]>();
      for (const s of this.stats().pools) m.set(s.endpoint, [...(m.get(s.endpoint) ?? []), s]);
      return m;
    };
    const sum = (xs: PoolStats[], f: (s: PoolStats) => number): number => xs.reduce((a, s) => a + f(s), 0);
    new Gauge({
      name: 'xenon_proxy_pooler_clients',
      help: 'Pooled client connections by endpoint and state (active: holding a server connection; waiting: queued for one; idle)',
      labelNames: ['endpoint', 'state'],
      registers,
      collect() {
        this.reset();
        for (const [endpoint, xs] of byEndpoint()) {
          for (const state of ['active', 'waiting', 'idle'] as const) this.set({ endpoint, state }, sum(xs, (s) => s.clients[state]));
        }
      },
    });
    new Gauge({
      name: 'xenon_proxy_pooler_servers',
      help: 'Pooled server connections by endpoint and state (active: lent or resetting; idle; opening)',
      labelNames: ['endpoint', 'state'],
      registers,
      collect() {
        this.reset();
        for (const [endpoint, xs] of byEndpoint()) {
          for (const state of ['active', 'idle', 'opening'] as const) this.set({ endpoint, state }, sum(xs, (s) => s.servers[state]));
        }
      },
    });
    new Gauge({
      name: 'xenon_proxy_pooler_pool_size',
      help: 'Largest number of server connections per (database, role) of the endpoint',
      labelNames: ['endpoint'],
      registers,
      collect() {
        this.reset();
        for (const [endpoint, xs] of byEndpoint()) this.set({ endpoint }, Math.max(...xs.map((s) => s.pool_size)));
      },
    });
    const counter = (name: string, help: string, f: (s: PoolStats) => number): void => {
      new Counter({
        name,
        help,
        labelNames: ['endpoint'],
        registers,
        collect() {
          this.reset();
          for (const [endpoint, xs] of byEndpoint()) this.inc({ endpoint }, sum(xs, f));
        },
      });
    };
    counter('xenon_proxy_pooler_transactions_total', 'Transactions served by pooled server connections', (s) => s.transactions);
    counter('xenon_proxy_pooler_waits_total', 'Times a client had to wait for a server connection', (s) => s.wait.count);
    counter('xenon_proxy_pooler_wait_timeouts_total', 'Waits that ended with 53300', (s) => s.wait.timeouts);
    counter('xenon_proxy_pooler_server_connections_opened_total', 'Server connections opened', (s) => s.servers_opened);
    counter('xenon_proxy_pooler_server_connections_closed_total', 'Server connections closed', (s) => s.servers_closed);
    counter('xenon_proxy_pooler_prepares_total', 'Parse messages of named statements sent to computes', (s) => s.prepares);
    counter('xenon_proxy_pooler_injected_prepares_total', 'Statements prepared by the pooler on a server connection that lacked them', (s) => s.injected_prepares);
    counter('xenon_proxy_pooler_resets_total', 'Server connections reset (DISCARD ALL) after a session feature was used', (s) => s.resets);
    counter('xenon_proxy_pooler_pipelined_total', 'Autocommit queries written behind another client\'s on a busy server connection (batches)', (s) => s.pipelined);
    counter('xenon_proxy_pooler_pipeline_retries_total', 'Batched queries sent again after a cancel meant for another query hit them', (s) => s.pipeline_retries);
    counter('xenon_proxy_pooler_pipeline_pauses_total', 'Times batching paused because a batched query held others up', (s) => s.pipeline_pauses);
  }

  close(): void {
    clearInterval(this.sweeper);
    for (const p of this.pools.values()) p.close();
  }
}

function round(n: number): number {
  return Math.round(n * 100) / 100;
}
