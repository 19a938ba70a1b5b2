/**
 * LSN by time (api.ts `CreateTimelineRequest.ancestor_start_time`, `GET /v1/lsn_by_time`): the LSN
 * where a branch "as of time T" starts = the start LSN of the first commit record (`Transaction`
 * rmgr `COMMIT` / `COMMIT_PREPARED`; aborts are not commits) whose commit timestamp is after T, so
 * that the branch holds every transaction committed at or before T; no such commit: the tip.
 *
 * The timeline's `lsn_samples` (`[time, tip]`, taken by the ingest) narrow where the scan starts:
 * at the tip of the newest sample taken at or before T — every commit before it happened before
 * the sample — or at the timeline's first WAL. From there `pg_waldump --rmgr=Transaction` reads the
 * WAL in chunks of segments (fetched through `fetchSegment`) until it finds the commit or the tip.
 * Postgres timeline switches are followed by giving pg_waldump, for each segment number, the file
 * of the newest Postgres timeline that began at or before that segment (as recovery picks them).
 */
import { spawn } from 'node:child_process';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { XenonError } from '../lib/errors.ts';
import { formatLsn, parseLsn, prevSegmentOf, segmentFileName, segmentOf, segmentStart } from '../lib/lsn.ts';
import type { TimelineIndex } from './api.ts';
import type { Timelines } from './types.ts';

export interface LsnByTimeOptions {
  timelines: Timelines;
  tenantId: string;
  timelineId: string;
  time: Date;
  /** Directory of `pg_waldump`. */
  pgBin: string;
  /** Scratch space; the segments of one chunk at a time are kept in a subdirectory, removed afterwards. */
  tmpDir: string;
  /** The bytes of a WAL segment of this timeline by name (the caller resolves store / safekeepers). */
  fetchSegment: (name: string) => Promise<Buffer>;
  /**
   * The timeline's tip as the safekeepers' quorum has it (the resolver's `tip()`): the index's
   * `last_record_lsn` is only as new as the last ingest, and a time after it would otherwise
   * answer that stale LSN — before commits that were made before the time.
   */
  tip?: bigint;
  /** Segments per pg_waldump run (default 8; tests use fewer). */
  chunkSegments?: number;
}

/** Segments per pg_waldump run by default (consecutive runs overlap by one segment). */
const CHUNK_SEGMENTS = 8;

/** One commit record as pg_waldump prints it. */
export interface CommitRecord {
  lsn: bigint;
  /** Commit time in microseconds since the Unix epoch. */
  timeUs: bigint;
}

const COMMIT_RE = /\blsn: ([0-9A-Fa-f]{1,8}\/[0-9A-Fa-f]{1,8}),.*\bdesc: (COMMIT|COMMIT_PREPARED) (?:\d+: )?(\d{4})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))? (\S+?);?(?:\s|$)/;

/**
 * Commit records of `pg_waldump --rmgr=Transaction` output. pg_waldump prints commit times in the
 * time zone of its process (`timestamptz_to_str` → `localtime`, `%Z`); we run it with `TZ=UTC`
 * and refuse any other zone rather than guess an offset.
 */
export function parseCommitRecords(output: string): CommitRecord[] {
  const out: CommitRecord[] = [];
  for (const line of output.split('\n')) {
    if (!line.startsWith('rmgr: Transaction')) continue;
    const m = COMMIT_RE.exec(line);
    if (!m) continue;
    if (m[10] !== 'UTC') throw new XenonError('INTERNAL', `pg_waldump printed a commit time in zone ${m[10]} (expected UTC): ${line.slice(0, 200)}`);
    const ms = Date.UTC(Number(m[3]), Number(m[4]) - 1, Number(m[5]), Number(m[6]), Number(m[7]), Number(m[8]));
    const micros = BigInt((m[9] ?? '0').padEnd(6, '0'));
    out.push({ lsn: parseLsn(m[1]!), timeUs: BigInt(ms) * 1000n + micros });
  }
  return out;
}

/** Messages pg_waldump ends with when it runs out of (valid) WAL: the normal end of a scan. */
const USAGE_ERROR = /Try "pg_waldump --help"|could not open directory|could not locate WAL file|could not read file "[^"]*": No such file/;

function waldump(pgBin: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(join(pgBin, 'pg_waldump'), args, { stdio: ['ignore', 'pipe', 'pipe'], env: { PATH: process.env.PATH, LANG: 'C', LC_ALL: 'C', TZ: 'UTC' } });
    const out: Buffer[] = [];
    let err = '';
    child.stdout.on('data', (d: Buffer) => out.push(d));
    child.stderr.on('data', (d: Buffer) => (err = (err + d.toString()).slice(-4000)));
    child.on('error', (e) => reject(new XenonError('INTERNAL', `spawn pg_waldump: ${e.message}`, { cause: e })));
    child.on('exit', (code, sig) => {
      // A non-zero exit at the end of the available WAL is normal; a usage error is not.
      if (sig !== null || (code !== 0 && USAGE_ERROR.test(err))) {
        reject(new XenonError('INTERNAL', `pg_waldump ${args.join(' ')} failed (${code ?? sig}): ${err.trim().slice(-1000)}`));
        return;
      }
      resolve(Buffer.concat(out).toString('utf8'));
    });
  });
}

/** Postgres timeline pieces of the timeline's WAL, oldest first (derived from its segments when pg_history is empty). */
function piecesOf(ix: TimelineIndex): { tli: number; begin: bigint }[] {
  if (ix.pg_history.length > 0) return ix.pg_history.map((p) => ({ tli: p.pg_timeline, begin: parseLsn(p.begin_lsn) }));
  const segs = ix.wal.filter((w) => w.kind === 'segment' && w.start_lsn !== undefined);
  if (segs.length === 0) return [];
  const first = segs.reduce((a, b) => (parseLsn(b.start_lsn!) < parseLsn(a.start_lsn!) ? b : a));
  return [{ tli: first.pg_timeline, begin: parseLsn(first.start_lsn!) }];
}

/** The file recovery would read for `segno`: the newest timeline that began at or before that segment. */
function segmentName(pieces: { tli: number; begin: bigint }[], segno: bigint): string {
  let tli = pieces[0]?.tli ?? 1;
  for (const p of pieces) if (segmentOf(p.begin) <= segno) tli = p.tli;
  return segmentFileName(tli, segno);
}

/**
 * The LSN a branch of the timeline as of `time` starts at (see the file comment). Throws 409
 * `PS_LSN_BEFORE_GC_CUTOFF` for a time before the timeline existed (its `created_at`) or before
 * what GC kept; a time in the future gives the tip.
 */
export async function lsnByTime(o: LsnByTimeOptions): Promise<bigint> {
  const ix = await o.timelines.read(o.tenantId, o.timelineId);
  const last = parseLsn(ix.last_record_lsn);
  const tip = o.tip !== undefined && o.tip > last ? o.tip : last;
  const tMs = o.time.getTime();
  if (!Number.isFinite(tMs)) throw new XenonError('CP_BAD_REQUEST', 'not a time', { userMessage: 'time must be an ISO 8601 timestamp' });
  const tUs = BigInt(tMs) * 1000n;
  const before = (): XenonError =>
    new XenonError('PS_LSN_BEFORE_GC_CUTOFF', `${o.time.toISOString()} is before the WAL ${o.tenantId}/${o.timelineId} holds`);
  if (tMs < Date.parse(ix.created_at)) throw before();

  const samples = ix.lsn_samples
    .map(([at, lsn]) => ({ ms: Date.parse(at), lsn: parseLsn(lsn) }))
    .filter((s) => Number.isFinite(s.ms))
    .sort((a, b) => a.ms - b.ms);
  const gcCutoff = parseLsn(ix.gc_cutoff_lsn);
  // When the tip was last at or below the GC cutoff: anything before is gone.
  const cutoffSample = [...samples].reverse().find((s) => s.lsn <= gcCutoff);
  if (gcCutoff > 0n && cutoffSample && tMs < cutoffSample.ms) throw before();

  const pieces = piecesOf(ix);
  if (pieces.length === 0) return tip; // no WAL of its own yet: nothing committed since the start
  const low = [...samples].reverse().find((s) => s.ms <= tMs);
  let from = low?.lsn ?? pieces[0]!.begin;
  if (from < pieces[0]!.begin) from = pieces[0]!.begin;
  if (from < gcCutoff) from = gcCutoff;
  if (from >= tip) return tip;

  // Where the answer most likely is: before the tip of the first sample taken after T.
  let hint = samples.find((s) => s.ms > tMs)?.lsn;
  await mkdir(o.tmpDir, { recursive: true });
  const dir = await mkdtemp(join(o.tmpDir, 'lsn-by-time-'));
  try {
    const have = new Set<bigint>();
    let start = from;
    const chunk = BigInt(Math.max(2, o.chunkSegments ?? CHUNK_SEGMENTS));
    for (;;) {
      const firstSeg = segmentOf(start);
      const stop = hint !== undefined && hint > start && hint < tip ? hint : tip;
      const lastSeg = firstSeg + chunk - 1n < prevSegmentOf(stop) ? firstSeg + chunk - 1n : prevSegmentOf(stop);
      const end = segmentStart(lastSeg + 1n) < stop ? segmentStart(lastSeg + 1n) : stop;
      hint = undefined;
      for (const segno of [...have]) {
        if (segno < firstSeg) {
          await rm(join(dir, segmentFileName(1, segno)), { force: true });
          have.delete(segno);
        }
      }
      for (let segno = firstSeg; segno <= lastSeg; segno++) {
        if (have.has(segno)) continue;
        // Every file under TLI 1's name: pg_waldump reads one timeline, and the page headers carry the real TLIs.
        await writeFile(join(dir, segmentFileName(1, segno)), await o.fetchSegment(segmentName(pieces, segno)));
        have.add(segno);
      }
      const output = await waldump(o.pgBin, [`--path=${dir}`, `--start=${formatLsn(start)}`, `--end=${formatLsn(end)}`, '--timeline=1', '--rmgr=Transaction']);
      const hit = parseCommitRecords(output).find((c) => c.lsn >= from && c.timeUs > tUs);
      if (hit) return hit.lsn;
      if (end >= tip) return tip;
      // Next chunk from the start of this one's last segment (or from `start` again): a record
      // crossing `end` began there, and pg_waldump only prints records that end before `end`.
      // Without the hint the next chunk reaches at least one segment further: progress.
      if (segmentStart(lastSeg) > start) start = segmentStart(lastSeg);
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}
