/**
 * One client connection, from its first byte to the pipe (DESIGN §4 "Connect"):
 * SSLRequest or direct TLS (ALPN "postgresql") / GSSENCRequest ('N') / CancelRequest → TLS with
 * SNI → StartupMessage → endpoint (SNI, options, or the password hack) → limits (failed-auth
 * per address, connection attempts per endpoint, IP allowlist) → SCRAM-SHA-256(-PLUS) with the
 * client against the role secret (a mock secret for unknown endpoints and roles: the answer is
 * always 28P01 and nothing is woken) → wake → SCRAM to the compute with the client's ClientKey →
 * ParameterStatus and a proxy-owned BackendKeyData → pipe.
 */
import type { Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { TLSSocket, type SecureContext } from 'node:tls';
import type { EndpointAccess } from '../wake-compute/api.ts';
import { asXenonError, XenonError } from '../lib/errors.ts';
import { setTimeout as delay } from 'node:timers/promises';
import type { ScramSecret } from '../lib/scram.ts';
import { authFailed, beginAuth, checkEndpointAccess, type PasswordVerifier, type ProxyLimits } from './auth/access.ts';
import { tlsServerEndPoint } from './auth/channel-binding.ts';
import { endpointFromOptions, endpointFromSni, endpointRef, parsePasswordHack, resolveEndpoint, type EndpointRef } from './auth/credentials.ts';
import { ScramServerSession } from './auth/scram.ts';
import { allocateCancelKey, cancelKey, sendCancel, type CancelMap } from './cancellation.ts';
import { ComputeError, connectCompute, type ComputeSession } from './connect-compute.ts';
import type { ProxyConfig } from './config.ts';
import type { ConnectionTracker } from './connections.ts';
import { PHASES, RequestContext } from './context.ts';
import type { CachedControlPlane } from './control-plane.ts';
import type { ProxyMetrics } from './metrics.ts';
import { pipeBoth } from './passthrough.ts';
import type { Pooler } from './pooler/index.ts';
import { plainAddress, sourceNetwork } from './rate-limit.ts';
import {
  backend,
  DEFAULT_MAX_MESSAGE,
  FrontendReader,
  MAX_STARTUP_PACKET,
  MESSAGE_TYPES,
  parsePasswordMessage,
  parseSaslInitialResponse,
  PgWireError,
  TLS_HANDSHAKE_RECORD,
  type StartupPacket,
} from './pgwire/index.ts';

export interface SessionDeps {
  config: ProxyConfig;
  cp: CachedControlPlane;
  tracker: ConnectionTracker;
  cancels: CancelMap;
  metrics: ProxyMetrics;
  secureContext: () => SecureContext;
  limits: ProxyLimits;
  passwords: PasswordVerifier;
  /** The transaction pooler of `-pooler` endpoints (absent: they are served as direct sessions). */
  pooler?: Pooler;
}

/** How long a WebSocket session may take to show a pipelined password after its StartupMessage. */
const PIPELINED_PASSWORD_WAIT_MS = 25;

/** ALPN protocol of the Postgres wire protocol (PostgreSQL 17). */
const ALPN_POSTGRESQL = 'postgresql';

/** The client hung up (or we closed it): nothing more to say to it. */
class ClientGone extends Error {}

const violation = (msg: string): XenonError => new XenonError('PROXY_PROTOCOL_VIOLATION', msg, { userMessage: msg });

/** Startup parameters never forwarded to the compute. */
const DROPPED_PARAMS = new Set(['user', 'database', 'options', 'replication']);

/** The most a client may have buffered at the proxy before it stops reading (backpressure). */
const MAX_BUFFERED = MAX_STARTUP_PACKET + DEFAULT_MAX_MESSAGE;

/** The client side: a socket (plain, then TLS) feeding a FrontendReader, read with `await`. */
class ClientConn {
  /** A TCP socket (a TLSSocket after the upgrade), or a WebSocket's byte stream. */
  socket: Duplex;
  readonly reader = new FrontendReader();
  private waiter?: () => void;
  private gone = false;
  /** We sent the client an error and are closing: its disconnect is not news. */
  failed = false;

  constructor(
    socket: Duplex,
    private readonly idleTimeoutMs: number,
  ) {
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

  private attach(s: Duplex): void {
    s.on('data', this.onData);
    s.on('end', this.onGone);
    s.on('close', this.onGone);
    s.on('error', this.onGone);
  }

  private detachListeners(s: Duplex): void {
    s.off('data', this.onData);
    s.off('end', this.onGone);
    s.off('close', this.onGone);
    s.off('error', this.onGone);
  }

  /**
   * Waits until `fn` returns non-null (it throws PgWireError on malformed input). A client silent
   * for the idle timeout while we wait on it fails with PROXY_STARTUP_TIMEOUT.
   */
  async read<T>(fn: () => T | null): Promise<T> {
    for (;;) {
      const v = fn();
      if (v !== null) return v;
      if (this.gone || this.socket.destroyed) throw new ClientGone();
      if (this.socket.isPaused()) this.socket.resume();
      let idle: NodeJS.Timeout | undefined;
      await new Promise<void>((resolve, reject) => {
        this.waiter = resolve;
        idle = setTimeout(() => {
          this.waiter = undefined;
          const msg = `no data from the client for ${this.idleTimeoutMs} ms during connection startup`;
          reject(new XenonError('PROXY_STARTUP_TIMEOUT', msg, { userMessage: msg }));
        }, this.idleTimeoutMs);
      }).finally(() => clearTimeout(idle));
    }
  }

  /** The next unread byte, waiting at most `ms` for one to arrive (undefined if none did). */
  async peekWithin(ms: number): Promise<number | undefined> {
    const now = this.reader.peekByte();
    if (now !== undefined || this.gone) return now;
    if (this.socket.isPaused()) this.socket.resume();
    await new Promise<void>((resolve) => {
      const timer = setTimeout(() => { this.waiter = undefined; resolve(); }, ms);
      this.waiter = () => { clearTimeout(timer); resolve(); };
    });
    return this.reader.peekByte();
  }

  write(buf: Buffer): void {
    if (!this.socket.destroyed) this.socket.write(buf);
  }

  /**
   * Runs the TLS handshake on the same socket: after answering 'S' to an SSLRequest, or at once
   * for a direct TLS connection (the ClientHello bytes already read go back into the socket).
   * ALPN: "postgresql" or none; a client offering only other protocols fails the handshake.
   * Resolves with the SNI name.
   */
  async upgradeTls(context: () => SecureContext, timeoutMs: number, direct: boolean): Promise<string | undefined> {
    const raw = this.socket as Socket;
    raw.pause();
    this.detachListeners(raw);
    raw.on('error', () => {}); // errors surface on the TLS socket
    if (direct) raw.unshift(this.reader.drain());
    else raw.write('S');
    const tls = new TLSSocket(raw, {
      isServer: true,
      secureContext: context(),
      SNICallback: (_name, cb) => cb(null, context()),
      ALPNProtocols: [ALPN_POSTGRESQL],
    });
    this.socket = tls;
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(Object.assign(new ClientGone(`TLS handshake not finished in ${timeoutMs} ms`), { tls: true })), timeoutMs);
      tls.once('secure', () => { clearTimeout(timer); resolve(); });
      tls.once('error', (err) => { clearTimeout(timer); reject(Object.assign(new ClientGone(err.message), { tls: true })); });
      tls.once('close', () => { clearTimeout(timer); reject(new ClientGone('closed during TLS handshake')); });
    });
    this.attach(tls);
    if (direct && tls.alpnProtocol !== ALPN_POSTGRESQL) throw new XenonError('PROXY_ALPN_REQUIRED');
    const sni = (tls as TLSSocket & { servername?: string | false }).servername;
    return typeof sni === 'string' ? sni : undefined;
  }

  /** tls-server-end-point binding data of this connection's certificate (undefined without TLS). */
  channelBinding(): Buffer | undefined {
    return this.socket instanceof TLSSocket ? tlsServerEndPoint((this.socket.getCertificate() as { raw?: Buffer } | null)?.raw) : undefined;
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

/**
 * Serves one client socket. With `reject`, the handshake still runs (so the client can read the
 * error: libpq and pg expect TLS first, and CancelRequests are still forwarded), then the client
 * gets that error instead of a session — how an over-capacity proxy answers, as Postgres answers
 * "too many clients" after the SSL negotiation.
 */
export interface ClientOptions {
  /** Answer with this error after the handshake (an over-capacity proxy). */
  reject?: XenonError;
  /** WebSocket sessions: the client's address (from the HTTP connection). */
  peerIp?: string;
  /** WebSocket sessions: the host name naming the endpoint (Host header or `?address=`), read like SNI. */
  hostName?: string;
  /** WebSocket sessions: the HTTP connection is TLS (or loopback plain HTTP, allowed locally). */
  secure?: boolean;
}

export async function handleClient(raw: Duplex, deps: SessionDeps, ctx: RequestContext, o: ClientOptions = {}): Promise<void> {
  const { config, metrics } = deps;
  const tcp = ctx.protocol === 'tcp';
  if (tcp) {
    (raw as Socket).setNoDelay(true);
    (raw as Socket).setKeepAlive(true, 60_000);
  }
  const conn = new ClientConn(raw, config.idleStartupTimeoutMs);
  const peerIp = o.peerIp ?? plainAddress((raw as Socket).remoteAddress);
  const reject = o.reject;
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
    const hs = await handshake(conn, deps, ctx, peerIp);
    if (!hs) {
      clearTimeout(timer); // a CancelRequest, answered
      return;
    }
    if (reject) throw reject;
    const { startup } = hs;
    const tls = tcp ? hs.tls : (o.secure ?? false);
    const sni = tcp ? hs.sni : o.hostName;
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
    const computeParams: Record<string, string> = { user, database };
    for (const [k, v] of params) if (!DROPPED_PARAMS.has(k) && !k.startsWith('_pq_.')) computeParams[k] = v;
    if (opts.rest) computeParams.options = opts.rest;

    // ---- authentication
    deadline(config.authTimeoutMs, 'PROXY_AUTH_TIMEOUT');
    const auth = await authenticate(conn, deps, ctx, { tls, sni, optionsEndpoint: opts.endpoint, user, database, peerIp });
    const { ref, secret, clientKey } = auth;
    // Authenticated: from here wake and connect are bounded by their own timeouts and retries.
    clearTimeout(timer);
    // The auth timeout may have fired (and answered) while the password was being checked.
    if (conn.closed) throw new ClientGone('client gone or timed out during authentication');

    // ---- pooled endpoints: the pooler lends server connections per transaction
    if (ref.pooled && deps.pooler) {
      deps.tracker.inc(ref.endpoint);
      counted = ref.endpoint;
      ctx.begin('connect');
      const session = await deps.pooler.open({
        socket: conn.socket,
        endpoint: ref.endpoint,
        database,
        user,
        clientKey,
        secret,
        poolSize: auth.access.pool_size ?? null,
        params: computeParams,
        logger: ctx.logger,
      });
      ctx.end();
      // Until start() succeeds the pooler slot is given back and `counted` released below.
      let ended = false;
      try {
        if (conn.closed) throw new ClientGone('client left while its pool was being prepared');
        conn.write(session.greeting);
        const early = conn.detach();
        observeConnect(ctx, metrics);
        const labels = { protocol: ctx.protocol, kind: 'pooler' };
        metrics.sessionsOpened.inc(labels);
        metrics.sessionsActive.inc(labels);
        ctx.logger.info('session started', { ...roundTimings(ctx), auth: auth.method, endpointFrom: ref.source, tls, database, pooled: true });
        const endpoint = counted;
        session.start(early, () => {
          ended = true;
          deps.tracker.dec(endpoint);
          metrics.sessionsActive.dec(labels);
          ctx.logger.info('session ended', { durationMs: Math.round(ctx.elapsedMs), pooled: true });
        });
        counted = undefined; // released when the pooled client closes
      } catch (err) {
        session.abandon();
        if (ended) counted = undefined;
        throw err;
      }
      return;
    }

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
          clientKey,
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
        // compute now) — except a secret mismatch, which another wake cannot fix, and errors the
        // compute itself sent (unknown database, too many connections, …), which go to the client.
        const retry = (cached && !(err instanceof ComputeError) && xe?.code !== 'PROXY_COMPUTE_AUTH_FAILED') || (xe?.retryable ?? false);
        if (!retry || attempt >= config.computeConnectAttempts || conn.closed) throw err;
        deps.cp.invalidateWake(ref.endpoint);
        metrics.computeRetries.inc();
        ctx.logger.info('compute connect failed; waking again', { attempt, cached, code: xe?.code, err: (err as Error).message });
        // Backoff for retryable answers (a compute still starting, a control plane restarting);
        // a stale cached address is retried at once.
        if (!cached) await delay(Math.min(2_000, 50 * 2 ** attempt * (0.5 + Math.random())));
      }
    }
    // The client may have left during a cold start: do not keep a compute session (and a live
    // connection count, which would keep the endpoint awake) for nobody.
    if (conn.closed) {
      session.socket.destroy();
      throw new ClientGone('client left while its compute was being woken');
    }

    // ---- hand over: the compute's parameters, our cancel key, then bytes
    let key: Awaited<ReturnType<typeof allocateCancelKey>>;
    try {
      key = await allocateCancelKey(deps.cancels);
      await deps.cancels.set(key.key, { host: session.socket.remoteAddress ?? '127.0.0.1', port: session.socket.remotePort ?? 0, processId: session.processId, secretKey: session.secretKey });
    } catch (err) {
      session.socket.destroy();
      throw err;
    }
    const out = [backend.authenticationOk()];
    for (const [k, v] of session.parameters) out.push(backend.parameterStatus(k, v));
    out.push(backend.backendKeyData(key.processId, key.secretKey), backend.readyForQuery('I'));
    conn.write(Buffer.concat(out));
    const early = conn.detach();
    if (early.length) session.socket.write(early);
    observeConnect(ctx, metrics);
    const labels = { protocol: ctx.protocol, kind: ref.pooled ? 'pooler' : 'direct' };
    metrics.sessionsOpened.inc(labels);
    metrics.sessionsActive.inc(labels);
    ctx.logger.info('session started', { ...roundTimings(ctx), cold: ctx.cold, auth: auth.method, endpointFrom: ref.source, tls, database });
    const endpoint = counted;
    counted = undefined; // released when the pipe closes
    pipeBoth(conn.socket as Socket, session.socket, (r) => {
      deps.tracker.dec(endpoint);
      void Promise.resolve(deps.cancels.delete(key.key)).catch((err: Error) => ctx.logger.warn('could not forget a cancel key', { err }));
      metrics.sessionsActive.dec(labels);
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

/**
 * The startup phase up to a StartupMessage: TLS (after an SSLRequest, or direct), GSSENC refused
 * with 'N', CancelRequests forwarded. Null when the connection was a CancelRequest.
 */
async function handshake(
  conn: ClientConn,
  deps: SessionDeps,
  ctx: RequestContext,
  peerIp: string,
): Promise<{ tls: boolean; sni?: string; startup: Extract<StartupPacket, { kind: 'startup' }> } | null> {
  let tls = false;
  let sni: string | undefined;
  const upgrade = async (direct: boolean): Promise<void> => {
    ctx.begin('tls');
    try {
      sni = await conn.upgradeTls(deps.secureContext, deps.config.tlsHandshakeTimeoutMs, direct);
    } catch (err) {
      if ((err as { tls?: boolean }).tls) deps.metrics.tlsFailures.inc();
      throw err;
    }
    ctx.end();
    tls = true;
  };
  const tcp = ctx.protocol === 'tcp';
  for (;;) {
    // PostgreSQL 17 `sslnegotiation=direct`: a TLS record instead of an SSLRequest.
    if (tcp && !tls && (await conn.read(() => conn.reader.peekByte() ?? null)) === TLS_HANDSHAKE_RECORD) {
      await upgrade(true);
      continue;
    }
    const pkt = await conn.read(() => conn.reader.readStartup());
    if (pkt.kind === 'ssl' || pkt.kind === 'gssenc') {
      if (tls) throw violation(`${pkt.kind === 'ssl' ? 'SSLRequest' : 'GSSENCRequest'} inside TLS`);
      // Inside a WebSocket the transport is already encrypted (or local): no TLS inside it.
      if (!tcp) {
        conn.write(Buffer.from('N'));
        continue;
      }
      // Bytes after the request and before the handshake could be injected by a man in the middle.
      if (conn.reader.buffered > 0) throw violation('data received before the TLS handshake completed');
      // GSSAPI encryption is not offered: libpq goes on with an SSLRequest.
      if (pkt.kind === 'gssenc') {
        conn.write(Buffer.from('N'));
        continue;
      }
      await upgrade(false);
      continue;
    }
    if (pkt.kind === 'cancel') {
      await forwardCancel(pkt.processId, pkt.secretKey, deps, ctx, peerIp);
      conn.socket.end();
      return null;
    }
    return { tls, sni, startup: pkt };
  }
}

interface AuthResult {
  ref: EndpointRef;
  access: EndpointAccess;
  secret: ScramSecret;
  clientKey: Buffer;
  method: 'scram' | 'scram-plus' | 'password';
}

/**
 * Finds the endpoint, applies the limits and authenticates the client: SCRAM (with channel
 * binding when the client supports it over TLS), or a cleartext password when the endpoint came
 * as a password prefix. Unknown endpoints and roles go through a mock secret: 28P01 either way.
 */
async function authenticate(
  conn: ClientConn,
  deps: SessionDeps,
  ctx: RequestContext,
  c: { tls: boolean; sni?: string; optionsEndpoint?: string; user: string; database: string; peerIp: string },
): Promise<AuthResult> {
  ctx.begin('auth');
  const endAuth = beginAuth(deps, c.peerIp);
  try {
    return await authenticateClient(conn, deps, ctx, c);
  } finally {
    endAuth();
  }
}

async function authenticateClient(
  conn: ClientConn,
  deps: SessionDeps,
  ctx: RequestContext,
  c: { tls: boolean; sni?: string; optionsEndpoint?: string; user: string; database: string; peerIp: string },
): Promise<AuthResult> {
  const { config, metrics } = deps;
  let ref = resolveEndpoint(endpointFromSni(c.sni, config.domain), c.optionsEndpoint);
  let password: string | undefined;
  if (!ref) {
    // The password hack: only over TLS, where a cleartext password is as safe as SCRAM's proof.
    if (!c.tls) throw new XenonError('PROXY_ENDPOINT_MISSING');
    conn.write(backend.authenticationCleartextPassword());
    const hack = parsePasswordHack(parsePasswordMessage(await readPassword(conn)));
    if (!hack) throw new XenonError('PROXY_ENDPOINT_MISSING');
    ref = endpointRef(hack.endpoint, 'password');
    password = hack.password;
  } else if (ctx.protocol === 'ws' && (await conn.peekWithin(PIPELINED_PASSWORD_WAIT_MS)) === MESSAGE_TYPES.PASSWORD) {
    // @neondatabase/serverless pipelines StartupMessage + password (+ first query) without
    // waiting for a request (in one frame, or — with coalesceWrites off — in frames right behind
    // each other): the password is already here, so ask for exactly that. A client that waits
    // for our request sends nothing, and gets SCRAM after the short wait.
    conn.write(backend.authenticationCleartextPassword());
    password = parsePasswordMessage(await readPassword(conn));
  }
  ctx.setEndpoint(ref.endpoint, c.user, c.database);
  const { access, secret, checkAgainst } = await checkEndpointAccess(deps, ref.endpoint, c.user, c.peerIp);
  let clientKey: Buffer | null = null;
  let serverFinal: string | undefined;
  let method: AuthResult['method'];
  if (password !== undefined) {
    method = 'password';
    clientKey = await deps.passwords.verify(checkAgainst, password);
  } else {
    const scram = new ScramServerSession(checkAgainst, { channelBinding: conn.channelBinding() });
    conn.write(backend.authenticationSASL(scram.mechanisms));
    const initial = parseSaslInitialResponse(await readPassword(conn));
    conn.write(backend.authenticationSASLContinue(scram.clientFirst(initial.data, initial.mechanism)));
    const result = scram.clientFinal(await readPassword(conn));
    method = scram.bound ? 'scram-plus' : 'scram';
    if (result.ok) {
      clientKey = result.clientKey;
      serverFinal = result.serverFinal;
    }
  }
  if (!clientKey || !secret || !access) throw authFailed(deps, c.peerIp, c.user, method);
  metrics.authentications.inc({ method, outcome: 'ok' });
  if (serverFinal !== undefined) conn.write(backend.authenticationSASLFinal(serverFinal));
  ctx.end();
  return { ref, access, secret, clientKey, method };
}

/** Reads one PasswordMessage ('p') body; Terminate means the client gave up. */
async function readPassword(conn: ClientConn): Promise<Buffer> {
  const m = await conn.read(() => conn.reader.readMessage());
  if (m.type === MESSAGE_TYPES.TERMINATE) throw new ClientGone();
  if (m.type !== MESSAGE_TYPES.PASSWORD) throw violation(`expected a password message, got message type ${JSON.stringify(String.fromCharCode(m.type))}`);
  return m.body;
}

async function forwardCancel(processId: number, secretKey: number, deps: SessionDeps, ctx: RequestContext, peerIp: string): Promise<void> {
  // A cancel key is 64 random bits, but a flood of guesses still costs compute connections.
  if (!deps.limits.cancel.take(sourceNetwork(peerIp))) {
    deps.metrics.cancelRequests.inc({ outcome: 'rate_limited' });
    deps.metrics.rateLimited.inc({ limit: 'cancel' });
    ctx.logger.info('cancel request rate-limited', { network: sourceNetwork(peerIp) });
    return;
  }
  const pooled = deps.pooler?.cancel(processId, secretKey);
  if (pooled) {
    try {
      deps.metrics.cancelRequests.inc({ outcome: (await pooled) ? 'forwarded' : 'idle' });
    } catch (err) {
      deps.metrics.cancelRequests.inc({ outcome: 'failed' });
      ctx.logger.warn('cancel request could not reach the compute', { err });
    }
    return;
  }
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
