/**
 * Reads the few fields of a data directory's `global/pg_control` the control plane needs
 * (PostgreSQL 15 layout of `ControlFileData`, see src/include/catalog/pg_control.h):
 * the system identifier, the cluster state, the latest checkpoint and its redo point and timeline.
 */
import { open } from 'node:fs/promises';
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
}

export async function readControlData(dataDir: string): Promise<ControlData> {
  const fh = await open(join(dataDir, 'global', 'pg_control'), 'r');
  try {
    const buf = Buffer.alloc(52);
    const { bytesRead } = await fh.read(buf, 0, buf.length, 0);
    if (bytesRead < buf.length) throw new Error(`${dataDir}: pg_control is truncated`);
    const state = buf.readUInt32LE(16);
    return {
      systemId: buf.readBigUInt64LE(0),
      state: DB_STATES[state] ?? 'unknown',
      checkpoint: buf.readBigUInt64LE(32),
      redo: buf.readBigUInt64LE(40),
      timeline: buf.readUInt32LE(48),
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
