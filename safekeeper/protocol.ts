/**
 * The CopyData payloads of physical streaming replication (CopyBoth mode after START_REPLICATION).
 * @see https://www.postgresql.org/docs/15/protocol-replication.html
 *
 * Server → client: `w` XLogData (dataStart, walEnd, sendTime, data), `k` primary keepalive
 * (walEnd, sendTime, replyRequested). Client → server: `r` standby status update (write, flush,
 * apply, clock, replyRequested). All integers big-endian; LSNs and times are 64-bit.
 */

/** Microseconds between the Unix epoch and the Postgres epoch (2000-01-01 UTC). */
const PG_EPOCH_OFFSET_US = 946_684_800_000_000n;

export interface XLogData {
  tag: 'w';
  dataStart: bigint;
  walEnd: bigint;
  sendTime: bigint;
  /** A view into the parser's buffer: copy it before the current turn ends. */
  data: Buffer;
}

export interface Keepalive {
  tag: 'k';
  walEnd: bigint;
  sendTime: bigint;
  replyRequested: boolean;
}

export type ReplicationMessage = XLogData | Keepalive;

/** Parses one CopyData payload from the server; throws on anything that is not `w`/`k`. */
export function parseReplicationMessage(buf: Buffer): ReplicationMessage {
  const tag = buf[0];
  if (tag === 0x77 /* w */) {
    if (buf.length < 25) throw new Error(`XLogData message too short (${buf.length} bytes)`);
    return {
      tag: 'w',
      dataStart: buf.readBigUInt64BE(1),
      walEnd: buf.readBigUInt64BE(9),
      sendTime: buf.readBigInt64BE(17),
      data: buf.subarray(25),
    };
  }
  if (tag === 0x6b /* k */) {
    if (buf.length < 18) throw new Error(`keepalive message too short (${buf.length} bytes)`);
    return { tag: 'k', walEnd: buf.readBigUInt64BE(1), sendTime: buf.readBigInt64BE(9), replyRequested: buf[17] === 1 };
  }
  throw new Error(`unexpected replication message type 0x${(tag ?? 0).toString(16)}`);
}

/** Now, in microseconds since the Postgres epoch. */
export function pgNow(): bigint {
  return BigInt(Date.now()) * 1000n - PG_EPOCH_OFFSET_US;
}

/** `r` standby status update (34 bytes). */
export function standbyStatusUpdate(write: bigint, flush: bigint, apply: bigint, replyRequested = false, now = pgNow()): Buffer {
  const b = Buffer.alloc(34);
  b[0] = 0x72; // r
  b.writeBigUInt64BE(write, 1);
  b.writeBigUInt64BE(flush, 9);
  b.writeBigUInt64BE(apply, 17);
  b.writeBigInt64BE(now, 25);
  b[33] = replyRequested ? 1 : 0;
  return b;
}

/**
 * The same update framed as a whole CopyData message (`d`, length, payload: 39 bytes), ready for
 * the socket — one allocation per reply instead of pg's copy of a copy.
 */
export function standbyStatusUpdateFrame(write: bigint, flush: bigint, apply: bigint, replyRequested = false, now = pgNow()): Buffer {
  const b = Buffer.allocUnsafe(39);
  b[0] = 0x64; // d
  b.writeInt32BE(38, 1);
  b[5] = 0x72; // r
  b.writeBigUInt64BE(write, 6);
  b.writeBigUInt64BE(flush, 14);
  b.writeBigUInt64BE(apply, 22);
  b.writeBigInt64BE(now, 30);
  b[38] = replyRequested ? 1 : 0;
  return b;
}
