/**
 * The control plane's side of WAL durability (DESIGN §4 "WAL and durability"): which settings a
 * compute needs to commit only on a safekeeper quorum, where a new compute's WAL must start, and
 * telling the safekeepers which compute — of which generation — to follow.
 */
import { XenonError } from '../lib/errors.ts';
import type { Logger } from '../lib/logger.ts';
import { formatLsn, parseLsn } from '../lib/lsn.ts';
import type { ComputeTarget, FollowRequest, TimelineStatus } from '../safekeeper/api.ts';
import { SafekeeperClient } from '../safekeeper/client.ts';
import type { WalStatus } from './api.ts';
import type { SafekeeperRef } from './config.ts';

interface Member extends SafekeeperRef {
  client: SafekeeperClient;
}

export interface StartPoint {
  /** The highest flush LSN among the safekeepers that answered (a majority): the compute must have WAL up to here. */
  upTo: string;
  /** Safekeeper URLs, most WAL first. */
  order: string[];
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
   * Where a new compute of `timelineId` must start: a majority must answer, since any commit ever
   * acknowledged is on a majority and so on at least one of those that answered.
   */
  async startPoint(timelineId: string): Promise<StartPoint> {
    const st = await this.statuses(timelineId);
    const up = st.map((s, i) => ({ m: this.members[i]!, s })).filter((x) => x.s !== 'unreachable');
    if (up.length < this.quorum) {
      const down = st.map((s, i) => (s === 'unreachable' ? this.members[i]!.id : '')).filter(Boolean);
      throw new XenonError('CP_SAFEKEEPERS_UNAVAILABLE', `only ${up.length} of ${this.members.length} safekeepers answered (unreachable: ${down.join(', ')}); ${this.quorum} are needed`);
    }
    const flush = (s: TimelineStatus | null | 'unreachable'): bigint => (s && s !== 'unreachable' ? parseLsn(s.flush_lsn) : 0n);
    up.sort((a, b) => (flush(b.s) > flush(a.s) ? 1 : flush(b.s) < flush(a.s) ? -1 : 0));
    return {
      upTo: formatLsn(flush(up[0]!.s)),
      order: up.map((x) => x.m.url),
      statuses: Object.fromEntries(st.map((s, i) => [this.members[i]!.id, s])),
    };
  }

  /**
   * Tells every safekeeper to follow the compute of `generation`. Resolves once a quorum has
   * accepted (a compute without a quorum could not commit); the others are retried in the
   * background until they accept or a newer generation takes over.
   */
  async follow(timelineId: string, generation: number, compute: ComputeTarget, startLsn: string, timeoutMs = 10_000): Promise<void> {
    this.current.set(timelineId, generation);
    const reqFor = (m: Member): FollowRequest => ({ generation, compute, start_lsn: startLsn, peers: this.members.filter((p) => p !== m).map((p) => p.url) });
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
    for (let wait = 5; !progress.done && !this.closed; wait = Math.min(wait * 2, 100)) {
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
