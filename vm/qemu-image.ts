/**
 * The compute image of the qemu driver: what a compute VM boots, built from Debian's archive and
 * nothing of the host's file system.
 *
 * - `root.img`: an ext4 image (read-only in every VM, one file shared by all of them) of a
 *   `debootstrap --variant=minbase` Debian with PostgreSQL 15, curl (the guest's
 *   `restore_command`) and busybox, plus the guest agent (vm/guest/agent.sh).
 * - `vmlinux`: Debian's kernel (the `linux-image-amd64` of the same suite), uncompressed: QEMU
 *   boots the ELF directly (PVH), which skips the firmware's decompression — seconds under TCG.
 * - `initrd.cpio`: busybox, the virtio / 9p / ext4 / virtio-mem modules of that kernel (their
 *   dependency closure, read from each module's `.modinfo`) and vm/guest/init.sh.
 *
 * Built once per recipe into `<dir>/<key>/` (the key hashes the recipe and the guest scripts),
 * from the Debian tree and kernel package kept in `<dir>/base-<key>/` (debootstrap: minutes; a
 * change of the guest scripts rebuilds only the disk and initramfs: seconds). One build at a time
 * per directory (a lock directory): concurrent builders wait for it. Needs root (debootstrap and
 * chroot), debootstrap, xz and network access to the Debian mirror.
 */
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { chmod, copyFile, mkdir, readdir, readFile, rename, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { XenonError } from '../lib/errors.ts';
import type { Logger } from '../lib/logger.ts';
import { delay, runCommand } from '../lib/postgres.ts';

/** Bump when the recipe below changes in a way the key does not see. */
const RECIPE_VERSION = 1;
const SUITE = 'bookworm';
const PACKAGES = ['postgresql-15', 'curl', 'busybox-static'];
/** Drivers the guest needs, loaded in this order after their dependencies. */
const MODULES = ['virtio_pci', 'virtio_blk', 'crc32c_generic', 'ext4', '9pnet_virtio', '9p', 'virtio_net', 'virtio_console', 'virtio_mem'];
const GUEST_DIR = fileURLToPath(new URL('./guest/', import.meta.url));
const GUEST_FILES = { 'init.sh': 'init.sh', 'agent.sh': 'agent.sh', 'restore-wal.sh': 'restore-wal.sh' } as const;

export interface VmImage {
  dir: string;
  kernel: string;
  initrd: string;
  root: string;
  manifest: VmImageManifest;
}

export interface VmImageManifest {
  key: string;
  suite: string;
  kernelRelease: string;
  postgres: string;
  builtAt: string;
  buildMs: number;
  rootBytes: number;
}

export interface BuildImageOptions {
  /** Where images are kept: `<dir>/<key>/`. */
  dir: string;
  mirror?: string;
  logger: Logger;
  /** How long to wait for another process' build of the same image (default 20 min). */
  waitMs?: number;
}

/** Where images are kept unless told: `$XENON_VM_IMAGE_DIR`, else `<state dir>/vm-image`. */
export function defaultImageDir(env: NodeJS.ProcessEnv, stateDir: string): string {
  return env.XENON_VM_IMAGE_DIR || join(stateDir, 'vm-image');
}

/** The key of the Debian part (debootstrap'd tree and kernel package): kept across guest script changes. */
function baseKey(): string {
  return createHash('sha256').update(JSON.stringify({ RECIPE_VERSION, SUITE, PACKAGES })).digest('hex').slice(0, 16);
}

/** The key of the current recipe (the guest scripts included). */
export async function imageKey(): Promise<string> {
  const h = createHash('sha256').update(JSON.stringify({ RECIPE_VERSION, SUITE, PACKAGES, MODULES }));
  for (const f of Object.keys(GUEST_FILES).sort()) h.update(f).update(await readFile(join(GUEST_DIR, f)));
  return h.digest('hex').slice(0, 16);
}

/** The built image of the current recipe under `dir`, or undefined. */
export async function findImage(dir: string): Promise<VmImage | undefined> {
  const at = join(dir, await imageKey());
  try {
    const manifest = JSON.parse(await readFile(join(at, 'manifest.json'), 'utf8')) as VmImageManifest;
    return { dir: at, kernel: join(at, 'vmlinux'), initrd: join(at, 'initrd.cpio'), root: join(at, 'root.img'), manifest };
  } catch {
    return undefined;
  }
}

/** The image of the current recipe: built unless it is there; waits for a concurrent build. */
export async function ensureImage(o: BuildImageOptions): Promise<VmImage> {
  const found = await findImage(o.dir);
  if (found) return found;
  await mkdir(o.dir, { recursive: true });
  const key = await imageKey();
  // One build at a time per directory: builds share the Debian tree.
  const lock = join(o.dir, 'build.lock');
  const deadline = Date.now() + (o.waitMs ?? 20 * 60_000);
  for (;;) {
    try {
      await mkdir(lock);
      await writeFile(join(lock, 'pid'), String(process.pid));
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    const done = await findImage(o.dir);
    if (done) return done;
    const holder = Number(await readFile(join(lock, 'pid'), 'utf8').catch(() => '0'));
    if (holder && !alive(holder)) {
      o.logger.warn('removing the lock of a compute image build whose process is gone', { lock, pid: holder });
      await rm(lock, { recursive: true, force: true });
      continue;
    }
    if (Date.now() > deadline) throw new XenonError('CP_COMPUTE_START_FAILED', `timed out waiting for the compute image build holding ${lock}`);
    await delay(1000);
  }
  try {
    const again = await findImage(o.dir);
    if (again) return again;
    return await build(o, key);
  } finally {
    await rm(lock, { recursive: true, force: true });
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

async function build(o: BuildImageOptions, key: string): Promise<VmImage> {
  if (process.getuid?.() !== 0) {
    throw new XenonError('CP_COMPUTE_START_FAILED', `building the compute image needs root (debootstrap, chroot): run \`sudo xenon vm build-image --dir ${o.dir}\` once`);
  }
  const started = Date.now();
  const log = o.logger.child({ component: 'vm-image', key });
  const base = await ensureBase(o, log);
  const work = join(o.dir, `${key}.build-${process.pid}`);
  await rm(work, { recursive: true, force: true });
  await mkdir(work, { recursive: true });
  try {
    log.info('building the compute image: guest files, kernel, root disk', { kernel: base.kernelRelease });
    await installGuestFiles(base.rootfs);
    const postgres = (await run('chroot', [base.rootfs, '/usr/lib/postgresql/15/bin/postgres', '--version'])).trim();
    await writeVmlinux(join(base.kernel, 'boot', `vmlinuz-${base.kernelRelease}`), join(work, 'vmlinux'));
    await writeInitrd(join(base.kernel, 'lib/modules', base.kernelRelease), base.rootfs, join(work, 'initrd'), join(work, 'initrd.cpio'));
    // The root image: the tree's size plus room for the file system's own metadata.
    const bytes = Number((await run('du', ['-sb', base.rootfs])).split(/\s/)[0]);
    const size = Math.ceil((bytes * 1.15 + 64 * 2 ** 20) / 2 ** 20);
    await run('mkfs.ext4', ['-q', '-F', '-O', '^has_journal', '-L', 'xenon-root', '-E', 'root_owner=0:0', '-d', base.rootfs, join(work, 'root.img'), `${size}M`]);
    const rootBytes = (await stat(join(work, 'root.img'))).size;

    const manifest: VmImageManifest = { key, suite: SUITE, kernelRelease: base.kernelRelease, postgres, builtAt: new Date().toISOString(), buildMs: Date.now() - started, rootBytes };
    const final = join(o.dir, key);
    await mkdir(final, { recursive: true });
    for (const f of ['vmlinux', 'initrd.cpio', 'root.img']) await rename(join(work, f), join(final, f));
    await writeFile(join(final, 'manifest.json'), JSON.stringify(manifest, null, 2) + '\n');
    log.info('compute image built', { ...manifest });
    const image = await findImage(o.dir);
    if (!image) throw new Error('the built image is not where it was put');
    return image;
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

interface Base {
  rootfs: string;
  kernel: string;
  kernelRelease: string;
}

/** The debootstrap'd tree and the extracted kernel package: `<dir>/base-<key>/`. */
async function ensureBase(o: BuildImageOptions, log: Logger): Promise<Base> {
  const dir = join(o.dir, `base-${baseKey()}`);
  const done = await readFile(join(dir, 'base.json'), 'utf8').then((t) => JSON.parse(t) as { kernelRelease: string }, () => undefined);
  if (done) return { rootfs: join(dir, 'rootfs'), kernel: join(dir, 'kernel'), kernelRelease: done.kernelRelease };
  const mirror = o.mirror ?? 'http://deb.debian.org/debian';
  const rootfs = join(dir, 'rootfs');
  await rm(dir, { recursive: true, force: true });
  await mkdir(dir, { recursive: true });
  log.info('building the compute image: debootstrap', { suite: SUITE, mirror, packages: PACKAGES });
  await run('debootstrap', ['--variant=minbase', `--include=${PACKAGES.join(',')}`, SUITE, rootfs, mirror]);

  // Debian's kernel of the same suite, fetched by the new system's own apt.
  await copyFile('/etc/resolv.conf', join(rootfs, 'etc/resolv.conf')).catch(() => {});
  await run('chroot', [rootfs, 'apt-get', 'update', '-q']);
  const depends = await run('chroot', [rootfs, 'apt-cache', 'depends', 'linux-image-amd64']);
  const pkg = /Depends: (linux-image-[0-9][^\s]*-amd64)/.exec(depends)?.[1];
  if (!pkg) throw new Error(`no versioned kernel package in: ${depends}`);
  await run('chroot', [rootfs, 'sh', '-c', `cd /tmp && apt-get download -q ${pkg}`]);
  const deb = (await readdir(join(rootfs, 'tmp'))).find((f) => f.startsWith(pkg) && f.endsWith('.deb'));
  if (!deb) throw new Error(`apt-get download ${pkg} left no .deb`);
  await run('dpkg-deb', ['-x', join(rootfs, 'tmp', deb), join(dir, 'kernel')]);
  const kernelRelease = pkg.replace(/^linux-image-/, '');

  // What a compute never uses: the package's own cluster, apt's caches.
  for (const p of ['var/lib/postgresql/15/main', 'etc/postgresql/15/main', 'var/lib/apt/lists', 'var/cache/apt', 'tmp']) {
    await rm(join(rootfs, p), { recursive: true, force: true });
  }
  await mkdir(join(rootfs, 'tmp'));
  await chmod(join(rootfs, 'tmp'), 0o1777);
  await mkdir(join(rootfs, 'var/lib/apt/lists/partial'), { recursive: true });
  await writeFile(join(rootfs, 'etc/hostname'), 'xenon-compute\n');
  await writeFile(join(rootfs, 'etc/resolv.conf'), '# compute VMs have no DNS\n');
  await writeFile(join(dir, 'base.json'), JSON.stringify({ kernelRelease, builtAt: new Date().toISOString() }) + '\n');
  return { rootfs, kernel: join(dir, 'kernel'), kernelRelease };
}

/** Runs a build step as this user; throws with the step's output tail on failure. */
function run(cmd: string, args: string[]): Promise<string> {
  return runCommand(cmd, args, undefined, { DEBIAN_FRONTEND: 'noninteractive', PATH: `/usr/sbin:/usr/bin:/sbin:/bin:${process.env.PATH ?? ''}` });
}

/** The guest agent and restore command, into the tree (each image build writes the current ones). */
async function installGuestFiles(rootfs: string): Promise<void> {
  const install = async (from: string, to: string): Promise<void> => {
    await copyFile(join(GUEST_DIR, from), join(rootfs, to));
    await chmod(join(rootfs, to), 0o755);
  };
  await install(GUEST_FILES['agent.sh'], 'usr/local/sbin/xenon-agent');
  await install(GUEST_FILES['restore-wal.sh'], 'usr/local/bin/xenon-restore-wal');
  // The share's mount point, and /xenon/data: where the agent points it (the share, or a
  // directory in it) at each start.
  await rm(join(rootfs, 'xenon'), { recursive: true, force: true });
  await mkdir(join(rootfs, 'xenon/share'), { recursive: true });
  await symlink('/run/xenon-data', join(rootfs, 'xenon/data'));
}

/**
 * The uncompressed kernel ELF out of a bzImage: the setup header (boot protocol ≥ 2.08) gives
 * the compressed payload's offset and length; xz, gzip and zstd payloads are recognised.
 */
export async function writeVmlinux(bzImage: string, out: string): Promise<void> {
  const b = await readFile(bzImage);
  const setupSects = b[0x1f1] || 4;
  const offset = (setupSects + 1) * 512 + b.readUInt32LE(0x248);
  const length = b.readUInt32LE(0x24c);
  const payload = join(`${out}.payload`);
  await writeFile(payload, b.subarray(offset, offset + length));
  const magic = b.subarray(offset, offset + 6).toString('hex');
  const tool = magic.startsWith('fd377a585a00') ? 'xz' : magic.startsWith('1f8b') ? 'gzip' : magic.startsWith('28b52ffd') ? 'zstd' : undefined;
  if (!tool) throw new Error(`unknown kernel payload compression (magic ${magic})`);
  // `--single-stream`-like tolerance: the payload is followed by the decompressed size.
  await runCommand('sh', ['-c', `${tool} -dc < "$0" > "$1"; test -s "$1"`, payload, out], undefined);
  await rm(payload, { force: true });
  const head = await readFile(out).then((d) => d.subarray(0, 4).toString('latin1'));
  if (head !== '\x7fELF') throw new Error('the decompressed kernel is not an ELF file');
}

/** Module name → its `depends=` from the `.modinfo` section. */
async function moduleDeps(path: string): Promise<string[]> {
  const text = (await readFile(path)).toString('latin1');
  const m = /depends=([^\0]*)\0/.exec(text);
  return m?.[1] ? m[1].split(',').filter(Boolean) : [];
}

async function indexModules(dir: string, into = new Map<string, string>()): Promise<Map<string, string>> {
  for (const e of await readdir(dir, { withFileTypes: true })) {
    if (e.isDirectory()) await indexModules(join(dir, e.name), into);
    else if (e.name.endsWith('.ko')) into.set(e.name.slice(0, -3).replace(/-/g, '_'), join(dir, e.name));
  }
  return into;
}

/** The initramfs: busybox (static, from the image), the modules' closure in load order, /init. */
async function writeInitrd(moduleDir: string, rootfs: string, tree: string, out: string): Promise<void> {
  const index = await indexModules(join(moduleDir, 'kernel'));
  const order: string[] = [];
  const visit = async (name: string, path: string[]): Promise<void> => {
    if (order.includes(name)) return;
    if (path.includes(name)) throw new Error(`module dependency cycle: ${[...path, name].join(' → ')}`);
    const file = index.get(name);
    if (!file) throw new Error(`module ${name} is not in ${moduleDir} (built in? then drop it from MODULES)`);
    for (const d of await moduleDeps(file)) await visit(d, [...path, name]);
    order.push(name);
  };
  for (const m of MODULES) await visit(m, []);
  await mkdir(join(tree, 'bin'), { recursive: true });
  await mkdir(join(tree, 'lib/modules'), { recursive: true });
  await copyFile(join(rootfs, 'bin/busybox'), join(tree, 'bin/busybox'));
  await chmod(join(tree, 'bin/busybox'), 0o755);
  for (const m of order) await copyFile(index.get(m)!, join(tree, 'lib/modules', `${m}.ko`));
  await writeFile(join(tree, 'lib/modules/order'), order.join('\n') + '\n');
  await copyFile(join(GUEST_DIR, GUEST_FILES['init.sh']), join(tree, 'init'));
  await chmod(join(tree, 'init'), 0o755);
  if (!existsSync(join(tree, 'bin/busybox'))) throw new Error('busybox missing from the initramfs');
  await runCommand('sh', ['-c', 'cd "$0" && find . | "$0/bin/busybox" cpio -o -H newc > "$1"', tree, out], undefined);
}
