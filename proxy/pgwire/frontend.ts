/**
 * Frontend (client → proxy) side of the codec: framing of the startup-phase packets and of typed
 * messages, and the bodies the proxy needs during authentication.
 *
 * Formats: {@link https://www.postgresql.org/docs/current/protocol-message-formats.html}.
 * Flow: {@link https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-START-UP}.
 *
 * Everything here treats its input as hostile: lengths are read as signed int32 and checked before
 * anything is allocated or buffered on their behalf, and the only thing ever thrown for bad input is
 * a {@link PgWireError}.
 */
import { isUtf8 } from 'node:buffer';
import { PgWireError, violation } from './errors.ts';

/**
 * Request codes of the packets a client may send before (or instead of) a StartupMessage: the int32
 * that follows the length word.
 * {@link https://www.postgresql.org/docs/current/protocol-message-formats.html}
 * (SSLRequest, GSSENCRequest, CancelRequest, StartupMessage).
 */
export const STARTUP_CODES = {
  /** SSLRequest: 1234 << 16 | 5679. */
  SSL_REQUEST: 80877103,
  /** GSSENCRequest: 1234 << 16 | 5680. */
  GSSENC_REQUEST: 80877104,
  /** CancelRequest: 1234 << 16 | 5678. */
  CANCEL_REQUEST: 80877102,
  /** StartupMessage protocol version 3.0: 3 << 16 | 0. */
  PROTOCOL_3_0: 196608,
} as const;

/** Largest startup-phase packet accepted, in bytes including the length word (Postgres' MAX_STARTUP_PACKET_LENGTH). */
export const MAX_STARTUP_PACKET = 10_000;

/**
 * First byte of a TLS handshake record (a ClientHello): a client using PostgreSQL 17's
 * `sslnegotiation=direct` starts TLS at once instead of sending an SSLRequest. As a startup
 * packet's length word it would mean a packet of over 350 MB, so it cannot be mistaken for one.
 */
export const TLS_HANDSHAKE_RECORD = 0x16;

/** Default cap on a typed message's body (length word excluded): 1 MiB. */
export const DEFAULT_MAX_MESSAGE = 1024 * 1024;

/**
 * Type bytes of the frontend messages the proxy looks at during the startup/auth phase.
 * {@link https://www.postgresql.org/docs/current/protocol-message-formats.html}
 */
export const MESSAGE_TYPES = {
  /** 'p': PasswordMessage, SASLInitialResponse, SASLResponse (and GSSResponse) share it. */
  PASSWORD: 0x70,
  /** 'X': Terminate. */
  TERMINATE: 0x58,
  /** 'Q': Query (e.g. pipelined right after the password by @neondatabase/serverless). */
  QUERY: 0x51,
} as const;

/** A startup-phase packet, as returned by {@link FrontendReader.readStartup}. */
export type StartupPacket =
  | { kind: 'ssl' }
  | { kind: 'gssenc' }
  /** `processId` and `secretKey` are read as signed int32 (as pg-protocol reads BackendKeyData). */
  | { kind: 'cancel'; processId: number; secretKey: number }
  | { kind: 'startup'; major: number; minor: number; params: Map<string, string> };

/** A typed frontend message, as returned by {@link FrontendReader.readMessage}. */
export interface FrontendMessage {
  /** The type byte, e.g. {@link MESSAGE_TYPES.PASSWORD}. */
  type: number;
  /** The body, without type byte and length word. May share memory with pushed chunks. */
  body: Buffer;
}

export interface FrontendReaderOptions {
  /** Largest accepted typed-message body in bytes (length word excluded). Default 1 MiB. */
  maxMessage?: number;
  /**
   * A per-type cap below `maxMessage` (Postgres caps most message types at 10,000 bytes and only
   * Query, Parse, Bind, FunctionCall and CopyData at 1 GB). Called with the type byte.
   */
  limitFor?: (type: number) => number;
}

const EMPTY = Buffer.alloc(0);
/** Compact the chunk list once this many consumed slots have accumulated at its front. */
const COMPACT_AFTER = 64;

/**
 * Accumulates bytes from a client and frames them.
 *
 * Pushed chunks are kept in a list and only merged when a complete packet is available (plus a few
 * bytes to read a header), so feeding many tiny chunks stays linear. A read that throws consumes
 * nothing; the connection is expected to be closed after any {@link PgWireError}.
 */
export class FrontendReader {
  readonly maxMessage: number;
  readonly #limitFor: ((type: number) => number) | undefined;
  #chunks: Buffer[] = [];
  /** Index of the first live chunk in #chunks. */
  #head = 0;
  #size = 0;

  constructor(opts: FrontendReaderOptions = {}) {
    const max = opts.maxMessage ?? DEFAULT_MAX_MESSAGE;
    if (!Number.isSafeInteger(max) || max < 0 || max > 0x7fff_ffff - 4) {
      throw new RangeError(`maxMessage must be an integer in [0, 2^31 - 5], got ${String(max)}`);
    }
    this.maxMessage = max;
    this.#limitFor = opts.limitFor;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.#chunks.push(chunk);
    this.#size += chunk.length;
  }

  /**
   * The first unconsumed byte, without consuming it (undefined when nothing is buffered). Tells a
   * direct TLS ClientHello (0x16, a TLS handshake record) from a startup packet's length word.
   */
  peekByte(): number | undefined {
    return this.#size === 0 ? undefined : this.#chunks[this.#head]![0];
  }

  /** Number of bytes buffered and not yet consumed. */
  get buffered(): number {
    return this.#size;
  }

  /**
   * Next startup-phase packet (no type byte: int32 length incl. itself + int32 code + body), or
   * null if incomplete.
   *
   * Rejects a bad length as soon as the length word is buffered (the body is never awaited), and a
   * bad request code as soon as the code is buffered. SSLRequest and GSSENCRequest must be exactly
   * 8 bytes, CancelRequest exactly 16. A StartupMessage must be protocol 3.x (any minor is
   * returned as is: the caller decides whether to send NegotiateProtocolVersion), its parameters
   * NUL-terminated UTF-8 key/value pairs ending with an extra NUL, with `user` present and
   * non-empty and no key repeated.
   * {@link https://www.postgresql.org/docs/current/protocol-message-formats.html#PROTOCOL-MESSAGE-FORMATS-STARTUPMESSAGE}
   */
  readStartup(): StartupPacket | null {
    if (this.#size < 4) return null;
    const len = this.#coalesce(4).readInt32BE(0);
    if (len < 8) throw violation('invalid length of startup packet');
    if (len > MAX_STARTUP_PACKET) throw new PgWireError('PROXY_STARTUP_TOO_LARGE', 'startup packet too large');
    if (this.#size < 8) return null;
    const code = this.#coalesce(8).readUInt32BE(4);
    switch (code) {
      case STARTUP_CODES.SSL_REQUEST:
        if (len !== 8) throw violation('invalid length of SSLRequest packet');
        this.#skip(8);
        return { kind: 'ssl' };
      case STARTUP_CODES.GSSENC_REQUEST:
        if (len !== 8) throw violation('invalid length of GSSENCRequest packet');
        this.#skip(8);
        return { kind: 'gssenc' };
      case STARTUP_CODES.CANCEL_REQUEST: {
        if (len !== 16) throw violation('invalid length of CancelRequest packet');
        if (this.#size < 16) return null;
        const pkt = this.#coalesce(16);
        const processId = pkt.readInt32BE(8);
        const secretKey = pkt.readInt32BE(12);
        this.#skip(16);
        return { kind: 'cancel', processId, secretKey };
      }
    }
    const major = code >>> 16;
    const minor = code & 0xffff;
    if (major !== 3) {
      throw new PgWireError(
        'PROXY_UNSUPPORTED_PROTOCOL',
        `unsupported frontend protocol ${major}.${minor}: server supports protocol 3`,
      );
    }
    if (this.#size < len) return null;
    const params = parseStartupParams(this.#coalesce(len).subarray(8, len));
    this.#skip(len);
    return { kind: 'startup', major, minor, params };
  }

  /**
   * Next typed message (1 type byte + int32 length incl. itself + body), or null if incomplete.
   * A length below 4 is a protocol violation and a body above `maxMessage` is
   * PROXY_MESSAGE_TOO_LARGE, both detected as soon as the 5-byte header is buffered.
   * {@link https://www.postgresql.org/docs/current/protocol-overview.html#PROTOCOL-MESSAGE-CONCEPTS}
   */
  readMessage(): FrontendMessage | null {
    const frame = this.readFrame();
    return frame === null ? null : { type: frame[0]!, body: frame.subarray(5) };
  }

  /**
   * Like {@link readMessage}, but returns the whole message (type byte, length word and body) as
   * one Buffer, a view into the pushed chunks whenever the message lies within one of them: what a
   * router forwards unchanged without re-serializing it.
   */
  readFrame(): Buffer | null {
    if (this.#size < 5) return null;
    const header = this.#coalesce(5);
    const type = header[0]!;
    const len = header.readInt32BE(1);
    if (len < 4) throw violation('invalid message length');
    const max = this.#limitFor ? Math.min(this.maxMessage, this.#limitFor(type)) : this.maxMessage;
    if (len - 4 > max) throw new PgWireError('PROXY_MESSAGE_TOO_LARGE', 'message too large');
    const total = len + 1;
    if (this.#size < total) return null;
    const first = this.#coalesce(total);
    const frame = first.length === total ? first : first.subarray(0, total);
    this.#skip(total);
    return frame;
  }

  /** Returns and clears any buffered unconsumed bytes. */
  drain(): Buffer {
    const live = this.#chunks.slice(this.#head);
    const out = live.length === 1 ? live[0]! : Buffer.concat(live, this.#size);
    this.#chunks = [];
    this.#head = 0;
    this.#size = 0;
    return out;
  }

  /**
   * Makes the first live chunk hold at least `n` bytes (merging exactly `n` bytes from the front
   * when needed) and returns it. Requires `n <= #size`, so `n` is always bounded by what was
   * actually received.
   */
  #coalesce(n: number): Buffer {
    const chunks = this.#chunks;
    const first = chunks[this.#head]!;
    if (first.length >= n) return first;
    const out = Buffer.allocUnsafe(n);
    let off = 0;
    let i = this.#head;
    for (;;) {
      const c = chunks[i]!;
      const k = Math.min(c.length, n - off);
      c.copy(out, off, 0, k);
      off += k;
      if (k < c.length) {
        chunks[i] = c.subarray(k);
        break;
      }
      i++;
      if (off === n) break;
    }
    // chunks[head .. i-1] were copied whole; `out` takes the last of those slots.
    for (let j = this.#head; j < i - 1; j++) chunks[j] = EMPTY;
    this.#head = i - 1;
    chunks[this.#head] = out;
    this.#compact();
    return out;
  }

  /** Consumes `n <= #size` bytes from the front. */
  #skip(n: number): void {
    this.#size -= n;
    const chunks = this.#chunks;
    while (n > 0) {
      const c = chunks[this.#head]!;
      if (c.length <= n) {
        n -= c.length;
        chunks[this.#head++] = EMPTY;
      } else {
        chunks[this.#head] = c.subarray(n);
        n = 0;
      }
    }
    if (this.#head === chunks.length) {
      this.#chunks = [];
      this.#head = 0;
    } else {
      this.#compact();
    }
  }

  #compact(): void {
    if (this.#head >= COMPACT_AFTER && this.#head * 2 >= this.#chunks.length) {
      this.#chunks = this.#chunks.slice(this.#head);
      this.#head = 0;
    }
  }
}

/** Parses the NUL-terminated key/value pairs of a StartupMessage (after length and version). */
function parseStartupParams(buf: Buffer): Map<string, string> {
  const params = new Map<string, string>();
  let off = 0;
  for (;;) {
    if (off >= buf.length) throw violation('invalid startup packet layout: expected terminator as last byte');
    if (buf[off] === 0) {
      if (off !== buf.length - 1) throw violation('invalid startup packet layout: expected terminator as last byte');
      break;
    }
    const keyEnd = buf.indexOf(0, off);
    if (keyEnd < 0) throw violation('invalid startup packet layout: expected terminator as last byte');
    const valStart = keyEnd + 1;
    const valEnd = valStart < buf.length ? buf.indexOf(0, valStart) : -1;
    if (valEnd < 0) throw violation('invalid startup packet layout: parameter without a value');
    const key = utf8(buf.subarray(off, keyEnd), 'startup packet');
    const value = utf8(buf.subarray(valStart, valEnd), 'startup packet');
    if (params.has(key)) throw violation('invalid startup packet: duplicate parameter');
    params.set(key, value);
    off = valEnd + 1;
  }
  if (!params.get('user')) throw violation('no PostgreSQL user name specified in startup packet');
  return params;
}

function utf8(bytes: Buffer, where: string): string {
  if (!isUtf8(bytes)) throw violation(`invalid byte sequence for encoding "UTF8" in ${where}`);
  return bytes.toString('utf8');
}

/**
 * Body of a PasswordMessage ('p'): one NUL-terminated UTF-8 string and nothing after it.
 * {@link https://www.postgresql.org/docs/current/protocol-message-formats.html#PROTOCOL-MESSAGE-FORMATS-PASSWORDMESSAGE}
 */
export function parsePasswordMessage(body: Buffer): string {
  if (body.length === 0 || body.indexOf(0) !== body.length - 1) throw violation('invalid password packet');
  return utf8(body.subarray(0, body.length - 1), 'password packet');
}

/**
 * Body of a SASLInitialResponse ('p'): mechanism name (NUL-terminated, non-empty), int32 length of
 * the initial response (-1 = none), then exactly that many bytes. `data` is a view into `body`.
 * {@link https://www.postgresql.org/docs/current/protocol-message-formats.html#PROTOCOL-MESSAGE-FORMATS-SASLINITIALRESPONSE}
 */
export function parseSaslInitialResponse(body: Buffer): { mechanism: string; data: Buffer | null } {
  const nul = body.indexOf(0);
  if (nul <= 0) throw violation('invalid SASLInitialResponse: missing mechanism name');
  const mechanism = utf8(body.subarray(0, nul), 'SASL mechanism name');
  const off = nul + 1;
  if (body.length - off < 4) throw violation('invalid SASLInitialResponse: truncated');
  const len = body.readInt32BE(off);
  const rest = body.length - off - 4;
  if (len === -1) {
    if (rest !== 0) throw violation('invalid SASLInitialResponse: trailing bytes');
    return { mechanism, data: null };
  }
  if (len < 0 || len !== rest) throw violation('invalid SASLInitialResponse: bad data length');
  return { mechanism, data: body.subarray(off + 4) };
}
