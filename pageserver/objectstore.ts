/**
 * The pageserver's object store (`types.ts` {@link ObjectStore}): every byte the pageserver keeps
 * (index.json, images, WAL) lives here. {@link LocalObjectStore} keeps objects as files under a
 * directory; S3 is not supported yet (`createObjectStore` says so).
 */
import { randomBytes } from 'node:crypto';
import { mkdir, open, readdir, rename, rm, stat, unlink, type FileHandle } from 'node:fs/promises';
import { isAbsolute, join, resolve } from 'node:path';
import { Readable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { ConfigError } from '../lib/config.ts';
import { XenonError } from '../lib/errors.ts';
import type { ObjectInfo, ObjectStore } from './types.ts';

const SEGMENT_RE = /^[A-Za-z0-9._-]{1,255}$/;
const MAX_KEY = 1024;

/** Thrown by `get`/`getBuffer` when the object does not exist (callers pick the XenonError). */
export class ObjectNotFoundError extends Error {
  override name = 'ObjectNotFoundError';
  constructor(readonly key: string) {
    super(`object ${key} not found`);
  }
}

export const isObjectNotFound = (err: unknown): err is ObjectNotFoundError => err instanceof ObjectNotFoundError;

function badKey(key: string, why: string): XenonError {
  const msg = `invalid object key ${JSON.stringify(key.slice(0, 200))}: ${why}`;
  return new XenonError('CP_BAD_REQUEST', msg, { userMessage: msg });
}

/** Throws CP_BAD_REQUEST unless `key` is `/`-separated `[A-Za-z0-9._-]` segments (no `.`/`..`, no leading `/`). */
export function validateKey(key: string, opts: { prefix?: boolean } = {}): void {
  if (typeof key !== 'string') throw badKey(String(key), 'not a string');
  if (key.length > MAX_KEY) throw badKey(key, `longer than ${MAX_KEY} characters`);
  if (key === '') {
    if (opts.prefix) return;
    throw badKey(key, 'empty');
  }
  if (key.startsWith('/')) throw badKey(key, 'absolute');
  const parts = key.split('/');
  // A prefix may end with `/` (a folder) or in the middle of a segment.
  if (opts.prefix && parts[parts.length - 1] === '') parts.pop();
  for (const p of parts) {
    if (p === '') throw badKey(key, 'empty path segment');
    if (p === '.' || p === '..') throw badKey(key, 'relative path segment');
    if (!SEGMENT_RE.test(p)) throw badKey(key, 'only letters, digits, ".", "_" and "-" are allowed in a segment');
  }
}

function checkRange(key: string, range: { start: number; end: number } | undefined, size: number): { start: number; end: number } {
  if (!range) return { start: 0, end: size };
  const { start, end } = range;
  if (!Number.isSafeInteger(start) || !Number.isSafeInteger(end) || start < 0 || end < start) {
    throw new XenonError('CP_BAD_REQUEST', `bad byte range ${start}-${end} of ${key}`);
  }
  return { start: Math.min(start, size), end: Math.min(end, size) };
}

const isEnoent = (err: unknown): boolean => (err as NodeJS.ErrnoException).code === 'ENOENT';
/** Temporary files carry `~`, a character keys may not have: `list` never shows them. */
const TMP_MARK = '~tmp';

/**
 * Objects as files under `root`: key `a/b/c` is the file `root/a/b/c`. `put` writes a temporary
 * file in the same directory, fsyncs it, renames it over the key and fsyncs the directory, so a
 * reader sees the whole old object or the whole new one and a crash leaves one of the two.
 */
export class LocalObjectStore implements ObjectStore {
  readonly kind = 'local';
  readonly root: string;

  constructor(root: string) {
    this.root = resolve(root);
  }

  private path(key: string): string {
    validateKey(key);
    return join(this.root, ...key.split('/'));
  }

  async put(key: string, body: Buffer | Readable): Promise<{ size: number }> {
    const path = this.path(key);
    const dir = path.slice(0, path.lastIndexOf('/'));
    await mkdir(dir, { recursive: true, mode: 0o700 });
    const tmp = `${path}.${randomBytes(6).toString('hex')}${TMP_MARK}`;
    const fh = await open(tmp, 'wx', 0o600);
    let size = 0;
    try {
      if (Buffer.isBuffer(body)) {
        await fh.writeFile(body);
        size = body.length;
      } else {
        for await (const chunk of body as AsyncIterable<Buffer | string>) {
          const buf = typeof chunk === 'string' ? Buffer.from(chunk) : chunk;
          let off = 0;
          while (off < buf.length) off += (await fh.write(buf, off, buf.length - off)).bytesWritten;
          size += buf.length;
        }
      }
      await fh.sync();
      await fh.close();
      await rename(tmp, path);
    } catch (err) {
      await fh.close().catch(() => {});
      await unlink(tmp).catch(() => {});
      throw err;
    }
    await fsyncDir(dir);
    return { size };
  }

  /** Opens `key` for reading; `ObjectNotFoundError` when it does not exist. */
  private async openObject(key: string): Promise<FileHandle> {
    try {
      return await open(this.path(key), 'r');
    } catch (err) {
      if (isEnoent(err)) throw new ObjectNotFoundError(key);
      throw err;
    }
  }

  async get(key: string, range?: { start: number; end: number }): Promise<Readable> {
    const fh = await this.openObject(key);
    try {
      const size = (await fh.stat()).size;
      const r = checkRange(key, range, size);
      if (r.end === r.start) {
        await fh.close();
        return Readable.from([]);
      }
      return fh.createReadStream({ start: r.start, end: r.end - 1, autoClose: true });
    } catch (err) {
      await fh.close().catch(() => {});
      throw err;
    }
  }

  async getBuffer(key: string, range?: { start: number; end: number }): Promise<Buffer> {
    const fh = await this.openObject(key);
    try {
      const size = (await fh.stat()).size;
      const r = checkRange(key, range, size);
      const buf = Buffer.alloc(r.end - r.start);
      let off = 0;
      while (off < buf.length) {
        const { bytesRead } = await fh.read(buf, off, buf.length - off, r.start + off);
        if (bytesRead === 0) break;
        off += bytesRead;
      }
      return off === buf.length ? buf : buf.subarray(0, off);
    } finally {
      await fh.close();
    }
  }

  async head(key: string): Promise<ObjectInfo | undefined> {
    try {
      const st = await stat(this.path(key));
      return st.isFile() ? { key, size: st.size, mtime: st.mtime } : undefined;
    } catch (err) {
      if (isEnoent(err) || (err as NodeJS.ErrnoException).code === 'ENOTDIR') return undefined;
      throw err;
    }
  }

  async list(prefix: string): Promise<ObjectInfo[]> {
    validateKey(prefix, { prefix: true });
    const slash = prefix.lastIndexOf('/');
    const dirKey = slash < 0 ? '' : prefix.slice(0, slash);
    const out: ObjectInfo[] = [];
    const walk = async (dir: string, keyPrefix: string): Promise<void> => {
      let entries;
      try {
        entries = await readdir(dir, { withFileTypes: true });
      } catch (err) {
        if (isEnoent(err) || (err as NodeJS.ErrnoException).code === 'ENOTDIR') return;
        throw err;
      }
      for (const e of entries) {
        if (e.name.includes('~')) continue;
        const key = keyPrefix + e.name;
        if (e.isDirectory()) {
          // Only descend where keys can still match the prefix.
          const k = key + '/';
          if (k.startsWith(prefix) || prefix.startsWith(k)) await walk(join(dir, e.name), k);
        } else if (e.isFile() && key.startsWith(prefix)) {
          try {
            const st = await stat(join(dir, e.name));
            out.push({ key, size: st.size, mtime: st.mtime });
          } catch (err) {
            if (!isEnoent(err)) throw err; // deleted meanwhile
          }
        }
      }
    };
    await walk(dirKey === '' ? this.root : join(this.root, ...dirKey.split('/')), dirKey === '' ? '' : dirKey + '/');
    return out.sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0));
  }

  async delete(key: string): Promise<void> {
    try {
      await unlink(this.path(key));
    } catch (err) {
      if (!isEnoent(err)) throw err;
    }
  }

  async deletePrefix(prefix: string): Promise<void> {
    validateKey(prefix, { prefix: true });
    if (prefix === '') throw badKey(prefix, 'refusing to delete the whole store');
    if (prefix.endsWith('/')) {
      await rm(join(this.root, ...prefix.slice(0, -1).split('/')), { recursive: true, force: true });
      return;
    }
    for (const o of await this.list(prefix)) await this.delete(o.key);
  }
}

async function fsyncDir(dir: string): Promise<void> {
  const fh = await open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * The store named by `XENON_PAGESERVER_STORAGE`: a path or `file:///…` → {@link LocalObjectStore};
 * `s3://…` is not supported yet (ConfigError).
 */
export function createObjectStore(url: string): ObjectStore {
  if (/^s3:\/\//i.test(url)) {
    throw new ConfigError(`XENON_PAGESERVER_STORAGE=${url}: S3 object storage is not supported yet; use a local directory (a path or file:///…)`);
  }
  if (/^file:/i.test(url)) return new LocalObjectStore(fileURLToPath(url));
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(url)) {
    throw new ConfigError(`XENON_PAGESERVER_STORAGE=${url}: unsupported storage URL; use a local directory (a path or file:///…)`);
  }
  if (url === '') throw new ConfigError('XENON_PAGESERVER_STORAGE is empty');
  return new LocalObjectStore(isAbsolute(url) ? url : resolve(url));
}
