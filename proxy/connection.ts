/**
 * One client connection, from its first byte to the pipe (DESIGN §4 "Connect"):
 * SSLRequest / GSSENCRequest ('N') / CancelRequest → TLS with SNI → StartupMessage → endpoint →
 * SCRAM with the client against the role secret (a mock secret for unknown endpoints and roles:
 * the answer is always 28P01 and nothing is woken) → wake → SCRAM to the compute with the
 * client's ClientKey → ParameterStatus and a proxy-owned BackendKeyData → pipe.
 */
import type { Socket } from 'node:net';
import { TLSSocket, type SecureContext } from 'node:tls';
import { asXenonError, XenonError } from '../lib/errors.ts';
import { setTimeout as delay } from 'node:timers/promises';
import { parseScramSecret } from '../lib/scram.ts';
import { endpointFromOptions, endpointFromSni, resolveEndpoint } from './auth/credentials.ts';
import { mockSecret, SCRAM_SHA_256, ScramServerSession } from './auth/scram.ts';
import { allocateCancelKey, cancelKey, sendCancel, type CancelMap } from './cancellation.ts';
import { ComputeError, connectCompute, type ComputeSession } from './connect-compute.ts';
import type { ProxyConfig } from './config.ts';
import type { ConnectionTracker } from './connections.ts';
import { PHASES, RequestContext } from './context.ts';
import type { CachedControlPlane } from './control-plane.ts';
import type { ProxyMetrics } from './metrics.ts';
import { pipeBoth } from './passthrough.ts';
import {
  backend,
  DEFAULT_MAX_MESSAGE,
  FrontendReader,
  MAX_STARTUP_PACKET,
  MESSAGE_TYPES,
  parseSaslInitialResponse,
  PgWireError,
  type StartupPacket,
} from './pgwire/index.ts';

export interface SessionDeps {
  config: ProxyConfig;
  cp: CachedControlPlane;
  tracker: ConnectionTracker;
  cancels: CancelMap;
  metrics: ProxyMetrics;
  secureContext: () => SecureContext;
}

/** The client hung up (or we closed it): nothing more to say to it. */
class ClientGone extends Error {}

const violation = (msg: string): XenonError => new XenonError('PROXY_PROTOCOL_VIOLATION', msg, { userMessage: msg });

/** Startup parameters never forwarded to the compute. */
const DROPPED_PARAMS = new Set(['user', 'database', 'options', 'replication']);

/** The most a client may have buffered at the proxy before it stops reading (backpressure). */
const MAX_BUFFERED = MAX_STARTUP_PACKET + DEFAULT_MAX_MESSAGE;

/** The client side: a socket (plain, then TLS) feeding a FrontendReader, read with `await`. */
class ClientConn {
  socket: Socket;
  readonly reader = new FrontendReader();
  private waiter?: () => void;
  private gone = false;
  /** We sent the client an error and are closing: its disconnect is not news. */
  failed = false;

  constructor(socket: Socket) {
    this.socket = socket;
    this.attach(socket);
  }

  private readonly onData = (chunk: Buffer): void => {
    this.reader.push(chunk);
    // Pipelined bytes wait here while we authenticate and wake: bound them.
    if (this.reader.buffered > MAX_BUFFERED) this.socket.pause();
    this.wake();
  };
  private readonly onGone = (): void => {
    this.gone = true;
    this.wake();
  };

  private wake(): void {
    const w = this.waiter;
    this.waiter = undefined;
    w?.();
  }

  private attach(s: Socket): void {
    s.on('data', this.onData);
    s.on('end', this.onGone);
    s.on('close', this.onGone);
    s.on('error', this.onGone);
  }

  private detachListeners(s: Socket): void {
    s.off('data', this.onData);
    s.off('end', this.onGone);
    s.off('close', this.onGone);
    s.off('error', this.onGone);
  }

  /** Waits until `fn` returns non-null (it throws PgWireError on malformed input). */
  async read<T>(fn: () => T | null): Promise<T> {
    for (;;) {
      const v = fn();
      if (v !== null) return v;
      if (this.gone || this.socket.destroyed) throw new ClientGone();
      if (this.socket.isPaused()) this.socket.resume();
      await new Promise<void>((r) => (this.waiter = r));
    }
  }

  write(buf: Buffer): void {
    if (!this.socket.destroyed) this.socket.write(buf);
  }

  /** Answers 'S' and runs the TLS handshake on the same socket. Resolves with the SNI name. */
  async upgradeTls(context: () => SecureContext, timeoutMs: number): Promise<string | undefined> {
    const raw = this.socket;
    raw.pause();
    this.detachListeners(raw);
    raw.on('error', () => {}); // errors surface on the TLS socket
    raw.write('S');
    const tls = new TLSSocket(raw, {
      isServer: true,
      secureContext: context(),
      SNICallback: (_name, cb) => cb(null, context()),
    });
    this.socket = tls;
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new XenonError('PROXY_STARTUP_TIMEOUT', 'TLS handshake timed out')), timeoutMs);
      tls.once('secure', () => { clearTimeout(timer); resolve(); });
      tls.once('error', (err) => { clearTimeout(timer); reject(Object.assign(new ClientGone(err.message), { tls: true })); });
      tls.once('close', () => { clearTimeout(timer); reject(new ClientGone('closed during TLS handshake')); });
    });
    this.attach(tls);
    const sni = (tls as TLSSocket & { servername?: string | false }).servername;
    return typeof sni === 'string' ? sni : undefined;
  }

  /** The client is gone, or we are closing it after an error. */
  get closed(): boolean {
    return this.gone || this.failed || this.socket.destroyed;
  }

  /** Stops reading (bytes stay in the kernel until the pipe starts) and returns what was already read. */
  detach(): Buffer {
    this.socket.pause();
    this.detachListeners(this.socket);
    return this.reader.drain();
  }

  /** Sends a FATAL ErrorResponse and closes (once). Whatever the client still sends is discarded. */
  fail(fields: { code: string; message: string; detail?: string; hint?: string }): void {
    if (this.failed || this.socket.destroyed) return;
    this.failed = true;
    this.socket.off('data', this.onData);
    this.socket.on('data', () => {});
    this.socket.on('error', () => {});
    this.reader.drain();
    this.socket.resume();
    this.socket.end(backend.errorResponse({ severity: 'FATAL', ...fields }));
    setTimeout(() => this.socket.destroy(), 1_000).unref();
    this.gone = true;
    this.wake();
  }
}

export async function handleClient(raw: Socket, deps: SessionDeps, ctx: RequestContext): Promise<void> {
  const { config, metrics } = deps;
  raw.setNoDelay(true);
  raw.setKeepAlive(true, 60_000);
  const conn = new ClientConn(raw);
  let timer: NodeJS.Timeout | undefined;
  const deadline = (ms: number, code: 'PROXY_STARTUP_TIMEOUT' | 'PROXY_AUTH_TIMEOUT'): void => {
    clearTimeout(timer);
    timer = setTimeout(() => {
      const xe = new XenonError(code);
      metrics.errors.inc({ kind: xe.kind, code: xe.code });
      ctx.logger.info('client timed out', { code });
      conn.fail({ code: xe.sqlstate, message: xe.userMessage });
    }, ms);
  };
  let counted: string | undefined;
  try {
    deadline(config.startupTimeoutMs, 'PROXY_STARTUP_TIMEOUT');
    // ---- handshake
    let tls = false;
    let sni: string | undefined;
    let startup: Extract<StartupPacket, { kind: 'startup' }>;
    for (;;) {
      const pkt = await conn.read(() => conn.reader.readStartup());
      if (pkt.kind === 'ssl' || pkt.kind === 'gssenc') {
        if (tls) throw violation(`${pkt.kind === 'ssl' ? 'SSLRequest' : 'GSSENCRequest'} inside TLS`);
        // Bytes after the request and before the handshake could be injected by a man in the middle.
        if (conn.reader.buffered > 0) throw violation('data received before the TLS handshake completed');
        if (pkt.kind === 'gssenc') {
          conn.write(Buffer.from('N'));
          continue;
        }
        ctx.begin('tls');
        try {
          sni = await conn.upgradeTls(deps.secureContext, config.startupTimeoutMs);
        } catch (err) {
          if ((err as { tls?: boolean }).tls) metrics.tlsFailures.inc();
          throw err;
        }
        ctx.end();
        tls = true;
        continue;
      }
      if (pkt.kind === 'cancel') {
        await forwardCancel(pkt.processId, pkt.secretKey, deps, ctx);
        conn.socket.end();
        return;
      }
      startup = pkt;
      break;
    }
    if (!tls && config.requireTls) throw new XenonError('PROXY_TLS_REQUIRED');

    // ---- startup parameters
    const params = startup.params;
    const unsupported = [...params.keys()].filter((k) => k.startsWith('_pq_.'));
    if (startup.minor > 0 || unsupported.length) conn.write(backend.negotiateProtocolVersion(0, unsupported));
    const user = params.get('user')!;
    const database = params.get('database') || user;
    const replication = params.get('replication');
    if (replication !== undefined && !/^(false|off|no|0)$/i.test(replication)) throw new XenonError('PROXY_REPLICATION_REJECTED');
    const opts = endpointFromOptions(params.get('options'));
    const ref = resolveEndpoint(endpointFromSni(sni, config.domain), opts.endpoint);
    ctx.setEndpoint(ref.endpoint, user, database);
    const computeParams: Record<string, string> = { user, database };
    for (const [k, v] of params) if (!DROPPED_PARAMS.has(k) && !k.startsWith('_pq_.')) computeParams[k] = v;
    if (opts.rest) computeParams.options = opts.rest;

    // ---- SCRAM with the client
    deadline(config.authTimeoutMs, 'PROXY_AUTH_TIMEOUT');
    ctx.begin('auth');
    const access = await deps.cp.getEndpointAccess(ref.endpoint, user);
    const secret = access?.role_secret ? parseScramSecret(access.role_secret) : null;
    const scram = new ScramServerSession(secret ?? mockSecret(config.mockSecretKey, ref.endpoint, user));
    conn.write(backend.authenticationSASL([SCRAM_SHA_256]));
    const first = await readPassword(conn);
    const initial = parseSaslInitialResponse(first);
    if (initial.mechanism !== SCRAM_SHA_256) throw new XenonError('AUTH_METHOD_UNSUPPORTED');
    conn.write(backend.authenticationSASLContinue(scram.clientFirst(initial.data)));
    const result = scram.clientFinal(await readPassword(conn));
    if (!result.ok || !secret || !access) {
      const msg = `password authentication failed for user "${user}"`;
      throw new XenonError('AUTH_FAILED', msg, { userMessage: msg });
    }
    conn.write(backend.authenticationSASLFinal(result.serverFinal));
    ctx.end();
    // Authenticated: from here wake and connect are bounded by their own timeouts and retries.
    clearTimeout(timer);

    // ---- wake and connect (re-wake when a cached address fails)
    deps.tracker.inc(ref.endpoint);
    counted = ref.endpoint;
    let session: ComputeSession | undefined;
    for (let attempt = 1; !session; attempt++) {
      let cached = false;
      try {
        ctx.begin('wake');
        const info = await deps.cp.wakeCompute(ref.endpoint);
        ctx.end();
        cached = info.cached;
        if (info.cold) ctx.cold = true;
        ctx.begin('connect');
        session = await connectCompute({
          host: info.host,
          port: info.port,
          params: computeParams,
          clientKey: result.clientKey,
          secret,
          // A cached address may point at a compute suspended or stopped since: fail fast and re-wake.
          timeoutMs: cached ? Math.min(config.computeConnectTimeoutMs, 1_000) : config.computeConnectTimeoutMs,
        });
        ctx.end();
      } catch (err) {
        ctx.end();
        const xe = err instanceof XenonError ? err : undefined;
        // The compute holds another secret than the one we checked: our copy may be stale.
        if (xe?.code === 'PROXY_COMPUTE_AUTH_FAILED') deps.cp.invalidateAccess(ref.endpoint, user);
        // Any failure on a cached address earns a fresh wake (the port may even belong to another
        // compute now) — except a secret mismatch, which another wake cannot fix.
        const retry = (cached && !(err instanceof ComputeError) && xe?.code !== 'PROXY_COMPUTE_AUTH_FAILED') || (xe?.retryable ?? false);
        if (!retry || attempt >= config.computeConnectAttempts) throw err;
        deps.cp.invalidateWake(ref.endpoint);
        metrics.computeRetries.inc();
        ctx.logger.info('compute connect failed; waking again', { attempt, cached, code: xe?.code, err: (err as Error).message });
        if (!cached) await delay(Math.min(1_000, 25 * 2 ** attempt));
      }
    }
    // The client may have left during a cold start: do not keep a compute session (and a live
    // connection count, which would keep the endpoint awake) for nobody.
    if (conn.closed) {
      session.socket.destroy();
      throw new ClientGone('client left while its compute was being woken');
    }

    // ---- hand over: the compute's parameters, our cancel key, then bytes
    const key = await allocateCancelKey(deps.cancels);
    await deps.cancels.set(key.key, { host: session.socket.remoteAddress ?? '127.0.0.1', port: session.socket.remotePort ?? 0, processId: session.processId, secretKey: session.secretKey });
    const out = [backend.authenticationOk()];
    for (const [k, v] of session.parameters) out.push(backend.parameterStatus(k, v));
    out.push(backend.backendKeyData(key.processId, key.secretKey), backend.readyForQuery('I'));
    conn.write(Buffer.concat(out));
    const early = conn.detach();
    if (early.length) session.socket.write(early);
    observeConnect(ctx, metrics);
    metrics.sessionsActive.inc();
    ctx.logger.info('session started', { ...roundTimings(ctx), cold: ctx.cold });
    const endpoint = counted;
    counted = undefined; // released when the pipe closes
    pipeBoth(conn.socket, session.socket, (r) => {
      deps.tracker.dec(endpoint);
      void Promise.resolve(deps.cancels.delete(key.key)).catch((err: Error) => ctx.logger.warn('could not forget a cancel key', { err }));
      metrics.sessionsActive.dec();
      metrics.bytes.inc({ direction: 'to_compute' }, r.toCompute);
      metrics.bytes.inc({ direction: 'to_client' }, r.toClient);
      ctx.logger.info('session ended', { durationMs: Math.round(ctx.elapsedMs), bytesToCompute: r.toCompute, bytesToClient: r.toClient });
    });
  } catch (err) {
    clearTimeout(timer);
    if (counted) deps.tracker.dec(counted);
    reportError(err, conn, ctx, metrics);
  }
}

/** Reads one PasswordMessage ('p') body; Terminate means the client gave up. */
async function readPassword(conn: ClientConn): Promise<Buffer> {
  const m = await conn.read(() => conn.reader.readMessage());
  if (m.type === MESSAGE_TYPES.TERMINATE) throw new ClientGone();
  if (m.type !== MESSAGE_TYPES.PASSWORD) throw violation(`expected a password message, got message type ${JSON.stringify(String.fromCharCode(m.type))}`);
  return m.body;
}

async function forwardCancel(processId: number, secretKey: number, deps: SessionDeps, ctx: RequestContext): Promise<void> {
  const target = await deps.cancels.get(cancelKey(processId, secretKey));
  if (!target) {
    deps.metrics.cancelRequests.inc({ outcome: 'unknown_key' });
    ctx.logger.info('cancel request for an unknown key');
    return;
  }
  try {
    await sendCancel(target);
    deps.metrics.cancelRequests.inc({ outcome: 'forwarded' });
  } catch (err) {
    deps.metrics.cancelRequests.inc({ outcome: 'failed' });
    ctx.logger.warn('cancel request could not reach the compute', { err });
  }
}

function roundTimings(ctx: RequestContext): Record<string, number> {
  const out: Record<string, number> = {};
  for (const p of PHASES) if (ctx.timings[p] !== undefined) out[`${p}Ms`] = Math.round(ctx.timings[p]! * 100) / 100;
  out.totalMs = Math.round(ctx.elapsedMs * 100) / 100;
  return out;
}

function observeConnect(ctx: RequestContext, metrics: ProxyMetrics): void {
  const cold = String(ctx.cold);
  for (const p of PHASES) if (ctx.timings[p] !== undefined) metrics.connectSeconds.observe({ phase: p, cold }, ctx.timings[p]! / 1000);
  metrics.connectSeconds.observe({ phase: 'total', cold }, ctx.elapsedMs / 1000);
}

function reportError(err: unknown, conn: ClientConn, ctx: RequestContext, metrics: ProxyMetrics): void {
  // Already answered (a timeout fired): what follows is the consequence of our own close.
  if (conn.failed) return;
  if (err instanceof ClientGone) {
    metrics.errors.inc({ kind: 'clientDisconnect', code: 'CLIENT_GONE' });
    ctx.logger.debug('client went away during startup', { reason: err.message });
    conn.socket.destroy();
    return;
  }
  if (err instanceof ComputeError) {
    metrics.errors.inc({ kind: 'compute', code: err.fields.code });
    ctx.logger.info('compute refused the session', { sqlstate: err.fields.code, msg: err.fields.message });
    conn.fail(err.fields);
    return;
  }
  const xe = err instanceof PgWireError ? new XenonError(err.code, err.message, { userMessage: err.message }) : asXenonError(err);
  metrics.errors.inc({ kind: xe.kind, code: xe.code });
  const fields = { code: xe.code, err: xe.message, ...roundTimings(ctx) };
  if (xe.kind === 'user' || xe.kind === 'rateLimit' || xe.kind === 'clientDisconnect') ctx.logger.info('connection rejected', fields);
  else ctx.logger.warn('connection failed', fields);
  conn.fail({ code: xe.sqlstate, message: xe.userMessage });
}
