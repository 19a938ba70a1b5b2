/** Typed client of the pageserver's `/v1` API (used by the control plane, the vm driver and tests). */
import type { Readable } from 'node:stream';
import { XenonError, isErrorCode, type ErrorBody } from '../lib/errors.ts';
import { callJson } from '../lib/http.ts';
import type {
  AttachComputeRequest,
  CreateTimelineRequest,
  GcResult,
  ImageInfo,
  ImageKind,
  StartPlan,
  TimelineStatus,
} from './api.ts';

export interface UploadImageMeta {
  lsn: string;
  end_lsn: string;
  pg_timeline: number;
  kind: ImageKind;
}

export class PageserverClient {
  constructor(
    readonly baseUrl: string,
    private readonly opts: { timeoutMs?: number } = {},
  ) {
    this.baseUrl = baseUrl.replace(/\/+$/, '');
  }

  private call<T>(method: string, path: string, body?: unknown, timeoutMs?: number): Promise<T> {
    return callJson<T>(this.baseUrl, method, path, body, { timeoutMs: timeoutMs ?? this.opts.timeoutMs ?? 30_000 });
  }

  private tl(t: string, tl: string): string {
    return `/v1/tenant/${encodeURIComponent(t)}/timeline/${encodeURIComponent(tl)}`;
  }

  /** Creates a tenant (idempotent). */
  async createTenant(tenantId: string): Promise<void> {
    await this.call('POST', '/v1/tenant', { tenant_id: tenantId });
  }

  async deleteTenant(tenantId: string): Promise<void> {
    await this.call('DELETE', `/v1/tenant/${encodeURIComponent(tenantId)}`);
  }

  /** A root timeline (no ancestor) or a branch. */
  createTimeline(tenantId: string, req: CreateTimelineRequest): Promise<TimelineStatus> {
    return this.call('POST', `/v1/tenant/${encodeURIComponent(tenantId)}/timeline`, req);
  }

  /** The timeline's status; null when the tenant or timeline is unknown. */
  async timeline(tenantId: string, timelineId: string): Promise<TimelineStatus | null> {
    try {
      return await this.call<TimelineStatus>('GET', this.tl(tenantId, timelineId));
    } catch (err) {
      if (err instanceof XenonError && err.code === 'PS_TIMELINE_NOT_FOUND') return null;
      throw err;
    }
  }

  async listTimelines(tenantId: string): Promise<TimelineStatus[]> {
    return (await this.call<{ timelines: TimelineStatus[] }>('GET', `/v1/tenant/${encodeURIComponent(tenantId)}/timeline`)).timelines;
  }

  async deleteTimeline(tenantId: string, timelineId: string): Promise<void> {
    await this.call('DELETE', this.tl(tenantId, timelineId));
  }

  /** Uploads an image (a tar of a data directory), streamed. */
  async uploadImage(tenantId: string, timelineId: string, body: Buffer | Readable, meta: UploadImageMeta): Promise<ImageInfo> {
    const q = new URLSearchParams({ lsn: meta.lsn, end_lsn: meta.end_lsn, pg_timeline: String(meta.pg_timeline), kind: meta.kind });
    const path = `${this.tl(tenantId, timelineId)}/image?${q}`;
    let res: Response;
    try {
      res = await fetch(this.baseUrl + path, {
        method: 'PUT',
        headers: { 'content-type': 'application/x-tar' },
        body: Buffer.isBuffer(body) ? body : (body as unknown as ReadableStream),
        // Node's fetch needs this for a streamed body.
        ...(Buffer.isBuffer(body) ? {} : { duplex: 'half' }),
        signal: AbortSignal.timeout(this.opts.timeoutMs ?? 600_000),
      } as RequestInit);
    } catch (err) {
      throw new XenonError('PS_UNAVAILABLE', `PUT ${path}: ${(err as Error).message}`, { cause: err });
    }
    return parseResponse<ImageInfo>(res, 'PUT', path);
  }

  /** The image's tar as a web stream (the caller consumes it). */
  async downloadImage(tenantId: string, timelineId: string, imageId: string): Promise<Response> {
    return this.fetchRaw(`${this.tl(tenantId, timelineId)}/image/${encodeURIComponent(imageId)}`);
  }

  /** A WAL file as the resolver serves it (404 → PS_WAL_NOT_FOUND). */
  async readWal(tenantId: string, timelineId: string, file: string, upto?: string): Promise<Buffer> {
    const q = upto === undefined ? '' : `?upto=${encodeURIComponent(upto)}`;
    const res = await this.fetchRaw(`${this.tl(tenantId, timelineId)}/wal/${encodeURIComponent(file)}${q}`);
    return Buffer.from(await res.arrayBuffer());
  }

  private async fetchRaw(path: string): Promise<Response> {
    let res: Response;
    try {
      res = await fetch(this.baseUrl + path, { signal: AbortSignal.timeout(this.opts.timeoutMs ?? 600_000) });
    } catch (err) {
      throw new XenonError('PS_UNAVAILABLE', `GET ${path}: ${(err as Error).message}`, { cause: err });
    }
    if (!res.ok) await parseResponse(res, 'GET', path);
    return res;
  }

  /** How to start a compute of the timeline at `lsn` (default: its tip). */
  startPlan(tenantId: string, timelineId: string, lsn?: string): Promise<StartPlan> {
    const q = lsn === undefined ? '' : `?lsn=${encodeURIComponent(lsn)}`;
    return this.call('GET', `${this.tl(tenantId, timelineId)}/start${q}`);
  }

  async attachCompute(tenantId: string, timelineId: string, compute: AttachComputeRequest): Promise<void> {
    await this.call('PUT', `${this.tl(tenantId, timelineId)}/compute`, compute);
  }

  async detachCompute(tenantId: string, timelineId: string): Promise<void> {
    await this.call('DELETE', `${this.tl(tenantId, timelineId)}/compute`);
  }

  /** Makes a `BASE_BACKUP` image from the attached compute now. */
  makeImage(tenantId: string, timelineId: string): Promise<ImageInfo> {
    return this.call('POST', `${this.tl(tenantId, timelineId)}/image`, undefined, 600_000);
  }

  gc(tenantId: string, timelineId: string): Promise<GcResult> {
    return this.call('POST', `${this.tl(tenantId, timelineId)}/gc`);
  }

  lease(tenantId: string, timelineId: string, lsn: string, ttlSeconds: number): Promise<{ lsn: string; until: string }> {
    return this.call('POST', `${this.tl(tenantId, timelineId)}/lease`, { lsn, ttl_seconds: ttlSeconds });
  }

  async lsnByTime(tenantId: string, timelineId: string, time: Date | string): Promise<string> {
    const q = new URLSearchParams({ tenant: tenantId, timeline: timelineId, time: typeof time === 'string' ? time : time.toISOString() });
    return (await this.call<{ lsn: string }>('GET', `/v1/lsn_by_time?${q}`)).lsn;
  }
}

async function parseResponse<T>(res: Response, method: string, path: string): Promise<T> {
  const text = await res.text();
  let json: unknown;
  try {
    json = text ? JSON.parse(text) : undefined;
  } catch {
    throw new XenonError('PS_UNAVAILABLE', `${method} ${path}: HTTP ${res.status} with a non-JSON body`, { retryable: res.status >= 500 });
  }
  if (res.ok) return json as T;
  const e = (json as Partial<ErrorBody> | undefined)?.error;
  if (e && typeof e.code === 'string' && isErrorCode(e.code)) {
    throw new XenonError(e.code, `${method} ${path}: ${e.message}`, { userMessage: e.message, retryable: e.retryable });
  }
  throw new XenonError('PS_UNAVAILABLE', `${method} ${path}: HTTP ${res.status}`, { retryable: res.status >= 500 });
}
