#!/usr/bin/env node
// `npm test` runs this first (pretest): it makes sure the system packages the suite needs are
// present. As root it installs them with apt-get (without creating Debian's default cluster);
// otherwise it stops and prints the exact command to run.
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';

const PG_MAJOR = '15';
const PG_BIN = `/usr/lib/postgresql/${PG_MAJOR}/bin`;

/** What the suite needs: a check, and the Debian package that satisfies it. */
const NEEDS = [
  { what: `PostgreSQL ${PG_MAJOR} server (${PG_BIN}/postgres)`, ok: () => existsSync(`${PG_BIN}/postgres`) && existsSync(`${PG_BIN}/initdb`), pkg: `postgresql-${PG_MAJOR}` },
  { what: `pgbench (${PG_BIN}/pgbench)`, ok: () => existsSync(`${PG_BIN}/pgbench`), pkg: `postgresql-${PG_MAJOR}` },
  { what: 'psql', ok: () => onPath('psql'), pkg: `postgresql-client-${PG_MAJOR}` },
  { what: 'openssl', ok: () => onPath('openssl'), pkg: 'openssl' },
  // The client matrix (test/e2e/client-matrix.test.ts) also drives Python psycopg2 (Debian's
  // /usr/bin/python3, not a pyenv one) and Java pgJDBC (a source file run with `java File.java`).
  { what: 'python3-psycopg2', ok: () => dpkgInstalled('python3-psycopg2'), pkg: 'python3-psycopg2' },
  { what: 'pgJDBC (/usr/share/java/postgresql.jar)', ok: () => existsSync('/usr/share/java/postgresql.jar'), pkg: 'libpostgresql-jdbc-java' },
  { what: 'a JDK that runs a source file (java File.java)', ok: () => javaRunsSource(), pkg: 'default-jdk-headless' },
  // The image cache's tests and benchmark mount a small XFS with reflink (test/helpers/xfs.ts).
  { what: 'mkfs.xfs (xfsprogs)', ok: () => onPath('mkfs.xfs') || existsSync('/usr/sbin/mkfs.xfs') || existsSync('/sbin/mkfs.xfs'), pkg: 'xfsprogs' },
  // The qemu driver (test/vm/qemu-driver.test.ts, test/e2e/qemu.test.ts): QEMU, and what builds
  // the compute image (debootstrap, xz for the kernel; dpkg-deb, mkfs.ext4 and chroot are in
  // every Debian).
  { what: 'qemu-system-x86_64', ok: () => onPath('qemu-system-x86_64'), pkg: 'qemu-system-x86' },
  { what: 'debootstrap', ok: () => onPath('debootstrap') || existsSync('/usr/sbin/debootstrap'), pkg: 'debootstrap' },
  { what: 'xz', ok: () => onPath('xz'), pkg: 'xz-utils' },
  // `npm run bench` compares the transaction pooler with PgBouncer (test/bench/pooler.ts, run.ts).
  { what: 'pgbouncer', ok: () => onPath('pgbouncer') || existsSync('/usr/sbin/pgbouncer'), pkg: 'pgbouncer' },
];

function onPath(cmd) {
  return spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0;
}

function dpkgInstalled(pkg) {
  const r = spawnSync('dpkg-query', ['-W', '-f=${db:Status-Status}', pkg], { encoding: 'utf8' });
  return r.status === 0 && r.stdout.trim() === 'installed';
}

/**
 * Source-launch mode (`java File.java`) needs the jdk.compiler module: a JRE alone has a `java`
 * that cannot run it. Listing the modules is quick (no JVM warm-up of a compile).
 */
function javaRunsSource() {
  if (!onPath('java')) return false;
  const r = spawnSync('java', ['--list-modules'], { encoding: 'utf8' });
  return r.status === 0 && /^jdk\.compiler@/m.test(r.stdout);
}

const major = Number(process.versions.node.split('.')[0]);
if (major < 20) {
  console.error(`xenon: Node.js 20 or newer is required (this is ${process.version}).`);
  process.exit(1);
}

const missing = NEEDS.filter((n) => !n.ok());
const isRoot = typeof process.getuid === 'function' && process.getuid() === 0;
if (missing.length) {
  const pkgs = [...new Set(missing.map((n) => n.pkg))];
  const cmd = `apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${pkgs.join(' ')}`;
  if (!isRoot) {
    console.error(`xenon: the test suite needs ${missing.map((n) => n.what).join(', ')}.\nInstall with:\n  sudo sh -c '${cmd}'`);
    process.exit(1);
  }
  console.error(`xenon: installing ${pkgs.join(' ')} …`);
  // Debian's postgresql package would create and start a "main" cluster on port 5432: the suite
  // starts its own clusters, so ask postgresql-common not to.
  mkdirSync('/etc/postgresql-common/createcluster.d', { recursive: true });
  writeFileSync('/etc/postgresql-common/createcluster.d/xenon-no-main-cluster.conf', 'create_main_cluster = false\n');
  execFileSync('sh', ['-c', cmd], { stdio: 'inherit' });
  const still = NEEDS.filter((n) => !n.ok());
  if (still.length) {
    console.error(`xenon: still missing after apt-get: ${still.map((n) => n.what).join(', ')}`);
    process.exit(1);
  }
}

// As root, Postgres runs as the `postgres` user (the package creates it).
if (isRoot && !readFileSync('/etc/passwd', 'utf8').split('\n').some((l) => l.startsWith('postgres:'))) {
  console.error("xenon: running as root needs a 'postgres' user for the computes; creating it");
  execFileSync('useradd', ['--system', '--user-group', '--home-dir', '/var/lib/postgresql', '--shell', '/bin/sh', 'postgres'], { stdio: 'inherit' });
}

// The qemu driver's compute image (debootstrap of Debian with PostgreSQL, a kernel, an
// initramfs): built once here, before the test files start, into the directory they share.
// Minutes the first time on a machine; found in its directory after that.
if (isRoot) {
  const dir = process.env.XENON_VM_IMAGE_DIR || '/var/tmp/xenon-vm-image';
  console.error(`xenon: making sure the qemu compute image is built (${dir}) …`);
  const t0 = Date.now();
  const r = spawnSync(process.execPath, ['--import', 'tsx', 'wake-compute/cli.ts', 'vm', 'build-image', '--dir', dir], { stdio: ['ignore', 'pipe', 'inherit'], encoding: 'utf8' });
  if (r.status !== 0) {
    console.error(`xenon: building the compute image failed (exit ${r.status}): ${r.stdout}`);
    process.exit(1);
  }
  console.error(`xenon: compute image ready in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
}
