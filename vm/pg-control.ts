/**
 * Reads the few fields of a data directory's `global/pg_control` the control plane needs
 * (PostgreSQL 15 layout of `ControlFileData`, see src/include/catalog/pg_control.h):
 * the system identifier, the cluster state, the latest checkpoint and its redo point and timeline.
 */
import { open } from 'node:fs/promises';
import { XenonError } from '../lib/errors.ts';
import { join } from 'node:path';
import { WAL_SEGMENT_SIZE } from '../lib/lsn.ts';

/** `DBState` values. */
export const DB_STATES = ['starting up', 'shut down', 'shut down in recovery', 'shutting down', 'in crash recovery', 'in archive recovery', 'in production'] as const;

export interface ControlData {
  systemId: bigint;
  state: (typeof DB_STATES)[number] | 'unknown';
  /** Start of the latest checkpoint record. */
  checkpoint: bigint;
  /** Its redo point: recovery starts reading WAL here. */
  redo: bigint;
  /** The Postgres timeline of the latest checkpoint. */
  timeline: number;
  /**
   * `minRecoveryPoint` (0 when unset): WAL up to here must be replayed before the data files are
   * consistent (a standby's or a restartpoint's; offset 136 in PG 15: after `checkPointCopy`,
   * 88 bytes at 40, and `unloggedLSN`).
   */
  minRecoveryPoint: bigint;
}

export async function readControlData(dataDir: string): Promise<ControlData> {
  const fh = await open(join(dataDir, 'global', 'pg_control'), 'r');
  try {
    const buf = Buffer.alloc(144);
    const { bytesRead } = await fh.read(buf, 0, buf.length, 0);
    if (bytesRead < buf.length) throw new Error(`${dataDir}: pg_control is truncated`);
    const state = buf.readUInt32LE(16);
    return {
      systemId: buf.readBigUInt64LE(0),
      state: DB_STATES[state] ?? 'unknown',
      checkpoint: buf.readBigUInt64LE(32),
      redo: buf.readBigUInt64LE(40),
      timeline: buf.readUInt32LE(48),
      minRecoveryPoint: buf.readBigUInt64LE(136),
    };
  } finally {
    await fh.close();
  }
}

const XLOG_BLCKSZ = 8192n;
/**
 * XLogRecord header (24) + short main-data header (2) + sizeof(CheckPoint) (88) = 114 bytes in
 * PG 15, MAXALIGNed: WAL positions advance in 8-byte units, and the flush pointer a walsender
 * streams up to is the aligned end.
 */
const CHECKPOINT_RECORD_SIZE = 120n;
const SHORT_PAGE_HEADER = 24n;
const LONG_PAGE_HEADER = 40n;

/**
 * Where WAL ends after a checkpoint record that starts at `checkpoint` (a clean shutdown writes
 * nothing after it): the record plus any page header it runs over.
 */
export function checkpointRecordEnd(checkpoint: bigint): bigint {
  let pos = checkpoint;
  let left = CHECKPOINT_RECORD_SIZE;
  while (left > 0n) {
    const pageEnd = (pos / XLOG_BLCKSZ + 1n) * XLOG_BLCKSZ;
    const here = pageEnd - pos < left ? pageEnd - pos : left;
    pos += here;
    left -= here;
    if (left > 0n) pos += pos % BigInt(WAL_SEGMENT_SIZE) === 0n ? LONG_PAGE_HEADER : SHORT_PAGE_HEADER;
  }
  return pos;
}

/** `PG_CONTROL_VERSION` of PostgreSQL 15 (offset 8 of pg_control). */
const PG15_CONTROL_VERSION = 1300;
/** `offsetof(ControlFileData, crc)` in PostgreSQL 15: the CRC covers the bytes before it. */
const PG15_CRC_OFFSET = 288;
/** pg_control is always written as one 8 KiB block (`PG_CONTROL_FILE_SIZE`). */
const PG_CONTROL_FILE_SIZE = 8192;
const DB_IN_PRODUCTION = DB_STATES.indexOf('in production');

const CRC32C_TABLE = ((): Uint32Array => {
  const table = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let c = i;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    table[i] = c >>> 0;
  }
  return table;
})();

/** CRC-32C (Castagnoli), as Postgres' `COMP_CRC32C` computes it (init and final xor 0xFFFFFFFF). */
export function crc32c(data: Uint8Array): number {
  let crc = 0xffffffff;
  for (let i = 0; i < data.length; i++) crc = CRC32C_TABLE[(crc ^ data[i]!) & 0xff]! ^ (crc >>> 8);
  return (crc ^ 0xffffffff) >>> 0;
}

/**
 * Marks a cleanly shut down cluster as not shut down (`state` → `DB_IN_PRODUCTION`, CRC
 * recomputed), so that its next start runs crash recovery through all of `pg_wal` — WAL after the
 * shutdown checkpoint included — and stays on the same Postgres timeline (DESIGN §4 "Compute
 * start (stateless)", `StartPlan` mode `crash`). Refuses a file whose CRC does not match the
 * PostgreSQL 15 layout (an unknown version or a corrupt file) and leaves it untouched then.
 * The rest of the 8 KiB block is kept; the file is rewritten in place and fsynced.
 */
export async function markNotShutDown(dataDir: string): Promise<void> {
  const path = join(dataDir, 'global', 'pg_control');
  const fh = await open(path, 'r+');
  try {
    const buf = Buffer.alloc(PG_CONTROL_FILE_SIZE);
    const { bytesRead } = await fh.read(buf, 0, buf.length, 0);
    if (bytesRead !== PG_CONTROL_FILE_SIZE) {
      throw new XenonError('CP_COMPUTE_START_FAILED', `${path}: ${bytesRead} bytes, expected ${PG_CONTROL_FILE_SIZE}`);
    }
    const version = buf.readUInt32LE(8);
    const stored = buf.readUInt32LE(PG15_CRC_OFFSET);
    if (version !== PG15_CONTROL_VERSION || crc32c(buf.subarray(0, PG15_CRC_OFFSET)) !== stored) {
      throw new XenonError(
        'CP_COMPUTE_START_FAILED',
        `${path}: not a PostgreSQL 15 pg_control (pg_control_version ${version}, CRC ${crc32c(buf.subarray(0, PG15_CRC_OFFSET)) === stored ? 'matches' : 'does not match'}): refusing to rewrite it`,
      );
    }
    buf.writeUInt32LE(DB_IN_PRODUCTION, 16);
    buf.writeUInt32LE(crc32c(buf.subarray(0, PG15_CRC_OFFSET)), PG15_CRC_OFFSET);
    const { bytesWritten } = await fh.write(buf, 0, buf.length, 0);
    if (bytesWritten !== buf.length) throw new XenonError('CP_COMPUTE_START_FAILED', `${path}: short write (${bytesWritten} bytes)`);
    await fh.sync();
  } finally {
    await fh.close();
  }
}
