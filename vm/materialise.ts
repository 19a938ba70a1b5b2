/**
 * Materialises a compute's data directory from the pageserver (DESIGN §4 "Compute start
 * (stateless)"): the {@link StartPlan}'s image is streamed into `tar -x` (as the compute's OS
 * user), then either
 * - `crash`: the plan's WAL files go into `pg_wal` and a `shutdown` image is marked as not shut
 *   down, so that Postgres replays all of it in crash recovery on the same timeline (a `backup`
 *   image keeps its `backup_label`: crash recovery from it reaches the end of the backup from
 *   `pg_wal` alone); or
 * - `archive`: `recovery.signal`, and settings whose `restore_command` runs `restore-wal.js`
 *   against the pageserver's WAL resolver; recovery ends where the served WAL ends and Postgres
 *   promotes onto a new timeline. `hot_standby=off`: no client connects before the promotion.
 */
import { spawn } from 'node:child_process';
import { constants, createWriteStream, realpathSync, statSync } from 'node:fs';
import { chmod, chown, copyFile, mkdir, open, readdir, rename, rm, truncate } from 'node:fs/promises';
import { dirname, join, sep } from 'node:path';
import { get as httpGet, type ClientRequest, type IncomingMessage } from 'node:http';
import { get as httpsGet } from 'node:https';
import { Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { fileURLToPath } from 'node:url';
import { isErrorCode, XenonError, type ErrorCode } from '../lib/errors.ts';
import type { Logger } from '../lib/logger.ts';
import { parseLsn, segmentFileName, segmentOf, WAL_SEGMENT_SIZE } from '../lib/lsn.ts';
import { ensureOwnedDir, type RunAs } from '../lib/postgres.ts';
import type { StartPlan } from '../pageserver/api.ts';
import type { ImageCache } from './image-cache.ts';
import { markNotShutDown } from './pg-control.ts';
import { writeFileDurably } from './wal-restore.ts';

export interface MaterialiseOptions {
  /** Created fresh: refused when it exists and is not empty. Its parent receives `restore-wal.js`. */
  dataDir: string;
  plan: StartPlan;
  /** The compute's OS user: owns every file written (undefined: this process' user). */
  runAs: RunAs | undefined;
  logger: Logger;
  /** Longest wait for a response's headers, or between two chunks of a body (default 60 s). */
  fetchTimeoutMs?: number;
  /** WAL files downloaded at once in `crash` mode (default 4). */
  walConcurrency?: number;
  /**
   * Unpacked images on this host: where it is enabled the data directory is a reflink clone of
   * the cached image (fetched into the cache first on a miss) instead of a `tar -x` of a stream.
   */
  cache?: ImageCache;
  /**
   * The `restore_command` of an archive start, given the prefetch directory on this host (the
   * default runs restore-wal.js with this host's Node.js). A compute VM, which sees the data
   * through its own mount and has no Node.js, brings its own.
   */
  restoreCommand?: (restoreUrl: string, lsn: string, prefetchDir: string) => string;
}

export interface MaterialiseResult {
  /** Settings for this start only (never persist them): `archive` mode's recovery settings. */
  settings: Record<string, string>;
  ms: number;
  /** Bytes downloaded (image + WAL). */
  bytes: number;
  /** `hit`/`miss`: the image came from the host's image cache (fetched into it first on a miss). */
  cache: 'hit' | 'miss' | 'off';
}

/** The `restore_command` script shipped with this module (copied next to each data dir). */
export const RESTORE_WAL_SCRIPT = fileURLToPath(new URL('./restore-wal.js', import.meta.url));

const WAL_FILE_NAME = /^(?:[0-9A-F]{24}|[0-9A-F]{8}\.history)$/;
const LEFTOVERS = ['postmaster.pid', 'postmaster.opts', 'standby.signal', 'recovery.signal'];

/** Extracts the plan's image and prepares recovery; see the module comment. */
export async function materialise(o: MaterialiseOptions): Promise<MaterialiseResult> {
  const started = Date.now();
  const { dataDir, plan, runAs } = o;
  const log = o.logger.child({ timeline: plan.timeline_id, image: plan.image.id, mode: plan.mode });
  const entries = await readdir(dataDir).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return [];
    throw err;
  });
  if (entries.length) throw new XenonError('CP_CONFLICT', `${dataDir} exists and is not empty: refusing to materialise into it`);
  if (plan.mode !== 'crash' && plan.mode !== 'archive') throw new XenonError('CP_BAD_REQUEST', `unknown start mode ${JSON.stringify(plan.mode)}`);
  for (const w of plan.wal) {
    if (!WAL_FILE_NAME.test(w.name)) throw new XenonError('CP_BAD_REQUEST', `not a WAL file name in the start plan: ${JSON.stringify(w.name)}`);
  }
  const fetchTimeoutMs = o.fetchTimeoutMs ?? 60_000;
  let node: string | undefined;
  if (plan.mode === 'archive') {
    if (!plan.restore_url) throw new XenonError('CP_BAD_REQUEST', 'an archive start plan without restore_url');
  }
  if (plan.mode === 'archive' && !o.restoreCommand) {
    node = realpathSync(process.execPath);
    if (runAs) assertReachable(node, runAs, 'the Node.js binary (restore_command runs it as the compute\'s user)', true);
  }
  await ensureOwnedDir(dirname(dataDir), runAs, 0o700);
  await ensureOwnedDir(dataDir, runAs, 0o700);
  try {
    return await fill();
  } catch (err) {
    // A half-made data directory must not look like data: the next start materialises again.
    await rm(dataDir, { recursive: true, force: true }).catch(() => {});
    log.warn('materialising the data directory failed', { dataDir, err, ms: Date.now() - started });
    throw err;
  }

  async function fill(): Promise<MaterialiseResult> {
    const prefetch = join(dirname(dataDir), 'wal-prefetch');
    let cache: MaterialiseResult['cache'] = 'off';
    const took = { imageMs: 0, walAheadMs: 0 };
    const timed = async (key: keyof typeof took, fn: () => Promise<number>): Promise<number> => {
      const t0 = Date.now();
      try { return await fn(); } finally { took[key] = Date.now() - t0; }
    };
    const image = async (): Promise<number> => {
      if (o.cache?.enabled) {
        const r = await o.cache.cloneInto(plan.image, dataDir);
        cache = r.hit ? 'hit' : 'miss';
        return r.fetched;
      }
      const n = await extractImage(dataDir, plan.image.url, runAs, fetchTimeoutMs, log);
      if (plan.image.size > 0 && n !== plan.image.size) log.warn('the image has another size than the plan says', { url: plan.image.url, bytes: n, size: plan.image.size });
      return n;
    };
    // Archive mode: the plan's files are fetched ahead, in parallel with the image, from the same
    // resolver: each restore_command call then costs a `cp`, not a Node.js start and an HTTP
    // fetch. What Postgres asks for beyond them goes to restore-wal.js and the resolver as before.
    const ahead = async (): Promise<number> => {
      if (plan.mode !== 'archive') return 0;
      await rm(prefetch, { recursive: true, force: true });
      await ensureOwnedDir(prefetch, runAs, 0o700);
      const n = await downloadWal(prefetch, plan.wal, runAs, fetchTimeoutMs, o.walConcurrency ?? 4, o.cache);
      await markAbsent(prefetch, plan, runAs, fetchTimeoutMs);
      return n;
    };
    // Both settle before a failure is thrown: the caller removes the directories they write into.
    const [got, fetchedAhead] = await Promise.allSettled([timed('imageMs', image), timed('walAheadMs', ahead)]);
    if (got.status === 'rejected') throw got.reason;
    if (fetchedAhead.status === 'rejected') throw fetchedAhead.reason;
    let bytes = got.value + fetchedAhead.value;
    for (const f of LEFTOVERS) await rm(join(dataDir, f), { force: true });
    await chmod(dataDir, 0o700);
    for (const d of ['pg_wal', join('pg_wal', 'archive_status')]) {
      await mkdir(join(dataDir, d), { recursive: true, mode: 0o700 });
      if (runAs) await chown(join(dataDir, d), runAs.uid, runAs.gid);
    }
    const extracted = Date.now();

    // The new files are not durable yet: Postgres syncs them before recovery (it does for a
    // cluster that was not shut down). One syncfs() of the file system instead of an fsync() of
    // every file: ~10 ms against ~150 ms for 1,000 files, and it grows with the files.
    const settings: Record<string, string> = { recovery_init_sync_method: 'syncfs' };
    if (plan.mode === 'crash') {
      bytes += await downloadWal(join(dataDir, 'pg_wal'), plan.wal, runAs, fetchTimeoutMs, o.walConcurrency ?? 4, o.cache);
      if (plan.image.kind === 'shutdown') await markNotShutDown(dataDir);
    } else {
      await writeFileDurably(join(dataDir, 'recovery.signal'), Buffer.alloc(0), runAs);
      if (o.restoreCommand) {
        settings.restore_command = o.restoreCommand(plan.restore_url, plan.lsn, prefetch);
      } else {
        const script = join(dirname(dataDir), 'restore-wal.js');
        const tmp = `${script}.xenon-tmp`;
        await copyFile(RESTORE_WAL_SCRIPT, tmp);
        await chmod(tmp, 0o644);
        if (runAs) await chown(tmp, runAs.uid, runAs.gid);
        await rename(tmp, script);
        if (runAs) assertReachable(script, runAs, 'restore-wal.js', false);
        settings.restore_command = restoreCommand(node!, script, plan.restore_url, plan.lsn, prefetch);
      }
      settings.recovery_target_timeline = 'latest';
      // No synchronous_standby_names override: our computes get it on the command line only
      // (never from a copied postgresql.conf), nothing commits during recovery, and after the
      // promotion the branch's commits must wait for its safekeepers like any other.
      settings.hot_standby = 'off';
    }
    const ms = Date.now() - started;
    log.info('data directory materialised', {
      dataDir, kind: plan.image.kind, lsn: plan.lsn, imageLsn: plan.image.lsn, walFiles: plan.wal.length, bytes, ms, extractMs: extracted - started, ...took, cache,
    });
    return { settings, ms, bytes, cache };
  }
}

/**
 * `<name>.absent` markers in the prefetch directory for files Postgres will ask for and the
 * resolver does not have, so that restore_command answers "no" with a shell test instead of a
 * Node.js start and an HTTP round trip (~0.4 s each on a busy machine):
 * - the history file of the timeline after the newest one it knows (asked at the start and
 *   again when it picks its new timeline), and that newest one's when it is not in the plan
 *   (asked when it writes the new timeline's history): asked of the resolver once, here;
 * - the first segment at or after the target on each Postgres timeline of the plan (the
 *   recovery prefetcher reads ahead into it, and recovery asks for it at the end): the
 *   resolver serves nothing from the target on, so these need no question.
 */
async function markAbsent(prefetch: string, plan: StartPlan, runAs: RunAs | undefined, fetchTimeoutMs: number): Promise<void> {
  const tlis = new Set([plan.image.pg_timeline, ...plan.wal.map((w) => parseInt(w.name.slice(0, 8), 16))]);
  const newest = Math.max(...tlis);
  const have = new Set(plan.wal.map((w) => w.name));
  const hex = (tli: number): string => tli.toString(16).toUpperCase().padStart(8, '0');
  const probes = [newest + 1, newest].map((tli) => `${hex(tli)}.history`).filter((n) => !have.has(n));
  const target = parseLsn(plan.lsn);
  const past = segmentOf(target) + (target % BigInt(WAL_SEGMENT_SIZE) === 0n ? 0n : 1n);
  const beyond = [...tlis].map((tli) => segmentFileName(tli, past)).filter((n) => !have.has(n));
  await Promise.all([
    ...probes.map(async (name) => {
      if (await resolverSays404(`${plan.restore_url}${name}?upto=${encodeURIComponent(plan.lsn)}`, fetchTimeoutMs)) {
        await writeFileOwned(join(prefetch, `${name}.absent`), runAs);
      }
    }),
    ...beyond.map((name) => writeFileOwned(join(prefetch, `${name}.absent`), runAs)),
  ]);
}

/** Whether the resolver answers "no such file" (404 `PS_WAL_NOT_FOUND`) for `url`. */
async function resolverSays404(url: string, timeoutMs: number): Promise<boolean> {
  try {
    const res = await fetch(url, { signal: AbortSignal.timeout(timeoutMs) });
    const text = await res.text();
    return res.status === 404 && text.includes('"PS_WAL_NOT_FOUND"');
  } catch {
    return false; // restore-wal.js asks again when Postgres needs it
  }
}

async function writeFileOwned(path: string, runAs: RunAs | undefined): Promise<void> {
  const fh = await open(path, 'w', 0o600);
  await fh.close();
  if (runAs) await chown(path, runAs.uid, runAs.gid);
}

/** POSIX shell single quoting, with `%` doubled for Postgres' own `%f`/`%p` expansion. */
export function shellArg(s: string): string {
  return `'${s.replace(/'/g, `'\\''`).replace(/%/g, '%%')}'`;
}

/**
 * The `restore_command` value: `/usr/bin/env -i '<node>' '<script>' '<restore_url>' %f %p '<lsn>'`.
 * An empty environment: `NODE_OPTIONS` and the like that reached the postmaster (preloads of a
 * test runner, a debugger) must not run inside the compute's user.
 */
export function restoreCommand(node: string, script: string, restoreUrl: string, lsn: string, prefetchDir?: string): string {
  const fetch = `/usr/bin/env -i ${shellArg(node)} ${shellArg(script)} ${shellArg(restoreUrl)} %f %p ${shellArg(lsn)}`;
  return prefetchDir ? preferPrefetched(fetch, prefetchDir) : fetch;
}

/**
 * A `restore_command` that takes a fetched-ahead copy when there is one (copied, not moved:
 * Postgres asks for the last segment twice), answers "no" for an `.absent` marker, and else
 * runs `fetch`.
 */
export function preferPrefetched(fetch: string, prefetchDir: string): string {
  const local = `${shellArg(prefetchDir)}/%f`;
  return `if [ -f ${local} ]; then cp ${local} %p.xenon-tmp && mv %p.xenon-tmp %p || exit 200; elif [ -f ${local}.absent ]; then exit 1; else exec ${fetch}; fi`;
}

/**
 * Throws unless `runAs` can reach `path` (search permission on every ancestor, read — and
 * execute when `exec` — on the file). Judged from mode bits and the user's primary group only.
 */
function assertReachable(path: string, runAs: RunAs, what: string, exec: boolean): void {
  const can = (p: string, bits: number): boolean => {
    const st = statSync(p);
    const shift = st.uid === runAs.uid ? 6 : st.gid === runAs.gid ? 3 : 0;
    return ((st.mode >> shift) & bits) === bits;
  };
  const parts = path.split(sep).filter(Boolean);
  for (let i = 0; i < parts.length; i++) {
    const dir = sep + parts.slice(0, i).join(sep);
    if (!can(dir, constants.S_IXOTH)) {
      throw new XenonError('CP_COMPUTE_START_FAILED', `${what} at ${path} is not reachable by user ${runAs.user}: no search permission on ${dir} (install Node.js where every user can run it, e.g. /usr/bin/node)`);
    }
  }
  if (!can(path, constants.S_IROTH | (exec ? constants.S_IXOTH : 0))) {
    throw new XenonError('CP_COMPUTE_START_FAILED', `${what} at ${path} is not ${exec ? 'executable' : 'readable'} by user ${runAs.user}`);
  }
}

/**
 * GET with a timeout on the response headers and between body chunks (never on the whole body:
 * images can be 1 GB): call `touch` on every chunk, `done` when finished; an idle body is
 * destroyed. `node:http` rather than `fetch`: the body is a plain stream, with no web-stream
 * conversion per chunk (16 MiB to a file in 46–127 ms against 54–353 ms through `fetch`, in one
 * process on this machine; on a busy one both were slower — the image cache avoids the download).
 */
async function get(url: string, timeoutMs: number, what: string): Promise<{ body: IncomingMessage; length: number | undefined; fileSize: number | undefined; touch: () => void; done: () => void }> {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw new XenonError('CP_BAD_REQUEST', `GET ${what}: not a URL: ${JSON.stringify(url.slice(0, 200))}`);
  }
  if (u.protocol !== 'http:' && u.protocol !== 'https:') throw new XenonError('CP_BAD_REQUEST', `GET ${what} ${url}: only http and https URLs`);
  let req: ClientRequest | undefined;
  let timer: NodeJS.Timeout | undefined;
  const touch = (): void => {
    clearTimeout(timer);
    timer = setTimeout(() => req?.destroy(new Error(`no data for ${timeoutMs} ms`)), timeoutMs);
  };
  const done = (): void => clearTimeout(timer);
  touch();
  let res: IncomingMessage;
  try {
    res = await new Promise<IncomingMessage>((resolve, reject) => {
      req = (u.protocol === 'https:' ? httpsGet : httpGet)(u, { agent: false, headers: { connection: 'close' } }, resolve);
      req.once('error', reject);
    });
  } catch (err) {
    done();
    const e = err as NodeJS.ErrnoException;
    throw new XenonError('PS_UNAVAILABLE', `GET ${what} ${url}: ${e.message}${e.code ? ` (${e.code})` : ''}`, { cause: err });
  }
  if (res.statusCode !== 200) {
    let text = '';
    try {
      for await (const chunk of res) {
        text += (chunk as Buffer).toString('utf8');
        if (text.length > 4000) break;
      }
    } catch { /* the body of an error is best effort */ }
    res.destroy();
    done();
    let code: ErrorCode = (res.statusCode ?? 0) >= 500 ? 'PS_UNAVAILABLE' : 'CP_COMPUTE_START_FAILED';
    try {
      const c = (JSON.parse(text) as { error?: { code?: unknown } }).error?.code;
      if (typeof c === 'string' && c.startsWith('PS_') && isErrorCode(c)) code = c; // the pageserver's own verdicts only
    } catch { /* not JSON */ }
    throw new XenonError(code, `GET ${what} ${url}: HTTP ${res.statusCode} ${text.slice(0, 500)}`);
  }
  const len = res.headers['content-length'];
  const fileSize = Number(res.headers['x-wal-file-size']);
  return { body: res, length: len === undefined ? undefined : Number(len), fileSize: Number.isSafeInteger(fileSize) && fileSize > 0 ? fileSize : undefined, touch, done };
}

/** A pass-through that counts bytes and keeps the idle timer alive. */
function counter(touch: () => void): Transform & { bytes: number } {
  const t = new Transform({
    transform(chunk: Buffer, _enc, cb) {
      t.bytes += chunk.length;
      touch();
      cb(null, chunk);
    },
  }) as Transform & { bytes: number };
  t.bytes = 0;
  return t;
}

function checkLength(length: number | undefined, got: number, what: string): void {
  if (length !== undefined && length !== got) throw new XenonError('PS_UNAVAILABLE', `${what}: short body (${got} of ${length} bytes)`);
}

/** Streams the image into `tar -x -C dataDir` running as `runAs`; returns the bytes read. */
export async function extractImage(dataDir: string, url: string, runAs: RunAs | undefined, timeoutMs: number, log: Logger): Promise<number> {
  const { body, length, touch, done } = await get(url, timeoutMs, 'image');
  const tar = spawn('tar', ['-x', '-f', '-', '-C', dataDir], {
    stdio: ['pipe', 'ignore', 'pipe'],
    uid: runAs?.uid,
    gid: runAs?.gid,
    env: { PATH: process.env.PATH, LANG: 'C', LC_ALL: 'C' },
  });
  let stderr = '';
  tar.stderr.on('data', (d: Buffer) => { stderr = (stderr + d.toString('utf8')).slice(-4000); });
  const exited = new Promise<number | string>((resolve) => {
    tar.once('error', (err) => resolve(err.message));
    tar.once('close', (code, sig) => resolve(code ?? String(sig)));
  });
  const count = counter(touch);
  let streamErr: unknown;
  try {
    await pipeline(body, count, tar.stdin);
  } catch (err) {
    streamErr = err;
    tar.kill('SIGKILL');
  } finally {
    done();
  }
  const status = await exited;
  // A download that broke (tar then complains about the truncated archive), unless the break is
  // tar closing its input (EPIPE: tar failed first); then any tar failure.
  const code = (streamErr as NodeJS.ErrnoException | undefined)?.code;
  if (streamErr && code !== 'EPIPE' && code !== 'ERR_STREAM_DESTROYED') {
    throw new XenonError('PS_UNAVAILABLE', `downloading image ${url} failed after ${count.bytes} bytes: ${(streamErr as Error).message}${stderr.trim() ? ` (tar: ${stderr.trim()})` : ''}`, { cause: streamErr });
  }
  if (status !== 0) {
    throw new XenonError('CP_COMPUTE_START_FAILED', `tar -x of image ${url} into ${dataDir} failed (${status}): ${stderr.trim() || 'no message'}`, { cause: streamErr });
  }
  checkLength(length, count.bytes, `image ${url}`);
  if (stderr.trim()) log.warn('tar warned while extracting the image', { url, stderr: stderr.trim() });
  return count.bytes;
}

/**
 * Downloads the plan's WAL files into `walDir` (several at once); with a cache, a file it holds
 * is cloned from it instead, and one downloaded is kept in it. Returns the bytes downloaded.
 */
async function downloadWal(walDir: string, files: StartPlan['wal'], runAs: RunAs | undefined, timeoutMs: number, concurrency: number, cache?: ImageCache): Promise<number> {
  let next = 0;
  let bytes = 0;
  let failed = false;
  const worker = async (): Promise<void> => {
    while (!failed && next < files.length) {
      const f = files[next++]!;
      const dest = join(walDir, f.name);
      try {
        if (cache?.enabled && await cache.copyWal(f, dest, runAs)) continue;
        bytes += await downloadOne(dest, compactUrl(f.url), runAs, timeoutMs, f.name.length === 24 ? WAL_SEGMENT_SIZE : undefined);
        if (cache?.enabled) await cache.keepWal(f, dest);
      } catch (err) {
        failed = true; // the others finish their current file and stop
        throw err;
      }
    }
  };
  // Settle every worker before failing: the caller removes the directory they write into.
  const results = await Promise.allSettled(Array.from({ length: Math.max(1, Math.min(concurrency, files.length)) }, worker));
  const rejected = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (rejected) throw rejected.reason;
  await fsyncDir(walDir);
  return bytes;
}

/** The resolver URL asking for a segment without its zero tail (`x-wal-file-size` gives the size). */
function compactUrl(url: string): string {
  return `${url}${url.includes('?') ? '&' : '?'}compact=1`;
}

/**
 * Downloads to a temporary name, chowns and renames into place. A body shorter than the
 * file (`x-wal-file-size`: the resolver's `compact=1`) is the file without its zero tail: the file
 * is extended with zeros to that size.
 */
export async function downloadOne(dest: string, url: string, runAs: RunAs | undefined, timeoutMs: number, size: number | undefined): Promise<number> {
  const tmp = `${dest}.xenon-tmp`;
  const { body, length, fileSize, touch, done } = await get(url, timeoutMs, 'WAL');
  const count = counter(touch);
  try {
    try {
      await pipeline(body, count, createWriteStream(tmp, { mode: 0o600 }));
    } catch (err) {
      throw new XenonError('PS_UNAVAILABLE', `downloading WAL ${url} failed after ${count.bytes} bytes: ${(err as Error).message}`, { cause: err });
    } finally {
      done();
    }
    checkLength(length, count.bytes, `WAL ${url}`);
    let total = count.bytes;
    if (fileSize !== undefined && fileSize > total && fileSize <= WAL_SEGMENT_SIZE) {
      await truncate(tmp, fileSize); // the zero tail the resolver left out
      total = fileSize;
    }
    if (size !== undefined && total !== size) throw new XenonError('PS_UNAVAILABLE', `WAL ${url}: ${total} bytes, expected a ${size}-byte segment`);
    // No fsync here: a compute started from these files syncs its file system first
    // (recovery_init_sync_method=syncfs), and the cache drops its copies when it opens.
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
  if (runAs) await chown(tmp, runAs.uid, runAs.gid);
  await rename(tmp, dest);
  return count.bytes;
}

async function fsyncDir(dir: string): Promise<void> {
  const fh = await open(dir, 'r');
  try { await fh.sync(); } finally { await fh.close(); }
}
