/**
 * Before a compute starts, its `pg_wal` must hold every WAL record the safekeepers' quorum holds
 * (DESIGN §4 "WAL and durability"): a commit is durable because a majority of safekeepers has it,
 * not because this data directory's disk kept it. Segments from the latest checkpoint's segment
 * up to the quorum's flush LSN are checked against a safekeeper (their last block up to that
 * LSN, with a Range read), and any that is missing or differs is replaced with the safekeeper's
 * copy. History files the compute lacks are copied as well.
 */
import { chown, open, rename, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from '../lib/logger.ts';
import { formatLsn, parseLsn, parseSegmentFileName, segmentOf, segmentStart, WAL_SEGMENT_SIZE } from '../lib/lsn.ts';
import type { RunAs } from '../lib/postgres.ts';
import type { WalListing } from '../safekeeper/api.ts';
import { SafekeeperClient } from '../safekeeper/client.ts';
import { checkpointRecordEnd, markNotShutDown, readControlData } from './pg-control.ts';

export interface WalSource {
  /** The safekeepers' timeline id (the branch id). */
  timelineId: string;
  /** The LSN the compute must have WAL up to (the highest flush LSN of a safekeeper majority). */
  upTo: string;
  /** Safekeeper base URLs, the one with the most WAL first. */
  safekeepers: string[];
}

export interface WalRestoreResult {
  /** Files written into pg_wal. */
  restored: string[];
  /** Segments compared (and found equal or replaced). */
  checked: number;
  /**
   * Settings the next start needs (empty when none). A cleanly shut down cluster ignores WAL
   * after its shutdown checkpoint; to replay the safekeepers' WAL it must start in archive
   * recovery (`recovery.signal`, written here), which reads pg_wal and then promotes — onto a new
   * Postgres timeline, which the safekeepers follow like any timeline switch.
   */
  settings: Record<string, string>;
}

/** Archive recovery from pg_wal alone: no archive (`false` fails every fetch), to the end of WAL. */
const RECOVERY_FROM_PG_WAL = { restore_command: 'false', recovery_target_timeline: 'latest' };

const COMPARE_BYTES = 8192;

async function readLocal(path: string, start: number, end: number): Promise<Buffer | undefined> {
  let fh;
  try {
    fh = await open(path, 'r');
  } catch {
    return undefined;
  }
  try {
    const buf = Buffer.alloc(end - start);
    const { bytesRead } = await fh.read(buf, 0, buf.length, start);
    return bytesRead === buf.length ? buf : undefined;
  } finally {
    await fh.close();
  }
}

/** Writes `data` to a temporary name, fsyncs, hands it to `runAs` and renames it into place. */
export async function writeFileDurably(path: string, data: Buffer, runAs: RunAs | undefined): Promise<void> {
  const tmp = `${path}.xenon-tmp`;
  // Never through a link someone left at the temporary name (a compute VM's guest can write
  // into its data directory): remove it, then create exclusively.
  await rm(tmp, { force: true });
  const fh = await open(tmp, 'wx', 0o600);
  try {
    await fh.writeFile(data);
    await fh.datasync();
  } finally {
    await fh.close();
  }
  if (runAs) await chown(tmp, runAs.uid, runAs.gid);
  await rename(tmp, path);
}

export async function restoreWal(dataDir: string, src: WalSource, runAs: RunAs | undefined, logger: Logger): Promise<WalRestoreResult> {
  const out = await restore(dataDir, src, runAs, logger);
  // An archive recovery that was interrupted (killed, timed out) left recovery.signal behind:
  // Postgres refuses to start in archive recovery without a restore_command, so every start
  // after it needs the same settings until a recovery completes and removes the file.
  if (!Object.keys(out.settings).length && (await stat(join(dataDir, 'recovery.signal')).then(() => true, () => false))) {
    out.settings = { ...RECOVERY_FROM_PG_WAL };
    logger.warn('an interrupted archive recovery left recovery.signal: recovering from pg_wal again', { dataDir });
  }
  return out;
}

async function restore(dataDir: string, src: WalSource, runAs: RunAs | undefined, logger: Logger): Promise<WalRestoreResult> {
  const upTo = parseLsn(src.upTo);
  const out: WalRestoreResult = { restored: [], checked: 0, settings: {} };
  if (upTo === 0n) return out;
  const ctl = await readControlData(dataDir);
  // A checkpoint record at or past the quorum's end: the local WAL already has all of it.
  if (checkpointRecordEnd(ctl.checkpoint) >= upTo) return out;
  let listing: WalListing | undefined;
  let client: SafekeeperClient | undefined;
  for (const url of src.safekeepers) {
    const c = new SafekeeperClient(url, { timeoutMs: 30_000 });
    try {
      const l = await c.listWal(src.timelineId);
      if (parseLsn(l.flush_lsn) >= upTo) { listing = l; client = c; break; }
    } catch (err) {
      logger.warn('safekeeper did not list its WAL', { url, err });
    }
  }
  if (!listing || !client) throw new Error(`no safekeeper serves WAL of ${src.timelineId} up to ${src.upTo}`);
  const walDir = join(dataDir, 'pg_wal');
  for (const f of listing.files) {
    if (f.kind !== 'history') continue;
    const local = join(walDir, f.name);
    if (await stat(local).then(() => true, () => false)) continue;
    await writeFileDurably(local, await client.readWal(src.timelineId, f.name), runAs);
    out.restored.push(f.name);
  }
  const fromSeg = segmentOf(ctl.checkpoint);
  for (const f of listing.files) {
    const seg = f.kind === 'segment' ? parseSegmentFileName(f.name) : undefined;
    if (!seg || seg.tli < ctl.timeline || seg.segno < fromSeg || segmentStart(seg.segno) >= upTo) continue;
    const name = f.name.replace(/\.partial$/, '');
    const end = Number((upTo < segmentStart(seg.segno + 1n) ? upTo : segmentStart(seg.segno + 1n)) - segmentStart(seg.segno));
    const start = Math.max(0, end - COMPARE_BYTES);
    out.checked++;
    const [remote, local] = await Promise.all([
      client.readWal(src.timelineId, f.name, { start, end }),
      readLocal(join(walDir, name), start, end),
    ]);
    if (local && local.equals(remote)) continue;
    const whole = await client.readWal(src.timelineId, f.name);
    if (whole.length !== WAL_SEGMENT_SIZE) throw new Error(`safekeeper sent ${whole.length} bytes for segment ${f.name}`);
    await writeFileDurably(join(walDir, name), whole, runAs);
    out.restored.push(name);
    logger.warn('restored a WAL segment from a safekeeper', { segment: name, upTo: formatLsn(upTo), had: local ? 'different bytes' : 'nothing' });
  }
  if (out.restored.length) {
    const dir = await open(walDir, 'r');
    try { await dir.sync(); } finally { await dir.close(); }
  }
  if (ctl.state === 'shut down' || ctl.state === 'shut down in recovery') {
    // The WAL after the shutdown checkpoint must be replayed. On the same Postgres timeline,
    // crash recovery does it (pg_control marked as not shut down): no promotion, no new
    // timeline, and no fork point before the quorum's end when that end lies inside a record.
    // A timeline switch after the checkpoint needs archive recovery, which follows histories.
    const tliOf = (f: WalListing['files'][number]): number => f.pg_timeline ?? parseInt(f.name.slice(0, 8), 16);
    const switched = listing.files.some((f) => tliOf(f) > ctl.timeline);
    if (!switched) {
      await markNotShutDown(dataDir);
      logger.warn('the data directory was shut down before the safekeepers\' end of WAL: crash recovery replays pg_wal on the same timeline', { checkpoint: formatLsn(ctl.checkpoint), upTo: src.upTo });
    } else {
      await writeFileDurably(join(dataDir, 'recovery.signal'), Buffer.alloc(0), runAs);
      out.settings = { ...RECOVERY_FROM_PG_WAL };
      logger.warn('the data directory was shut down before the safekeepers\' end of WAL, which switches timelines: archive recovery from pg_wal, then promotion', { checkpoint: formatLsn(ctl.checkpoint), upTo: src.upTo });
    }
  }
  return out;
}
