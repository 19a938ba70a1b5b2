/**
 * Log sequence numbers and WAL file names, as Postgres writes them. LSNs are `bigint` inside the
 * services and `X/Y` hex text on the wire (JSON APIs, SQL).
 * @see https://www.postgresql.org/docs/15/datatype-pg-lsn.html
 */
import { XenonError } from './errors.ts';

/** The default (and only supported) WAL segment size: 16 MiB. */
export const WAL_SEGMENT_SIZE = 16 * 1024 * 1024;
/** Segments per 4 GiB "xlog id" (the middle part of a segment file name). */
const SEGMENTS_PER_XLOGID = 0x1_0000_0000 / WAL_SEGMENT_SIZE;
const MAX_LSN = (1n << 64n) - 1n;

/** `"16/B374D848"` → 0x16B374D848n. Throws CP_BAD_REQUEST on anything else. */
export function parseLsn(text: string): bigint {
  const m = /^([0-9A-Fa-f]{1,8})\/([0-9A-Fa-f]{1,8})$/.exec(text);
  if (!m) throw new XenonError('CP_BAD_REQUEST', `not an LSN: ${JSON.stringify(text)} (expected e.g. "0/16B3748")`);
  return (BigInt('0x' + m[1]) << 32n) | BigInt('0x' + m[2]);
}

export function formatLsn(lsn: bigint): string {
  if (lsn < 0n || lsn > MAX_LSN) throw new RangeError(`LSN out of range: ${lsn}`);
  return `${(lsn >> 32n).toString(16).toUpperCase()}/${(lsn & 0xffff_ffffn).toString(16).toUpperCase()}`;
}

/** The segment number holding `lsn`. */
export const segmentOf = (lsn: bigint): bigint => lsn / BigInt(WAL_SEGMENT_SIZE);
export const segmentStart = (segno: bigint): bigint => segno * BigInt(WAL_SEGMENT_SIZE);
/**
 * The segment holding the byte just before `lsn` (Postgres' `XLByteToPrevSeg`): where WAL ending at
 * `lsn` lies. `pg_walfile_name()` names this one, so for an LSN exactly at a segment start it
 * names the previous segment.
 */
export const prevSegmentOf = (lsn: bigint): bigint => (lsn === 0n ? 0n : (lsn - 1n) / BigInt(WAL_SEGMENT_SIZE));

const hex8 = (n: number | bigint): string => n.toString(16).toUpperCase().padStart(8, '0');

/** `000000010000000000000003` for TLI 1, segment 3 (XLogFileName). */
export function segmentFileName(tli: number, segno: bigint): string {
  const per = BigInt(SEGMENTS_PER_XLOGID);
  return hex8(tli) + hex8(segno / per) + hex8(segno % per);
}

/** Inverse of {@link segmentFileName} (a `.partial` suffix is allowed); undefined when not a segment name. */
export function parseSegmentFileName(name: string): { tli: number; segno: bigint; partial: boolean } | undefined {
  const m = /^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})(\.partial)?$/.exec(name);
  if (!m) return undefined;
  const tli = parseInt(m[1]!, 16);
  const hi = BigInt('0x' + m[2]);
  const lo = BigInt('0x' + m[3]);
  if (tli === 0 || lo >= BigInt(SEGMENTS_PER_XLOGID)) return undefined;
  return { tli, segno: hi * BigInt(SEGMENTS_PER_XLOGID) + lo, partial: m[4] !== undefined };
}

/** `00000002.history`. */
export const historyFileName = (tli: number): string => `${hex8(tli)}.history`;
