/**
 * The pools: server connections per (endpoint, database, role), at most `size` of them (the
 * endpoint's `pool_size` or the proxy's default), lent to clients for one transaction, most
 * recently used first; clients wait in a FIFO queue (53300 after the wait timeout). Server
 * connections are opened with the credentials of the clients that authenticated (their ClientKey,
 * as for direct sessions), through the same wake as direct sessions.
 */
import { LRUCache } from 'lru-cache';
import { XenonError } from '../../lib/errors.ts';
import type { Logger } from '../../lib/logger.ts';
import type { ScramSecret } from '../../lib/scram.ts';
import { sendCancel } from '../cancellation.ts';
import { ComputeError, connectCompute } from '../connect-compute.ts';
import type { CachedControlPlane } from '../control-plane.ts';
import type { ProxyMetrics } from '../metrics.ts';
import type { PooledClient } from './client.ts';
import { ServerConn } from './server.ts';

export interface PoolerSettings {
  /** Server connections per (endpoint, database, role) unless the endpoint sets `pool_size`. */
  defaultPoolSize: number;
  /** Pooled client connections per proxy. */
  maxClientConn: number;
  /** How long a client waits for a server connection (53300 after). */
  queryWaitTimeoutMs: number;
  /** Idle server connections are closed after this long. */
  serverIdleTimeoutMs: number;
  /** Prepared statements kept per server connection (LRU). */
  maxPreparedStatements: number;
  /** Largest Query/Parse/Bind/FunctionCall/CopyData message from a client. */
  maxMessageBytes: number;
  /** How long a departed client's transaction may take to finish before its server is cancelled and closed. */
  orphanDrainMs: number;
  computeConnectTimeoutMs: number;
  computeConnectAttempts: number;
  /**
   * Most queries on one server connection at a time when clients queue: the waiting clients'
   * pipelinable autocommit queries are written behind the one that got it (1 = never).
   */
  pipelineDepth: number;
}

export interface PoolDeps {
  cp: CachedControlPlane;
  metrics: ProxyMetrics;
  logger: Logger;
  settings: PoolerSettings;
}

export interface PoolCounters {
  transactions: number;
  waits: number;
  waitMsTotal: number;
  waitMsMax: number;
  waitTimeouts: number;
  serversOpened: number;
  serversClosed: number;
  parses: number;
  injectedParses: number;
  /** Named Parse messages answered without a server connection (statement known to the pool). */
  localParses: number;
  resets: number;
  /** Queries written behind another client's on a busy server connection. */
  pipelined: number;
  /** Batched queries sent again because a cancel meant for another query hit them. */
  pipelineRetries: number;
  /** Times batching paused because a batched query held others up. */
  pipelinePauses: number;
}

export class Pool {
  size: number;
  readonly idle: ServerConn[] = [];
  readonly servers = new Set<ServerConn>();
  readonly clients = new Set<PooledClient>();
  opening = 0;
  private waiters: (PooledClient | null)[] = [];
  private wHead = 0;
  private waitCount = 0;
  /** ParameterStatus of the compute (from the first server connection). */
  params?: [string, string][];
  private creds?: { clientKey: Buffer; secret: ScramSecret };
  private firstOpen?: Promise<void>;
  private sweeper?: NodeJS.Timeout;
  closed = false;
  /**
   * Server names of statements some server connection of this pool prepared successfully: a
   * client's Parse + Sync of one of these, between transactions, is answered without a server
   * connection (it is prepared where its Bind lands). This keeps clients that prepare
   * synchronously while others hold the pool's connections (pgbench -M prepared) from deadlocking.
   */
  readonly known = new LRUCache<string, true>({ max: 10_000 });
  readonly counters: PoolCounters = { transactions: 0, waits: 0, waitMsTotal: 0, waitMsMax: 0, waitTimeouts: 0, serversOpened: 0, serversClosed: 0, parses: 0, injectedParses: 0, localParses: 0, resets: 0, pipelined: 0, pipelineRetries: 0, pipelinePauses: 0 };
  /** No batches before this time (performance.now()): a batched query was slow. */
  private pipelineHoldUntil = -Infinity;
  private pipelineStreak = 0;

  constructor(
    readonly endpoint: string,
    readonly database: string,
    readonly user: string,
    private readonly deps: PoolDeps,
  ) {
    this.size = deps.settings.defaultPoolSize;
  }

  get logger(): Logger {
    return this.deps.logger;
  }

  get metrics(): ProxyMetrics {
    return this.deps.metrics;
  }

  get waiting(): number {
    return this.waitCount;
  }

  /** Servers lent to clients or busy draining/resetting. */
  get active(): number {
    return this.servers.size - this.idle.length;
  }

  /** Credentials for new server connections: the most recent client's (a changed password takes over). */
  setCredentials(clientKey: Buffer, secret: ScramSecret): void {
    this.creds = { clientKey, secret };
  }

  /**
   * Makes sure the compute accepted this (database, role) once, so the client can be told the
   * compute's parameters: opens the first server connection if there is none yet. Errors (unknown
   * database, compute unavailable) go to the client.
   */
  async ready(): Promise<[string, string][]> {
    if (this.params) return this.params;
    this.firstOpen ??= this.open().finally(() => { this.firstOpen = undefined; });
    await this.firstOpen;
    return this.params!;
  }

  // ---- lending

  /** A server connection for `c` now, or null: `c` waits in the queue and gets one through `granted`. */
  acquire(c: PooledClient): ServerConn | null {
    if (this.waitCount === 0) {
      for (;;) {
        const s = this.idle.pop();
        if (!s) break;
        if (s.dead) continue;
        return s;
      }
    }
    c.waiting = true;
    c.waitStart = performance.now();
    this.waiters.push(c);
    this.waitCount++;
    this.counters.waits++;
    this.grow();
    this.sweeper ??= setInterval(() => this.sweep(), Math.max(10, Math.min(250, this.deps.settings.queryWaitTimeoutMs / 4)));
    return null;
  }

  /** A waiting client left. */
  forgetWaiter(c: PooledClient): void {
    const i = this.waiters.indexOf(c, this.wHead);
    if (i >= 0) {
      this.waiters[i] = null;
      this.waitCount--;
    }
  }

  private waited(c: PooledClient): void {
    const waited = performance.now() - c.waitStart;
    this.counters.waitMsTotal += waited;
    if (waited > this.counters.waitMsMax) this.counters.waitMsMax = waited;
    this.deps.metrics.poolerWaitSeconds.observe(waited / 1000);
  }

  /** The first client in the queue, left in it. */
  private peekWaiter(): PooledClient | undefined {
    for (let i = this.wHead; i < this.waiters.length; i++) {
      const c = this.waiters[i];
      if (c) return c;
    }
    return undefined;
  }

  /**
   * A batched query held the ones behind it up: batches pause for a second, twice as long each
   * time it happens again within ten seconds of the last pause's end (at most a minute).
   */
  pipelineSlow(): void {
    const now = performance.now();
    if (now < this.pipelineHoldUntil) return;
    this.pipelineStreak = now - this.pipelineHoldUntil < 10_000 ? Math.min(this.pipelineStreak + 1, 6) : 0;
    const ms = 1_000 * 2 ** this.pipelineStreak;
    this.pipelineHoldUntil = now + ms;
    this.counters.pipelinePauses++;
    this.deps.logger.info('pooler: a batched query held up the ones behind it; batching pauses', { endpoint: this.endpoint, ms });
  }

  private nextWaiter(): PooledClient | undefined {
    while (this.wHead < this.waiters.length) {
      const c = this.waiters[this.wHead]!;
      this.waiters[this.wHead++] = null;
      if (this.wHead > 256 && this.wHead * 2 > this.waiters.length) {
        this.waiters = this.waiters.slice(this.wHead);
        this.wHead = 0;
      }
      if (c) {
        this.waitCount--;
        return c;
      }
    }
    this.waiters.length = 0;
    this.wHead = 0;
    return undefined;
  }

  /** Fails clients that waited longer than the timeout (oldest first: the queue is FIFO). */
  private sweep(): void {
    const limit = this.deps.settings.queryWaitTimeoutMs;
    const now = performance.now();
    while (this.wHead < this.waiters.length) {
      const c = this.waiters[this.wHead];
      if (!c) {
        // The hole of a waiter that left (nextWaiter would skip it and take the next one).
        this.wHead++;
        continue;
      }
      if (now - c.waitStart < limit) break;
      this.nextWaiter();
      this.counters.waitTimeouts++;
      this.deps.metrics.errors.inc({ kind: 'rateLimit', code: 'PROXY_POOL_TIMEOUT' });
      const xe = new XenonError('PROXY_POOL_TIMEOUT', `no server connection of the pool became free within ${limit} ms (pool size ${this.size}); try again`, {
        userMessage: `no server connection of the pool became free within ${limit} ms (pool size ${this.size}); try again`,
      });
      c.waitFailed(xe.sqlstate, xe.userMessage);
    }
    if (this.waitCount === 0) {
      clearInterval(this.sweeper);
      this.sweeper = undefined;
    }
  }

  /** A server connection is free (transaction over, reset done, or just opened). */
  release(s: ServerConn): void {
    if (s.dead) return;
    if (s.cancels > 0) {
      // A cancel for the query that just ended may still reach the compute: nobody else gets the
      // connection before it arrived (an idle backend ignores it).
      s.releaseAfterCancel = true;
      return;
    }
    if (s.doomed || this.closed || this.servers.size > this.size) {
      s.destroy(s.doomed ? 'compute invalidated' : 'pool shrank');
      return;
    }
    if (s.dirty) {
      this.counters.resets++;
      s.reset((ok) => (ok ? this.release(s) : s.destroy('reset failed')));
      return;
    }
    this.counters.transactions++;
    s.resume();
    const c = this.nextWaiter();
    if (c) {
      this.waited(c);
      s.lastUsed = Date.now();
      const depth = this.deps.settings.pipelineDepth;
      if (depth < 2 || this.waitCount === 0 || performance.now() < this.pipelineHoldUntil) {
        c.granted(s);
        return;
      }
      // The clients queued next whose queries may be batched go behind it, in one write.
      s.corked = true;
      c.granted(s);
      while (s.client === c && this.waitCount > 0) {
        const w = this.peekWaiter();
        const q = w?.pipelinableHeld();
        if (!w || !q || !s.canTakeFollower(w, depth)) break;
        this.nextWaiter();
        this.waited(w);
        w.takeHeld();
        s.addFollower(w, q);
        this.counters.pipelined++;
      }
      s.corked = false;
      s.flush();
      return;
    }
    s.lastUsed = Date.now();
    this.idle.push(s);
  }

  /** A server connection closed. */
  removed(s: ServerConn, reason: string): void {
    if (!this.servers.delete(s)) return;
    this.counters.serversClosed++;
    const i = this.idle.indexOf(s);
    if (i >= 0) this.idle.splice(i, 1);
    this.deps.logger.debug('pooler: server connection closed', { endpoint: this.endpoint, server: s.id, reason });
    this.grow();
  }

  /** Opens server connections while clients wait and the pool has room. */
  private grow(): void {
    while (!this.closed && this.waitCount > this.opening && this.servers.size + this.opening < this.size) {
      this.open().catch((err: Error) => this.openFailed(err));
    }
  }

  private openFailed(err: Error): void {
    if (this.servers.size + this.opening > 0) return; // others will serve the queue
    const xe = err instanceof ComputeError ? undefined : err instanceof XenonError ? err : new XenonError('PROXY_COMPUTE_UNAVAILABLE', err.message);
    const code = err instanceof ComputeError ? err.fields.code : xe!.sqlstate;
    const message = err instanceof ComputeError ? err.fields.message : xe!.userMessage;
    for (let c = this.nextWaiter(); c; c = this.nextWaiter()) c.waitFailed(code, message);
  }

  /** Opens one server connection (re-waking on failure, as direct sessions do) and releases it into the pool. */
  private async open(): Promise<void> {
    const creds = this.creds;
    if (!creds) throw new XenonError('INTERNAL', 'no credentials for the pool');
    const { settings, cp } = this.deps;
    this.opening++;
    try {
      for (let attempt = 1; ; attempt++) {
        let cached = false;
        try {
          const info = await cp.wakeCompute(this.endpoint);
          cached = info.cached;
          const session = await connectCompute({
            host: info.host,
            port: info.port,
            params: { user: this.user, database: this.database },
            clientKey: creds.clientKey,
            secret: creds.secret,
            timeoutMs: cached ? Math.min(settings.computeConnectTimeoutMs, 1_000) : settings.computeConnectTimeoutMs,
          });
          session.socket.removeAllListeners('error');
          const s = new ServerConn(this, session.socket, session.processId, session.secretKey, settings.maxPreparedStatements);
          this.params ??= session.parameters;
          this.opening--;
          this.servers.add(s);
          this.counters.serversOpened++;
          this.deps.logger.debug('pooler: server connection opened', { endpoint: this.endpoint, server: s.id, cold: info.cold });
          this.release(s);
          return;
        } catch (err) {
          const xe = err instanceof XenonError ? err : undefined;
          if (xe?.code === 'PROXY_COMPUTE_AUTH_FAILED') cp.invalidateAccess(this.endpoint, this.user);
          const retry = (cached && !(err instanceof ComputeError) && xe?.code !== 'PROXY_COMPUTE_AUTH_FAILED') || (xe?.retryable ?? false);
          if (!retry || attempt >= settings.computeConnectAttempts || this.closed) throw err;
          cp.invalidateWake(this.endpoint);
          this.deps.metrics.computeRetries.inc();
          if (!cached) await new Promise((r) => setTimeout(r, Math.min(2_000, 50 * 2 ** attempt * (0.5 + Math.random()))));
        }
      }
    } catch (err) {
      this.opening--;
      throw err;
    }
  }

  /** Closes idle server connections unused for the idle timeout. */
  closeIdle(now = Date.now()): void {
    const limit = this.deps.settings.serverIdleTimeoutMs;
    for (const s of [...this.idle]) if (now - s.lastUsed >= limit) s.destroy('idle');
  }

  /**
   * The compute was suspended, stopped or moved: close idle connections now and busy ones when
   * their transaction ends; new ones are opened (with a fresh wake) when clients need them.
   */
  invalidate(): void {
    for (const s of this.servers) s.doomed = true;
    for (const s of [...this.idle]) s.destroy('compute invalidated');
  }

  /**
   * Cancels what `c` runs now, on the server connection it holds; the connection is not lent to
   * another client until the cancel request was delivered. A client waiting for a connection gets
   * 57014 for the request it waits with.
   */
  cancel(c: PooledClient): Promise<boolean> {
    if (c.waiting) {
      this.forgetWaiter(c);
      c.waiting = false;
      c.cancelWait();
      return Promise.resolve(true);
    }
    if (c.following) {
      // Queued behind other clients' queries on the wire: cancelled once it is the one running.
      c.following.cancelWhenHead(c);
      return Promise.resolve(true);
    }
    const s = c.server;
    if (!s || s.dead || s.pending === 0) return Promise.resolve(false);
    s.cancelStarted();
    return sendCancel({ host: s.host, port: s.port, processId: s.processId, secretKey: s.secretKey })
      .then(() => true)
      .finally(() => s.cancelDone());
  }

  close(): void {
    this.closed = true;
    clearInterval(this.sweeper);
    for (const s of [...this.servers]) s.destroy('proxy closing');
  }
}
