/**
 * The control file of one timeline (`control.json`): what this safekeeper promised — the compute
 * generation it follows, the cluster it belongs to, the Postgres timeline and how far its WAL is
 * durable. Written atomically (temporary file, fsync, rename, fsync of the directory) with mode
 * 0600, since it holds the compute's password.
 */
import { open, readFile, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { XenonError } from '../lib/errors.ts';
import { formatLsn, parseLsn } from '../lib/lsn.ts';
import type { ComputeTarget } from './api.ts';

export const CONTROL_FILE = 'control.json';
const FORMAT_VERSION = 1;

/** One Postgres timeline switch: `tli` ended at `switchLsn` (its successor began there). */
export interface TimelineSwitch {
  tli: number;
  switchLsn: bigint;
}

/** One generation history entry: the compute of `generation` started from the WAL up to `startLsn`. */
export interface GenerationStart {
  generation: number;
  startLsn: bigint;
}

export interface ControlState {
  timelineId: string;
  generation: number;
  /** The compute to follow; null when not following (DELETE …/compute). */
  compute: ComputeTarget | null;
  /** Decimal text (a uint64). */
  systemId: string | null;
  pgTimeline: number;
  /** Durable WAL end on `pgTimeline` at the time of writing (never beyond what was fdatasync'ed). */
  flushLsn: bigint;
  /** Earlier Postgres timelines and where they ended, oldest first. */
  history: TimelineSwitch[];
  /**
   * Base URLs of the other safekeepers of this timeline (from the last follow request that named
   * them), asked for WAL the compute no longer has. Optional: older control files have none.
   */
  peers?: string[];
  /**
   * A generation change's WAL cut not yet known to be durable: written together with the new
   * generation, redone at load before anything else, cleared once the cut is synced.
   */
  pendingTruncateLsn?: bigint;
  /**
   * The stored generation came from an unfollow (`DELETE …/compute?generation=N`) only: a later
   * follow of that same generation still performs the generation change (the truncation).
   */
  unfollowedOnly?: boolean;
  /**
   * The follow request's `start_lsn` (everything before it is on a quorum), remembered until the
   * first connection decides where this safekeeper's WAL starts (`pgTimeline` 0).
   */
  joinStartLsn?: bigint;
  /**
   * The generation history of the WAL held here (Raft's term history), oldest first: which
   * computes' WAL it is, each from which LSN. Optional: older control files have none (read as
   * empty: nothing is known about which generation wrote the WAL).
   */
  generationHistory?: GenerationStart[];
}

interface ControlJson {
  version: number;
  timeline_id: string;
  generation: number;
  compute: ComputeTarget | null;
  system_id: string | null;
  pg_timeline: number;
  flush_lsn: string;
  history: { tli: number; switch_lsn: string }[];
  peers?: string[];
  pending_truncate_lsn?: string;
  unfollowed_only?: boolean;
  join_start_lsn?: string;
  /** `history` is taken by the Postgres timeline switches. */
  generation_history?: { generation: number; start_lsn: string }[];
}

export function serializeControl(s: ControlState): string {
  const j: ControlJson = {
    version: FORMAT_VERSION,
    timeline_id: s.timelineId,
    generation: s.generation,
    compute: s.compute,
    system_id: s.systemId,
    pg_timeline: s.pgTimeline,
    flush_lsn: formatLsn(s.flushLsn),
    history: s.history.map((h) => ({ tli: h.tli, switch_lsn: formatLsn(h.switchLsn) })),
  };
  if (s.peers !== undefined) j.peers = s.peers;
  if (s.pendingTruncateLsn !== undefined) j.pending_truncate_lsn = formatLsn(s.pendingTruncateLsn);
  if (s.unfollowedOnly) j.unfollowed_only = true;
  if (s.joinStartLsn !== undefined) j.join_start_lsn = formatLsn(s.joinStartLsn);
  if (s.generationHistory !== undefined) j.generation_history = s.generationHistory.map((e) => ({ generation: e.generation, start_lsn: formatLsn(e.startLsn) }));
  return JSON.stringify(j, null, 2) + '\n';
}

function corrupt(path: string, why: string): XenonError {
  return new XenonError('SK_CONTROL_FILE_CORRUPT', `control file ${path} is corrupted: ${why}`);
}

const isInt = (v: unknown, min: number, max: number): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v >= min && v <= max;

/** Parses and validates a control file; throws SK_CONTROL_FILE_CORRUPT with the reason. */
export function parseControl(text: string, path: string): ControlState {
  let j: Partial<ControlJson>;
  try {
    j = JSON.parse(text) as Partial<ControlJson>;
  } catch (err) {
    throw corrupt(path, `not JSON (${(err as Error).message})`);
  }
  if (typeof j !== 'object' || j === null) throw corrupt(path, 'not an object');
  if (j.version !== FORMAT_VERSION) throw corrupt(path, `unknown format version ${JSON.stringify(j.version)}`);
  if (typeof j.timeline_id !== 'string') throw corrupt(path, 'timeline_id missing');
  if (!isInt(j.generation, 0, Number.MAX_SAFE_INTEGER)) throw corrupt(path, 'generation invalid');
  if (!isInt(j.pg_timeline, 0, 0xffff_ffff)) throw corrupt(path, 'pg_timeline invalid');
  if (j.system_id !== null && (typeof j.system_id !== 'string' || !/^\d{1,20}$/.test(j.system_id))) throw corrupt(path, 'system_id invalid');
  const c = j.compute;
  if (c !== null && (typeof c !== 'object' || c === undefined || typeof c.host !== 'string' || !isInt(c.port, 1, 65535) || typeof c.user !== 'string' || typeof c.password !== 'string')) {
    throw corrupt(path, 'compute invalid');
  }
  if (j.peers !== undefined && (!Array.isArray(j.peers) || j.peers.length > 64 || !j.peers.every((u) => typeof u === 'string' && u.length <= 2048))) {
    throw corrupt(path, 'peers invalid');
  }
  if (j.unfollowed_only !== undefined && typeof j.unfollowed_only !== 'boolean') throw corrupt(path, 'unfollowed_only invalid');
  let flushLsn: bigint;
  let history: TimelineSwitch[];
  let pendingTruncateLsn: bigint | undefined;
  let joinStartLsn: bigint | undefined;
  let generationHistory: GenerationStart[] | undefined;
  try {
    flushLsn = parseLsn(String(j.flush_lsn));
    if (j.pending_truncate_lsn !== undefined) pendingTruncateLsn = parseLsn(String(j.pending_truncate_lsn));
    if (j.join_start_lsn !== undefined) joinStartLsn = parseLsn(String(j.join_start_lsn));
    if (!Array.isArray(j.history)) throw new Error('history is not an array');
    history = j.history.map((h) => {
      if (!isInt(h.tli, 1, 0xffff_ffff)) throw new Error('history tli invalid');
      return { tli: h.tli, switchLsn: parseLsn(String(h.switch_lsn)) };
    });
    if (j.generation_history !== undefined) {
      if (!Array.isArray(j.generation_history)) throw new Error('generation_history is not an array');
      generationHistory = j.generation_history.map((e) => {
        if (typeof e !== 'object' || e === null || !isInt(e.generation, 0, Number.MAX_SAFE_INTEGER)) throw new Error('generation_history generation invalid');
        return { generation: e.generation, startLsn: parseLsn(String(e.start_lsn)) };
      });
      if (!isOrderedHistory(generationHistory)) throw new Error('generation_history is not ordered');
    }
  } catch (err) {
    throw corrupt(path, (err as Error).message);
  }
  return {
    timelineId: j.timeline_id,
    generation: j.generation,
    compute: c ? { host: c.host, port: c.port, user: c.user, password: c.password } : null,
    systemId: j.system_id ?? null,
    pgTimeline: j.pg_timeline,
    flushLsn,
    history,
    ...(j.peers !== undefined ? { peers: [...j.peers] } : {}),
    ...(pendingTruncateLsn !== undefined ? { pendingTruncateLsn } : {}),
    ...(j.unfollowed_only ? { unfollowedOnly: true } : {}),
    ...(joinStartLsn !== undefined ? { joinStartLsn } : {}),
    ...(generationHistory !== undefined ? { generationHistory } : {}),
  };
}

/** Generations strictly increasing, start LSNs non-decreasing. */
export function isOrderedHistory(h: readonly GenerationStart[]): boolean {
  for (let i = 1; i < h.length; i++) {
    if (h[i]!.generation <= h[i - 1]!.generation || h[i]!.startLsn < h[i - 1]!.startLsn) return false;
  }
  return true;
}

/**
 * Up to which LSN WAL held under history `own` is also WAL of history `theirs` (Raft's log
 * matching). Every history holding an entry `(g, start)` got it from the same follow request,
 * so histories that share their newest common entry share everything before it (even when one
 * was cut short at the front, see MAX_GENERATION_HISTORY). After that entry — generation g,
 * whose WAL both hold — the next entry of either history starts WAL the other does not have: a
 * newer generation that started from g's WAL there, or (in `own`) a generation that lost.
 * Returns null when nothing of `own` is invalid (`theirs` continues no earlier than `own`
 * ends). Without any common entry the first entries' start LSNs bound it (WAL before them
 * predates both histories; with an empty `own` — an older control file — this is the old rule:
 * valid up to where the new compute started).
 */
export function divergenceLsn(own: readonly GenerationStart[], theirs: readonly GenerationStart[]): bigint | null {
  const inTheirs = new Map(theirs.map((e, i) => [e.generation, i]));
  let i = own.length - 1;
  let j = -1;
  for (; i >= 0; i--) {
    const k = inTheirs.get(own[i]!.generation);
    if (k !== undefined && theirs[k]!.startLsn === own[i]!.startLsn) { j = k; break; }
  }
  const a = own[i + 1]?.startLsn;
  const b = theirs[j + 1]?.startLsn;
  if (a === undefined) return b ?? null;
  if (b === undefined) return a;
  return a < b ? a : b;
}

/** The generation whose WAL ends at `flushLsn`: of the last entry starting at or below it (0: none). */
export function lastGeneration(h: readonly GenerationStart[], flushLsn: bigint): number {
  let g = 0;
  for (const e of h) {
    if (e.startLsn > flushLsn) break;
    g = e.generation;
  }
  return g;
}

/** The entries starting at or below `lsn` (the history of the WAL up to there). */
export function historyUpTo(h: readonly GenerationStart[], lsn: bigint): GenerationStart[] {
  const out: GenerationStart[] = [];
  for (const e of h) {
    if (e.startLsn > lsn) break;
    out.push(e);
  }
  return out;
}

export async function readControl(dir: string): Promise<ControlState> {
  const path = join(dir, CONTROL_FILE);
  return parseControl(await readFile(path, 'utf8'), path);
}

/** fsync a directory (after a rename or a create in it). */
export async function fsyncDir(dir: string): Promise<void> {
  const fh = await open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** Atomic replace: tmp (0600), fsync, rename, fsync of the directory. */
export async function writeControl(dir: string, s: ControlState): Promise<void> {
  const path = join(dir, CONTROL_FILE);
  const tmp = `${path}.tmp`;
  const fh = await open(tmp, 'w', 0o600);
  try {
    await fh.writeFile(serializeControl(s));
    await fh.sync();
  } catch (err) {
    await fh.close().catch(() => {});
    await rm(tmp, { force: true });
    throw err;
  } finally {
    await fh.close().catch(() => {});
  }
  await rename(tmp, path);
  await fsyncDir(dir);
}
