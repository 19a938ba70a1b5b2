/**
 * Internal seams of the pageserver (not for other services: they use `api.ts` / `client.ts`).
 * The object store holds every byte; `Timelines` owns `index.json` (reads, validation, atomic
 * read-modify-write under a per-timeline lock); ingest, imaging, LSN-by-time, the planner and
 * GC are written against these two.
 */
import type { Readable } from 'node:stream';
import type { TimelineIndex } from './api.ts';

export interface ObjectInfo {
  key: string;
  size: number;
  mtime: Date;
}

/**
 * Keys are `/`-separated, of `[A-Za-z0-9._-]` segments (no `..`, no leading `/`). `put` is
 * atomic: a reader sees the whole old object or the whole new one, never part; a crash during a
 * put leaves the old object (or none).
 */
export interface ObjectStore {
  readonly kind: string;
  put(key: string, body: Buffer | Readable): Promise<{ size: number }>;
  /** Throws `PS_OBJECT_NOT_FOUND`-style `XenonError` (`PS_WAL_MISSING`/`PS_IMAGE_MISSING` chosen by the caller) when absent. */
  get(key: string, range?: { start: number; end: number }): Promise<Readable>;
  /** The whole object as a Buffer (small objects: index.json, WAL segments). */
  getBuffer(key: string, range?: { start: number; end: number }): Promise<Buffer>;
  head(key: string): Promise<ObjectInfo | undefined>;
  /** Every object whose key starts with `prefix`, sorted by key. */
  list(prefix: string): Promise<ObjectInfo[]>;
  /** No error when absent. */
  delete(key: string): Promise<void>;
  /** Deletes every object under `prefix`. */
  deletePrefix(prefix: string): Promise<void>;
}

export const keys = {
  tenant: (t: string): string => `tenants/${t}/`,
  timeline: (t: string, tl: string): string => `tenants/${t}/timelines/${tl}/`,
  index: (t: string, tl: string): string => `tenants/${t}/timelines/${tl}/index.json`,
  image: (t: string, tl: string, id: string): string => `tenants/${t}/timelines/${tl}/images/${id}.tar`,
  wal: (t: string, tl: string, name: string): string => `tenants/${t}/timelines/${tl}/wal/${name}`,
} as const;

export interface TimelineRef {
  tenantId: string;
  timelineId: string;
}

export interface Timelines {
  readonly store: ObjectStore;
  /** Every timeline of every tenant (from the store, cached). */
  list(): Promise<TimelineRef[]>;
  /** Throws `PS_TIMELINE_NOT_FOUND` / `PS_INDEX_CORRUPT`. */
  read(tenantId: string, timelineId: string): Promise<TimelineIndex>;
  /**
   * Read-modify-write of `index.json` under the timeline's lock; `fn` mutates the copy it is
   * given (and may do I/O, e.g. upload a file first). Written atomically; returns the new index.
   * Refuses (`PS_INDEX_CORRUPT`) to touch a timeline whose index is corrupted.
   */
  update(tenantId: string, timelineId: string, fn: (index: TimelineIndex) => void | Promise<void>): Promise<TimelineIndex>;
}
