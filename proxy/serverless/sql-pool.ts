/**
 * SQL over HTTP, the compute side: pools of `pg.Client` connections per (endpoint, database,
 * role, compute address). A connection serves one request at a time, is reset with `DISCARD ALL`
 * before it is reused, and is dropped instead when it errored, is mid-transaction, was
 * invalidated (compute suspended, stopped or moved), or its request was cancelled.
 */
import pg from 'pg';
import { LRUCache } from 'lru-cache';
import { XenonError } from '../../lib/errors.ts';
import type { Logger } from '../../lib/logger.ts';
import { sendCancel } from '../cancellation.ts';
import type { SqlMetrics } from './sql-metrics.ts';

export interface PoolKey {
  endpoint: string;
  database: string;
  user: string;
  host: string;
  port: number;
}

export interface SqlPoolOptions {
  /** Connections per key (idle + busy + opening). */
  maxPerKey: number;
  idleMs: number;
  /** How long a request waits for a free connection when its key is at the maximum. */
  acquireTimeoutMs: number;
  statementTimeoutMs: number;
  connectTimeoutMs: number;
  metrics: SqlMetrics;
  logger: Logger;
  /** Keys kept (each holds at most `maxPerKey` connections). */
  maxKeys?: number;
}

/** Opening a connection failed below Postgres (refused, timed out, reset), or the pool was invalidated: re-wake and retry. */
export class ComputeConnectError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'ComputeConnectError';
  }
}

/** Raw Postgres text for every type: results are shaped by the HTTP layer. */
const RAW_TYPES = { getTypeParser: () => (v: string) => v } as unknown as pg.CustomTypesConfig;

type ConnState = 'idle' | 'busy' | null;

/** A reset (DISCARD ALL) that takes longer drops the connection. */
const RESET_TIMEOUT_MS = 5_000;

export class PooledConnection {
  readonly client: pg.Client;
  /** A connection-level error or end was seen: never reuse. */
  dead = false;
  /** Invalidated while busy: drop on release. */
  doomed = false;
  state: ConnState = null;
  idleTimer?: NodeJS.Timeout;
  uses = 0;

  constructor(
    readonly pool: KeyPool,
    config: pg.ClientConfig,
  ) {
    this.client = new pg.Client(config);
    this.client.on('error', () => { this.dead = true; pool.owner.lost(this); });
    this.client.on('end', () => { this.dead = true; pool.owner.lost(this); });
  }

  /** The backend's pid (for logs and tests). */
  get pid(): number {
    return (this.client as unknown as { processID: number }).processID;
  }
}

interface Waiter {
  /** A connection handed over (already busy), or null: a slot was reserved for the waiter to open one. */
  resolve(conn: PooledConnection | null): void;
  reject(err: Error): void;
}

export class KeyPool {
  readonly idle: PooledConnection[] = [];
  readonly busy = new Set<PooledConnection>();
  /** Connections being opened (slots reserved). */
  opening = 0;
  /** Busy connections whose reset is under way (they serve waiters before slots are granted). */
  resetting = 0;
  readonly waiters: Waiter[] = [];
  closed = false;

  constructor(
    readonly owner: SqlPool,
    readonly id: string,
    readonly key: PoolKey,
  ) {}

  get size(): number {
    return this.idle.length + this.busy.size + this.opening;
  }
}

export interface Acquired {
  conn: PooledConnection;
  result: 'hit' | 'miss' | 'wait';
}

export class SqlPool {
  private readonly pools: LRUCache<string, KeyPool>;
  /** Every live key pool (the LRU is for lookups and eviction). */
  private readonly all = new Set<KeyPool>();
  private closed = false;

  constructor(private readonly opts: SqlPoolOptions) {
    this.pools = new LRUCache<string, KeyPool>({
      max: opts.maxKeys ?? 10_000,
      ttl: 2 * Math.max(opts.idleMs, opts.statementTimeoutMs),
      updateAgeOnGet: true,
      dispose: (kp, _key, reason) => {
        // Evicted or expired (not our own delete): drop everything it holds.
        if (reason !== 'delete') this.closeKeyPool(kp, new ComputeConnectError('pool evicted'));
      },
    });
  }

  /** Connections of every key, for tests and logs. */
  get stats(): { idle: number; busy: number; keys: number } {
    let idle = 0;
    let busy = 0;
    for (const kp of this.all) {
      idle += kp.idle.length;
      busy += kp.busy.size;
    }
    return { idle, busy, keys: this.all.size };
  }

  /**
   * A connection for `key`: an idle one (hit), one just being reset (hit), a new one (miss;
   * `ComputeConnectError` when the compute cannot be reached, a pg DatabaseError when Postgres
   * refuses), or the next one freed when the key is at its maximum (wait; 53300 after
   * `acquireTimeoutMs`).
   */
  async acquire(key: PoolKey, password: string, signal: AbortSignal): Promise<Acquired> {
    if (this.closed) throw new ComputeConnectError('the SQL-over-HTTP pool is closed');
    const id = [key.endpoint, key.database, key.user, `${key.host}:${key.port}`].join('\0');
    let kp = this.pools.get(id);
    if (!kp || kp.closed) {
      kp = new KeyPool(this, id, key);
      this.pools.set(id, kp);
      this.all.add(kp);
    }
    const conn = this.takeIdle(kp);
    if (conn) return { conn, result: 'hit' };
    const full = kp.size >= this.opts.maxPerKey;
    // Below the maximum, a connection still being reset (DISCARD ALL after its response) is not
    // waited for: a sequential client would pay the reset on every request. A second connection
    // is opened once, and the two take turns.
    if (full) {
      // At the maximum: wait for one.
      const handed = await this.wait(kp, signal);
      if (handed) return { conn: handed, result: full ? 'wait' : 'hit' };
      // Not handed a connection: a slot was reserved for us (counted in kp.opening).
      return { conn: await this.openReserved(kp, password), result: full ? 'wait' : 'miss' };
    }
    kp.opening++;
    return { conn: await this.openReserved(kp, password), result: 'miss' };
  }

  private takeIdle(kp: KeyPool): PooledConnection | undefined {
    while (kp.idle.length) {
      const c = kp.idle.pop()!;
      if (c.idleTimer) clearTimeout(c.idleTimer);
      if (c.dead) {
        this.setState(c, null);
        continue;
      }
      kp.busy.add(c);
      this.setState(c, 'busy');
      c.uses++;
      return c;
    }
    return undefined;
  }

  private wait(kp: KeyPool, signal: AbortSignal): Promise<PooledConnection | null> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        remove();
        const msg = `too many concurrent requests for this endpoint, database and role: no connection became free within ${this.opts.acquireTimeoutMs} ms`;
        reject(new XenonError('PROXY_TOO_MANY_CONNECTIONS', msg, { userMessage: msg }));
      }, this.opts.acquireTimeoutMs);
      const onAbort = (): void => {
        remove();
        reject(new Error('the client went away while waiting for a connection'));
      };
      const remove = (): void => {
        clearTimeout(timer);
        signal.removeEventListener('abort', onAbort);
        const i = kp.waiters.indexOf(w);
        if (i >= 0) kp.waiters.splice(i, 1);
      };
      const w: Waiter = {
        resolve: (c) => { remove(); resolve(c); },
        reject: (e) => { remove(); reject(e); },
      };
      if (signal.aborted) return onAbort();
      signal.addEventListener('abort', onAbort, { once: true });
      kp.waiters.push(w);
    });
  }

  /**
   * Reserves free slots for waiters that no reset under way will serve; each such waiter then
   * opens a connection itself.
   */
  private grantSlots(kp: KeyPool): void {
    while (!kp.closed && kp.size < this.opts.maxPerKey && kp.waiters.length > kp.resetting) {
      kp.opening++;
      kp.waiters[0]!.resolve(null);
    }
  }

  /** Opens a connection in a slot already counted in `kp.opening`. */
  private async openReserved(kp: KeyPool, password: string): Promise<PooledConnection> {
    try {
      return await this.open(kp, password);
    } finally {
      kp.opening--;
      this.grantSlots(kp);
      this.forgetIfEmpty(kp);
    }
  }

  private async open(kp: KeyPool, password: string): Promise<PooledConnection> {
    const { key } = kp;
    const conn = new PooledConnection(kp, {
      host: key.host,
      port: key.port,
      user: key.user,
      password,
      database: key.database,
      ssl: false,
      keepAlive: true,
      statement_timeout: this.opts.statementTimeoutMs,
      connectionTimeoutMillis: this.opts.connectTimeoutMs,
      application_name: 'xenon-sql-over-http',
      types: RAW_TYPES,
    });
    try {
      await conn.client.connect();
    } catch (err) {
      conn.dead = true;
      conn.client.end().catch(() => {});
      if (err instanceof pg.DatabaseError) throw err;
      throw new ComputeConnectError(`could not connect to the compute at ${key.host}:${key.port}: ${(err as Error).message}`, { cause: err });
    }
    if (kp.closed || this.closed || conn.dead) {
      conn.dead = true;
      conn.client.end().catch(() => {});
      throw new ComputeConnectError('the compute was invalidated while connecting');
    }
    kp.busy.add(conn);
    this.setState(conn, 'busy');
    conn.uses++;
    return conn;
  }

  /**
   * Gives a connection back after its response was sent: reset with DISCARD ALL and kept (or
   * handed to a waiter), or dropped when `reusable` is false or it cannot be reset.
   */
  release(conn: PooledConnection, reusable: boolean): void {
    const kp = conn.pool;
    if (!kp.busy.has(conn)) return;
    if (!reusable || conn.dead || conn.doomed || kp.closed || this.closed || conn.client.getTransactionStatus() !== 'I') {
      this.drop(conn);
      return;
    }
    kp.resetting++;
    let settled = false;
    const timer = setTimeout(() => settle(new Error('DISCARD ALL timed out')), RESET_TIMEOUT_MS);
    const settle = (err?: Error): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      kp.resetting--;
      if (err) {
        this.opts.logger.debug('pooled connection could not be reset; dropped', { err });
        return this.drop(conn);
      }
      if (conn.dead || conn.doomed || kp.closed || this.closed || !kp.busy.has(conn)) return this.drop(conn);
      const w = kp.waiters[0];
      if (w) {
        conn.uses++;
        w.resolve(conn);
        return;
      }
      kp.busy.delete(conn);
      kp.idle.push(conn);
      this.setState(conn, 'idle');
      conn.idleTimer = setTimeout(() => this.closeIdle(conn), this.opts.idleMs);
      conn.idleTimer.unref();
    };
    conn.client.query('DISCARD ALL').then(() => settle(), (err: Error) => settle(err));
  }

  /** Cancels what the connection is running (a CancelRequest to the compute), then drops it. */
  cancelAndDrop(conn: PooledConnection): void {
    const c = conn.client as unknown as { processID: number | null; secretKey: number | null };
    const alreadyDead = conn.dead;
    conn.dead = true;
    const { host, port } = conn.pool.key;
    const kill = (): void => this.drop(conn);
    if (alreadyDead || c.processID === null || c.secretKey === null) return kill();
    sendCancel({ host, port, processId: c.processID, secretKey: c.secretKey }, 2_000).then(kill, (err: Error) => {
      this.opts.logger.debug('cancel request to the compute failed', { err });
      kill();
    });
  }

  /** Closes a connection and frees its slot (idempotent). */
  drop(conn: PooledConnection): void {
    conn.dead = true;
    if (conn.idleTimer) clearTimeout(conn.idleTimer);
    const kp = conn.pool;
    const i = kp.idle.indexOf(conn);
    if (i >= 0) kp.idle.splice(i, 1);
    const wasBusy = kp.busy.delete(conn);
    this.setState(conn, null);
    if (i >= 0 || wasBusy) {
      const stream = (conn.client as unknown as { connection?: { stream?: { destroy?: () => void } } }).connection?.stream;
      // end() sends Terminate (or destroys the socket when a query is running) and waits for the
      // server to close; a compute that does not answer (frozen) gets the socket destroyed.
      conn.client.end().catch(() => {});
      setTimeout(() => stream?.destroy?.(), 1_000).unref();
      this.grantSlots(kp);
      this.forgetIfEmpty(kp);
    }
  }

  /** A connection-level error or end ('error'/'end' listeners): idle ones go now, busy ones on release. */
  lost(conn: PooledConnection): void {
    if (conn.pool.idle.includes(conn)) this.drop(conn);
  }

  private closeIdle(conn: PooledConnection): void {
    if (conn.pool.idle.includes(conn)) this.drop(conn);
  }

  private forgetIfEmpty(kp: KeyPool): void {
    if (kp.size > 0 || kp.waiters.length > 0) return;
    this.all.delete(kp);
    if (this.pools.peek(kp.id) === kp) this.pools.delete(kp.id);
  }

  private setState(conn: PooledConnection, state: ConnState): void {
    if (conn.state === state) return;
    if (conn.state) this.opts.metrics.poolConnections.dec({ state: conn.state });
    if (state) this.opts.metrics.poolConnections.inc({ state });
    conn.state = state;
  }

  private closeKeyPool(kp: KeyPool, err: Error): void {
    kp.closed = true;
    for (const w of [...kp.waiters]) w.reject(err);
    for (const c of [...kp.idle]) this.drop(c);
    for (const c of kp.busy) c.doomed = true;
    this.forgetIfEmpty(kp);
  }

  /** The endpoint's compute was suspended, stopped or moved: close idle connections, drop busy ones on release. */
  invalidate(endpoint: string): number {
    let n = 0;
    for (const kp of [...this.all]) {
      if (kp.key.endpoint !== endpoint) continue;
      n += kp.idle.length + kp.busy.size;
      if (this.pools.peek(kp.id) === kp) this.pools.delete(kp.id);
      this.closeKeyPool(kp, new ComputeConnectError(`endpoint ${endpoint} was invalidated`));
    }
    return n;
  }

  /** Closes every connection, busy ones included. */
  async close(): Promise<void> {
    this.closed = true;
    const busy: PooledConnection[] = [];
    for (const kp of [...this.all]) {
      busy.push(...kp.busy);
      this.closeKeyPool(kp, new ComputeConnectError('the SQL-over-HTTP pool is closed'));
    }
    this.pools.clear();
    for (const c of busy) this.drop(c);
    this.all.clear();
    await new Promise((r) => setImmediate(r));
  }
}
