/**
 * Timelines over the object store (`types.ts` {@link Timelines}): `index.json` per timeline,
 * validated strictly on every read (`PS_INDEX_CORRUPT` naming the key), read-modify-write under
 * an in-process per-timeline lock, tenants and timelines created and deleted, and a cached map of
 * every timeline's ancestor (the children of a timeline pin their branch points against its GC).
 */
import { XenonError } from '../lib/errors.ts';
import { parseLsn } from '../lib/lsn.ts';
import { IMAGE_KINDS, type TimelineIndex } from './api.ts';
import { keys, type ObjectStore, type TimelineRef, type Timelines } from './types.ts';
import { isObjectNotFound } from './objectstore.ts';

/** Tenant and timeline ids (api.ts). */
export const ID_RE = /^[a-z0-9][a-z0-9-]{0,62}$/;
const IMAGE_ID_RE = /^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$/;
const WAL_NAME_RE = /^[0-9A-F]{8}(\.history|[0-9A-F]{16}(\.partial)?)$/;

function badRequest(msg: string): XenonError {
  return new XenonError('CP_BAD_REQUEST', msg, { userMessage: msg });
}

/** Validates a tenant or timeline id (`what` names it in the error). */
export function checkId(raw: unknown, what: string): string {
  if (typeof raw !== 'string' || !ID_RE.test(raw)) throw badRequest(`${what} must match ^[a-z0-9][a-z0-9-]{0,62}$`);
  return raw;
}

const notFound = (t: string, tl?: string): XenonError =>
  new XenonError('PS_TIMELINE_NOT_FOUND', tl === undefined ? `tenant ${t} not found` : `timeline ${t}/${tl} not found`, {
    userMessage: tl === undefined ? `tenant ${t} not found` : `timeline ${tl} not found`,
  });

/** Throws PS_INDEX_CORRUPT naming `key` unless `raw` is a valid {@link TimelineIndex} of (t, tl). */
export function validateIndex(raw: unknown, key: string, t: string, tl: string): TimelineIndex {
  const fail = (why: string): never => {
    throw new XenonError('PS_INDEX_CORRUPT', `${key}: ${why}`);
  };
  const obj = (v: unknown, what: string): Record<string, unknown> => {
    if (typeof v !== 'object' || v === null || Array.isArray(v)) fail(`${what} is not an object`);
    return v as Record<string, unknown>;
  };
  const arr = (v: unknown, what: string): unknown[] => (Array.isArray(v) ? v : fail(`${what} is not an array`));
  const str = (v: unknown, what: string): string => (typeof v === 'string' ? v : fail(`${what} is not a string`));
  const lsn = (v: unknown, what: string): bigint => {
    try {
      return parseLsn(str(v, what));
    } catch (err) {
      if (err instanceof XenonError && err.code === 'PS_INDEX_CORRUPT') throw err;
      return fail(`${what} is not an LSN`);
    }
  };
  const time = (v: unknown, what: string): void => {
    if (Number.isNaN(Date.parse(str(v, what)))) fail(`${what} is not a timestamp`);
  };
  const int = (v: unknown, what: string, min: number): number =>
    typeof v === 'number' && Number.isSafeInteger(v) && v >= min ? v : fail(`${what} is not an integer >= ${min}`);

  const i = obj(raw, 'the index');
  if (i.version !== 1) fail(`unsupported version ${JSON.stringify(i.version)}`);
  if (i.tenant_id !== t) fail(`tenant_id ${JSON.stringify(i.tenant_id)} is not ${t}`);
  if (i.timeline_id !== tl) fail(`timeline_id ${JSON.stringify(i.timeline_id)} is not ${tl}`);
  time(i.created_at, 'created_at');
  if (i.ancestor !== null) {
    const a = obj(i.ancestor, 'ancestor');
    if (typeof a.timeline_id !== 'string' || !ID_RE.test(a.timeline_id) || a.timeline_id === tl) fail('ancestor.timeline_id is not a timeline id');
    lsn(a.lsn, 'ancestor.lsn');
  }
  let prev = -1n;
  let prevTli = 0;
  arr(i.pg_history, 'pg_history').forEach((p, n) => {
    const o = obj(p, `pg_history[${n}]`);
    const tli = int(o.pg_timeline, `pg_history[${n}].pg_timeline`, 1);
    const b = lsn(o.begin_lsn, `pg_history[${n}].begin_lsn`);
    if (b < prev || tli <= prevTli) fail(`pg_history[${n}] is not after the piece before it`);
    prev = b;
    prevTli = tli;
  });
  const ids = new Set<string>();
  arr(i.images, 'images').forEach((im, n) => {
    const o = obj(im, `images[${n}]`);
    const id = str(o.id, `images[${n}].id`);
    if (!IMAGE_ID_RE.test(id) || ids.has(id)) fail(`images[${n}].id is not a valid, unique image id`);
    ids.add(id);
    const l = lsn(o.lsn, `images[${n}].lsn`);
    if (lsn(o.end_lsn, `images[${n}].end_lsn`) < l) fail(`images[${n}].end_lsn is before its lsn`);
    int(o.pg_timeline, `images[${n}].pg_timeline`, 1);
    if (!(IMAGE_KINDS as readonly unknown[]).includes(o.kind)) fail(`images[${n}].kind is not one of ${IMAGE_KINDS.join(', ')}`);
    int(o.size, `images[${n}].size`, 0);
    time(o.created_at, `images[${n}].created_at`);
  });
  arr(i.wal, 'wal').forEach((w, n) => {
    const o = obj(w, `wal[${n}]`);
    if (!WAL_NAME_RE.test(str(o.name, `wal[${n}].name`))) fail(`wal[${n}].name is not a WAL file name`);
    if (o.kind !== 'segment' && o.kind !== 'history') fail(`wal[${n}].kind is not segment or history`);
    int(o.pg_timeline, `wal[${n}].pg_timeline`, 1);
    if (o.start_lsn !== undefined) lsn(o.start_lsn, `wal[${n}].start_lsn`);
    if (o.end_lsn !== undefined) lsn(o.end_lsn, `wal[${n}].end_lsn`);
    int(o.size, `wal[${n}].size`, 0);
  });
  lsn(i.last_record_lsn, 'last_record_lsn');
  lsn(i.gc_cutoff_lsn, 'gc_cutoff_lsn');
  arr(i.lsn_samples, 'lsn_samples').forEach((s, n) => {
    const a = arr(s, `lsn_samples[${n}]`);
    if (a.length !== 2) fail(`lsn_samples[${n}] is not a [time, lsn] pair`);
    time(a[0], `lsn_samples[${n}][0]`);
    lsn(a[1], `lsn_samples[${n}][1]`);
  });
  arr(i.leases, 'leases').forEach((l, n) => {
    const o = obj(l, `leases[${n}]`);
    lsn(o.lsn, `leases[${n}].lsn`);
    time(o.until, `leases[${n}].until`);
  });
  return raw as TimelineIndex;
}

/** A new, empty index (a root when `ancestor` is null). */
export function newIndex(t: string, tl: string, ancestor: { timeline_id: string; lsn: string } | null, now = new Date()): TimelineIndex {
  return {
    version: 1,
    tenant_id: t,
    timeline_id: tl,
    created_at: now.toISOString(),
    ancestor,
    pg_history: [],
    images: [],
    wal: [],
    last_record_lsn: ancestor?.lsn ?? '0/0',
    // A branch has no history before its branch point.
    gc_cutoff_lsn: ancestor?.lsn ?? '0/0',
    lsn_samples: [],
    leases: [],
  };
}

/** What the ancestor map knows of one timeline. */
export type AncestorEntry = { ancestor: { timelineId: string; lsn: bigint } | null } | { corrupt: string };

/**
 * {@link Timelines} over an {@link ObjectStore}. Construct it in tests with
 * `new StoreTimelines(new LocalObjectStore(dir))`.
 */
export class StoreTimelines implements Timelines {
  private readonly locks = new Map<string, Promise<unknown>>();
  /** tenant → timeline → ancestor (built from the store on first use, kept current by create/delete). */
  private ancestors = new Map<string, Map<string, AncestorEntry>>();
  private scanned: Promise<void> | undefined;

  constructor(readonly store: ObjectStore) {}

  /** Runs `fn` under the lock of `name` (an in-process mutex; one pageserver owns a store). */
  async withLock<T>(name: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.locks.get(name) ?? Promise.resolve();
    const p = prev.then(fn, fn);
    const tail = p.catch(() => {});
    this.locks.set(name, tail);
    try {
      return await p;
    } finally {
      if (this.locks.get(name) === tail) this.locks.delete(name);
    }
  }

  private async scan(): Promise<void> {
    this.scanned ??= (async () => {
      const map = new Map<string, Map<string, AncestorEntry>>();
      for (const o of await this.store.list('tenants/')) {
        const m = /^tenants\/([^/]+)\/(?:tenant\.json|timelines\/([^/]+)\/index\.json)$/.exec(o.key);
        if (!m || !ID_RE.test(m[1]!)) continue;
        const tenant = map.get(m[1]!) ?? new Map<string, AncestorEntry>();
        map.set(m[1]!, tenant);
        if (m[2] === undefined || !ID_RE.test(m[2])) continue;
        tenant.set(m[2], await this.entryOf(m[1]!, m[2]));
      }
      this.ancestors = map;
    })();
    try {
      await this.scanned;
    } catch (err) {
      this.scanned = undefined;
      throw err;
    }
  }

  private async entryOf(t: string, tl: string): Promise<AncestorEntry> {
    try {
      const idx = await this.read(t, tl);
      return { ancestor: idx.ancestor ? { timelineId: idx.ancestor.timeline_id, lsn: parseLsn(idx.ancestor.lsn) } : null };
    } catch (err) {
      if (err instanceof XenonError && err.code === 'PS_INDEX_CORRUPT') return { corrupt: err.message };
      throw err;
    }
  }

  async list(): Promise<TimelineRef[]> {
    await this.scan();
    const out: TimelineRef[] = [];
    for (const [tenantId, tls] of [...this.ancestors].sort()) for (const timelineId of [...tls.keys()].sort()) out.push({ tenantId, timelineId });
    return out;
  }

  /** The timelines of a tenant with their ancestors (corrupt ones marked). Throws when the tenant is unknown. */
  async tenantTimelines(t: string): Promise<Map<string, AncestorEntry>> {
    await this.scan();
    const m = this.ancestors.get(t);
    if (!m) throw notFound(t);
    return m;
  }

  async tenantExists(t: string): Promise<boolean> {
    await this.scan();
    return this.ancestors.has(t);
  }

  /** Children of (t, tl) with their branch points; throws PS_INDEX_CORRUPT when a timeline of the tenant is unreadable (it might be one). */
  async children(t: string, tl: string, opts: { lenient?: boolean } = {}): Promise<{ timelineId: string; lsn: bigint }[]> {
    const out: { timelineId: string; lsn: bigint }[] = [];
    for (const [id, e] of await this.tenantTimelines(t)) {
      if ('corrupt' in e && opts.lenient) continue;
      if ('corrupt' in e) throw new XenonError('PS_INDEX_CORRUPT', `cannot tell the children of ${t}/${tl}: ${e.corrupt}`);
      if (e.ancestor?.timelineId === tl) out.push({ timelineId: id, lsn: e.ancestor.lsn });
    }
    return out.sort((a, b) => (a.lsn < b.lsn ? -1 : a.lsn > b.lsn ? 1 : a.timelineId < b.timelineId ? -1 : 1));
  }

  async read(t: string, tl: string): Promise<TimelineIndex> {
    const key = keys.index(t, tl);
    let buf: Buffer;
    try {
      buf = await this.store.getBuffer(key);
    } catch (err) {
      if (isObjectNotFound(err)) throw notFound(t, tl);
      throw err;
    }
    let raw: unknown;
    try {
      raw = JSON.parse(buf.toString('utf8'));
    } catch {
      throw new XenonError('PS_INDEX_CORRUPT', `${key}: not valid JSON`);
    }
    return validateIndex(raw, key, t, tl);
  }

  async update(t: string, tl: string, fn: (index: TimelineIndex) => void | Promise<void>): Promise<TimelineIndex> {
    await this.scan();
    return this.withLock(`${t}/${tl}`, async () => {
      const idx = structuredClone(await this.read(t, tl));
      await fn(idx);
      const key = keys.index(t, tl);
      validateIndex(idx, key, t, tl);
      // Deleted (with its tenant) while `fn` ran: do not bring the index back.
      if (!this.ancestors.get(t)?.has(tl)) throw notFound(t, tl);
      await this.store.put(key, Buffer.from(JSON.stringify(idx, null, 1)));
      return idx;
    });
  }

  /** Creates the tenant (idempotent); returns whether it was new. */
  async createTenant(t: string): Promise<boolean> {
    await this.scan();
    return this.withLock(`tenant:${t}`, async () => {
      if (this.ancestors.has(t)) return false;
      await this.store.put(`${keys.tenant(t)}tenant.json`, Buffer.from(JSON.stringify({ tenant_id: t, created_at: new Date().toISOString() })));
      this.ancestors.set(t, new Map());
      return true;
    });
  }

  /** Deletes the tenant and every object of it. */
  async deleteTenant(t: string): Promise<void> {
    await this.tenantTimelines(t);
    await this.withLock(`tenant:${t}`, async () => {
      // The marker first: a crash midway leaves no half-listed tenant behind.
      await this.store.delete(`${keys.tenant(t)}tenant.json`);
      this.ancestors.delete(t);
      await this.store.deletePrefix(keys.tenant(t));
    });
  }

  /**
   * Writes a new timeline's index. `check` runs first, under the tenant's lock and the
   * ancestor's timeline lock (validation against the ancestor). Throws PS_TIMELINE_EXISTS.
   */
  async createTimeline(index: TimelineIndex, check?: () => Promise<void>): Promise<void> {
    const t = index.tenant_id;
    const tl = index.timeline_id;
    const tenant = await this.tenantTimelines(t);
    await this.withLock(`tenant:${t}`, async () => {
      if (tenant.has(tl) || (await this.store.head(keys.index(t, tl)))) {
        throw new XenonError('PS_TIMELINE_EXISTS', `timeline ${t}/${tl} exists`, { userMessage: `timeline ${tl} already exists` });
      }
      const write = async (): Promise<void> => {
        if (check) await check();
        const key = keys.index(t, tl);
        validateIndex(index, key, t, tl);
        await this.store.put(key, Buffer.from(JSON.stringify(index, null, 1)));
        tenant.set(tl, { ancestor: index.ancestor ? { timelineId: index.ancestor.timeline_id, lsn: parseLsn(index.ancestor.lsn) } : null });
      };
      // Under the ancestor's lock: its GC (which runs under that lock and reads the children
      // there) sees the new branch point, or has finished before `check` reads its index.
      if (index.ancestor) await this.withLock(`${t}/${index.ancestor.timeline_id}`, write);
      else await write();
    });
  }

  /**
   * Deletes a timeline and its objects. Refuses (PS_TIMELINE_HAS_CHILDREN) while branches of it
   * exist, and (PS_INDEX_CORRUPT) when its index — or any index of the tenant, which might be a
   * child — is corrupt: nothing is deleted then.
   */
  async deleteTimeline(t: string, tl: string): Promise<void> {
    const tenant = await this.tenantTimelines(t);
    await this.withLock(`tenant:${t}`, async () => {
      const e = tenant.get(tl);
      if (!e) throw notFound(t, tl);
      if ('corrupt' in e) throw new XenonError('PS_INDEX_CORRUPT', `refusing to delete ${t}/${tl}: ${e.corrupt}`);
      await this.read(t, tl); // corrupt since the scan: refuse as well
      const kids = await this.children(t, tl);
      if (kids.length > 0) {
        throw new XenonError('PS_TIMELINE_HAS_CHILDREN', `timeline ${t}/${tl} has branches ${kids.map((k) => k.timelineId).join(', ')}`, {
          userMessage: `the branch has child branches (${kids.map((k) => k.timelineId).join(', ')}); delete them first`,
        });
      }
      await this.withLock(`${t}/${tl}`, async () => {
        await this.store.delete(keys.index(t, tl));
        tenant.delete(tl);
        await this.store.deletePrefix(keys.timeline(t, tl));
      });
    });
  }

  /** Re-reads one timeline's index into the ancestor map (after an operator repaired it). */
  async refresh(t: string, tl: string): Promise<void> {
    const tenant = await this.tenantTimelines(t);
    if (await this.store.head(keys.index(t, tl))) tenant.set(tl, await this.entryOf(t, tl));
    else tenant.delete(tl);
  }
}
