/** Typed client of a safekeeper's `/v1` API (used by the control plane, the vm driver and tests). */
import { callJson } from '../lib/http.ts';
import { XenonError } from '../lib/errors.ts';
import type { FollowRequest, SafekeeperApi, TimelineStatus, WalListing } from './api.ts';

export class SafekeeperClient implements SafekeeperApi {
  constructor(
    readonly baseUrl: string,
    private readonly opts: { timeoutMs?: number } = {},
  ) {}

  private call<T>(method: string, path: string, body?: unknown): Promise<T> {
    return callJson<T>(this.baseUrl, method, path, body, { timeoutMs: this.opts.timeoutMs ?? 10_000 });
  }

  private tl(id: string): string {
    return `/v1/timeline/${encodeURIComponent(id)}`;
  }

  follow(timelineId: string, req: FollowRequest): Promise<TimelineStatus> {
    return this.call('PUT', `${this.tl(timelineId)}/compute`, req);
  }

  unfollow(timelineId: string, generation: number): Promise<TimelineStatus> {
    return this.call('DELETE', `${this.tl(timelineId)}/compute?generation=${generation}`);
  }

  fence(timelineId: string, generation: number): Promise<TimelineStatus> {
    return this.call('POST', `${this.tl(timelineId)}/fence`, { generation });
  }

  async status(timelineId: string): Promise<TimelineStatus | null> {
    try {
      return await this.call<TimelineStatus>('GET', this.tl(timelineId));
    } catch (err) {
      if (err instanceof XenonError && err.code === 'SK_TIMELINE_NOT_FOUND') return null;
      throw err;
    }
  }

  async listTimelines(): Promise<TimelineStatus[]> {
    return (await this.call<{ timelines: TimelineStatus[] }>('GET', '/v1/timelines')).timelines;
  }

  listWal(timelineId: string): Promise<WalListing> {
    return this.call('GET', `${this.tl(timelineId)}/wal`);
  }

  async readWal(timelineId: string, file: string, range?: { start: number; end: number }): Promise<Buffer> {
    const path = `${this.tl(timelineId)}/wal/${encodeURIComponent(file)}`;
    let res: Response;
    try {
      res = await fetch(this.baseUrl + path, {
        headers: range ? { range: `bytes=${range.start}-${range.end - 1}` } : {},
        signal: AbortSignal.timeout(this.opts.timeoutMs ?? 30_000),
      });
    } catch (err) {
      throw new XenonError('SK_UNAVAILABLE', `GET ${path}: ${(err as Error).message}`, { cause: err });
    }
    const body = Buffer.from(await res.arrayBuffer());
    if (res.ok) return body;
    if (res.status === 404) throw new XenonError('SK_WAL_NOT_FOUND', `GET ${path}: no such WAL file`);
    throw new XenonError('SK_UNAVAILABLE', `GET ${path}: HTTP ${res.status}: ${body.toString('utf8').slice(0, 300)}`);
  }

  async deleteTimeline(timelineId: string): Promise<void> {
    await this.call('DELETE', this.tl(timelineId));
  }
}
