/**
 * A small XFS file system with reflink, loop-mounted in a temporary directory: where the image
 * cache clones files (this machine's own disks are ext4). Needs root and mkfs.xfs (xfsprogs,
 * installed by the pretest step); `xfsUnavailable()` says why not otherwise.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { chmodSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export function xfsUnavailable(): string | undefined {
  if (process.getuid?.() !== 0) return 'mounting a loop XFS needs root';
  if (spawnSync('sh', ['-c', 'command -v mkfs.xfs || test -x /usr/sbin/mkfs.xfs || test -x /sbin/mkfs.xfs'], { stdio: 'ignore' }).status !== 0) return 'mkfs.xfs (xfsprogs) is not installed';
  return undefined;
}

export interface Xfs {
  /** The mount point (mode 0755, root's). */
  dir: string;
  /** Unmounts (the loop device goes with it) and removes the image. */
  close(): void;
}

/** Makes and mounts a sparse XFS image of `sizeGiB`. */
export function mountXfs(sizeGiB = 4): Xfs {
  const base = mkdtempSync(join(tmpdir(), 'xenon-xfs-'));
  chmodSync(base, 0o755);
  const img = join(base, 'fs.img');
  const dir = join(base, 'mnt');
  mkdirSync(dir);
  execFileSync('truncate', ['-s', `${sizeGiB}G`, img]);
  const mkfs = spawnSync('sh', ['-c', 'command -v mkfs.xfs || echo /usr/sbin/mkfs.xfs'], { encoding: 'utf8' }).stdout.trim();
  execFileSync(mkfs, ['-q', '-m', 'reflink=1', img]);
  execFileSync('mount', ['-o', 'loop', img, dir]);
  chmodSync(dir, 0o755);
  let closed = false;
  return {
    dir,
    close() {
      if (closed) return;
      closed = true;
      // lazy: a process still starting in there (a test that failed halfway) must not keep it
      spawnSync('umount', ['-l', dir], { stdio: 'ignore' });
      rmSync(base, { recursive: true, force: true });
    },
  };
}
