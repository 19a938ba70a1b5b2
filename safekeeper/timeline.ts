/**
 * One timeline on a safekeeper: its control file, its segment store, and the replication stream
 * from the compute of the current generation.
 *
 * Receive path: CopyData `w` messages are copied into a pending list; one flush per event-loop
 * turn (group commit) writes everything pending, fdatasyncs once, advances the flush LSN and sends
 * a standby status update. A keepalive that asks for a reply is answered at once with what is
 * written/flushed now. The flush LSN only ever names bytes that were fdatasync'ed.
 */
import { mkdir, rm } from 'node:fs/promises';
import { basename, join } from 'node:path';
import pg from 'pg';
import { XenonError } from '../lib/errors.ts';
import type { Logger } from '../lib/logger.ts';
import { formatLsn, historyFileName, parseLsn, segmentFileName, segmentOf, segmentStart, WAL_SEGMENT_SIZE } from '../lib/lsn.ts';
import { MAX_GENERATION_HISTORY, type ComputeTarget, type FollowRequest, type TimelineStatus, type WalFile, type WalListing } from './api.ts';
import { SafekeeperClient } from './client.ts';
import { divergenceLsn, historyUpTo, lastGeneration, readControl, writeControl, type ControlState, type GenerationStart } from './control.ts';
import type { SafekeeperMetrics } from './metrics.ts';
import { parseReplicationMessage, standbyStatusUpdateFrame } from './protocol.ts';
import { SegmentStore, type StoreHooks, type SyncMethod } from './store.ts';

const SEG = BigInt(WAL_SEGMENT_SIZE);
/** Above this many bytes received but not yet flushed, stop reading from the compute. */
const MAX_PENDING_BYTES = 32 * 1024 * 1024;
/** Status update at least this often while streaming (pg_receivewal's default is 10 s). */
const STATUS_INTERVAL_MS = 10_000;
/** Silence from the compute for this long (no data, no keepalive) ends the connection. */
const RECEIVE_TIMEOUT_MS = 60_000;
const BACKOFF_START_MS = 100;
const BACKOFF_MAX_MS = 1_000;

/** Returns values as the server sent them (replication command results are text). */
const RAW_TYPES = { getTypeParser: () => (v: string) => v };

export interface TimelineDeps {
  safekeeperId: string;
  logger: Logger;
  metrics: SafekeeperMetrics;
  /** Test hooks for the store (e.g. an injected write error). */
  storeHooks?: Pick<StoreHooks, 'beforeWrite' | 'writeMsPerMiB'>;
  /** See {@link SegmentCompleteEvent}. */
  onSegmentComplete?(e: SegmentCompleteEvent): void;
  syncMethod?: SyncMethod;
}

/**
 * A WAL segment became complete on this safekeeper (fdatasync'ed, final name, directory synced).
 * The hook for offloading segments to the object store (the pageserver issue): note that complete
 * here means complete on *this* safekeeper; whether a quorum holds it is for the uploader to check.
 */
export interface SegmentCompleteEvent {
  timelineId: string;
  pgTimeline: number;
  segno: bigint;
  fileName: string;
  path: string;
}

interface Pending {
  tli: number;
  start: bigint;
  buf: Buffer;
}

/** One connection attempt's state. */
interface Session {
  client: pg.Client | null;
  stopped: boolean;
  /** Resolves when the session is stopped (to abandon waits such as a connect). */
  stopSignal: Promise<void>;
  stop(): void;
  fail(err: Error): void;
}

function newSession(): Session {
  let signal!: () => void;
  const stopSignal = new Promise<void>((r) => (signal = r));
  const session: Session = {
    client: null,
    stopped: false,
    stopSignal,
    stop() {
      session.stopped = true;
      signal();
    },
    fail: () => {},
  };
  return session;
}

class StreamError extends Error {
  override name = 'StreamError';
}

/** The compute no longer has the WAL at our flush LSN (or our slot was invalidated): ask peers. */
class WalGoneError extends StreamError {
  override name = 'WalGoneError';
}

/** WAL fetched from a peer per HTTP request. */
const PEER_CHUNK = 4 * 1024 * 1024;
const PEER_TIMEOUT_MS = 10_000;
const XLOG_BLCKSZ = 8192;
const XLP_HEADER_MIN = 16;

/** Whether a START_REPLICATION error means the compute cannot give us the WAL we need. */
function walGoneReason(err: unknown): 'removed' | 'slot' | null {
  const code = (err as { code?: string }).code;
  const msg = (err as Error).message ?? '';
  if (code === '58P01' || /has already been removed/.test(msg)) return 'removed';
  if (code === '55000' && /invalidated|can no longer get changes/.test(msg)) return 'slot';
  return null;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export class Timeline {
  readonly walDir: string;
  readonly store: SegmentStore;
  private state: ControlState | null;
  /** Why the timeline cannot be used (a corrupted control file). */
  readonly broken: XenonError | null;
  /** Everything below is fdatasync'ed. */
  private flushLsn = 0n;
  /** Everything below is written (maybe not synced). */
  private writeLsn = 0n;
  /** End of what the current session has received (the next XLogData must start here). */
  private receivedEnd = 0n;
  private computeLsn: bigint | null = null;
  private streamingNow = false;
  private lastError: string | null = null;
  private pending: Pending[] = [];
  private pendingBytes = 0;
  private pendingMessages = 0;
  private flushing: Promise<void> | null = null;
  private session: Session | null = null;
  private follower: Promise<void> | null = null;
  private persisting: Promise<void> = Promise.resolve();
  private persistAgain = false;
  private persistRunning = false;
  private opChain: Promise<unknown> = Promise.resolve();
  /** A generation change (fence persisted, WAL being cut) in progress. */
  private changing: Promise<void> | null = null;
  private readonly log: Logger;
  private closed = false;

  private constructor(
    readonly id: string,
    readonly dir: string,
    state: ControlState | null,
    broken: XenonError | null,
    private readonly deps: TimelineDeps,
  ) {
    this.state = state;
    this.broken = broken;
    this.walDir = join(dir, 'wal');
    this.log = deps.logger.child({ timelineId: id });
    const m = deps.metrics;
    this.store = new SegmentStore(this.walDir, {
      onSync: (s) => m.fsyncSeconds.observe(s),
      onBytes: (n) => m.bytesWritten.inc({ timeline_id: id }, n),
      beforeWrite: deps.storeHooks?.beforeWrite,
      writeMsPerMiB: deps.storeHooks?.writeMsPerMiB,
      onComplete: (e) => {
        try {
          deps.onSegmentComplete?.({ timelineId: id, pgTimeline: e.tli, segno: e.segno, fileName: basename(e.path), path: e.path });
        } catch (err) {
          this.log.error('segment-complete hook failed', { err: err as Error });
        }
      },
    }, deps.syncMethod);
    if (broken) this.lastError = broken.message;
  }

  /** Loads a timeline directory; a corrupted control file gives a "broken" timeline (never written). */
  static async load(id: string, dir: string, deps: TimelineDeps): Promise<Timeline> {
    let state: ControlState;
    try {
      state = await readControl(dir);
    } catch (err) {
      const xe = err instanceof XenonError ? err : new XenonError('SK_CONTROL_FILE_CORRUPT', `control file of ${id} unreadable: ${(err as Error).message}`);
      deps.logger.error('timeline control file unusable; not following', { timelineId: id, err: xe });
      return new Timeline(id, dir, null, xe, deps);
    }
    const tl = new Timeline(id, dir, state, null, deps);
    let from = state.flushLsn;
    let rewrite = false;
    if (state.pendingTruncateLsn !== undefined) {
      // A generation change crashed before its WAL cut was durable: redo the cut before anything
      // else (the files may hold WAL past start_lsn, or a later segment after a gap).
      const lsn = state.pendingTruncateLsn;
      try {
        await tl.cutFiles(lsn);
      } catch (err) {
        const xe = new XenonError('SK_UNAVAILABLE', `timeline ${id}: redoing the interrupted truncation to ${formatLsn(lsn)} failed: ${(err as Error).message}`, { cause: err });
        deps.logger.error('timeline truncation could not be redone; not following', { timelineId: id, err: xe });
        return new Timeline(id, dir, null, xe, deps);
      }
      tl.log.warn('redid an interrupted truncation', { to: formatLsn(lsn) });
      delete state.pendingTruncateLsn;
      if (lsn < from) from = lsn;
      rewrite = true;
    }
    if (state.pgTimeline > 0) {
      let end: bigint;
      try {
        end = await tl.store.recoverEnd(state.pgTimeline, from);
      } catch (err) {
        const xe = new XenonError('SK_UNAVAILABLE', `timeline ${id}: reading its WAL files failed: ${(err as Error).message}`, { cause: err });
        deps.logger.error('timeline WAL files unreadable; not following', { timelineId: id, err: xe });
        return new Timeline(id, dir, null, xe, deps);
      }
      if (end !== state.flushLsn) tl.log.info('flush position recovered from the WAL files', { control: formatLsn(state.flushLsn), files: formatLsn(end) });
      tl.flushLsn = tl.writeLsn = end;
      if (end !== state.flushLsn) rewrite = true;
    }
    if (rewrite) await tl.persist();
    return tl;
  }

  /**
   * A new timeline: from a follow request (its generation history adopted), or from a fence
   * (`compute` null: no history yet, and the later follow of that generation is a generation change).
   */
  static async create(id: string, dir: string, req: { generation: number; compute: ComputeTarget | null; peers?: string[]; startLsn?: bigint; generationHistory?: GenerationStart[] }, deps: TimelineDeps): Promise<Timeline> {
    await mkdir(join(dir, 'wal'), { recursive: true, mode: 0o700 });
    const state: ControlState = {
      timelineId: id, generation: req.generation, compute: req.compute, systemId: null, pgTimeline: 0, flushLsn: 0n, history: [],
      ...(req.peers ? { peers: req.peers } : {}),
      ...(req.startLsn !== undefined && req.startLsn > 0n ? { joinStartLsn: req.startLsn } : {}),
      generationHistory: req.compute === null ? [] : req.generationHistory ?? [{ generation: req.generation, startLsn: req.startLsn ?? 0n }],
      ...(req.compute === null ? { unfollowedOnly: true } : {}),
    };
    await writeControl(dir, state);
    return new Timeline(id, dir, state, null, deps);
  }

  // ---------------------------------------------------------------- control operations

  /** Serialises follow/unfollow/delete/close. */
  private op<T>(fn: () => Promise<T>): Promise<T> {
    const p = this.opChain.then(fn, fn);
    this.opChain = p.catch(() => {});
    return p;
  }

  private requireState(): ControlState {
    if (!this.state) throw this.broken ?? new XenonError('SK_CONTROL_FILE_CORRUPT');
    return this.state;
  }

  /** Starts following the stored compute (after load). */
  resume(): void {
    if (this.state?.compute && !this.follower && !this.closed) this.startFollower();
  }

  follow(req: FollowRequest & { startLsn?: bigint; generationHistory?: GenerationStart[] }): Promise<TimelineStatus> {
    return this.op(async () => {
      const s = this.requireState();
      if (req.generation < s.generation) {
        throw new XenonError('SK_GENERATION_FENCED', `generation ${req.generation} < stored ${s.generation} for ${this.id}`, {
          userMessage: `generation ${req.generation} is fenced: this timeline already follows generation ${s.generation}`,
        });
      }
      if (s.pgTimeline === 0 && req.startLsn !== undefined && req.startLsn > 0n && s.joinStartLsn !== req.startLsn) {
        s.joinStartLsn = req.startLsn; // persisted below or with the generation change
        if (req.generation === s.generation && !s.unfollowedOnly) await this.persist();
      }
      if (req.generation === s.generation && !s.unfollowedOnly) {
        const same = s.compute && sameTarget(s.compute, req.compute);
        const peersChanged = req.peers !== undefined && !samePeers(s.peers, req.peers);
        if (peersChanged) s.peers = req.peers;
        if (!same) {
          s.compute = req.compute;
          await this.persist();
          await this.stopFollower();
        } else if (peersChanged) {
          await this.persist();
        }
        if (!this.follower) this.startFollower();
        return this.status();
      }
      // A newer generation: persist the fence first, then cut divergent WAL, then follow.
      this.log.info('new compute generation', { from: s.generation, to: req.generation, startLsn: req.startLsn === undefined ? undefined : formatLsn(req.startLsn) });
      // Until the cut is done, status and WAL reads wait: a peer recovering from us must never see
      // the new generation together with WAL past start_lsn, nor read WAL that is being cut.
      const change = (async () => {
        // Stop the old stream first so that the flush LSN no longer moves, then persist the fence
        // together with the cut still to do (redone at load if we crash before it is durable).
        await this.stopFollower();
        this.computeLsn = null;
        s.generation = req.generation;
        s.compute = req.compute;
        delete s.unfollowedOnly;
        if (req.peers !== undefined) s.peers = req.peers;
        // The WAL held here is valid up to where its generation history and the new compute's
        // diverge; past that it is the tail of a generation that lost (never acknowledged).
        // Without a history in the request: the new compute's WAL agrees with ours up to start_lsn.
        const own = s.generationHistory ?? [];
        const start = req.startLsn ?? this.flushLsn;
        const theirs = req.generationHistory ?? [...historyUpTo(own, start), { generation: req.generation, startLsn: start }];
        const valid = divergenceLsn(own, theirs);
        const cut = valid !== null && valid < this.flushLsn ? valid : undefined;
        if (cut !== undefined) s.pendingTruncateLsn = cut;
        if (cut !== undefined && req.startLsn !== undefined && cut < req.startLsn) {
          this.log.warn('WAL diverged from the new compute\'s generation history before its start LSN', { at: formatLsn(cut), startLsn: formatLsn(req.startLsn), own: fmtHistory(own), theirs: fmtHistory(theirs) });
        }
        // The history is adopted in the same control-file write as the fence and the pending cut.
        s.generationHistory = theirs.slice(-MAX_GENERATION_HISTORY);
        await this.persist();
        if (cut !== undefined) await this.truncateTo(cut);
      })();
      this.changing = change;
      try {
        await change;
      } finally {
        if (this.changing === change) this.changing = null;
      }
      this.startFollower();
      return this.status();
    });
  }

  /**
   * `POST …/fence`: from now on no compute older than `generation` is followed. A higher one is
   * stored (marked like an unfollow: the follow of that generation is still a generation change)
   * after the old stream was stopped and its last batch synced, so the status answered carries
   * the final flush LSN of the older generations here. Equal: nothing changes. Lower: 409.
   */
  fence(generation: number): Promise<TimelineStatus> {
    return this.op(async () => {
      const s = this.requireState();
      if (generation < s.generation) {
        throw new XenonError('SK_GENERATION_FENCED', `fence generation ${generation} < stored ${s.generation}`, {
          userMessage: `generation ${generation} is fenced: this timeline already follows generation ${s.generation}`,
        });
      }
      if (generation > s.generation) {
        this.log.info('fenced by a new compute generation', { from: s.generation, to: generation, flushLsn: formatLsn(this.flushLsn) });
        await this.stopFollower();
        this.computeLsn = null;
        s.generation = generation;
        s.compute = null;
        s.unfollowedOnly = true;
        await this.persist();
      }
      return this.status();
    });
  }

  unfollow(generation: number): Promise<TimelineStatus> {
    return this.op(async () => {
      const s = this.requireState();
      if (generation < s.generation) {
        throw new XenonError('SK_GENERATION_FENCED', `unfollow generation ${generation} < stored ${s.generation}`, {
          userMessage: `generation ${generation} is fenced: this timeline already follows generation ${s.generation}`,
        });
      }
      // A higher generation is recorded (it fences older computes) but marked: the follow of that
      // generation that comes later must still do the generation change's truncation.
      if (generation > s.generation) s.unfollowedOnly = true;
      s.generation = generation;
      s.compute = null;
      await this.stopFollower();
      await this.persist();
      return this.status();
    });
  }

  /** Stops streaming, persists the control file and closes files. */
  close(): Promise<void> {
    return this.op(async () => {
      this.closed = true;
      await this.stopFollower();
      if (this.state) await this.persist();
      await this.store.close().catch(() => {});
    });
  }

  /** Stops and removes everything of this timeline. */
  destroy(): Promise<void> {
    return this.op(async () => {
      this.closed = true;
      await this.stopFollower();
      await this.store.close().catch(() => {});
      await this.persisting.catch(() => {});
      await rm(this.dir, { recursive: true, force: true });
    });
  }

  private async truncateTo(lsn: bigint): Promise<void> {
    this.log.warn('truncating WAL past the new compute\'s start LSN', { from: formatLsn(this.flushLsn), to: formatLsn(lsn) });
    await this.cutFiles(lsn);
    this.flushLsn = this.writeLsn = lsn;
    delete this.requireState().pendingTruncateLsn; // the cut is durable (store.truncate synced it)
    await this.persist();
  }

  /** Cuts the files at `lsn` (durably) and drops newer Postgres timelines from the state (not persisted). */
  private async cutFiles(lsn: bigint): Promise<void> {
    const s = this.requireState();
    if (s.pgTimeline === 0) return;
    // The Postgres timeline holding `lsn`: the first one that ended at or after it.
    let tli = s.pgTimeline;
    for (const h of s.history) {
      if (lsn <= h.switchLsn) { tli = h.tli; break; }
    }
    await this.store.truncate(tli, lsn);
    s.history = s.history.filter((h) => h.tli < tli);
    s.pgTimeline = tli;
  }

  // ---------------------------------------------------------------- persistence

  /** Writes the control file with the current flush LSN (serialised; coalesces concurrent calls). */
  persist(): Promise<void> {
    if (!this.state) return Promise.resolve();
    if (this.persistRunning) {
      this.persistAgain = true;
      return this.persisting;
    }
    this.persistRunning = true;
    this.persisting = (async () => {
      try {
        do {
          this.persistAgain = false;
          const snapshot: ControlState = { ...this.state!, flushLsn: this.flushLsn, history: [...this.state!.history] };
          await writeControl(this.dir, snapshot);
        } while (this.persistAgain);
      } finally {
        this.persistRunning = false;
      }
    })();
    return this.persisting;
  }

  // ---------------------------------------------------------------- status

  get flush(): bigint {
    return this.flushLsn;
  }

  get streaming(): boolean {
    return this.streamingNow;
  }

  lagBytes(): number {
    return this.computeLsn !== null && this.computeLsn > this.flushLsn ? Number(this.computeLsn - this.flushLsn) : 0;
  }

  /** Resolves when no generation change (fence + truncation) is in progress. */
  async settled(): Promise<void> {
    while (this.changing) await this.changing.catch(() => {});
  }

  async status(): Promise<TimelineStatus> {
    await this.settled();
    const s = this.state;
    let start = this.flushLsn;
    try {
      const first = await this.store.oldestSegment();
      if (first !== undefined) start = segmentStart(first);
    } catch { /* best effort */ }
    return {
      timeline_id: this.id,
      safekeeper_id: this.deps.safekeeperId,
      generation: s?.generation ?? 0,
      history: (s?.generationHistory ?? []).map((e) => ({ generation: e.generation, start_lsn: formatLsn(e.startLsn) })),
      last_generation: lastGeneration(s?.generationHistory ?? [], this.flushLsn),
      system_id: s?.systemId ?? null,
      pg_timeline: s?.pgTimeline ?? 0,
      flush_lsn: formatLsn(this.flushLsn),
      start_lsn: formatLsn(start),
      compute_lsn: this.computeLsn === null ? null : formatLsn(this.computeLsn),
      lag_bytes: this.lagBytes(),
      streaming: this.streamingNow,
      compute: s?.compute ? { host: s.compute.host, port: s.compute.port, user: s.compute.user } : null,
      last_error: this.lastError,
    };
  }

  async listWal(): Promise<WalListing> {
    const s = this.state;
    const files: WalFile[] = [];
    for (const f of await this.store.list()) {
      if (f.kind === 'history') {
        files.push({ name: f.name, kind: 'history', size: f.size });
        continue;
      }
      const start = segmentStart(f.segno!);
      let end = start + SEG;
      if (f.partial) {
        const ended = s?.history.find((h) => h.tli === f.tli);
        if (ended) end = ended.switchLsn < end ? ended.switchLsn : end;
        else if (f.tli === s?.pgTimeline) end = this.flushLsn < start ? start : this.flushLsn < end ? this.flushLsn : end;
        else end = start;
      }
      files.push({ name: f.name, kind: 'segment', pg_timeline: f.tli!, start_lsn: formatLsn(start), end_lsn: formatLsn(end), partial: f.partial!, size: f.size });
    }
    return { timeline_id: this.id, flush_lsn: formatLsn(this.flushLsn), pg_timeline: s?.pgTimeline ?? 0, files };
  }

  /**
   * The readable end (segment offset) of a segment file: a complete one is all readable; of a
   * partial one only what is durable (bytes past the flush LSN may be written but not synced, or
   * about to be truncated) — the rest reads as zeros.
   */
  readableEnd(tli: number, segno: bigint, partial: boolean): number {
    if (!partial) return WAL_SEGMENT_SIZE;
    const start = segmentStart(segno);
    const ended = this.state?.history.find((h) => h.tli === tli);
    const end = ended ? ended.switchLsn : tli === this.state?.pgTimeline ? this.flushLsn : start;
    if (end <= start) return 0;
    return end - start >= SEG ? WAL_SEGMENT_SIZE : Number(end - start);
  }

  // ---------------------------------------------------------------- streaming

  private startFollower(): void {
    const s = this.requireState();
    if (!s.compute || this.closed) return;
    const target = s.compute;
    const session = newSession();
    this.session = session;
    this.follower = this.followLoop(target, session)
      .catch((err: Error) => {
        this.lastError = `follower failed: ${err.message}`;
        this.log.error('follower loop failed', { err });
      })
      .finally(() => {
        if (this.session === session) this.session = null;
      });
  }

  private async stopFollower(): Promise<void> {
    const session = this.session;
    const follower = this.follower;
    this.follower = null;
    if (session) {
      session.stop();
      // Not client.end(): during a connect it makes pg never settle connect(). Dropping the
      // socket ends a stream as well (the compute sees a disconnect).
      (session.client as unknown as { connection?: { stream?: { destroy(): void } } } | null)?.connection?.stream?.destroy();
    }
    if (follower) await follower.catch(() => {});
    await this.drainFlush();
    this.streamingNow = false;
  }

  private async followLoop(target: ComputeTarget, session: Session): Promise<void> {
    let attempt = 0;
    while (!session.stopped) {
      let progressed = false;
      const before = this.flushLsn;
      try {
        await this.streamOnce(target, session);
        this.lastError = null;
      } catch (err) {
        if (session.stopped) break;
        let msg = (err as Error).message;
        if (err instanceof WalGoneError) {
          try {
            await this.recoverFromPeers(session, msg);
            this.lastError = null;
            continue; // progress: connect again at once, from the new flush LSN
          } catch (rerr) {
            msg = (rerr as Error).message;
          }
        }
        if (session.stopped) break;
        if (this.lastError !== msg) this.log.warn('replication stream failed', { err: err as Error, host: target.host, port: target.port });
        this.lastError = msg;
      } finally {
        this.streamingNow = false;
        progressed = this.flushLsn !== before;
      }
      if (session.stopped) break;
      await this.drainFlush();
      attempt = progressed ? 0 : attempt + 1;
      const base = Math.min(BACKOFF_MAX_MS, BACKOFF_START_MS * 2 ** Math.min(attempt, 10));
      await sleep(base / 2 + Math.random() * (base / 2));
      if (session.stopped) break;
      this.deps.metrics.reconnects.inc({ timeline_id: this.id });
    }
  }

  /** One connection: identify, slot, then stream timeline after timeline until an error or stop. */
  private async streamOnce(target: ComputeTarget, session: Session): Promise<void> {
    await this.drainFlush();
    const s = this.requireState();
    const slot = this.deps.safekeeperId;
    const client = new pg.Client({
      host: target.host,
      port: target.port,
      user: target.user,
      password: target.password,
      database: 'postgres',
      replication: 'true',
      application_name: slot,
      connectionTimeoutMillis: 10_000,
      keepAlive: true,
    } as pg.ClientConfig);
    session.client = client;
    let clientError: Error | null = null;
    client.on('error', (err) => { clientError ??= err; });
    try {
      const stopped = session.stopSignal.then(() => {
        throw new StreamError('stopped');
      });
      stopped.catch(() => {});
      await Promise.race([client.connect(), stopped]);
      if (session.stopped) return;
      const id = await client.query<string[]>({ text: 'IDENTIFY_SYSTEM', rowMode: 'array', types: RAW_TYPES });
      const row = id.rows[0];
      if (!row || row.length < 3) throw new StreamError('IDENTIFY_SYSTEM returned no row: not a replication connection?');
      const [systemId, tliText, xlogposText] = row as [string, string, string];
      if (s.systemId !== null && s.systemId !== systemId) {
        throw new StreamError(`compute ${target.host}:${target.port} belongs to another cluster (system id ${systemId}, this timeline's is ${s.systemId}); refusing its WAL`);
      }
      let serverTli = Number(tliText);
      const xlogpos = parseLsn(xlogposText);
      // Generation fencing at the compute: a compute started by the control plane carries
      // `xenon.generation`; one of another generation (an old compute still running at this
      // address, or a new one we have not been told about yet) is refused before anything is
      // written or a slot is created. Computes started without the setting are accepted.
      const computeGeneration = await this.computeGeneration(client);
      if (computeGeneration !== null && computeGeneration !== s.generation) {
        throw new StreamError(`compute runs generation ${computeGeneration}, this timeline follows generation ${s.generation} (${target.host}:${target.port}); refusing its WAL`);
      }
      if (s.systemId === null) {
        s.systemId = systemId;
        await this.persist();
      }
      await this.ensureSlot(client, slot);
      if (s.pgTimeline === 0) {
        // A new timeline here: begin where its WAL on the other safekeepers begins (see joinPoint).
        const start = await this.joinPoint(session, systemId, xlogpos);
        if (session.stopped) return;
        s.pgTimeline = serverTli;
        this.flushLsn = this.writeLsn = start;
        delete s.joinStartLsn;
        await this.persist();
      }
      while (!session.stopped) {
        if (serverTli < s.pgTimeline) {
          throw new StreamError(`compute is on Postgres timeline ${serverTli}, older than this safekeeper's ${s.pgTimeline}`);
        }
        if (s.pgTimeline > 1 && !(await this.store.hasHistory(s.pgTimeline))) await this.fetchHistory(client, s.pgTimeline);
        let next: { tli: number; startLsn: bigint } | null;
        try {
          next = await this.streamTimeline(client, session, s.pgTimeline, this.flushLsn);
        } catch (err) {
          const gone = session.stopped ? null : walGoneReason(err);
          if (!gone) throw err;
          if (gone === 'slot') this.recreateSlot = true;
          throw new WalGoneError(`the compute no longer has the WAL at ${formatLsn(this.flushLsn)} on timeline ${s.pgTimeline}: ${(err as Error).message}`);
        }
        if (!next) return;
        await this.switchTimeline(client, next.tli, next.startLsn);
        if (next.tli > serverTli) serverTli = next.tli;
      }
    } finally {
      this.streamingNow = false;
      session.client = null;
      client.end().catch(() => {});
      void clientError;
    }
  }

  /**
   * Where a safekeeper new to a timeline starts: the start of the segment holding the lowest of
   * what is known about where this timeline's WAL starts — the first LSN held by each peer of the
   * same system id and generation, and the follow request's `start_lsn` (everything before it is
   * on a quorum already). The flush LSN reported to the compute begins there, a claim only about
   * WAL that predates every safekeeper; a commit the compute still waits for is past it. Only when
   * nothing is known (no peer holds the timeline, no start_lsn) the compute's current position is
   * used, as pg_receivewal does. A peer that cannot be asked while nothing else is known makes us
   * retry (starting at the current position then could release a commit no quorum holds).
   */
  private async joinPoint(session: Session, systemId: string, xlogpos: bigint): Promise<bigint> {
    const s = this.requireState();
    const known: bigint[] = [];
    if (s.joinStartLsn !== undefined && s.joinStartLsn > 0n) known.push(s.joinStartLsn);
    const unreachable: string[] = [];
    const stopped = session.stopSignal.then(() => { throw new StreamError('stopped'); });
    stopped.catch(() => {});
    for (const url of s.peers ?? []) {
      let st;
      try {
        st = await Promise.race([new SafekeeperClient(url, { timeoutMs: PEER_TIMEOUT_MS }).status(this.id), stopped]);
      } catch (err) {
        if (session.stopped) return xlogpos;
        unreachable.push(`${url}: ${(err as Error).message}`);
        continue;
      }
      if (!st || st.pg_timeline === 0 || st.system_id !== systemId || st.generation !== s.generation) continue;
      // A peer joining at the same moment may not know its own start yet (0/0): it holds nothing.
      const start = parseLsn(st.start_lsn);
      if (start === 0n) continue;
      known.push(start);
    }
    if (known.length === 0) {
      if (unreachable.length > 0) throw new StreamError(`cannot tell where this timeline's WAL starts on the other safekeepers (${unreachable.join('; ')}); not starting at the compute's current position`);
      this.log.info('no safekeeper holds this timeline yet: starting at the compute\'s position', { xlogpos: formatLsn(xlogpos) });
      return segmentStart(segmentOf(xlogpos));
    }
    let min = xlogpos;
    for (const k of known) if (k < min) min = k;
    this.log.info('joining the timeline where its WAL starts on the other safekeepers', { start: formatLsn(segmentStart(segmentOf(min))), xlogpos: formatLsn(xlogpos) });
    return segmentStart(segmentOf(min));
  }

  /** `SHOW xenon.generation`: null when the compute has no such setting (or it is empty). */
  private async computeGeneration(client: pg.Client): Promise<number | null> {
    let res: pg.QueryResult<string[]>;
    try {
      res = await client.query<string[]>({ text: 'SHOW xenon.generation', rowMode: 'array', types: RAW_TYPES });
    } catch (err) {
      if ((err as { code?: string }).code === '42704') return null; // unrecognized configuration parameter
      throw err;
    }
    const v = res.rows[0]?.[0];
    if (v === undefined || v === null || v.trim() === '') return null;
    if (!/^\d{1,15}$/.test(v.trim())) throw new StreamError(`compute reports an invalid xenon.generation ${JSON.stringify(v.slice(0, 40))}; refusing its WAL`);
    return Number(v.trim());
  }

  /** Set when the compute said our slot was invalidated: drop and recreate it at the next connection. */
  private recreateSlot = false;

  /**
   * Our physical slot on the compute, reserving WAL. A slot that no longer reserves any
   * (`max_slot_wal_keep_size` exceeded: PG 15 sets its restart_lsn to NULL) is dropped and created
   * again — it would not keep the WAL we are about to stream.
   */
  private async ensureSlot(client: pg.Client, slot: string): Promise<void> {
    try {
      await client.query(`CREATE_REPLICATION_SLOT ${slot} PHYSICAL RESERVE_WAL`);
      this.log.info('created replication slot', { slot });
      this.recreateSlot = false;
      return;
    } catch (err) {
      if ((err as { code?: string }).code !== '42710') throw err;
    }
    let invalid = this.recreateSlot;
    if (!invalid) {
      const res = await client.query<(string | null)[]>({ text: `READ_REPLICATION_SLOT ${slot}`, rowMode: 'array', types: RAW_TYPES });
      const row = res.rows[0];
      invalid = row !== undefined && row[0] === 'physical' && row[1] === null;
    }
    if (!invalid) return;
    this.log.warn('replication slot on the compute no longer reserves WAL (invalidated); recreating it', { slot });
    await client.query(`DROP_REPLICATION_SLOT ${slot}`);
    await client.query(`CREATE_REPLICATION_SLOT ${slot} PHYSICAL RESERVE_WAL`);
    this.recreateSlot = false;
  }

  /**
   * Fetches the WAL the compute no longer has from a peer safekeeper of the same generation,
   * system and Postgres timeline whose flush LSN is beyond ours: from our flush LSN up to the
   * peer's, written into the store exactly as streamed WAL is (same files, sync, control file).
   * Returns the bytes recovered; throws (naming every peer's reason) when no peer could help.
   */
  private async recoverFromPeers(session: Session, reason: string): Promise<number> {
    const s = this.requireState();
    const peers = s.peers ?? [];
    if (peers.length === 0) throw new StreamError(`${reason}; no peer safekeepers known to recover it from`);
    await this.drainFlush();
    // Every peer call is abandoned when the session is stopped (a generation change waits for us).
    const stopped = session.stopSignal.then(() => { throw new StreamError('stopped'); });
    stopped.catch(() => {});
    const unlessStopped = <T>(p: Promise<T>): Promise<T> => Promise.race([p, stopped]);
    const why: string[] = [];
    const candidates: { url: string; client: SafekeeperClient; flush: bigint }[] = [];
    for (const url of peers) {
      const client = new SafekeeperClient(url, { timeoutMs: PEER_TIMEOUT_MS });
      let st;
      try {
        st = await unlessStopped(client.status(this.id));
      } catch (err) {
        why.push(`${url}: unreachable (${(err as Error).message})`);
        continue;
      }
      if (!st) { why.push(`${url}: does not hold this timeline`); continue; }
      if (st.generation !== s.generation) { why.push(`${url}: follows generation ${st.generation}, this one ${s.generation}`); continue; }
      if (st.system_id !== s.systemId) { why.push(`${url}: system id ${st.system_id}, this one ${s.systemId}`); continue; }
      if (st.pg_timeline !== s.pgTimeline) { why.push(`${url}: on Postgres timeline ${st.pg_timeline}, this one on ${s.pgTimeline}`); continue; }
      const flush = parseLsn(st.flush_lsn);
      if (flush <= this.flushLsn) { why.push(`${url}: flush LSN ${st.flush_lsn} not beyond ${formatLsn(this.flushLsn)}`); continue; }
      if (parseLsn(st.start_lsn) > this.flushLsn) { why.push(`${url}: holds WAL only from ${st.start_lsn}`); continue; }
      candidates.push({ url, client, flush });
    }
    candidates.sort((a, b) => (a.flush > b.flush ? -1 : a.flush < b.flush ? 1 : 0));
    const tli = s.pgTimeline;
    let total = 0;
    for (const c of candidates) {
      if (session.stopped || this.flushLsn >= c.flush) break;
      const from = this.flushLsn;
      this.log.info('recovering WAL from a peer safekeeper', { peer: c.url, from: formatLsn(from), to: formatLsn(c.flush), reason });
      try {
        while (this.flushLsn < c.flush && !session.stopped) {
          const pos = this.flushLsn;
          const segno = segmentOf(pos);
          const base = segmentStart(segno);
          let end = base + SEG;
          if (end > c.flush) end = c.flush;
          if (end - pos > BigInt(PEER_CHUNK)) end = pos + BigInt(PEER_CHUNK);
          const buf = await unlessStopped(c.client.readWal(this.id, segmentFileName(tli, segno), { start: Number(pos - base), end: Number(end - base) }));
          if (buf.length !== Number(end - pos)) throw new Error(`${segmentFileName(tli, segno)}: got ${buf.length} bytes, asked for ${end - pos}`);
          checkPageHeaders(buf, pos);
          // Still the same generation and durable there after the read? (A peer that moved to a
          // newer generation may have cut that WAL meanwhile; its status waits for the cut.)
          const again = await unlessStopped(c.client.status(this.id));
          if (!again || again.generation !== s.generation || again.pg_timeline !== tli || parseLsn(again.flush_lsn) < end) {
            throw new Error(`the peer changed while reading (generation ${again?.generation}, flush ${again?.flush_lsn})`);
          }
          const written = await this.store.write(tli, pos, [buf]);
          this.writeLsn = written;
          await this.store.sync();
          this.flushLsn = written;
          this.deps.metrics.peerRecoveredBytes.inc({ timeline_id: this.id }, buf.length);
          total += buf.length;
          if (written % SEG === 0n) await this.persist();
        }
      } catch (err) {
        this.writeLsn = this.flushLsn;
        await this.store.close().catch(() => {});
        why.push(`${c.url}: fetching WAL failed at ${formatLsn(this.flushLsn)} (${(err as Error).message})`);
        this.log.warn('recovering WAL from a peer failed', { peer: c.url, err: err as Error });
      }
      await this.persist();
      if (this.flushLsn > from) this.log.info('recovered WAL from a peer safekeeper', { peer: c.url, from: formatLsn(from), to: formatLsn(this.flushLsn), bytes: Number(this.flushLsn - from) });
    }
    if (total === 0) throw new StreamError(`${reason}; no peer could supply it: ${why.join('; ') || 'none usable'}`);
    return total;
  }

  private async fetchHistory(client: pg.Client, tli: number): Promise<void> {
    const res = await client.query<string[]>({ text: `TIMELINE_HISTORY ${tli}`, rowMode: 'array', types: RAW_TYPES });
    const row = res.rows[0];
    if (!row || row.length < 2) throw new StreamError(`TIMELINE_HISTORY ${tli} returned no row`);
    const [name, content] = row as [string, string];
    if (name !== historyFileName(tli)) throw new StreamError(`TIMELINE_HISTORY ${tli} returned file ${JSON.stringify(name)}`);
    await this.store.writeHistory(tli, Buffer.from(content, 'utf8'));
    this.log.info('stored timeline history', { file: name });
  }

  private async switchTimeline(client: pg.Client, nextTli: number, switchLsn: bigint): Promise<void> {
    const s = this.requireState();
    await this.drainFlush();
    if (this.flushLsn > switchLsn) {
      throw new StreamError(`this safekeeper holds WAL up to ${formatLsn(this.flushLsn)} on timeline ${s.pgTimeline}, past its end ${formatLsn(switchLsn)} on the compute`);
    }
    this.log.info('Postgres timeline switch', { from: s.pgTimeline, to: nextTli, at: formatLsn(switchLsn) });
    await this.store.close(); // the old timeline's last segment stays `.partial` (as pg_receivewal leaves it)
    await this.fetchHistory(client, nextTli);
    s.history = [...s.history.filter((h) => h.tli !== s.pgTimeline), { tli: s.pgTimeline, switchLsn }];
    s.pgTimeline = nextTli;
    // Like pg_receivewal: stream the new timeline from the start of the segment of the switch.
    this.flushLsn = this.writeLsn = segmentStart(segmentOf(switchLsn));
    await this.persist();
  }

  /**
   * START_REPLICATION on `tli` from `start`. Resolves with the next timeline when the server ends
   * this one, null when stopped; rejects on errors.
   */
  private streamTimeline(client: pg.Client, session: Session, tli: number, start: bigint): Promise<{ tli: number; startLsn: bigint } | null> {
    const con = (client as unknown as { connection: ReplConnection }).connection;
    this.receivedEnd = start;
    return new Promise((resolve, reject) => {
      let done = false;
      let lastRecv = Date.now();
      let lastStatus = 0;
      const sendStatus = (): void => {
        if (done || !this.streamingNow) return;
        lastStatus = Date.now();
        const flush = this.flushLsn;
        const write = this.writeLsn > flush ? this.writeLsn : flush;
        const frame = standbyStatusUpdateFrame(write, flush, 0n);
        if (con.stream?.writable) con.stream.write(frame);
      };
      this.sendStatus = sendStatus;
      const finish = (err: Error | null, value: { tli: number; startLsn: bigint } | null = null): void => {
        if (done) return;
        done = true;
        clearInterval(tick);
        con.off('copyData', onData);
        con.off('copyDone', onCopyDone);
        con.off('replicationStart', onStart);
        this.streamingNow = false;
        if (this.sendStatus === sendStatus) this.sendStatus = () => {};
        if (err) reject(err);
        else resolve(value);
      };
      session.fail = (err) => {
        finish(err);
        con.stream?.destroy();
      };
      const onStart = (): void => {
        this.streamingNow = true;
        this.lastError = null;
        this.log.info('streaming', { pgTimeline: tli, from: formatLsn(start) });
        sendStatus();
      };
      const onData = (msg: { chunk: Buffer }): void => {
        lastRecv = Date.now();
        try {
          const m = parseReplicationMessage(msg.chunk);
          if (m.walEnd > (this.computeLsn ?? 0n)) this.computeLsn = m.walEnd;
          if (m.tag === 'w') {
            if (m.dataStart !== this.receivedEnd) {
              throw new StreamError(`XLogData at ${formatLsn(m.dataStart)}, expected ${formatLsn(this.receivedEnd)}`);
            }
            if (m.data.length === 0) return;
            // The chunk is a view into the parser's buffer, which it reuses: copy.
            this.pending.push({ tli, start: m.dataStart, buf: Buffer.from(m.data) });
            this.receivedEnd += BigInt(m.data.length);
            this.pendingBytes += m.data.length;
            this.pendingMessages++;
            if (this.pendingBytes > MAX_PENDING_BYTES) con.stream?.pause();
            this.scheduleFlush(session);
          } else if (m.replyRequested) {
            sendStatus();
          }
        } catch (err) {
          session.fail(err as Error);
        }
      };
      const onCopyDone = (): void => {
        // The server ended this timeline: answer with CopyDone; the next timeline follows as a result row.
        this.streamingNow = false;
        con.endCopyFrom();
      };
      const tick = setInterval(() => {
        if (Date.now() - lastRecv > RECEIVE_TIMEOUT_MS) {
          session.fail(new StreamError(`no message from the compute for ${RECEIVE_TIMEOUT_MS / 1000} s`));
        } else if (this.streamingNow && Date.now() - lastStatus >= STATUS_INTERVAL_MS) {
          sendStatus();
        }
      }, 1_000);
      tick.unref();
      con.on('copyData', onData);
      con.on('copyDone', onCopyDone);
      con.on('replicationStart', onStart);
      const cmd = `START_REPLICATION SLOT ${this.deps.safekeeperId} PHYSICAL ${formatLsn(start)} TIMELINE ${tli}`;
      client.query<string[]>({ text: cmd, rowMode: 'array', types: RAW_TYPES }).then(
        (res) => {
          // The next-timeline row comes as its own result (then START_STREAMING's CommandComplete).
          const results = (Array.isArray(res) ? res : [res]) as pg.QueryResult<string[]>[];
          const row = results.map((r) => r.rows?.[0]).find((r) => r !== undefined);
          if (session.stopped) return finish(null, null);
          if (!row || row.length < 2) return finish(new StreamError(`the compute ended streaming on timeline ${tli} without naming a next timeline`));
          finish(null, { tli: Number(row[0]), startLsn: parseLsn(row[1]!) });
        },
        (err: Error) => finish(session.stopped ? null : err),
      );
    });
  }

  private sendStatus: () => void = () => {};

  // ---------------------------------------------------------------- group commit

  private scheduleFlush(session: Session): void {
    if (this.flushing) return;
    this.flushing = new Promise<void>((r) => setImmediate(r))
      .then(() => this.flushPending(session))
      .catch((err: Error) => {
        this.log.error('flush failed', { err });
        session.fail(err);
      })
      .finally(() => {
        this.flushing = null;
        // Data that arrived during the last write of a loop that just ended.
        if (this.pending.length > 0 && !session.stopped) this.scheduleFlush(session);
      });
  }

  private async flushPending(session: Session): Promise<void> {
    while (this.pending.length > 0) {
      const batch = this.pending;
      const messages = this.pendingMessages;
      this.pending = [];
      this.pendingBytes = 0;
      this.pendingMessages = 0;
      const con = (session.client as unknown as { connection?: ReplConnection } | null)?.connection;
      if (con?.stream?.isPaused()) con.stream.resume();
      const first = batch[0]!;
      try {
        const end = await this.store.write(first.tli, first.start, batch.map((p) => p.buf));
        this.writeLsn = end;
        await this.store.sync();
        const completed = segmentOf(end - 1n) > segmentOf(first.start) || end % SEG === 0n;
        this.flushLsn = end;
        this.deps.metrics.batchMessages.observe(messages);
        this.sendStatus();
        if (completed) void this.persist().catch((err: Error) => this.log.error('control file write failed', { err }));
      } catch (err) {
        // Never acknowledge what did not reach the disk: drop the stream; the reconnect resumes at the flush LSN.
        this.pending = [];
        this.pendingBytes = 0;
        this.pendingMessages = 0;
        this.writeLsn = this.flushLsn;
        await this.store.close().catch(() => {});
        const msg = `WAL write failed: ${(err as Error).message}`;
        this.log.error('WAL write failed; reconnecting', { err: err as Error });
        session.fail(new StreamError(msg));
        this.lastError = msg;
        return;
      }
    }
  }

  /** Waits until nothing is pending or being flushed. */
  private async drainFlush(): Promise<void> {
    while (this.flushing) await this.flushing.catch(() => {});
    this.pending = [];
    this.pendingBytes = 0;
    this.pendingMessages = 0;
  }
}

/** A page header that is there must carry its own address (guards against a peer serving wrong bytes). */
function checkPageHeaders(buf: Buffer, start: bigint): void {
  const first = Number((BigInt(XLOG_BLCKSZ) - (start % BigInt(XLOG_BLCKSZ))) % BigInt(XLOG_BLCKSZ));
  for (let off = first; off + XLP_HEADER_MIN <= buf.length; off += XLOG_BLCKSZ) {
    if (buf.readUInt16LE(off) === 0) continue;
    const addr = buf.readBigUInt64LE(off + 8);
    const want = start + BigInt(off);
    if (addr !== want) throw new Error(`page at ${formatLsn(want)} carries address ${formatLsn(addr)}`);
  }
}

interface ReplConnection {
  on(ev: string, fn: (...a: never[]) => void): void;
  off(ev: string, fn: (...a: never[]) => void): void;
  sendCopyFromChunk(b: Buffer): void;
  endCopyFrom(): void;
  stream?: { pause(): void; resume(): void; isPaused(): boolean; destroy(): void; write(b: Buffer): boolean; writable: boolean };
}

function fmtHistory(h: readonly GenerationStart[]): string {
  return h.map((e) => `${e.generation}@${formatLsn(e.startLsn)}`).join(' ');
}

function samePeers(a: string[] | undefined, b: string[]): boolean {
  return a !== undefined && a.length === b.length && a.every((u, i) => u === b[i]);
}

function sameTarget(a: ComputeTarget, b: ComputeTarget): boolean {
  return a.host === b.host && a.port === b.port && a.user === b.user && a.password === b.password;
}
