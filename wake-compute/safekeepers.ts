/**
 * The control plane's side of WAL durability (DESIGN §4 "WAL and durability"): which settings a
 * compute needs to commit only on a safekeeper quorum, where a new compute's WAL must start, and
 * telling the safekeepers which compute — of which generation — to follow.
 */
import { XenonError } from '../lib/errors.ts';
import type { Logger } from '../lib/logger.ts';
import { formatLsn, parseLsn } from '../lib/lsn.ts';
import { MAX_GENERATION_HISTORY, type ComputeTarget, type FollowRequest, type GenerationEntry, type TimelineStatus } from '../safekeeper/api.ts';
import { SafekeeperClient } from '../safekeeper/client.ts';
import type { WalStatus } from './api.ts';
import type { SafekeeperRef } from './config.ts';

interface Member extends SafekeeperRef {
  client: SafekeeperClient;
}

export interface StartPoint {
  /** The generation that fenced the safekeepers and will follow the new compute. */
  generation: number;
  /**
   * The flush LSN of the donor: of the safekeepers that answered the fence (a majority), the one
   * with the highest (last_generation, flush_lsn). The compute must have WAL up to here.
   */
  upTo: string;
  /** The donor's id (null for a timeline no safekeeper holds WAL of). */
  donor: string | null;
  /**
   * URLs of safekeepers whose WAL up to their flush LSN is the donor's (same last generation),
   * the donor first, then by flush LSN: where the compute's WAL up to `upTo` may be read.
   */
  order: string[];
  /** The history the new compute's WAL follows: the donor's up to its flush LSN, then `{generation, upTo}`. */
  history: GenerationEntry[];
  /** Each safekeeper's answer to the fence. */
  statuses: Record<string, TimelineStatus | null | 'unreachable'>;
}

const RETRY_MIN_MS = 100;
const RETRY_MAX_MS = 5_000;

export class SafekeeperSet {
  private readonly members: Member[];
  /** The generation each timeline's safekeepers should follow now (background retries check it). */
  private readonly current = new Map<string, number>();
  private readonly timers = new Set<NodeJS.Timeout>();
  private closed = false;

  constructor(
    refs: readonly SafekeeperRef[],
    private readonly logger: Logger,
    private readonly opts: { maxSlotWalKeepSize: string; stopWaitMs: number; requestTimeoutMs?: number },
  ) {
    this.members = refs.map((r) => ({ ...r, client: new SafekeeperClient(r.url, { timeoutMs: opts.requestTimeoutMs ?? 5_000 }) }));
  }

  get enabled(): boolean {
    return this.members.length > 0;
  }

  get size(): number {
    return this.members.length;
  }

  /** How many safekeepers must flush a commit before it is acknowledged. */
  get quorum(): number {
    return Math.floor(this.members.length / 2) + 1;
  }

  /** `postgresql.conf` settings of a compute of `generation` (none when there are no safekeepers). */
  computeSettings(generation: number): Record<string, string | number> {
    if (!this.enabled) return {};
    const senders = Math.max(10, this.members.length + 5);
    return {
      wal_level: 'replica',
      max_wal_senders: senders,
      max_replication_slots: senders,
      synchronous_commit: 'on',
      synchronous_standby_names: `ANY ${this.quorum} (${this.members.map((m) => m.id).join(', ')})`,
      max_slot_wal_keep_size: this.opts.maxSlotWalKeepSize,
      // The safekeepers check this against the generation they were told to follow.
      'xenon.generation': generation,
    };
  }

  private async statuses(timelineId: string): Promise<(TimelineStatus | null | 'unreachable')[]> {
    return Promise.all(this.members.map((m) => m.client.status(timelineId).catch((err: Error) => {
      this.logger.warn('safekeeper unreachable', { safekeeper: m.id, url: m.url, err: err.message });
      return 'unreachable' as const;
    })));
  }

  /**
   * Where a new compute of `timelineId`, of `generation`, must start. First every safekeeper is
   * fenced with `generation` (`POST …/fence`): once it answered, it acknowledges nothing more to
   * an older compute, so its flush LSN in the answer is final. A majority must answer: any commit
   * ever acknowledged is on a majority, hence on at least one of them. The start point is the
   * flush LSN of the one with the highest (last generation, flush LSN) — as in Raft, the newest
   * generation's WAL first: a safekeeper with more WAL of an older generation holds the tail of a
   * compute that lost (never acknowledged), which it cuts when it follows the new compute.
   */
  async startPoint(timelineId: string, generation: number): Promise<StartPoint> {
    const st = await Promise.all(this.members.map((m) => m.client.fence(timelineId, generation).catch((err: Error) => {
      if (err instanceof XenonError && err.code === 'SK_GENERATION_FENCED') {
        throw new XenonError('CP_SAFEKEEPERS_UNAVAILABLE', `safekeeper ${m.id} already follows a newer compute generation of ${timelineId} than ${generation}: ${err.message}`, { retryable: false });
      }
      this.logger.warn('safekeeper did not answer the fence', { safekeeper: m.id, url: m.url, timelineId, generation, err: err.message });
      return 'unreachable' as const;
    })));
    const up = st.map((s, i) => ({ m: this.members[i]!, s })).filter((x): x is { m: Member; s: TimelineStatus } => x.s !== 'unreachable');
    if (up.length < this.quorum) {
      const down = st.map((s, i) => (s === 'unreachable' ? this.members[i]!.id : '')).filter(Boolean);
      throw new XenonError('CP_SAFEKEEPERS_UNAVAILABLE', `only ${up.length} of ${this.members.length} safekeepers answered (unreachable: ${down.join(', ')}); ${this.quorum} are needed`);
    }
    const lastGen = (s: TimelineStatus): number => s.last_generation ?? 0;
    const flush = (s: TimelineStatus): bigint => parseLsn(s.flush_lsn);
    up.sort((a, b) => lastGen(b.s) - lastGen(a.s) || (flush(b.s) > flush(a.s) ? 1 : flush(b.s) < flush(a.s) ? -1 : 0));
    const donor = up[0]!;
    const upTo = flush(donor.s);
    // The donor's history up to its flush LSN (entries past it describe WAL it does not hold).
    const history: GenerationEntry[] = (donor.s.history ?? []).filter((e) => parseLsn(e.start_lsn) <= upTo);
    history.push({ generation, start_lsn: formatLsn(upTo) });
    const sp: StartPoint = {
      generation,
      upTo: formatLsn(upTo),
      donor: upTo > 0n ? donor.m.id : null,
      order: up.filter((x) => lastGen(x.s) === lastGen(donor.s)).map((x) => x.m.url),
      history: history.slice(-MAX_GENERATION_HISTORY),
      statuses: Object.fromEntries(st.map((s, i) => [this.members[i]!.id, s])),
    };
    this.planned.set(timelineId, sp);
    if (up.some((x) => lastGen(x.s) < lastGen(donor.s) && flush(x.s) > upTo)) {
      this.logger.warn('a safekeeper holds more WAL of an older generation than the start point: that tail was never acknowledged and will be cut', {
        timelineId, generation, upTo: sp.upTo, donor: donor.m.id,
        stale: up.filter((x) => lastGen(x.s) < lastGen(donor.s) && flush(x.s) > upTo).map((x) => `${x.m.id}: generation ${lastGen(x.s)} to ${x.s.flush_lsn}`).join(', '),
      });
    }
    return sp;
  }

  /** The last start point computed per timeline (its history goes with a follow given only the LSN). */
  private readonly planned = new Map<string, StartPoint>();

  /**
   * Tells every safekeeper to follow the compute of `generation`. Resolves once a quorum has
   * accepted (a compute without a quorum could not commit); the others are retried in the
   * background until they accept or a newer generation takes over.
   */
  async follow(timelineId: string, generation: number, compute: ComputeTarget, start: string | StartPoint, timeoutMs = 10_000): Promise<void> {
    this.current.set(timelineId, generation);
    const planned = this.planned.get(timelineId);
    const sp = typeof start === 'string' ? (planned && planned.generation === generation && planned.upTo === start ? planned : undefined) : start;
    const startLsn = typeof start === 'string' ? start : start.upTo;
    if (sp && sp.generation === generation) this.planned.delete(timelineId);
    const history = sp && sp.generation === generation ? sp.history : undefined;
    const reqFor = (m: Member): FollowRequest => ({
      generation, compute, start_lsn: startLsn, peers: this.members.filter((p) => p !== m).map((p) => p.url),
      ...(history ? { history } : {}),
    });
    let accepted = 0;
    const progress = { errors: '', done: false };
    let onQuorum!: () => void;
    let onFenced!: (err: XenonError) => void;
    const quorum = new Promise<void>((resolve, reject) => { onQuorum = resolve; onFenced = reject; });
    const attempt = (m: Member, delay: number): void => {
      m.client.follow(timelineId, reqFor(m)).then(
        () => { if (++accepted === this.quorum) onQuorum(); },
        (err: Error) => {
          if (err instanceof XenonError && err.code === 'SK_GENERATION_FENCED') {
            // The metadata's generation is behind a safekeeper's (a restored metadata database?):
            // no retry can fix that; say so now rather than time out without a reason.
            this.logger.error('safekeeper already follows a newer generation', { safekeeper: m.id, timelineId, generation, err: err.message });
            onFenced(new XenonError('CP_SAFEKEEPERS_UNAVAILABLE', `safekeeper ${m.id} already follows a newer compute generation of ${timelineId} than ${generation}: ${err.message}`, { retryable: false }));
            return;
          }
          this.logger.warn('safekeeper did not accept the compute; retrying', { safekeeper: m.id, timelineId, generation, err: err.message, retryInMs: delay });
          this.later(delay, () => {
            if (this.current.get(timelineId) === generation) attempt(m, Math.min(delay * 2, RETRY_MAX_MS));
          });
        },
      );
    };
    for (const m of this.members) attempt(m, RETRY_MIN_MS);
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(this.noQuorum(timelineId, accepted, progress.errors)), timeoutMs);
    });
    try {
      await Promise.race([quorum, timeout]);
      // Accepted is not streaming yet: until a quorum streams, every commit would hang without a
      // word. Wait for that (bounded), so a start that cannot work fails with the reason.
      await Promise.race([this.streaming(timelineId, generation, progress), timeout]);
    } finally {
      clearTimeout(timer);
      progress.done = true;
    }
  }

  private async streaming(timelineId: string, generation: number, progress: { errors: string; done: boolean }): Promise<void> {
    // A short poll: this wait is on the path of every cold start (a status call costs ~1 ms).
    for (let wait = 5; !progress.done && !this.closed; wait = Math.min(wait * 2, 20)) {
      const st = await this.statuses(timelineId);
      const ok = st.filter((s) => s && s !== 'unreachable' && s.generation === generation && s.streaming).length;
      if (ok >= this.quorum) return;
      if (this.current.get(timelineId) !== generation) throw new XenonError('CP_SAFEKEEPERS_UNAVAILABLE', `a newer compute of ${timelineId} took over`);
      progress.errors = st.map((s, i) => `${this.members[i]!.id}: ${s === 'unreachable' ? 'unreachable' : s?.streaming ? 'streaming' : (s?.last_error ?? 'not streaming yet')}`).join('; ');
      await new Promise((r) => setTimeout(r, wait));
    }
  }

  private noQuorum(timelineId: string, accepted: number, errors: string): XenonError {
    return new XenonError('CP_SAFEKEEPERS_UNAVAILABLE', accepted < this.quorum
      ? `only ${accepted} of ${this.members.length} safekeepers accepted the compute of ${timelineId}; ${this.quorum} are needed`
      : `fewer than ${this.quorum} safekeepers stream from the compute of ${timelineId} (${errors})`);
  }

  private later(ms: number, fn: () => void): void {
    if (this.closed) return;
    const t = setTimeout(() => { this.timers.delete(t); fn(); }, ms);
    t.unref();
    this.timers.add(t);
  }

  /**
   * After a compute of `generation` stopped: waits (bounded) until a quorum has flushed WAL up to
   * `walEnd` (the end of its shutdown checkpoint), then tells the safekeepers to stop following.
   * Returns how many had flushed it.
   */
  async stopped(timelineId: string, generation: number, walEnd: bigint | undefined): Promise<{ flushed: number; quorum: boolean }> {
    if (this.current.get(timelineId) === generation) this.current.delete(timelineId);
    let flushed = 0;
    if (walEnd !== undefined) {
      const until = Date.now() + this.opts.stopWaitMs;
      for (;;) {
        const st = await this.statuses(timelineId);
        flushed = st.filter((s) => s && s !== 'unreachable' && parseLsn(s.flush_lsn) >= walEnd).length;
        if (flushed >= this.quorum || Date.now() >= until) break;
        await new Promise((r) => setTimeout(r, 50));
      }
      if (flushed < this.quorum) {
        this.logger.error('the shutdown checkpoint is not on a safekeeper quorum', { timelineId, walEnd: formatLsn(walEnd), flushed, quorum: this.quorum });
      }
    }
    await Promise.all(this.members.map((m) => m.client.unfollow(timelineId, generation).catch((err: Error) => {
      if (!(err instanceof XenonError && err.code === 'SK_GENERATION_FENCED')) this.logger.warn('safekeeper did not stop following', { safekeeper: m.id, timelineId, err: err.message });
    })));
    return { flushed, quorum: flushed >= this.quorum };
  }

  /** Every safekeeper's view of a timeline (unreachable ones included), for the API. */
  async report(timelineId: string): Promise<WalStatus['safekeepers']> {
    return Promise.all(this.members.map(async (m) => {
      try {
        const s = await m.client.status(timelineId);
        return { id: m.id, url: m.url, reachable: true, flush_lsn: s?.flush_lsn ?? '0/0', generation: s?.generation ?? 0, streaming: s?.streaming ?? false, lag_bytes: s?.lag_bytes ?? 0, last_error: s?.last_error ?? null };
      } catch (err) {
        return { id: m.id, url: m.url, reachable: false, error: (err as Error).message };
      }
    }));
  }

  /** Removes a deleted branch's WAL from every safekeeper (best effort). */
  async deleteTimeline(timelineId: string): Promise<void> {
    this.current.delete(timelineId);
    await Promise.all(this.members.map((m) => m.client.deleteTimeline(timelineId).catch((err: Error) => {
      if (!(err instanceof XenonError && err.code === 'SK_TIMELINE_NOT_FOUND')) this.logger.warn('could not delete a timeline on a safekeeper', { safekeeper: m.id, timelineId, err: err.message });
    })));
  }

  close(): void {
    this.closed = true;
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
  }
}
