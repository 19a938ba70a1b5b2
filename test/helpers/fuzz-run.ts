/**
 * Plays the cases of test/helpers/fuzz-gen.ts against a running proxy and judges every reply.
 *
 * - {@link validateReply}: what the proxy may send during the startup phase — nothing (a close),
 *   'S'/'N' answering SSL/GSSENC requests we sent, TLS records after 'S', AuthenticationSASL /
 *   SASLContinue / NegotiateProtocolVersion inside TLS as part of a handshake, and at most one
 *   ErrorResponse, last, well formed, FATAL, with a SQLSTATE the proxy's startup phase documents.
 * - {@link runCase} / {@link runCases}: one connection per case, bounded concurrency, every case
 *   must end with the proxy closing the connection within `caseTimeoutMs`.
 * - {@link HealthyTraffic}: a node-postgres client querying over TLS throughout (plus a fresh
 *   connection every second), which must see no error.
 * - {@link fuzzStack}: all of it against a `startTestStack` stack, then the checks after the run:
 *   the proxy process is the same one and serves a fresh connection, its connection slots
 *   (`xenon_proxy_connections_active`) are back to the baseline, its log has no internal error.
 */
import { isUtf8 } from 'node:buffer';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { connect as netConnect, type Socket } from 'node:net';
import { join } from 'node:path';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { setImmediate as tick, setTimeout as sleep } from 'node:timers/promises';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import { Worker } from 'node:worker_threads';
import parsePrometheusTextFormat, { type PrometheusFamily } from 'parse-prometheus-text-format';
import pg from 'pg';
import { ERROR_CATALOGUE, type ErrorCode } from '../../lib/errors.ts';
import { buildFinal, FAMILIES, GSSENC_REQUEST, Rng, split, SSL_REQUEST, type FuzzCase, type Target } from './fuzz-gen.ts';
import type { TestStack } from './stack.ts';

// ---------------------------------------------------------------- what a reply may be

/**
 * The errors the proxy's startup phase may answer with (lib/errors.ts): protocol violations,
 * unsupported protocol, TLS required, timeouts, endpoint missing/mismatched/unknown, ALPN,
 * replication, IP allowlist, rate limits and the connection cap, authentication, and the "try
 * again" family. INTERNAL (XX000) is not among them: an internal error on hostile input is a bug.
 */
export const ALLOWED_ERROR_CODES = [
  'PROXY_PROTOCOL_VIOLATION', 'PROXY_STARTUP_TOO_LARGE', 'PROXY_MESSAGE_TOO_LARGE', 'PROXY_UNSUPPORTED_PROTOCOL',
  'PROXY_TLS_REQUIRED', 'PROXY_STARTUP_TIMEOUT', 'PROXY_AUTH_TIMEOUT', 'PROXY_ENDPOINT_MISSING', 'PROXY_ENDPOINT_MISMATCH',
  'PROXY_ALPN_REQUIRED', 'PROXY_IP_NOT_ALLOWED', 'PROXY_RATE_LIMITED', 'PROXY_AUTH_RATE_LIMITED',
  'PROXY_REPLICATION_REJECTED', 'PROXY_TOO_MANY_CONNECTIONS', 'AUTH_FAILED', 'AUTH_METHOD_UNSUPPORTED',
  'PROXY_COMPUTE_UNAVAILABLE', 'CP_UNAVAILABLE', 'CP_ENDPOINT_NOT_FOUND', 'CP_ENDPOINT_DISABLED',
] as const satisfies readonly ErrorCode[];

export const ALLOWED_SQLSTATES: ReadonlySet<string> = new Set(ALLOWED_ERROR_CODES.map((c) => ERROR_CATALOGUE[c].sqlstate));

/** Error and notice field codes (https://www.postgresql.org/docs/current/protocol-error-fields.html). */
const FIELD_CODES = new Set('SVCMDHPpqWstcdnFLR');
/** Longest sane ErrorResponse: its message may quote a user name of up to ~10,000 bytes. */
export const MAX_ERROR_LEN = 16 * 1024;
const MAX_AUTH_LEN = 1024;
const SERVER_FIRST = /^r=[\x21-\x2b\x2d-\x7e]+,s=[A-Za-z0-9+/]+={0,2},i=[1-9]\d*$/;

export interface Verdict {
  /** Empty when the reply is acceptable. */
  problems: string[];
  /** What was received, e.g. ['S', 'tls:', 'R10', 'R11', 'E:28P01']. */
  tokens: string[];
  /** SQLSTATE of the ErrorResponse, or 'close' when there was none. */
  outcome: string;
}

function count(hay: Buffer, needle: Buffer): number {
  let n = 0;
  for (let i = hay.indexOf(needle); i >= 0; i = hay.indexOf(needle, i + 1)) n++;
  return n;
}

/** Checks an ErrorResponse body; returns its SQLSTATE. */
export function checkErrorBody(body: Buffer, problems: string[]): string | undefined {
  const fields = new Map<string, string>();
  let off = 0;
  for (;;) {
    if (off >= body.length) { problems.push('ErrorResponse: no terminating zero byte'); return undefined; }
    const code = body[off]!;
    if (code === 0) {
      if (off !== body.length - 1) { problems.push('ErrorResponse: bytes after the terminator'); return undefined; }
      break;
    }
    const end = body.indexOf(0, off + 1);
    if (end < 0) { problems.push('ErrorResponse: unterminated field'); return undefined; }
    const ch = String.fromCharCode(code);
    if (!FIELD_CODES.has(ch)) problems.push(`ErrorResponse: unknown field code ${JSON.stringify(ch)}`);
    if (fields.has(ch)) problems.push(`ErrorResponse: field ${ch} twice`);
    const raw = body.subarray(off + 1, end);
    if (!isUtf8(raw)) problems.push(`ErrorResponse: field ${ch} is not UTF-8`);
    fields.set(ch, raw.toString('utf8'));
    off = end + 1;
  }
  for (const f of ['S', 'V', 'C', 'M']) if (!fields.has(f)) problems.push(`ErrorResponse: field ${f} missing`);
  const s = fields.get('S');
  const v = fields.get('V');
  if (s !== undefined && s !== 'FATAL') problems.push(`ErrorResponse: severity ${JSON.stringify(s)}, not FATAL`);
  if (v !== undefined && v !== 'FATAL') problems.push(`ErrorResponse: non-localized severity ${JSON.stringify(v)}, not FATAL`);
  const c = fields.get('C');
  if (c !== undefined && !/^[0-9A-Z]{5}$/.test(c)) problems.push(`ErrorResponse: SQLSTATE ${JSON.stringify(c)} is not 5 characters [0-9A-Z]`);
  else if (c !== undefined && !ALLOWED_SQLSTATES.has(c)) problems.push(`ErrorResponse: SQLSTATE ${c} is not one the startup phase may send (${[...ALLOWED_SQLSTATES].join(', ')}); message ${JSON.stringify(fields.get('M'))}`);
  if (fields.get('M') === '') problems.push('ErrorResponse: empty message');
  return c;
}

/** Checks a run of TLS records (type 20–23, version 3.x, length ≤ 2^14 + 2048, complete). */
function checkTlsRecords(buf: Buffer, problems: string[]): void {
  let off = 0;
  while (off < buf.length) {
    if (buf.length - off < 5) { problems.push(`truncated TLS record header (${buf.length - off} bytes)`); return; }
    const type = buf[off]!;
    const len = buf.readUInt16BE(off + 3);
    if (type < 20 || type > 23 || buf[off + 1] !== 3 || buf[off + 2]! > 4 || len > 16384 + 2048) {
      problems.push(`not a TLS record: ${buf.subarray(off, off + 8).toString('hex')}`);
      return;
    }
    if (buf.length - off - 5 < len) { problems.push('truncated TLS record'); return; }
    off += 5 + len;
  }
}

/**
 * Backend messages of the startup phase, in order: NegotiateProtocolVersion?, then either
 * AuthenticationSASL (offering SCRAM-SHA-256) and AuthenticationSASLContinue?, or
 * AuthenticationCleartextPassword (the "password hack" of clients without SNI), then
 * ErrorResponse? — nothing after the ErrorResponse, no partial message, never AuthenticationOk or
 * SASLFinal (no fuzz case knows a password). With `authAllowed` false (a plaintext stream to a
 * proxy that requires TLS) only an ErrorResponse may come.
 */
function checkMessages(buf: Buffer, authAllowed: boolean, problems: string[], tokens: string[]): string | undefined {
  let off = 0;
  let stage = 0; // 0 start, 1 after 'v', 2 after R10, 3 after R11 or R3, 4 after E
  let sqlstate: string | undefined;
  while (off < buf.length) {
    if (stage === 4) { problems.push(`bytes after the ErrorResponse: ${buf.subarray(off, off + 16).toString('hex')}`); break; }
    if (buf.length - off < 5) { problems.push(`partial message header at the close: ${buf.subarray(off).toString('hex')}`); break; }
    const type = String.fromCharCode(buf[off]!);
    const len = buf.readInt32BE(off + 1);
    const max = type === 'E' ? MAX_ERROR_LEN : MAX_AUTH_LEN;
    if (len < 4 || len > max) { problems.push(`message '${type}' with insane length ${len}`); break; }
    if (buf.length - off - 1 < len) { problems.push(`partial '${type}' message at the close (${buf.length - off - 1} of ${len} bytes)`); break; }
    const body = buf.subarray(off + 5, off + 1 + len);
    off += 1 + len;
    if (type === 'E') {
      tokens.push('E');
      sqlstate = checkErrorBody(body, problems);
      if (sqlstate) tokens[tokens.length - 1] = `E:${sqlstate}`;
      stage = 4;
      continue;
    }
    if (!authAllowed) { problems.push(`unexpected message '${type}' (0x${buf[off - 1 - len]!.toString(16)}) in plaintext: ${body.subarray(0, 16).toString('hex')}`); break; }
    if (type === 'v') {
      tokens.push('v');
      if (stage !== 0) problems.push('NegotiateProtocolVersion after authentication began');
      if (body.length < 8) { problems.push('NegotiateProtocolVersion too short'); break; }
      if (body.readUInt32BE(0) >>> 16 !== 3) problems.push(`NegotiateProtocolVersion offers ${body.readUInt32BE(0) >>> 16}.x`);
      const n = body.readInt32BE(4);
      let p = 8;
      for (let i = 0; i < n && p <= body.length; i++) {
        const e = body.indexOf(0, p);
        if (e < 0) { p = body.length + 1; break; }
        if (!body.subarray(p, e).toString('latin1').startsWith('_pq_.')) problems.push('NegotiateProtocolVersion lists a non-_pq_ option');
        p = e + 1;
      }
      if (n < 0 || p !== body.length) problems.push(`NegotiateProtocolVersion: ${n} options do not fill the body`);
      stage = 1;
      continue;
    }
    if (type === 'R') {
      if (body.length < 4) { problems.push('authentication request too short'); break; }
      const code = body.readInt32BE(0);
      const rest = body.subarray(4);
      tokens.push(`R${code}`);
      if (code === 10) {
        if (stage >= 2) problems.push('AuthenticationSASL twice or after SASLContinue');
        const names = rest.toString('latin1').split('\0');
        if (rest.at(-1) !== 0 || rest.at(-2) !== 0 || names.length < 3) problems.push(`AuthenticationSASL: bad mechanism list ${JSON.stringify(rest.toString('latin1'))}`);
        else if (!names.includes('SCRAM-SHA-256')) problems.push('AuthenticationSASL without SCRAM-SHA-256');
        stage = 2;
      } else if (code === 3) {
        if (stage >= 2) problems.push('AuthenticationCleartextPassword after another authentication request');
        if (rest.length !== 0) problems.push('AuthenticationCleartextPassword with a body');
        stage = 3;
      } else if (code === 11) {
        if (stage !== 2) problems.push('SASLContinue without a preceding AuthenticationSASL');
        if (!SERVER_FIRST.test(rest.toString('latin1'))) problems.push(`SASLContinue: bad server-first-message ${JSON.stringify(rest.toString('latin1'))}`);
        stage = 3;
      } else {
        problems.push(code === 0 || code === 12 ? `authentication SUCCEEDED (R${code}) for a fuzz case` : `unexpected authentication request ${code}`);
        break;
      }
      continue;
    }
    problems.push(`unexpected message type '${type}' (0x${buf[off - 1 - len]!.toString(16)}) during startup`);
    break;
  }
  return sqlstate;
}

/**
 * Judges what the proxy sent: `plain` before any TLS session (and after 'S' without one), `tls`
 * what came decrypted inside our TLS session (undefined if none), given the plaintext we sent.
 */
export function validateReply(plain: Buffer, tls: Buffer | undefined, sentPlain: Buffer, o: { requireTls?: boolean; direct?: boolean } = {}): Verdict {
  const problems: string[] = [];
  const tokens: string[] = [];
  let sqlstate: string | undefined;
  let ssl = count(sentPlain, SSL_REQUEST);
  let gss = count(sentPlain, GSSENC_REQUEST);
  let off = 0;
  let sawS = false;
  for (;;) {
    if (off >= plain.length) break;
    const c = plain[off]!;
    if (c === 0x4e && gss > 0) { gss--; tokens.push('N'); off++; continue; }
    if (c === 0x53 && ssl > 0) {
      ssl--;
      tokens.push('S');
      sawS = true;
      off++;
      if (off < plain.length) { tokens.push('tls-records'); checkTlsRecords(plain.subarray(off), problems); }
      break;
    }
    // Direct TLS (PostgreSQL 17 sslnegotiation=direct): a proxy may take a 0x16 byte where a
    // packet starts for a ClientHello and answer with TLS records.
    if (c >= 20 && c <= 23 && sentPlain.includes(0x16)) {
      tokens.push('tls-records');
      checkTlsRecords(plain.subarray(off), problems);
      break;
    }
    if (c === 0x53 || c === 0x4e) problems.push(`'${String.fromCharCode(c)}' without a matching ${c === 0x53 ? 'SSLRequest' : 'GSSENCRequest'} left to answer`);
    sqlstate = checkMessages(plain.subarray(off), o.requireTls === false, problems, tokens);
    break;
  }
  if (tls !== undefined) {
    if (!sawS && !o.direct) problems.push("a TLS session without an 'S'");
    tokens.push('tls:');
    const s = checkMessages(tls, true, problems, tokens);
    if (s) sqlstate = s;
  }
  return { problems, tokens, outcome: sqlstate ?? 'close' };
}

// ---------------------------------------------------------------- one connection

export interface FuzzEnv {
  host: string;
  port: number;
  /** CA of the proxy's certificate (the chain is verified, the name is not: SNI varies on purpose). */
  ca: string | Buffer;
  /** A case must be over (the proxy closed) this long after it connected. */
  caseTimeoutMs: number;
  requireTls?: boolean;
  /**
   * Source address of the n-th case. Spreading cases over 127.0.0.0/8 keeps the proxy's
   * per-address limits (failed authentications) about each case, not the whole fuzzer, and away
   * from the healthy client on 127.0.0.1.
   */
  localAddress?: (n: number) => string | undefined;
}

/** 127.a.b.c with a = 1 + n mod 254 first, so neighbouring cases are in different /24 networks. */
export function spreadLoopback(n: number): string {
  return `127.${1 + (n % 254)}.${Math.floor(n / 254) % 256}.${1 + (Math.floor(n / (254 * 256)) % 254)}`;
}

export interface CaseResult {
  id: string;
  family: FuzzCase['family'];
  what: string;
  problems: string[];
  /** SQLSTATE of the final ErrorResponse, 'close', or 'hang'. */
  outcome: string;
  /** The shape of the reply, e.g. "S tls: R10 R11 E". */
  kind: string;
  ms: number;
  /** The proxy reset the connection (rather than a FIN). */
  reset: boolean;
  /** ms from connect to our last write (how late the runner itself was). */
  lastWriteMs?: number;
  /** ms from connect to a failed TLS handshake (after an 'S'), if one failed. */
  tlsFailedAtMs?: number;
  /** Kept for failures only. */
  plain?: Buffer;
  tls?: Buffer;
}

class Wire {
  readonly raw: Socket;
  tls?: TLSSocket;
  private plainChunks: Buffer[] = [];
  plainLen = 0;
  private tlsChunks: Buffer[] = [];
  private sent: Buffer[] = [];
  closed = false;
  closedByUs = false;
  error?: string;
  /** performance.now() of our last write, and of the first byte the proxy sent. */
  lastWriteAt = 0;
  firstByteAt = 0;
  private waiters = new Set<() => void>();

  constructor(raw: Socket) {
    this.raw = raw;
    raw.on('data', this.onRaw);
    raw.on('error', (e: NodeJS.ErrnoException) => { this.error ??= e.code ?? e.message; });
    raw.on('close', this.onClose);
  }

  private readonly onRaw = (d: Buffer): void => {
    this.firstByteAt ||= performance.now();
    this.plainChunks.push(d);
    this.plainLen += d.length;
    this.notify();
  };

  private readonly onClose = (): void => {
    this.closed = true;
    this.notify();
  };

  private notify(): void {
    for (const w of [...this.waiters]) w();
  }

  get plain(): Buffer {
    return Buffer.concat(this.plainChunks);
  }

  get decrypted(): Buffer | undefined {
    return this.tls ? Buffer.concat(this.tlsChunks) : undefined;
  }

  get sentPlain(): Buffer {
    return Buffer.concat(this.sent);
  }

  /** Resolves true once `pred()` holds; false if the connection closes first or `ms` pass. */
  until(pred: () => boolean, ms: number): Promise<boolean> {
    if (pred()) return Promise.resolve(true);
    if (this.closed || ms <= 0) return Promise.resolve(false);
    return new Promise((resolve) => {
      const done = (v: boolean): void => {
        clearTimeout(timer);
        this.waiters.delete(check);
        resolve(v);
      };
      const check = (): void => {
        if (pred()) done(true);
        else if (this.closed) done(false);
      };
      const timer = setTimeout(() => done(false), ms);
      this.waiters.add(check);
    });
  }

  write(buf: Buffer): void {
    if (this.closed || buf.length === 0) return;
    this.lastWriteAt = performance.now();
    if (this.tls) {
      if (!this.tls.destroyed && this.tls.writable) this.tls.write(buf);
    } else {
      this.sent.push(buf);
      if (!this.raw.destroyed && this.raw.writable) this.raw.write(buf);
    }
  }

  async sendChunks(chunks: Buffer[], pace: FuzzCase['pace'], raw = false): Promise<void> {
    for (let i = 0; i < chunks.length; i++) {
      if (this.closed) return;
      if (i > 0 && pace === 'tick') await tick();
      else if (i > 0 && pace === 'ms') await sleep(1 + (i % 3));
      else if (i > 0 && pace === 'slow') await sleep(150 + (i % 3) * 100);
      if (raw) this.writeRaw(chunks[i]!);
      else this.write(chunks[i]!);
    }
  }

  /** Bytes on the TCP socket itself, under the TLS session (forged records). */
  writeRaw(buf: Buffer): void {
    if (this.closed || buf.length === 0) return;
    this.lastWriteAt = performance.now();
    if (!this.raw.destroyed && this.raw.writable) this.raw.write(buf);
  }

  end(): void {
    if (this.closed) return;
    if (this.tls) this.tls.end();
    else this.raw.end();
  }

  /**
   * Aborts: a TCP RST in plaintext. Under a TLS session, a close without close_notify instead:
   * Node 20 cannot reset the TCP socket of a TLS session safely (destroying the TLS socket after
   * `resetAndDestroy()` crashes with SIGSEGV; not destroying it leaves a handle spinning).
   */
  reset(): void {
    if (this.closed) return;
    this.closedByUs = true;
    if (this.tls) this.tls.destroy();
    else this.raw.resetAndDestroy();
  }

  /** TLS over the raw socket; resolves with an error message, or undefined once secure. */
  startTls(servername: string, ca: string | Buffer, ms: number, alpn?: string[]): Promise<string | undefined> {
    this.raw.off('data', this.onRaw);
    const tls = tlsConnect({ socket: this.raw, servername, ca, checkServerIdentity: () => undefined, ...(alpn ? { ALPNProtocols: alpn } : {}) });
    this.tls = tls;
    tls.on('data', (d: Buffer) => { this.tlsChunks.push(d); this.notify(); });
    tls.on('close', this.onClose);
    let tlsError: string | undefined;
    tls.on('error', (e: NodeJS.ErrnoException) => { tlsError ??= e.code ?? e.message; this.error ??= tlsError; });
    return new Promise((resolve) => {
      const timer = setTimeout(() => { cleanup(); resolve(`no TLS handshake within ${ms} ms`); }, ms);
      const onSecure = (): void => { cleanup(); resolve(undefined); };
      const onClose = (): void => { cleanup(); resolve(`closed during the TLS handshake${tlsError ? ` (${tlsError})` : ''}`); };
      const cleanup = (): void => { clearTimeout(timer); tls.off('secureConnect', onSecure); tls.off('close', onClose); };
      tls.once('secureConnect', onSecure);
      tls.once('close', onClose);
    });
  }

  destroy(): void {
    if (!this.closed) this.closedByUs = true;
    this.tls?.destroy();
    this.raw.destroy();
  }
}

/** The body of the first authentication request with `code` in a backend stream, if any. */
export function findAuth(buf: Buffer, code: number): Buffer | undefined {
  let off = 0;
  while (buf.length - off >= 5) {
    const len = buf.readInt32BE(off + 1);
    if (len < 4 || buf.length - off - 1 < len) return undefined;
    if (buf[off] === 0x52 && len >= 8 && buf.readInt32BE(off + 5) === code) return buf.subarray(off + 9, off + 1 + len);
    off += 1 + len;
  }
  return undefined;
}

function connectRaw(env: FuzzEnv, ms: number, localAddress: string | undefined): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = netConnect({ host: env.host, port: env.port, noDelay: true, ...(localAddress ? { localAddress } : {}) });
    const timer = setTimeout(() => { s.destroy(); reject(new Error(`connect timed out after ${ms} ms`)); }, ms);
    s.once('connect', () => { clearTimeout(timer); s.removeAllListeners('error'); resolve(s); });
    s.once('error', (e) => { clearTimeout(timer); reject(e); });
  });
}

/** Plays one case; the result's `problems` is empty when the proxy behaved. */
export async function runCase(c: FuzzCase, env: FuzzEnv, n = 0): Promise<CaseResult> {
  const t0 = performance.now();
  const deadline = t0 + env.caseTimeoutMs;
  const left = (): number => Math.max(0, deadline - performance.now());
  const base = { id: c.id, family: c.family, what: c.what };
  let raw: Socket;
  try {
    raw = await connectRaw(env, env.caseTimeoutMs, env.localAddress?.(n));
  } catch (err) {
    return { ...base, problems: [`could not connect: ${(err as Error).message}`], outcome: 'no-connect', kind: 'no-connect', ms: performance.now() - t0, reset: false };
  }
  const w = new Wire(raw);
  const problems: string[] = [];
  let direct = false;
  let directRefused: string | undefined;
  let tlsFailedAt: number | undefined;
  steps: for (const step of c.steps) {
    if (w.closed || left() === 0) break;
    switch (step.op) {
      case 'send':
        await w.sendChunks(step.chunks, c.pace);
        break;
      case 'end':
        w.end();
        break;
      case 'reset':
        w.reset();
        break;
      case 'raw':
        await w.sendChunks(step.chunks, c.pace, true);
        break;
      case 'direct': {
        direct = true;
        w.lastWriteAt = performance.now();
        const err = await w.startTls(step.servername, env.ca, left(), step.alpn);
        if (err) {
          // Not every proxy takes direct TLS (or without ALPN "postgresql"): what it answered went
          // to our TLS client, which gave up. Only the close is checked.
          directRefused = err;
          break steps;
        }
        break;
      }
      case 'ssl':
      case 'gssenc': {
        const before = w.plainLen;
        await w.sendChunks(step.chunks, c.pace);
        if (!(await w.until(() => w.plainLen > before, left()))) break steps;
        if (step.op === 'ssl' && step.then === 'tls') {
          // Only an 'S' alone leads to a handshake; anything else is for the validator to judge.
          if (w.plainLen !== before + 1 || w.plain[before] !== 0x53) break steps;
          const err = await w.startTls(step.servername ?? '', env.ca, left());
          if (err) {
            problems.push(`TLS handshake failed: ${err}`);
            tlsFailedAt = performance.now() - t0;
            break steps;
          }
        }
        break;
      }
      case 'await': {
        const got = await w.until(() => findAuth(w.decrypted ?? w.plain, step.auth) !== undefined, left());
        if (!got) break steps;
        break;
      }
      case 'final': {
        const body = findAuth(w.decrypted ?? w.plain, 11);
        if (!body) break steps;
        const cert = step.plus ? w.tls?.getPeerCertificate().raw : undefined;
        const cbind = cert ? Buffer.concat([Buffer.from('p=tls-server-end-point,,'), createHash('sha256').update(cert).digest()]) : undefined;
        const msg = buildFinal(step.mutation, body.toString('utf8'), step.clientNonce, step.seed, step.truncateAt, cbind);
        await w.sendChunks(split(new Rng(step.seed ^ 0x5bd1e995), msg), c.pace);
        break;
      }
    }
  }
  await w.until(() => w.closed, left());
  let outcome: string | undefined;
  if (!w.closed) {
    const soFar = validateReply(w.plain, w.decrypted, w.sentPlain, { requireTls: env.requireTls, direct });
    problems.push(`the proxy did not close the connection within ${env.caseTimeoutMs} ms (received so far: ${soFar.tokens.join(' ') || 'nothing'})`);
    outcome = 'hang';
    w.destroy();
  }
  const plain = w.plain;
  const tls = w.decrypted;
  const v = validateReply(plain, tls, w.sentPlain, { requireTls: env.requireTls, direct });
  if (directRefused) v.tokens.push('direct-tls-refused');
  problems.push(...v.problems);
  outcome ??= v.outcome;
  // A proxy that did not offer SCRAM-SHA-256-PLUS answers channel-binding cases differently.
  const sasl = findAuth(tls ?? Buffer.alloc(0), 10);
  const plusOffered = sasl !== undefined && sasl.toString('latin1').split('\0').includes('SCRAM-SHA-256-PLUS');
  const expect = c.expectWithoutPlus && sasl !== undefined && !plusOffered ? c.expectWithoutPlus : c.expect;
  if (expect && !expect.includes(outcome)) problems.push(`expected ${expect.join(' or ')}, got ${outcome} (${v.tokens.join(' ') || 'nothing'})`);
  const failed = problems.length > 0;
  return {
    ...base,
    problems,
    outcome,
    kind: v.tokens.map((x) => (x.startsWith('E:') ? 'E' : x)).join(' ') || 'close',
    ms: performance.now() - t0,
    reset: w.error === 'ECONNRESET',
    lastWriteMs: w.lastWriteAt ? w.lastWriteAt - t0 : 0,
    ...(tlsFailedAt !== undefined ? { tlsFailedAtMs: tlsFailedAt } : {}),
    ...(failed ? { plain, ...(tls ? { tls } : {}) } : {}),
  };
}

export interface RunSummary {
  cases: number;
  failures: CaseResult[];
  /**
   * Cases that load explains ({@link mayBeLate}), played again one at a time at the end and
   * passed then.
   */
  lateRetried: CaseResult[];
  byFamily: Record<string, { cases: number; failures: number; outcomes: Record<string, number> }>;
  /** Reply shapes ("S tls: R10 E", "close", …) and how often. */
  kinds: Record<string, number>;
  outcomes: Record<string, number>;
  resets: number;
  slowestMs: number;
  durationMs: number;
}

/** Plays `cases` with at most `concurrency` connections at once. */
/**
 * A failure that timing under load may explain, given the proxy's startup timeout: the proxy
 * answered with its timeout error (08006) or just closed, where the case expected another
 * answer, and nothing else was wrong — except a TLS handshake (after an 'S') that died once the
 * startup timeout had passed. On a loaded machine the fuzzer sends late, or the proxy's stalled
 * event loop fires its timers before it reads bytes that came in time (and a reset after the
 * timeout can discard its ErrorResponse). Such a case is played again alone at the end; a
 * deterministic bug fails again. Never a hang, a malformed reply, or another error code.
 */
export function mayBeLate(r: CaseResult, startupTimeoutMs: number): boolean {
  if (r.outcome !== '08006' && r.outcome !== 'close') return false;
  if (!r.problems.length || !r.problems.every((p) => p.startsWith('expected ') || p.startsWith('TLS handshake failed'))) return false;
  return !r.problems.some((p) => p.startsWith('TLS handshake failed')) || (r.tlsFailedAtMs ?? 0) >= startupTimeoutMs;
}

export async function runCases(cases: readonly FuzzCase[], env: FuzzEnv, o: { concurrency?: number; onResult?: (r: CaseResult, done: number) => void; startupTimeoutMs?: number } = {}): Promise<RunSummary> {
  const t0 = performance.now();
  const summary: RunSummary = { cases: 0, failures: [], lateRetried: [], byFamily: {}, kinds: {}, outcomes: {}, resets: 0, slowestMs: 0, durationMs: 0 };
  for (const f of FAMILIES) summary.byFamily[f] = { cases: 0, failures: 0, outcomes: {} };
  let next = 0;
  const late: { c: FuzzCase; n: number; r: CaseResult }[] = [];
  const play = (c: FuzzCase, n: number): Promise<CaseResult> =>
    runCase(c, env, n).catch((err: Error): CaseResult => ({ id: c.id, family: c.family, what: c.what, problems: [`runner error: ${err.stack ?? err.message}`], outcome: 'runner-error', kind: 'runner-error', ms: 0, reset: false }));
  const worker = async (): Promise<void> => {
    while (next < cases.length) {
      const n = next++;
      const c = cases[n]!;
      const r = await play(c, n);
      if (o.startupTimeoutMs !== undefined && mayBeLate(r, o.startupTimeoutMs)) {
        late.push({ c, n, r });
        continue;
      }
      tally(r);
    }
  };
  const tally = (r: CaseResult): void => {
    summary.cases++;
    const fam = (summary.byFamily[r.family] ??= { cases: 0, failures: 0, outcomes: {} });
    fam.cases++;
    fam.outcomes[r.outcome] = (fam.outcomes[r.outcome] ?? 0) + 1;
    summary.kinds[r.kind] = (summary.kinds[r.kind] ?? 0) + 1;
    summary.outcomes[r.outcome] = (summary.outcomes[r.outcome] ?? 0) + 1;
    if (r.reset) summary.resets++;
    summary.slowestMs = Math.max(summary.slowestMs, r.ms);
    if (r.problems.length) { summary.failures.push(r); fam.failures++; }
    o.onResult?.(r, summary.cases);
  };
  // Workers start 10 ms apart: a first wave of simultaneous TLS handshakes would only measure load.
  await Promise.all(Array.from({ length: Math.max(1, Math.min(o.concurrency ?? 32, cases.length)) }, async (_, i) => {
    await sleep(i * 10);
    await worker();
  }));
  // The late ones again, one at a time: now a timeout is the proxy's doing.
  for (const { c, n, r: first } of late) {
    const again = await play(c, n);
    if (again.problems.length === 0) summary.lateRetried.push(first);
    else again.problems.push(`(also on its first run: ${first.problems.join('; ')})`);
    tally(again);
  }
  summary.durationMs = performance.now() - t0;
  return summary;
}

/** One line per problem of a failed case, with its replay id and what the proxy sent. */
export function describeFailure(r: CaseResult): string {
  const shown = (b: Buffer | undefined): string => (b === undefined ? '-' : `${b.length} B ${JSON.stringify(b.subarray(0, 120).toString('latin1'))}`);
  return `${r.id} [${r.what}] after ${Math.round(r.ms)} ms (last write at ${Math.round(r.lastWriteMs ?? 0)} ms): ${r.problems.join('; ')} | plain ${shown(r.plain)} | tls ${shown(r.tls)} | replay: FUZZ_REPLAY=${r.id} npm run fuzz`;
}

// ---------------------------------------------------------------- a healthy client

export interface HealthyReport {
  queries: number;
  freshConnects: number;
  errors: string[];
  /** Slowest query of the persistent client. */
  slowestMs: number;
  /** Slowest fresh connection (connect + one query + end). */
  slowestConnectMs: number;
}

/**
 * The healthy client's code, run in a worker thread of its own: the fuzzer keeps its event loop
 * busy with dozens of hostile connections, and a client that shares it would measure the
 * fuzzer's lag, not the proxy's. Plain CommonJS (no TypeScript loader needed in the worker).
 */
const HEALTHY_WORKER = `
const { parentPort, workerData } = require('node:worker_threads');
const { createRequire } = require('node:module');
const { setTimeout: sleep } = require('node:timers/promises');
const pg = createRequire(workerData.base)('pg');
const report = { queries: 0, freshConnects: 0, errors: [], slowestMs: 0, slowestConnectMs: 0 };
let stopped = false;
let client;
const loops = [];
async function queryLoop(c) {
  while (!stopped) {
    const v = report.queries + 1;
    const t0 = performance.now();
    try {
      const { rows } = await c.query('SELECT $1::int AS v', [v]);
      if (rows[0]?.v !== v) report.errors.push('wrong answer ' + JSON.stringify(rows) + ' for ' + v);
      report.queries = v;
    } catch (err) {
      report.errors.push('query: ' + err.message);
      await sleep(100);
    }
    report.slowestMs = Math.max(report.slowestMs, performance.now() - t0);
    await sleep(workerData.pauseMs);
  }
}
async function freshLoop(every) {
  while (!stopped) {
    await sleep(every);
    if (stopped) break;
    const c = new pg.Client(workerData.config);
    c.on('error', (err) => report.errors.push('fresh client: ' + err.message));
    const t0 = performance.now();
    try {
      await c.connect();
      const { rows } = await c.query('SELECT 1 AS one');
      if (rows[0]?.one !== 1) report.errors.push('fresh client: wrong answer ' + JSON.stringify(rows));
      report.freshConnects++;
    } catch (err) {
      report.errors.push('fresh client: ' + err.message);
    } finally {
      await c.end().catch(() => {});
    }
    report.slowestConnectMs = Math.max(report.slowestConnectMs, performance.now() - t0);
  }
}
parentPort.on('message', async (m) => {
  if (m === 'start') {
    const c = new pg.Client(workerData.config);
    c.on('error', (err) => report.errors.push('persistent client: ' + err.message));
    try {
      await c.connect();
      client = c;
      loops.push(queryLoop(c));
      if (workerData.freshEveryMs) loops.push(freshLoop(workerData.freshEveryMs));
    } catch (err) {
      report.errors.push('persistent client could not connect: ' + err.message);
      stopped = true;
    }
  } else {
    stopped = true;
    await Promise.all(loops);
    if (m === 'close') await client?.end().catch(() => {});
  }
  parentPort.postMessage({ done: m, report });
});
`;

/**
 * A node-postgres client querying through the proxy in a loop, and (every `freshEveryMs`) a
 * brand-new connection doing one query: all of it must succeed while the fuzzer runs. It runs
 * in a worker thread ({@link HEALTHY_WORKER}).
 */
export class HealthyTraffic {
  private worker?: Worker;
  report: HealthyReport = { queries: 0, freshConnects: 0, errors: [], slowestMs: 0, slowestConnectMs: 0 };

  constructor(private readonly config: pg.ClientConfig, private readonly o: { freshEveryMs?: number; pauseMs?: number } = {}) {}

  private send(cmd: 'start' | 'stop' | 'close'): Promise<HealthyReport> {
    const w = (this.worker ??= new Worker(HEALTHY_WORKER, {
      eval: true,
      execArgv: [],
      workerData: { config: this.config, freshEveryMs: this.o.freshEveryMs ?? 0, pauseMs: this.o.pauseMs ?? 2, base: import.meta.url },
    }));
    return new Promise((resolve) => {
      const done = (r: HealthyReport): void => {
        w.off('message', onMessage);
        w.off('error', onError);
        w.off('exit', onExit);
        this.report = r;
        resolve(r);
      };
      const onMessage = (m: { done: string; report: HealthyReport }): void => { if (m.done === cmd) done(m.report); };
      const onError = (err: Error): void => done({ ...this.report, errors: [...this.report.errors, `healthy worker: ${err.message}`] });
      const onExit = (code: number): void => done({ ...this.report, errors: [...this.report.errors, `healthy worker exited (${code})`] });
      w.on('message', onMessage);
      w.on('error', onError);
      w.on('exit', onExit);
      w.postMessage(cmd);
    });
  }

  /** Connects the persistent client and starts the loops (a failed connect is an error in the report). */
  async start(): Promise<void> {
    await this.send('start');
  }

  /** Stops the loops; the persistent client stays connected until {@link close}. */
  async stop(): Promise<HealthyReport> {
    return this.send('stop');
  }

  async close(): Promise<void> {
    if (!this.worker) return;
    await this.send('close');
    await this.worker.terminate();
    this.worker = undefined;
  }
}

// ---------------------------------------------------------------- metrics

export async function scrapeMetrics(metricsUrl: string): Promise<PrometheusFamily[]> {
  const res = await fetch(`${metricsUrl.replace(/\/$/, '')}/metrics`, { signal: AbortSignal.timeout(5_000) });
  if (!res.ok) throw new Error(`GET /metrics: ${res.status}`);
  return parsePrometheusTextFormat(await res.text());
}

/** The value of `name{labels}`; undefined when absent (prom-client omits a labelled gauge never set). */
export function metricValue(families: PrometheusFamily[], name: string, labels: Record<string, string> = {}): number | undefined {
  const fam = families.find((f) => f.name === name);
  const sample = fam?.metrics.find((m) => Object.entries(labels).every(([k, v]) => m.labels?.[k] === v));
  return sample?.value === undefined ? undefined : Number(sample.value);
}

export interface ProxyGauges {
  /** xenon_proxy_connections_active{protocol="tcp"} (absent = 0). */
  active: number;
  sessions: number;
  /** process_start_time_seconds of the proxy: changes if it was restarted. */
  startTime: number | undefined;
}

export async function proxyGauges(metricsUrl: string): Promise<ProxyGauges> {
  const fams = await scrapeMetrics(metricsUrl);
  // Sessions may be labelled (protocol, kind): count them all.
  const sessions = fams.find((f) => f.name === 'xenon_proxy_sessions_active')?.metrics.reduce((n, m) => n + Number(m.value ?? 0), 0);
  return {
    active: metricValue(fams, 'xenon_proxy_connections_active', { protocol: 'tcp' }) ?? 0,
    sessions: sessions ?? 0,
    startTime: metricValue(fams, 'xenon_proxy_process_process_start_time_seconds') ?? metricValue(fams, 'xenon_proxy_process_start_time_seconds'),
  };
}

/** Polls `read` until it returns `want` (or `ms` pass); returns whether it did and the last value. */
export async function settle(read: () => Promise<number>, want: number, ms: number, stepMs = 100): Promise<{ ok: boolean; last: number | undefined }> {
  const until = performance.now() + ms;
  let last: number | undefined;
  for (;;) {
    try { last = await read(); } catch { last = undefined; }
    if (last === want) return { ok: true, last };
    if (performance.now() >= until) return { ok: false, last };
    await sleep(stepMs);
  }
}

/** The proxy's pid: the child of `xenon up` running proxy/main.ts (Linux /proc), if found. */
export function proxyPid(stack: TestStack): number | undefined {
  try {
    const up = stack.child.pid!;
    const kids = readFileSync(`/proc/${up}/task/${up}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number);
    return kids.find((k) => readFileSync(`/proc/${k}/cmdline`, 'utf8').includes('proxy/main.ts'));
  } catch {
    return undefined;
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

// ---------------------------------------------------------------- the whole thing

export interface FuzzOptions {
  concurrency?: number;
  /** The proxy's startup and auth timeouts in this stack (XENON_PROXY_STARTUP_TIMEOUT_MS / _AUTH_). */
  startupTimeoutMs: number;
  authTimeoutMs: number;
  /**
   * Added to startup + auth timeouts for the per-case limit. Default 5 s: the proxy's clocks
   * start when it accepts, which a loaded machine delays.
   */
  marginMs?: number;
  /** How long slots may take to drain after the run. Default 10 s. */
  drainMs?: number;
  freshEveryMs?: number;
  onResult?: (r: CaseResult, done: number) => void;
}

export interface Check {
  name: string;
  ok: boolean;
  detail: string;
}

export interface FuzzReport {
  run: RunSummary;
  healthy: HealthyReport;
  checks: Check[];
  caseTimeoutMs: number;
  durationMs: number;
  /** The fuzzer's own event-loop delay during the run (a busy fuzzer sends late), ms. */
  runnerLag: { p99: number; max: number };
  /** The proxy's largest event-loop delay during the run (prom-client's, from /metrics), ms. */
  proxyLagMaxMs: number | undefined;
  /** Failed warm-up connections before the run (see {@link fuzzStack}). */
  warmupRetries: number;
}

/**
 * Environment for a stack to fuzz: short startup and auth timeouts (so a stalled case ends fast),
 * info-level logs, and a per-endpoint connection-attempt limit out of reach — the fuzzer sends a
 * few hundred authentication attempts per second to one endpoint, which a proxy's default limit
 * would (rightly) start refusing, the healthy client's fresh connections included. Settings a
 * proxy does not know are ignored.
 */
export function fuzzStackEnv(startupTimeoutMs: number, authTimeoutMs: number): Record<string, string> {
  return {
    XENON_PROXY_STARTUP_TIMEOUT_MS: String(startupTimeoutMs),
    XENON_PROXY_AUTH_TIMEOUT_MS: String(authTimeoutMs),
    XENON_PROXY_CONNECT_RATE_PER_SECOND: '1000000',
    XENON_PROXY_CONNECT_RATE_BURST: '1000000',
    XENON_LOG_LEVEL: 'info',
  };
}

export function targetOf(stack: TestStack): Target {
  return { endpoint: stack.info.endpoint_id, role: stack.info.role, database: stack.info.database, domain: 'localtest.me' };
}

/** Runs `cases` against `stack` with a healthy client alongside, then checks the proxy. */
export async function fuzzStack(stack: TestStack, cases: readonly FuzzCase[], o: FuzzOptions): Promise<FuzzReport> {
  const t0 = performance.now();
  const metricsUrl = stack.info.metrics_url;
  const checks: Check[] = [];
  const check = (name: string, ok: boolean, detail: string): void => { checks.push({ name, ok, detail }); };
  const pidBefore = proxyPid(stack);
  // Warm-up: with the short auth timeout of a fuzz stack, the very first authentication (cold
  // control plane, cold caches) may time out. Not part of the run; counted in the report.
  let warmupRetries = 0;
  for (;;) {
    const w = new pg.Client(stack.pgConfig());
    w.on('error', () => {});
    try {
      await w.connect();
      await w.query('SELECT 1');
      break;
    } catch (err) {
      if (++warmupRetries >= 10) throw new Error(`the proxy does not serve a healthy client even before the fuzzing: ${(err as Error).message}`);
      await sleep(500);
    } finally {
      await w.end().catch(() => {});
    }
  }
  await settle(async () => (await proxyGauges(metricsUrl)).active, 0, 5_000);
  const before = await proxyGauges(metricsUrl);
  const healthy = new HealthyTraffic(stack.pgConfig(), { freshEveryMs: o.freshEveryMs ?? 1_000 });
  await healthy.start();
  try {
    const withHealthy = await settle(async () => (await proxyGauges(metricsUrl)).active, before.active + 1, 5_000);
    const baseline = withHealthy.last ?? before.active + 1;
    const caseTimeoutMs = o.startupTimeoutMs + o.authTimeoutMs + (o.marginMs ?? 5_000);
    const env: FuzzEnv = { host: '127.0.0.1', port: stack.info.proxy_port, ca: readFileSync(stack.info.ca_cert), caseTimeoutMs, localAddress: spreadLoopback };
    let run: RunSummary;
    await scrapeMetrics(metricsUrl).catch(() => undefined); // resets prom-client's event-loop lag window
    const lag = monitorEventLoopDelay({ resolution: 10 });
    lag.enable();
    try {
      run = await runCases(cases, env, { concurrency: o.concurrency ?? 32, onResult: o.onResult, startupTimeoutMs: o.startupTimeoutMs });
    } finally {
      lag.disable();
      await healthy.stop();
    }
    const runnerLag = { p99: lag.percentile(99) / 1e6, max: lag.max / 1e6 };
    const proxyLag = await scrapeMetrics(metricsUrl).then((f) => metricValue(f, 'xenon_proxy_process_nodejs_eventloop_lag_max_seconds')).catch(() => undefined);
    const proxyLagMaxMs = proxyLag === undefined ? undefined : proxyLag * 1000;
    check('every case got a well-formed reply and a close', run.failures.length === 0, `${run.failures.length} of ${run.cases} cases failed`);
    check('the healthy client saw no error', healthy.report.errors.length === 0, `${healthy.report.queries} queries, ${healthy.report.freshConnects} fresh connections, slowest query ${Math.round(healthy.report.slowestMs)} ms, slowest fresh connection ${Math.round(healthy.report.slowestConnectMs)} ms, errors: ${JSON.stringify(healthy.report.errors.slice(0, 5))}`);
    check('the healthy client kept querying', healthy.report.queries > 10, `${healthy.report.queries} queries`);

    // Slots: back to the baseline (the healthy client alone), then to the value before it.
    const drainMs = o.drainMs ?? 10_000;
    const drained = await settle(async () => (await proxyGauges(metricsUrl)).active, baseline, drainMs);
    check('connection slots back to the baseline', drained.ok, `xenon_proxy_connections_active{protocol="tcp"} = ${String(drained.last)}, baseline ${baseline} (the healthy client), waited up to ${drainMs} ms`);
    const sessions = await proxyGauges(metricsUrl).catch(() => undefined);
    check('sessions back to the baseline', sessions?.sessions === before.sessions + 1, `xenon_proxy_sessions_active = ${String(sessions?.sessions)}, expected ${before.sessions + 1}`);

    // The proxy is the same process, and serves a fresh connection.
    const after = await proxyGauges(metricsUrl).catch(() => undefined);
    check('the proxy process was not restarted', after !== undefined && after.startTime === before.startTime, `process start time ${String(before.startTime)} → ${String(after?.startTime)}`);
    const pidAfter = proxyPid(stack);
    check('the proxy pid is unchanged and alive', pidBefore === undefined || (pidAfter === pidBefore && alive(pidBefore)), `pid ${String(pidBefore)} → ${String(pidAfter)}`);
    check('the stack is still running', stack.child.exitCode === null && stack.child.signalCode === null, `xenon up exit ${String(stack.child.exitCode ?? stack.child.signalCode)}`);
    let fresh = 'ok';
    const c = new pg.Client(stack.pgConfig());
    c.on('error', () => {});
    try {
      await c.connect();
      const { rows } = await c.query<{ v: number }>('SELECT 7 AS v');
      if (rows[0]?.v !== 7) fresh = `wrong answer ${JSON.stringify(rows)}`;
    } catch (err) {
      fresh = (err as Error).message;
    } finally {
      await c.end().catch(() => {});
    }
    check('a fresh connection works after the run', fresh === 'ok', fresh);

    await healthy.close();
    const empty = await settle(async () => (await proxyGauges(metricsUrl)).active, before.active, drainMs);
    check('connection slots back to the value before the run', empty.ok, `xenon_proxy_connections_active{protocol="tcp"} = ${String(empty.last)}, expected ${before.active}`);

    // No internal error or crash in the proxy's log.
    let bad: string[] = [];
    try {
      bad = badLogLines(readFileSync(join(stack.info.state_dir, 'logs', 'proxy.log'), 'utf8'));
    } catch (err) {
      bad = [`could not read the proxy log: ${(err as Error).message}`];
    }
    check('no error-level, INTERNAL or unhandled entries in the proxy log', bad.length === 0, `${bad.length} entries ${JSON.stringify(bad.slice(0, 3).map((l) => l.slice(0, 400)))}`);

    return { run, healthy: healthy.report, checks, caseTimeoutMs, durationMs: performance.now() - t0, runnerLag, proxyLagMaxMs, warmupRetries };
  } finally {
    await healthy.close(); // a no-op once closed; ends the worker whatever happened
  }
}

/**
 * Proxy log lines that betray a bug: JSON entries at error level, with code INTERNAL, or about an
 * unhandled/uncaught error; other lines (a crash's stack trace on stderr) that mention an error.
 * Client-supplied text (user names…) sits in other fields and is not looked at.
 */
export function badLogLines(log: string): string[] {
  return log.split('\n').filter((l) => {
    if (!l.trim()) return false;
    let e: { level?: unknown; code?: unknown; msg?: unknown };
    try {
      e = JSON.parse(l) as typeof e;
    } catch {
      return /error|uncaught|unhandled|abort|segmentation/i.test(l);
    }
    return e.level === 'error' || e.level === 'fatal' || e.code === 'INTERNAL' || /unhandled|uncaught/i.test(String(e.msg ?? ''));
  });
}

// ---------------------------------------------------------------- printing

function table(rows: (string | number)[][], head: string[]): string {
  const all = [head, ...rows.map((r) => r.map(String))];
  const widths = head.map((_, i) => Math.max(...all.map((r) => String(r[i] ?? '').length)));
  const line = (r: (string | number)[]): string => r.map((x, i) => (typeof x === 'number' || /^\d+$/.test(String(x)) ? String(x).padStart(widths[i]!) : String(x).padEnd(widths[i]!))).join('  ');
  return [line(head), widths.map((w) => '-'.repeat(w)).join('  '), ...rows.map(line)].join('\n');
}

export function formatReport(r: FuzzReport, o: { seed?: number } = {}): string {
  const out: string[] = [];
  const secs = (ms: number): string => (ms / 1000).toFixed(1);
  out.push(`fuzz: ${r.run.cases} cases${o.seed !== undefined ? `, seed ${o.seed}` : ''}, ${r.run.failures.length} failures, ${secs(r.run.durationMs)} s for the cases (${Math.round(r.run.cases / (r.run.durationMs / 1000))} cases/s), ${secs(r.durationMs)} s in all; per-case limit ${r.caseTimeoutMs} ms, slowest case ${Math.round(r.run.slowestMs)} ms`);
  out.push('');
  const outcomeCols = Object.keys(r.run.outcomes).sort();
  out.push(table(
    Object.entries(r.run.byFamily).map(([f, s]) => [f, s.cases, s.failures, ...outcomeCols.map((k) => s.outcomes[k] ?? 0)]),
    ['family', 'cases', 'failed', ...outcomeCols],
  ));
  out.push('');
  out.push(table(Object.entries(r.run.kinds).sort((a, b) => b[1] - a[1]).map(([k, n]) => [k, n]), ['reply (in order received)', 'cases']));
  out.push(`(connections the proxy reset rather than closed: ${r.run.resets}; warm-up connections retried before the run: ${r.warmupRetries})`);
  if (r.run.lateRetried.length) {
    out.push(`${r.run.lateRetried.length} cases got the proxy's timeout (or a close) instead of the expected answer under load, and passed when played again alone: ${r.run.lateRetried.slice(0, 8).map((x) => `${x.id} (${x.outcome}${x.tlsFailedAtMs !== undefined ? `, handshake died at ${Math.round(x.tlsFailedAtMs)} ms` : `, our last write at ${Math.round(x.lastWriteMs ?? 0)} ms`})`).join(', ')}${r.run.lateRetried.length > 8 ? ', …' : ''}`);
  }
  out.push('');
  out.push(`event-loop delay: fuzzer p99 ${Math.round(r.runnerLag.p99)} ms, max ${Math.round(r.runnerLag.max)} ms; proxy max ${r.proxyLagMaxMs === undefined ? '?' : Math.round(r.proxyLagMaxMs)} ms`);
  out.push(`healthy client: ${r.healthy.queries} queries, ${r.healthy.freshConnects} fresh connections, ${r.healthy.errors.length} errors, slowest query ${Math.round(r.healthy.slowestMs)} ms, slowest fresh connection ${Math.round(r.healthy.slowestConnectMs)} ms`);
  out.push('');
  for (const c of r.checks) out.push(`${c.ok ? 'ok  ' : 'FAIL'}  ${c.name}: ${c.detail}`);
  if (r.run.failures.length) {
    out.push('');
    out.push(`failures (first 50 of ${r.run.failures.length}):`);
    for (const f of r.run.failures.slice(0, 50)) out.push(`  ${describeFailure(f)}`);
  }
  return out.join('\n');
}
