/**
 * Message-level routing helpers for the transaction pooler: frontend type bytes of the messages
 * it routes, a streaming framer of backend messages that hands out views (no copy unless a
 * message straddles two reads), and builders for the few messages the pooler writes itself.
 *
 * {@link https://www.postgresql.org/docs/current/protocol-message-formats.html}
 * {@link https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-EXT-QUERY}
 */
import { violation } from './errors.ts';

/** Frontend (client → server) type bytes after startup. */
export const FRONTEND = {
  QUERY: 0x51, // 'Q'
  PARSE: 0x50, // 'P'
  BIND: 0x42, // 'B'
  DESCRIBE: 0x44, // 'D'
  EXECUTE: 0x45, // 'E'
  CLOSE: 0x43, // 'C'
  SYNC: 0x53, // 'S'
  FLUSH: 0x48, // 'H'
  FUNCTION_CALL: 0x46, // 'F'
  COPY_DATA: 0x64, // 'd'
  COPY_DONE: 0x63, // 'c'
  COPY_FAIL: 0x66, // 'f'
  TERMINATE: 0x58, // 'X'
} as const;

/** Backend (server → client) type bytes the pooler acts on. */
export const BACKEND = {
  PARSE_COMPLETE: 0x31, // '1'
  BIND_COMPLETE: 0x32, // '2'
  CLOSE_COMPLETE: 0x33, // '3'
  PARAMETER_DESCRIPTION: 0x74, // 't'
  ROW_DESCRIPTION: 0x54, // 'T'
  NO_DATA: 0x6e, // 'n'
  DATA_ROW: 0x44, // 'D'
  COMMAND_COMPLETE: 0x43, // 'C'
  EMPTY_QUERY: 0x49, // 'I'
  PORTAL_SUSPENDED: 0x73, // 's'
  ERROR: 0x45, // 'E'
  NOTICE: 0x4e, // 'N'
  NOTIFICATION: 0x41, // 'A'
  PARAMETER_STATUS: 0x53, // 'S'
  READY_FOR_QUERY: 0x5a, // 'Z'
  COPY_IN: 0x47, // 'G'
  COPY_OUT: 0x48, // 'H'
  COPY_BOTH: 0x57, // 'W'
  COPY_DATA: 0x64, // 'd'
  COPY_DONE: 0x63, // 'c'
  FUNCTION_RESULT: 0x56, // 'V'
} as const;

/**
 * Postgres' cap for message types that carry SQL or data (PQ_LARGE_MESSAGE_LIMIT is 1 GB; the
 * caller chooses its own below that); every other frontend message must fit in 10,000 bytes
 * (PQ_SMALL_MESSAGE_LIMIT), as in the server's SocketBackend().
 */
export const SMALL_MESSAGE_LIMIT = 10_000;
const LARGE_TYPES = new Set<number>([FRONTEND.QUERY, FRONTEND.PARSE, FRONTEND.BIND, FRONTEND.FUNCTION_CALL, FRONTEND.COPY_DATA]);
const ROUTABLE = new Set<number>(Object.values(FRONTEND));

/** The body cap of a frontend message type given the cap for large ones. */
export function frontendLimit(type: number, large: number): number {
  return LARGE_TYPES.has(type) ? large : SMALL_MESSAGE_LIMIT;
}

/** Whether `type` is a frontend message a client may send after startup. */
export function isRoutable(type: number): boolean {
  return ROUTABLE.has(type);
}

/** Index of the NUL ending the C string at `off` in `buf` (below `end`); a protocol violation if none. */
export function cstringEnd(buf: Buffer, off: number, end = buf.length): number {
  const i = buf.indexOf(0, off);
  if (i < 0 || i >= end) throw violation('invalid message format: unterminated string');
  return i;
}

/** One message: type byte, length word, then the parts as its body. */
export function frame(type: number, ...parts: (Buffer | string)[]): Buffer {
  let len = 4;
  const bufs = parts.map((p) => (typeof p === 'string' ? Buffer.from(p, 'utf8') : p));
  for (const b of bufs) len += b.length;
  const out = Buffer.allocUnsafe(len + 1);
  out[0] = type;
  out.writeInt32BE(len, 1);
  let off = 5;
  for (const b of bufs) off += b.copy(out, off);
  return out;
}

const NUL = Buffer.from([0]);

/** A C string (UTF-8 + NUL) as a Buffer. */
export function cstring(s: string): Buffer {
  return Buffer.concat([Buffer.from(s, 'utf8'), NUL]);
}

/** Messages with an empty body the pooler synthesizes. */
export const PARSE_COMPLETE = Buffer.from([BACKEND.PARSE_COMPLETE, 0, 0, 0, 4]);
export const CLOSE_COMPLETE = Buffer.from([BACKEND.CLOSE_COMPLETE, 0, 0, 0, 4]);
export const SYNC = Buffer.from([FRONTEND.SYNC, 0, 0, 0, 4]);

/** CommandComplete with `tag`. */
export function commandComplete(tag: string): Buffer {
  return frame(BACKEND.COMMAND_COMPLETE, cstring(tag));
}

/** A simple Query message. */
export function query(sql: string): Buffer {
  return frame(FRONTEND.QUERY, cstring(sql));
}

/** Close of a prepared statement ('S') or portal ('P'). */
export function closeMessage(kind: 'S' | 'P', name: string): Buffer {
  return frame(FRONTEND.CLOSE, kind, cstring(name));
}

/** CopyFail with a message. */
export function copyFail(message: string): Buffer {
  return frame(FRONTEND.COPY_FAIL, cstring(message));
}

/**
 * Receives each backend message: `buf[start..end)` is the whole message (type byte at `start`).
 * The view is valid during the call only when `buf` is the pushed chunk (it is, unless the
 * message straddled reads and was assembled into a buffer of its own).
 */
export type BackendMessageSink = (type: number, buf: Buffer, start: number, end: number) => void;

/**
 * Frames a stream of backend messages without copying: messages inside one pushed chunk are
 * handed out as offsets into it; only a message split across chunks is assembled. Backend input is
 * trusted (our own compute), but a length below 4 is still refused.
 */
export class BackendScanner {
  /** A message split across chunks: its bytes so far (header possibly incomplete). */
  #partial: Buffer | null = null;
  #partialLen = 0;

  /** Frames `chunk`, calling `sink` per complete message in order. */
  push(chunk: Buffer, sink: BackendMessageSink): void {
    let off = 0;
    if (this.#partial) {
      off = this.#fill(chunk, sink);
      if (off < 0) return;
    }
    const n = chunk.length;
    while (off < n) {
      if (n - off < 5) {
        this.#startPartial(chunk, off, 5);
        return;
      }
      const len = chunk.readInt32BE(off + 1);
      if (len < 4) throw violation('invalid backend message length');
      const end = off + 1 + len;
      if (end > n) {
        this.#startPartial(chunk, off, len + 1);
        return;
      }
      sink(chunk[off]!, chunk, off, end);
      off = end;
    }
  }

  /** Bytes buffered of a split message. */
  get buffered(): number {
    return this.#partial ? this.#partialLen : 0;
  }

  #startPartial(chunk: Buffer, off: number, need: number): void {
    const have = chunk.length - off;
    const buf = Buffer.allocUnsafe(Math.max(need, 5));
    chunk.copy(buf, 0, off);
    this.#partial = buf;
    this.#partialLen = have;
  }

  /** Continues a split message; returns the offset in `chunk` after it, or -1 if still incomplete. */
  #fill(chunk: Buffer, sink: BackendMessageSink): number {
    let buf = this.#partial!;
    let have = this.#partialLen;
    let off = 0;
    if (have < 5) {
      const k = Math.min(5 - have, chunk.length);
      chunk.copy(buf, have, 0, k);
      have += k;
      off = k;
      if (have < 5) {
        this.#partialLen = have;
        return -1;
      }
      const len = buf.readInt32BE(1);
      if (len < 4) throw violation('invalid backend message length');
      if (len + 1 > buf.length) {
        const bigger = Buffer.allocUnsafe(len + 1);
        buf.copy(bigger, 0, 0, have);
        buf = bigger;
      }
    }
    const total = buf.readInt32BE(1) + 1;
    const k = Math.min(total - have, chunk.length - off);
    chunk.copy(buf, have, off, off + k);
    have += k;
    off += k;
    if (have < total) {
      this.#partial = buf;
      this.#partialLen = have;
      return -1;
    }
    this.#partial = null;
    this.#partialLen = 0;
    sink(buf[0]!, buf, 0, total);
    return off;
  }
}
