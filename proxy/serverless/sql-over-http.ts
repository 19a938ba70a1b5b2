/**
 * SQL over HTTP (`POST /sql`), as the unmodified `@neondatabase/serverless` driver's `neon()`
 * speaks it: the target and credentials in `Neon-Connection-String`, `{query, params}` or
 * `{queries: [...]}` (one transaction) in the body, results as `{fields, rows, command, rowCount,
 * rowAsArray}` and errors as HTTP 400 with the Postgres error fields.
 *
 * Every request is authenticated (failed-auth limit, connection-attempt limit, IP allowlist, the
 * password against the role's SCRAM secret with PBKDF2 cached), counted as a live connection of
 * its endpoint while it runs, and served from a pool of compute connections (sql-pool.ts).
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import pg from 'pg';
import { XenonError } from '../../lib/errors.ts';
import type { Logger } from '../../lib/logger.ts';
import { authFailed, beginAuth, checkEndpointAccess, type PasswordVerifier, type ProxyLimits } from '../auth/access.ts';
import type { ProxyConfig } from '../config.ts';
import type { ConnectionTracker } from '../connections.ts';
import type { CachedControlPlane } from '../control-plane.ts';
import type { ProxyMetrics } from '../metrics.ts';
import { sqlMetrics, type SqlMetrics } from './sql-metrics.ts';
import { ComputeConnectError, SqlPool, type Acquired, type PooledConnection } from './sql-pool.ts';
import { ResponseBudget, runControl, runQuery, type SqlResult } from './sql-query.ts';
import {
  parseConnectionString,
  parseOptions,
  parsePayload,
  readBody,
  SqlHttpError,
  type ConnectionTarget,
  type SqlOptions,
  type SqlPayload,
} from './sql-request.ts';

export interface SqlDeps {
  config: ProxyConfig;
  cp: CachedControlPlane;
  tracker: ConnectionTracker;
  limits: ProxyLimits;
  metrics: ProxyMetrics;
  passwords: PasswordVerifier;
  logger: Logger;
}

/** How long a request waits for a pooled connection when its key is at `sqlPoolMaxPerEndpoint` (no config field yet). */
export const SQL_POOL_ACQUIRE_TIMEOUT_MS = 10_000;

/** The Postgres error fields the driver copies onto NeonDbError (plus `message`). */
const PG_ERROR_FIELDS = [
  'severity', 'code', 'detail', 'hint', 'position', 'internalPosition', 'internalQuery', 'where',
  'schema', 'table', 'column', 'dataType', 'constraint', 'file', 'line', 'routine',
] as const;

class ClientGone extends Error {
  constructor() {
    super('the client closed the connection');
    this.name = 'ClientGone';
  }
}

export class SqlOverHttp {
  private readonly metrics: SqlMetrics;
  private readonly pool: SqlPool;
  private readonly logger: Logger;

  constructor(
    readonly deps: SqlDeps,
    opts: { acquireTimeoutMs?: number } = {},
  ) {
    this.metrics = sqlMetrics(deps.metrics.registry);
    this.logger = deps.logger.child({ component: 'sql-over-http' });
    this.pool = new SqlPool({
      maxPerKey: deps.config.sqlPoolMaxPerEndpoint,
      idleMs: deps.config.sqlPoolIdleMs,
      acquireTimeoutMs: opts.acquireTimeoutMs ?? SQL_POOL_ACQUIRE_TIMEOUT_MS,
      statementTimeoutMs: deps.config.sqlQueryTimeoutMs,
      connectTimeoutMs: deps.config.computeConnectTimeoutMs,
      metrics: this.metrics,
      logger: this.logger,
    });
  }

  /** Pooled connections now (tests, logs). */
  get poolStats(): { idle: number; busy: number; keys: number } {
    return this.pool.stats;
  }

  /** Serves one `POST /sql` request from `peerIp`. */
  async handle(req: IncomingMessage, res: ServerResponse, peerIp: string): Promise<void> {
    const t0 = performance.now();
    const abort = new AbortController();
    const onClose = (): void => {
      if (!res.writableFinished) abort.abort(new ClientGone());
    };
    res.once('close', onClose);
    // A whole request (every query of a batch) gets the statement timeout once: neither a long
    // batch nor `SET statement_timeout = 0` holds a pooled connection longer.
    const deadline = setTimeout(() => {
      const ms = this.deps.config.sqlQueryTimeoutMs;
      abort.abort(new XenonError('PROXY_QUERY_TIMEOUT', `request ran over ${ms} ms`, { userMessage: `the request took longer than ${ms} ms and was cancelled` }));
    }, this.deps.config.sqlQueryTimeoutMs);
    deadline.unref();
    let log = this.logger.child({ peer: peerIp });
    let status = 499;
    let cold = false;
    let tracked: string | undefined;
    let conn: PooledConnection | undefined;
    let reusable = false;
    const fields: Record<string, unknown> = {};
    try {
      const target = parseConnectionString(req.headers['neon-connection-string']);
      log = log.child({ endpoint: target.endpoint, role: target.user, database: target.database });
      const opts = parseOptions(req);
      const payload = parsePayload(await readBody(req, this.deps.config.sqlMaxRequestBytes));
      fields.queries = payload.kind === 'single' ? 1 : payload.queries.length;
      const password = await this.authenticate(target, peerIp);
      this.deps.tracker.inc(target.endpoint);
      tracked = target.endpoint;
      if (abort.signal.aborted) throw abort.signal.reason;
      const { acquired, wakeCold } = await this.connect(target, password, abort.signal);
      conn = acquired.conn;
      cold = wakeCold;
      fields.pool = acquired.result;
      fields.pid = conn.pid;
      this.metrics.acquisitions.inc({ result: acquired.result });
      const budget = new ResponseBudget(this.deps.config.sqlMaxResponseBytes);
      const c = conn;
      const body = await this.execute(c, payload, opts, budget, abort.signal, () => this.pool.cancelAndDrop(c));
      // The estimate counted as rows arrived; this is the exact size.
      const text = JSON.stringify(body);
      reusable = true;
      const bytes = Buffer.byteLength(text);
      if (bytes > budget.max) throw budget.error();
      fields.bytes = bytes;
      status = this.send(req, res, 200, text);
    } catch (err) {
      // A Postgres error leaves the connection usable, unless it was FATAL (the backend is gone).
      if (err instanceof pg.DatabaseError && conn && !conn.dead && err.severity !== 'FATAL' && err.severity !== 'PANIC') reusable = true;
      status = this.fail(req, res, err, log);
    } finally {
      clearTimeout(deadline);
      res.off('close', onClose);
      // After the response: DISCARD ALL, then back to the pool (or dropped).
      if (conn) this.pool.release(conn, reusable && !abort.signal.aborted);
      if (tracked) this.deps.tracker.dec(tracked);
      const seconds = (performance.now() - t0) / 1000;
      this.metrics.requests.inc({ status: String(status) });
      this.metrics.duration.observe({ cold: String(cold) }, seconds);
      log.debug('sql request', { status, ms: Math.round(seconds * 10_000) / 10, cold, ...fields });
    }
  }

  /** The endpoint's compute was suspended, stopped or moved: drop its pooled connections. */
  invalidate(endpoint: string): void {
    const n = this.pool.invalidate(endpoint);
    if (n) this.logger.debug('pooled connections invalidated', { endpoint, connections: n });
  }

  async close(): Promise<void> {
    await this.pool.close();
  }

  /** Limits, allowlist and password; the password that matched. */
  private async authenticate(target: ConnectionTarget, peerIp: string): Promise<string> {
    const endAuth = beginAuth(this.deps, peerIp);
    try {
      const { checkAgainst } = await checkEndpointAccess(this.deps, target.endpoint, target.user, peerIp, { connectionAttempt: false });
      for (const candidate of target.passwords) {
        if (candidate && (await this.deps.passwords.verify(checkAgainst, candidate))) {
          this.deps.metrics.authentications.inc({ method: 'password', outcome: 'ok' });
          return candidate;
        }
      }
      throw authFailed(this.deps, peerIp, target.user, 'password');
    } finally {
      endAuth();
    }
  }

  /** Wake (cached) and a pooled connection; a compute that cannot be reached is re-woken once. */
  private async connect(target: ConnectionTarget, password: string, signal: AbortSignal): Promise<{ acquired: Acquired; wakeCold: boolean }> {
    for (let attempt = 1; ; attempt++) {
      const wake = await this.deps.cp.wakeCompute(target.endpoint);
      if (signal.aborted) throw signal.reason;
      try {
        const key = { endpoint: target.endpoint, database: target.database, user: target.user, host: wake.host, port: wake.port };
        return { acquired: await this.pool.acquire(key, password, signal), wakeCold: wake.cold };
      } catch (err) {
        if (!(err instanceof ComputeConnectError)) throw err;
        this.deps.cp.invalidateWake(target.endpoint);
        if (attempt >= 2 || signal.aborted) {
          throw new XenonError('PROXY_COMPUTE_UNAVAILABLE', err.message, { cause: err });
        }
        this.deps.metrics.computeRetries.inc();
        this.logger.debug('compute connection failed; waking again', { endpoint: target.endpoint, cached: wake.cached, err });
      }
    }
  }

  private async execute(
    conn: PooledConnection,
    payload: SqlPayload,
    opts: SqlOptions,
    budget: ResponseBudget,
    signal: AbortSignal,
    onAbandon: () => void,
  ): Promise<SqlResult | { results: SqlResult[] }> {
    const run = { rawText: opts.rawText, arrayMode: opts.arrayMode, budget, signal, onAbandon };
    if (payload.kind === 'single') return runQuery(conn.client, payload.query, run);
    const results: SqlResult[] = [];
    await runControl(conn.client, opts.begin, signal);
    try {
      for (const q of payload.queries) results.push(await runQuery(conn.client, q, run));
      await runControl(conn.client, 'COMMIT', signal);
    } catch (err) {
      // The connection is dropped when abandoned; otherwise end the transaction so it can be reused.
      if (!conn.dead && conn.client.getTransactionStatus() !== 'I') {
        await conn.client.query('ROLLBACK').catch(() => {});
      }
      throw err;
    }
    return { results };
  }

  private send(req: IncomingMessage, res: ServerResponse, status: number, text: string): number {
    if (res.headersSent || res.destroyed) return res.destroyed ? 499 : status;
    const headers: Record<string, string | number> = {
      'content-type': 'application/json',
      'access-control-allow-origin': '*',
      'content-length': Buffer.byteLength(text),
    };
    // A body left unread (refused early, or too large): discarded up to a bound so that the
    // client, still sending, gets to read this answer; beyond the bound the connection is closed.
    const declared = Number(req.headers['content-length']);
    const unread = !req.complete;
    const linger = unread && !(declared > DISCARD_MAX_BYTES);
    if (unread && !linger) headers.connection = 'close';
    res.writeHead(status, headers);
    res.end(text);
    if (linger) discardBody(req);
    return status;
  }

  /** The answer for an error; returns the status sent. */
  private fail(req: IncomingMessage, res: ServerResponse, err: unknown, log: Logger): number {
    if (err instanceof ClientGone || res.destroyed) {
      log.debug('the client went away', { err });
      return 499;
    }
    if (err instanceof pg.DatabaseError) {
      const body: Record<string, unknown> = { message: err.message };
      for (const f of PG_ERROR_FIELDS) {
        const v = (err as unknown as Record<string, unknown>)[f];
        if (v !== undefined && v !== null) body[f] = v;
      }
      log.debug('query failed', { code: err.code });
      return this.send(req, res, 400, JSON.stringify(body));
    }
    if (err instanceof SqlHttpError) {
      log.info('sql request refused', { status: err.status, code: err.sqlstate, msg: err.message });
      return this.send(req, res, err.status, JSON.stringify({ message: err.message, code: err.sqlstate }));
    }
    let xe: XenonError;
    if (err instanceof XenonError) {
      xe = err;
    } else if (isConnectionError(err)) {
      const msg = 'the connection to the compute node was lost while running the query';
      xe = new XenonError('PROXY_COMPUTE_UNAVAILABLE', `${msg}: ${(err as Error).message}`, { userMessage: msg, cause: err });
    } else {
      xe = new XenonError('INTERNAL', err instanceof Error ? err.message : String(err), { cause: err });
    }
    this.deps.metrics.errors.inc({ kind: xe.kind, code: xe.code });
    if (xe.kind === 'service') {
      log.error('sql request failed', { err: xe, cause: xe.cause });
      return this.send(req, res, 500, JSON.stringify({ message: xe.userMessage, code: xe.sqlstate }));
    }
    log.info('sql request refused', { code: xe.code, sqlstate: xe.sqlstate, msg: xe.message });
    // The driver builds NeonDbError (with `code`) only from a 400 JSON body.
    return this.send(req, res, 400, JSON.stringify({ message: xe.userMessage, code: xe.sqlstate }));
  }
}

/** A refused request body is read and thrown away up to this many bytes, for this long. */
const DISCARD_MAX_BYTES = 32 * 1024 * 1024;
const DISCARD_MAX_MS = 5_000;

/**
 * Reads and drops the rest of a request body (nothing is kept), so a client still sending gets
 * the answer instead of a reset; a body that goes on past the bounds gets the socket closed.
 */
function discardBody(req: IncomingMessage): void {
  let bytes = 0;
  const stop = (): void => {
    clearTimeout(timer);
    req.off('data', onData);
    req.socket?.destroy();
  };
  const onData = (chunk: Buffer): void => {
    bytes += chunk.length;
    if (bytes > DISCARD_MAX_BYTES) stop();
  };
  const timer = setTimeout(stop, DISCARD_MAX_MS);
  timer.unref();
  req.on('data', onData);
  req.once('end', () => clearTimeout(timer));
  req.once('close', () => clearTimeout(timer));
  req.resume();
}

/** pg's errors when the socket to the compute broke mid-request (not a Postgres error). */
function isConnectionError(err: unknown): boolean {
  if (!(err instanceof Error)) return false;
  return (
    /Connection terminated|not queryable|ECONNRESET|EPIPE|ECONNREFUSED|ETIMEDOUT/i.test(err.message) ||
    ['ECONNRESET', 'EPIPE', 'ECONNREFUSED', 'ETIMEDOUT'].includes((err as { code?: string }).code ?? '')
  );
}
