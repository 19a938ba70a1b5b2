/**
 * Images (DESIGN §4 "Images and GC").
 *
 * From a running compute ({@link makeImage}): `pg_basebackup -Ft -X none` of the attached compute
 * gives a tar of its data directory (with `backup_label`, empty `pg_wal`) and a `backup_manifest`
 * naming the WAL range the backup needs; the tar goes to the object store as a `backup` image
 * whose `lsn` is the backup's start (redo) LSN and `end_lsn` the point from which it is
 * consistent. The WAL itself comes from the safekeepers through the ingest.
 *
 * For a stopped timeline ({@link makeScratchImage}): the newest image plus the timeline's WAL is
 * recovered in a scratch Postgres **as a standby** up to the last checkpoint record C of the
 * timeline's own WAL (found with `pg_waldump`), which then shuts down (`recovery_target_lsn=C`,
 * `recovery_target_action=shutdown`) with a shutdown restartpoint at C: pg_control says
 * "shut down in recovery", checkpoint C, redo R. A standby writes no WAL at all, so the image
 * refers only to records that exist in the timeline's WAL — unlike crash recovery or a normal
 * shutdown, whose end-of-recovery / shutdown checkpoint record would exist only in the scratch
 * `pg_wal` (past the tip, and overwritten by the timeline's own segment at the next start).
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createReadStream, createWriteStream, existsSync } from 'node:fs';
import { mkdir, mkdtemp, open, readdir, readFile, rm, writeFile, chown } from 'node:fs/promises';
import { join } from 'node:path';
import { XenonError } from '../lib/errors.ts';
import type { Logger } from '../lib/logger.ts';
import { formatLsn, parseLsn, prevSegmentOf, segmentFileName, segmentOf, segmentStart, WAL_SEGMENT_SIZE } from '../lib/lsn.ts';
import { ensureOwnedDir, findFreePort, type RunAs } from '../lib/postgres.ts';
import { materialise } from '../vm/materialise.ts';
import { checkpointRecordEnd, readControlData } from '../vm/pg-control.ts';
import { tarDirectory } from '../vm/tar.ts';
import type { AttachComputeRequest, ImageInfo, StartPlan } from './api.ts';
import { keys, type Timelines } from './types.ts';

export interface MakeImageOptions {
  timelines: Timelines;
  tenantId: string;
  timelineId: string;
  compute: AttachComputeRequest;
  /** Directory of `pg_basebackup`. */
  pgBin: string;
  /** A scratch directory; each image works in its own subdirectory, removed afterwards. */
  tmpDir: string;
  logger: Logger;
}

/** The parts of `backup_manifest` an image needs. */
export interface BackupWalRange {
  startLsn: bigint;
  endLsn: bigint;
  pgTimeline: number;
}

/** Reads `WAL-Ranges` of a `backup_manifest` (JSON): the first range's start and TLI, the last one's end. */
export function parseBackupManifest(text: string): BackupWalRange {
  let m: unknown;
  try {
    m = JSON.parse(text);
  } catch (err) {
    throw new XenonError('INTERNAL', `backup_manifest is not JSON: ${(err as Error).message}`);
  }
  const ranges = (m as { 'WAL-Ranges'?: unknown })['WAL-Ranges'];
  if (!Array.isArray(ranges) || ranges.length === 0) throw new XenonError('INTERNAL', 'backup_manifest has no WAL-Ranges');
  const first = ranges[0] as Record<string, unknown>;
  const last = ranges[ranges.length - 1] as Record<string, unknown>;
  if (typeof first['Start-LSN'] !== 'string' || typeof last['End-LSN'] !== 'string' || typeof first.Timeline !== 'number') {
    throw new XenonError('INTERNAL', 'backup_manifest WAL-Ranges lack Start-LSN / End-LSN / Timeline');
  }
  return { startLsn: parseLsn(first['Start-LSN']), endLsn: parseLsn(last['End-LSN']), pgTimeline: first.Timeline };
}

/** `0000000002000028-a1b2c3`: sorts by LSN, unique. */
export function imageId(lsn: bigint): string {
  return lsn.toString(16).toUpperCase().padStart(16, '0') + '-' + randomBytes(3).toString('hex');
}

function runTool(cmd: string, args: string[], env: NodeJS.ProcessEnv): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { PATH: process.env.PATH, LANG: 'C', LC_ALL: 'C', ...env } });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out = (out + d.toString()).slice(-4000)));
    child.stderr.on('data', (d: Buffer) => (out = (out + d.toString()).slice(-4000)));
    child.on('error', (err) => reject(new XenonError('INTERNAL', `spawn ${cmd}: ${err.message}`, { cause: err })));
    child.on('exit', (code, sig) => {
      if (code === 0) resolve();
      else reject(new XenonError('PS_UNAVAILABLE', `${cmd.split('/').pop()} exited with ${code ?? sig}: ${out.trim().slice(-1500)}`));
    });
  });
}

/** Per `Timelines` and timeline: the image being made (one at a time). */
const running = new WeakMap<Timelines, Map<string, Promise<unknown>>>();

/**
 * Makes a `backup` image of the timeline from its running compute and records it in the index.
 * One image at a time per timeline (a second call waits for the first). The temp dir is always
 * removed; the password goes to `pg_basebackup` through `PGPASSWORD` only, never to a log.
 */
export function makeImage(o: MakeImageOptions): Promise<ImageInfo> {
  return oneAtATime(o.timelines, o.tenantId, o.timelineId, () => makeImageNow(o));
}

/** Runs `fn` after every image of the timeline already under way (backup or scratch). */
function oneAtATime<T>(timelines: Timelines, tenantId: string, timelineId: string, fn: () => Promise<T>): Promise<T> {
  let perStore = running.get(timelines);
  if (!perStore) running.set(timelines, (perStore = new Map()));
  const key = `${tenantId}/${timelineId}`;
  const prev = perStore.get(key) ?? Promise.resolve();
  const next = prev.catch(() => {}).then(fn);
  perStore.set(key, next);
  void next.catch(() => {}).finally(() => { if (perStore.get(key) === next) perStore.delete(key); });
  return next;
}

async function makeImageNow(o: MakeImageOptions): Promise<ImageInfo> {
  const log = o.logger.child({ component: 'imager', tenant_id: o.tenantId, timeline_id: o.timelineId });
  await o.timelines.read(o.tenantId, o.timelineId); // PS_TIMELINE_NOT_FOUND / PS_INDEX_CORRUPT first
  await mkdir(o.tmpDir, { recursive: true });
  const dir = await mkdtemp(join(o.tmpDir, 'image-'));
  const t0 = Date.now();
  try {
    const out = join(dir, 'backup');
    log.info('making an image', { host: o.compute.host, port: o.compute.port, user: o.compute.user });
    await runTool(
      join(o.pgBin, 'pg_basebackup'),
      ['-h', o.compute.host, '-p', String(o.compute.port), '-U', o.compute.user, '-D', out, '-Ft', '-X', 'none', '-c', 'fast', '--no-sync', '-w', '-l', `xenon image ${o.timelineId}`],
      { PGPASSWORD: o.compute.password, PGCONNECT_TIMEOUT: '10', PGAPPNAME: 'xenon-imager' },
    );
    const range = parseBackupManifest(await readFile(join(out, 'backup_manifest'), 'utf8'));
    const id = imageId(range.startLsn);
    const { size } = await o.timelines.store.put(keys.image(o.tenantId, o.timelineId, id), createReadStream(join(out, 'base.tar')));
    const info: ImageInfo = {
      id, kind: 'backup', lsn: formatLsn(range.startLsn), end_lsn: formatLsn(range.endLsn), pg_timeline: range.pgTimeline,
      size, created_at: new Date().toISOString(),
    };
    await o.timelines.update(o.tenantId, o.timelineId, (ix) => {
      ix.images.push(info);
    });
    log.info('image made', { image_id: id, lsn: info.lsn, end_lsn: info.end_lsn, size, ms: Date.now() - t0 });
    return info;
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

export interface MakeScratchImageOptions {
  timelines: Timelines;
  tenantId: string;
  timelineId: string;
  /** A `crash` start plan of the timeline at its tip (the resolver's `plan`), URLs reachable from here. */
  plan: StartPlan;
  /** Directory of `postgres` and `pg_waldump`. */
  pgBin: string;
  /** Scratch space reachable by `runAs` (every ancestor searchable); each image uses a subdirectory, removed afterwards. */
  tmpDir: string;
  /** The OS user Postgres runs as (undefined: this process' user; required when this process is root). */
  runAs: RunAs | undefined;
  logger: Logger;
  /** Longest the scratch recovery may take (default 10 min). */
  recoveryTimeoutMs?: number;
}

/** A checkpoint record as `pg_waldump --rmgr=XLOG` prints it. */
export interface CheckpointRecord {
  lsn: bigint;
  redo: bigint;
  tli: number;
  shutdown: boolean;
}

const CHECKPOINT_RE = /\blsn: ([0-9A-Fa-f]{1,8}\/[0-9A-Fa-f]{1,8}),.*\bdesc: CHECKPOINT_(SHUTDOWN|ONLINE) redo ([0-9A-Fa-f]{1,8}\/[0-9A-Fa-f]{1,8}); tli (\d+);/;

/** Checkpoint records of `pg_waldump --rmgr=XLOG` output, in WAL order. */
export function parseCheckpointRecords(output: string): CheckpointRecord[] {
  const out: CheckpointRecord[] = [];
  for (const line of output.split('\n')) {
    const m = CHECKPOINT_RE.exec(line);
    if (m) out.push({ lsn: parseLsn(m[1]!), redo: parseLsn(m[3]!), tli: Number(m[4]), shutdown: m[2] === 'SHUTDOWN' });
  }
  return out;
}

/** Runs a tool to its end; resolves with its stdout and stderr whatever its exit code (spawn failures reject). */
function captureTool(cmd: string, args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { PATH: process.env.PATH, LANG: 'C', LC_ALL: 'C', TZ: 'UTC' } });
    const out: Buffer[] = [];
    let err = '';
    child.stdout.on('data', (d: Buffer) => out.push(d));
    child.stderr.on('data', (d: Buffer) => (err = (err + d.toString()).slice(-4000)));
    child.on('error', (e) => reject(new XenonError('INTERNAL', `spawn ${cmd}: ${e.message}`, { cause: e })));
    child.on('close', (code) => resolve({ code, stdout: Buffer.concat(out).toString('utf8'), stderr: err }));
  });
}

/**
 * Runs `postgres` (as `runAs`) until it exits by itself; past `timeoutMs`, or when `signal`
 * aborts, it is stopped (SIGQUIT, then SIGKILL). Its log goes to `logFile`; rejects with the log's
 * tail when it exits non-zero.
 */
function runPostgresToExit(o: { bin: string; args: string[]; runAs: RunAs | undefined; logFile: string; timeoutMs: number }): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn(join(o.bin, 'postgres'), o.args, {
      stdio: ['ignore', 'ignore', 'pipe'],
      uid: o.runAs?.uid,
      gid: o.runAs?.gid,
      env: { PATH: process.env.PATH, LANG: 'C', LC_ALL: 'C', TZ: 'UTC' },
      detached: true,
    });
    const log = createWriteStream(o.logFile, { flags: 'a' });
    log.on('error', () => {});
    let tail = '';
    child.stderr.on('data', (d: Buffer) => {
      log.write(d);
      tail = (tail + d.toString('utf8')).slice(-3000);
    });
    let timedOut = false;
    const kill = (sig: NodeJS.Signals): void => { try { process.kill(child.pid!, sig); } catch { /* gone */ } };
    const timer = setTimeout(() => {
      timedOut = true;
      kill('SIGQUIT');
      setTimeout(() => kill('SIGKILL'), 5_000).unref();
    }, o.timeoutMs);
    child.once('error', (err) => {
      clearTimeout(timer);
      log.end();
      reject(new XenonError('INTERNAL', `spawn postgres: ${err.message}`, { cause: err }));
    });
    child.once('close', (code, sig) => {
      clearTimeout(timer);
      log.end();
      if (timedOut) reject(new XenonError('PS_UNAVAILABLE', `scratch recovery did not finish in ${o.timeoutMs} ms: ${tail.trim().slice(-1500)}`));
      else if (code !== 0) reject(new XenonError('PS_UNAVAILABLE', `scratch postgres exited with ${code ?? sig}: ${tail.trim().slice(-1500)}`));
      else resolve();
    });
  });
}

/**
 * Makes a `shutdown` image of a timeline without a running compute (see the module comment) and
 * records it in the index: `lsn` = the redo point R of the timeline's last checkpoint record C at
 * or before the plan's tip (C at or after the plan image's `end_lsn`), `end_lsn` = the end of C
 * (the image's minRecoveryPoint), `pg_timeline` = C's TLI. The image's `pg_wal` keeps the
 * timeline's own segments from R's to C's, zeroed after C (a prefix of the timeline's WAL: a
 * crash start copying the timeline's segments over them changes nothing before C). pg_control
 * stays "shut down in recovery": `materialise` marks a `shutdown` image "in production" for a
 * crash start (crash recovery from C), and an archive start recovers from C as well.
 *
 * Throws `CP_CONFLICT` when the WAL holds no such checkpoint with a redo point after the plan
 * image's (nothing to gain). One image at a time per timeline (shared with {@link makeImage}).
 * The scratch directory is always removed and Postgres always stopped. The scratch Postgres is a
 * standby with `hot_standby=off` on a free loopback port: it accepts no connection, writes no
 * WAL, archives nothing and streams from nowhere.
 */
export function makeScratchImage(o: MakeScratchImageOptions): Promise<ImageInfo> {
  return oneAtATime(o.timelines, o.tenantId, o.timelineId, () => makeScratchImageNow(o));
}

async function makeScratchImageNow(o: MakeScratchImageOptions): Promise<ImageInfo> {
  const log = o.logger.child({ component: 'imager', tenant_id: o.tenantId, timeline_id: o.timelineId });
  const plan = o.plan;
  if (plan.tenant_id !== o.tenantId || plan.timeline_id !== o.timelineId) throw new XenonError('INTERNAL', `a start plan of ${plan.tenant_id}/${plan.timeline_id} for ${o.tenantId}/${o.timelineId}`);
  if (plan.mode !== 'crash') {
    throw new XenonError('CP_CONFLICT', `${o.tenantId}/${o.timelineId}: a scratch image needs a crash start plan (the image and WAL on one Postgres timeline), got ${plan.mode}`);
  }
  if (typeof process.getuid === 'function' && process.getuid() === 0 && !o.runAs) {
    throw new XenonError('INTERNAL', 'running as root without a user to run the scratch Postgres as (see XENON_PG_USER)');
  }
  await o.timelines.read(o.tenantId, o.timelineId); // PS_TIMELINE_NOT_FOUND / PS_INDEX_CORRUPT first
  const tip = parseLsn(plan.lsn);
  const base = { lsn: parseLsn(plan.image.lsn), end: parseLsn(plan.image.end_lsn), tli: plan.image.pg_timeline };
  await mkdir(o.tmpDir, { recursive: true });
  const dir = await mkdtemp(join(o.tmpDir, 'scratch-'));
  const t0 = Date.now();
  try {
    await ensureOwnedDir(dir, o.runAs, 0o700);
    const dataDir = join(dir, 'pgdata');
    await materialise({ dataDir, plan, runAs: o.runAs, logger: log });
    const walDir = join(dataDir, 'pg_wal');

    // The last checkpoint record of the timeline's WAL at or before the tip.
    const dump = await captureTool(join(o.pgBin, 'pg_waldump'), ['-p', walDir, '-t', String(base.tli), '-s', formatLsn(base.lsn), '-e', formatLsn(tip), '--rmgr=XLOG']);
    const all = parseCheckpointRecords(dump.stdout);
    const usable = all.filter((c) => c.tli === base.tli && c.lsn >= base.end && c.redo > base.lsn && checkpointRecordEnd(c.lsn) <= tip);
    const target = usable[usable.length - 1];
    if (!target) {
      throw new XenonError('CP_CONFLICT', `${o.tenantId}/${o.timelineId}: no checkpoint record between the image's end ${formatLsn(base.end)} and the tip ${formatLsn(tip)} (${all.length} checkpoint records seen${dump.code !== 0 && all.length === 0 ? `; pg_waldump: ${dump.stderr.trim().slice(-500)}` : ''})`);
    }
    log.info('making a scratch image', { image_lsn: plan.image.lsn, tip: plan.lsn, checkpoint: formatLsn(target.lsn), redo: formatLsn(target.redo), wal_files: plan.wal.length });

    // Replay as a standby up to (and including) the checkpoint record, then shut down.
    const signal = join(dataDir, 'standby.signal');
    await writeFile(signal, '', { mode: 0o600 });
    if (o.runAs) await chown(signal, o.runAs.uid, o.runAs.gid);
    const port = await findFreePort(20000, 59999);
    const settings: Record<string, string> = {
      listen_addresses: '127.0.0.1',
      unix_socket_directories: '',
      hot_standby: 'off',
      archive_mode: 'off',
      primary_conninfo: '',
      primary_slot_name: '',
      restore_command: '',
      recovery_target_lsn: formatLsn(target.lsn),
      recovery_target_inclusive: 'on',
      recovery_target_action: 'shutdown',
      recovery_target_timeline: 'current',
      synchronous_standby_names: '',
      fsync: 'off', // a scratch directory: everything is read back from the page cache by tar
      log_checkpoints: 'on',
      lc_messages: 'C',
    };
    const args = ['-D', dataDir, '-p', String(port)];
    for (const [k, v] of Object.entries(settings)) args.push('-c', `${k}=${v}`);
    await runPostgresToExit({ bin: o.pgBin, args, runAs: o.runAs, logFile: join(dir, 'postgres.log'), timeoutMs: o.recoveryTimeoutMs ?? 600_000 });
    const logTail = async (): Promise<string> => (await readFile(join(dir, 'postgres.log'), 'utf8').catch(() => '')).trim().slice(-1500);

    const ctl = await readControlData(dataDir);
    if (ctl.state !== 'shut down in recovery' || ctl.checkpoint !== target.lsn || ctl.redo !== target.redo || ctl.timeline !== target.tli) {
      throw new XenonError('PS_UNAVAILABLE', `scratch recovery ended with pg_control state ${ctl.state}, checkpoint ${formatLsn(ctl.checkpoint)} redo ${formatLsn(ctl.redo)} tli ${ctl.timeline}; expected shut down in recovery at ${formatLsn(target.lsn)}: ${await logTail()}`);
    }
    const cEnd = checkpointRecordEnd(target.lsn);
    const endLsn = ctl.minRecoveryPoint > cEnd ? ctl.minRecoveryPoint : cEnd;
    if (endLsn > tip) throw new XenonError('INTERNAL', `scratch image would be consistent only at ${formatLsn(endLsn)}, past the tip ${formatLsn(tip)}`);
    if (existsSync(join(dataDir, 'backup_label'))) throw new XenonError('INTERNAL', `scratch recovery left backup_label behind: ${await logTail()}`);

    // Leave a cleanly shut down data directory: no recovery files, pg_wal = the timeline's
    // segments from R's to C's, zeroed after C.
    for (const f of ['standby.signal', 'recovery.signal', 'backup_label.old', 'tablespace_map.old']) await rm(join(dataDir, f), { force: true });
    const keep = new Set<string>();
    for (let segno = segmentOf(target.redo); segno <= prevSegmentOf(cEnd); segno++) keep.add(segmentFileName(target.tli, segno));
    for (const name of await readdir(walDir)) {
      if (name === 'archive_status') continue;
      if (!keep.has(name)) await rm(join(walDir, name), { recursive: true, force: true });
    }
    for (const name of await readdir(join(walDir, 'archive_status'))) await rm(join(walDir, 'archive_status', name), { force: true });
    for (const name of keep) {
      if (!existsSync(join(walDir, name))) throw new XenonError('INTERNAL', `scratch pg_wal lacks ${name} after recovery`);
    }
    const lastSeg = prevSegmentOf(cEnd);
    const fh = await open(join(walDir, segmentFileName(target.tli, lastSeg)), 'r+');
    try {
      const from = Number(cEnd - segmentStart(lastSeg));
      if (from < WAL_SEGMENT_SIZE) await fh.write(Buffer.alloc(WAL_SEGMENT_SIZE - from), 0, WAL_SEGMENT_SIZE - from, from);
    } finally {
      await fh.close();
    }

    const id = imageId(target.redo);
    const { size } = await o.timelines.store.put(keys.image(o.tenantId, o.timelineId, id), tarDirectory(dataDir));
    const info: ImageInfo = {
      id, kind: 'shutdown', lsn: formatLsn(target.redo), end_lsn: formatLsn(endLsn), pg_timeline: target.tli,
      size, created_at: new Date().toISOString(),
    };
    await o.timelines.update(o.tenantId, o.timelineId, (ix) => {
      ix.images.push(info);
    });
    log.info('scratch image made', { image_id: id, lsn: info.lsn, end_lsn: info.end_lsn, checkpoint: formatLsn(target.lsn), size, ms: Date.now() - t0 });
    return info;
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

export interface ImagerOptions {
  timelines: Timelines;
  /** Attached computes by `${tenantId}/${timelineId}`. */
  computes: Map<string, AttachComputeRequest>;
  /** Make a new image once the tip is this many bytes of WAL past the newest image. */
  imageWalBytes: number;
  intervalMs: number;
  pgBin: string;
  tmpDir: string;
  logger: Logger;
  /**
   * The start plan of a timeline at its tip (the resolver's `plan`): given, timelines without an
   * attached compute get scratch images too ({@link makeScratchImage}).
   */
  plan?: (tenantId: string, timelineId: string) => Promise<StartPlan>;
  /** The OS user scratch Postgres runs as (see {@link MakeScratchImageOptions.runAs}). */
  runAs?: RunAs | undefined;
  /** Scratch data directories (reachable by `runAs`); default `tmpDir`. */
  scratchDir?: string;
}

/**
 * Every `intervalMs`, for each attached compute: an image when `last_record_lsn` is more than
 * `imageWalBytes` past the newest image of the timeline — for a timeline without one, past the
 * image its start uses (`plan`: an ancestor's), or right away without `plan` or any image. A failure (the
 * compute stopping is normal) backs that timeline off exponentially, up to 32 intervals.
 * With `plan`: also, for each timeline without an attached compute that has an image of its own
 * and whose `last_record_lsn` is more than `imageWalBytes` past its newest one, a scratch image
 * ({@link makeScratchImage}; same backoff on failure).
 */
export function startImager(o: ImagerOptions): { close(): Promise<void> } {
  const log = o.logger.child({ component: 'imager' });
  const backoff = new Map<string, { failures: number; until: number }>();
  const busy = new Map<string, Promise<void>>();
  let closed = false;
  let timer: NodeJS.Timeout | undefined;

  async function consider(key: string, compute: AttachComputeRequest | undefined): Promise<void> {
    const slash = key.indexOf('/');
    const tenantId = key.slice(0, slash);
    const timelineId = key.slice(slash + 1);
    try {
      const ix = await o.timelines.read(tenantId, timelineId);
      const newest = ix.images.reduce<bigint | undefined>((m, i) => {
        const l = parseLsn(i.lsn);
        return m === undefined || l > m ? l : m;
      }, undefined);
      const tip = parseLsn(ix.last_record_lsn);
      if (compute) {
        let base = newest;
        if (base === undefined && o.plan) {
          // A branch starts from an ancestor's image: it gets one of its own once as much WAL
          // passed since that one as between any two images (a copy of the whole database per
          // new branch would make branching cost what it costs to copy the database).
          base = await o.plan(tenantId, timelineId).then((p) => parseLsn(p.image.lsn), () => undefined);
        }
        if (base !== undefined && tip - base <= BigInt(o.imageWalBytes)) return;
        await makeImage({ timelines: o.timelines, tenantId, timelineId, compute, pgBin: o.pgBin, tmpDir: o.tmpDir, logger: o.logger });
      } else {
        // A stopped timeline: only one with an image of its own (else its start is an archive
        // recovery from an ancestor's image), and only when enough WAL passed.
        if (!o.plan || newest === undefined || tip - newest <= BigInt(o.imageWalBytes)) return;
        const plan = await o.plan(tenantId, timelineId);
        if (o.computes.has(key)) return; // a compute was attached meanwhile: a backup is better
        await makeScratchImage({ timelines: o.timelines, tenantId, timelineId, plan, pgBin: o.pgBin, tmpDir: o.scratchDir ?? o.tmpDir, runAs: o.runAs, logger: o.logger });
      }
      backoff.delete(key);
    } catch (err) {
      const b = backoff.get(key) ?? { failures: 0, until: 0 };
      b.failures++;
      b.until = Date.now() + o.intervalMs * Math.min(32, 2 ** (b.failures - 1));
      backoff.set(key, b);
      const level = b.failures === 1 ? 'info' : 'warn';
      log[level]('image not made', { tenant_id: tenantId, timeline_id: timelineId, failures: b.failures, retry_in_ms: b.until - Date.now(), err });
    }
  }

  const start = (key: string, compute: AttachComputeRequest | undefined, nowMs: number): void => {
    if (closed || busy.has(key) || (backoff.get(key)?.until ?? 0) > nowMs) return;
    const p = consider(key, compute).finally(() => busy.delete(key));
    busy.set(key, p);
  };

  let listing: Promise<void> | undefined;
  let rounds = 0;
  function round(): void {
    const nowMs = Date.now();
    if (!o.plan) for (const k of backoff.keys()) if (!o.computes.has(k)) backoff.delete(k);
    for (const [key, compute] of o.computes) start(key, compute, nowMs);
    // Stopped timelines' WAL only grows through ingest catching up: every 5th round is enough.
    if (o.plan && !listing && rounds++ % 5 === 0) {
      // Stopped timelines: every timeline of the store without an attached compute.
      listing = o.timelines.list().then((refs) => {
        const known = new Set(refs.map((r) => `${r.tenantId}/${r.timelineId}`));
        for (const k of backoff.keys()) if (!known.has(k)) backoff.delete(k);
        for (const k of known) if (!o.computes.has(k)) start(k, undefined, Date.now());
      }, (err: unknown) => log.warn('listing timelines failed', { err })).finally(() => { listing = undefined; });
    }
  }

  const loop = (): void => {
    timer = setTimeout(() => {
      if (closed) return;
      round();
      loop();
    }, o.intervalMs);
    timer.unref?.();
  };
  loop();

  return {
    async close() {
      closed = true;
      if (timer) clearTimeout(timer);
      await listing;
      await Promise.all([...busy.values()]);
    },
  };
}
