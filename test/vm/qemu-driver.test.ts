/**
 * vm/qemu.ts with real QEMU (TCG here: no hardware KVM) booting the real compute image: a
 * compute VM starts on host-made data and serves SQL; it is paused with QMP (its CPU time stops)
 * and resumed; CPUs and memory are resized live, both ways, as the guest sees them; the guest
 * cannot read the host's files; a clean stop keeps the data; a boot that hangs is retried; a
 * warm VM from the pool serves a compute's data; a VM killed from outside is reported as an
 * unexpected exit.
 */
import { chmodSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import t from 'tap';
import { silentLogger } from '../../lib/logger.ts';
import { findPgBin, pgRunAs } from '../../lib/postgres.ts';
import type { ComputeExit } from '../../vm/api.ts';
import { QemuDriver } from '../../vm/qemu.ts';
import { testVmImage } from '../helpers/qemu.ts';

const ADMIN = { user: 'cloud_admin', password: 'qemu-test-Pa55word' };
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function waitFor(cond: () => boolean, ms: number): Promise<boolean> {
  const end = Date.now() + ms;
  while (!cond() && Date.now() < end) await sleep(100);
  return cond();
}

/** utime + stime of a process, in clock ticks. */
function cpuTicks(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return Number(f[11]) + Number(f[12]);
}

async function query(port: number, sql: string): Promise<pg.QueryResult> {
  const c = new pg.Client({ host: '127.0.0.1', port, user: ADMIN.user, password: ADMIN.password, database: 'postgres', connectionTimeoutMillis: 30_000 });
  await c.connect();
  try {
    return await c.query(sql);
  } finally {
    await c.end();
  }
}

/** A command's output inside the guest, run by Postgres (the superuser's COPY FROM PROGRAM). */
async function guest(port: number, cmd: string): Promise<string> {
  const r = await query(port, `CREATE TEMP TABLE o(line text); COPY o FROM PROGRAM '${cmd.replace(/'/g, "''")}' WITH (FORMAT csv, DELIMITER E'\\x01', QUOTE E'\\x02'); SELECT string_agg(line, E'\\n') AS out FROM o;`);
  const last = Array.isArray(r) ? r[r.length - 1] : r;
  return String((last as pg.QueryResult).rows[0].out ?? '');
}

t.test('QemuDriver with real QEMU and the compute image', { timeout: 600_000 }, async (t) => {
  const image = await testVmImage();
  const root = mkdtempSync(join(tmpdir(), 'xenon-qemu-'));
  chmodSync(root, 0o755);
  t.teardown(() => rmSync(root, { recursive: true, force: true }));
  const dataRoot = join(root, 'data');
  const marker = join(root, 'host-secret.txt');
  writeFileSync(marker, 'host-only marker\n', { mode: 0o644 });
  const base = 40000 + Math.floor(Math.random() * 200) * 100;
  const driver = await QemuDriver.create({
    pgBin: findPgBin(process.env), dataRoot, logDir: join(root, 'logs'), runAs: pgRunAs(process.env), portRange: [base, base + 99],
    image, logger: silentLogger,
  });
  t.teardown(() => driver.close());
  const exits: ComputeExit[] = [];
  driver.onUnexpectedExit((e) => exits.push(e));
  t.equal(driver.accel, /\b(vmx|svm)\b/.test(readFileSync('/proc/cpuinfo', 'utf8')) ? driver.accel : 'tcg', 'TCG where the CPU has no vmx/svm');

  t.same(await driver.prepare('br-one', ADMIN), { created: true }, 'initdb on the host');
  const size = { min: { cpu: 1, memoryMiB: 1024 }, max: { cpu: 2, memoryMiB: 2048 }, use: { cpu: 1, memoryMiB: 1024 } };
  const t0 = Date.now();
  const addr = await driver.start({ computeId: 'ep-vm-one', dataKey: 'br-one', size });
  const coldMs = Date.now() - t0;
  t.comment(`cold start (launch → Postgres ready) ${coldMs} ms under ${driver.accel}`);
  t.equal(driver.status('ep-vm-one'), 'running');
  await query(addr.port, 'CREATE TABLE kept(v int); INSERT INTO kept VALUES (42)');
  t.match(String((await query(addr.port, 'SELECT version() AS v')).rows[0].v), /PostgreSQL 15/, 'Postgres 15 answers through the host forward');

  await t.test('the guest is a VM of its own that cannot read the host', async (t) => {
    t.equal((await guest(addr.port, 'cat /etc/hostname')).trim(), 'xenon-compute', 'the image\'s root file system, not the host\'s');
    t.equal((await guest(addr.port, `cat ${marker} 2>&1 || echo unreadable`)).trim().split('\n').pop(), 'unreadable', 'a file in the host\'s state dir is not there');
    t.equal((await guest(addr.port, 'ls /xenon/data')).split('\n').sort().join(','), 'pgdata,xenon-start.conf', 'the data share holds only this compute\'s directory');
    t.match(await guest(addr.port, 'cat /proc/cpuinfo | grep -m1 "model name"'), /QEMU|Virtual|AMD|Intel/, 'a guest CPU');
  });

  await t.test('live resize: CPUs and memory, up and back down', async (t) => {
    const memKiB = async (): Promise<number> => Number(/MemTotal:\s+(\d+) kB/.exec(await guest(addr.port, 'cat /sys/devices/system/node/node0/meminfo'))?.[1]);
    t.equal((await guest(addr.port, 'grep -c ^processor /proc/cpuinfo')).trim(), '1', '1 vCPU at start');
    const before = await memKiB();
    t.ok(before > 700_000 && before <= 1024 * 1024, `~1 GiB at start (${before} kB)`);
    const up = await driver.resize('ep-vm-one', { cpu: 2, memoryMiB: 2048 });
    t.same(up, { cpu: 2, memoryMiB: 2048 });
    t.equal((await guest(addr.port, 'grep -c ^processor /proc/cpuinfo')).trim(), '2', '2 vCPUs inside, no restart');
    const after = await memKiB();
    t.ok(after - before >= 1000 * 1024, `+1 GiB inside (${before} → ${after} kB)`);
    const down = await driver.resize('ep-vm-one', { cpu: 1, memoryMiB: 1024 });
    t.same(down, { cpu: 1, memoryMiB: 1024 });
    t.equal((await guest(addr.port, 'grep -c ^processor /proc/cpuinfo')).trim(), '1', 'back to 1 vCPU');
    const back = await memKiB();
    t.ok(back < after - 900 * 1024, `memory unplugged again (${after} → ${back} kB)`);
    t.equal(String((await query(addr.port, 'SELECT v FROM kept')).rows[0].v), '42', 'Postgres kept serving throughout');
  });

  await t.test('suspend stops the VM\'s CPU, resume brings it back', async (t) => {
    const [pid] = await driver.pids('ep-vm-one');
    await driver.suspend('ep-vm-one');
    t.equal(driver.status('ep-vm-one'), 'suspended');
    await sleep(300);
    const a = cpuTicks(pid!);
    await sleep(1500);
    const b = cpuTicks(pid!);
    t.ok(b - a <= 3, `QEMU used ${b - a} ticks in 1.5 s while paused`);
    const r0 = Date.now();
    await driver.resume('ep-vm-one');
    t.equal(String((await query(addr.port, 'SELECT v FROM kept')).rows[0].v), '42', 'serves again after resume');
    t.comment(`resume → first row ${Date.now() - r0} ms`);
  });

  await t.test('a clean stop keeps the data; the next boot serves it; links the guest leaves are not followed', async (t) => {
    const [pid] = await driver.pids('ep-vm-one');
    // A hostile guest (here its superuser) leaves links in its share pointing at host paths.
    await guest(addr.port, `ln -sfn ${marker} /xenon/data/xenon-start.conf && ln -sfn /etc /xenon/data/wal-prefetch && echo planted`);
    await driver.stop('ep-vm-one');
    t.equal(driver.status('ep-vm-one'), 'stopped');
    t.throws(() => process.kill(pid!, 0), 'QEMU is gone');
    t.equal((await driver.controlData('br-one'))?.state, 'shut down', 'Postgres inside shut down cleanly');
    await t.rejects(driver.start({ computeId: 'ep-vm-one', dataKey: 'br-one' }), /wal-prefetch is not a directory/, 'a start on a directory link is refused');
    rmSync(join(dataRoot, 'computes', 'br-one', 'wal-prefetch'));
    const again = await driver.start({ computeId: 'ep-vm-one', dataKey: 'br-one' });
    t.equal(readFileSync(marker, 'utf8'), 'host-only marker\n', 'the settings file was not written through the guest\'s link');
    t.equal(String((await query(again.port, 'SELECT v FROM kept')).rows[0].v), '42');
    await driver.stop('ep-vm-one');
    t.same(exits, [], 'no unexpected exit so far');
  });

  await t.test('a hung boot is killed and tried again', async (t) => {
    // `-S`: QEMU starts with its CPU stopped, a boot that never reports (as a hung kernel does).
    const hung = await QemuDriver.create({
      pgBin: findPgBin(process.env), dataRoot, logDir: join(root, 'logs'), runAs: pgRunAs(process.env), portRange: [base, base + 99],
      image, logger: silentLogger, bootTimeoutMs: 20_000, extraArgs: (attempt) => (attempt === 1 ? ['-S'] : []),
    });
    t.teardown(() => hung.close());
    const t1 = Date.now();
    const a = await hung.start({ computeId: 'ep-vm-one', dataKey: 'br-one' });
    t.ok(Date.now() - t1 >= 20_000, `the first attempt waited out the boot timeout (${Date.now() - t1} ms in all)`);
    t.equal(String((await query(a.port, 'SELECT v FROM kept')).rows[0].v), '42', 'the second boot serves');
    await hung.stop('ep-vm-one');
  });

  await t.test('a warm VM from the pool: a start costs a Postgres start, not a boot', async (t) => {
    const warm = await QemuDriver.create({
      pgBin: findPgBin(process.env), dataRoot, logDir: join(root, 'logs'), runAs: pgRunAs(process.env), portRange: [base, base + 99],
      image, logger: silentLogger, warmPool: 1,
    });
    t.teardown(() => warm.close());
    await warm.warmPool();
    t.equal(warm.pooled, 1, 'one VM booted and waiting');
    const t1 = Date.now();
    const a = await warm.start({ computeId: 'ep-vm-one', dataKey: 'br-one' });
    const warmMs = Date.now() - t1;
    t.equal(String((await query(a.port, 'SELECT v FROM kept')).rows[0].v), '42', 'the compute\'s data, served from the warm VM');
    t.ok(warmMs < coldMs, `warm start ${warmMs} ms < cold start ${coldMs} ms`);
    t.comment(`warm start (Postgres only) ${warmMs} ms; cold start ${coldMs} ms`);
    await warm.stop('ep-vm-one');
    t.equal((await warm.controlData('br-one'))?.state, 'shut down', 'a clean shutdown through the bind mount');
    t.ok(await waitFor(() => warm.pooled === 1, 120_000), 'the pool refilled');
    const slots = readdirSync(join(dataRoot, 'vm-slots'));
    t.equal(slots.length, 1, 'the used VM\'s slot is released');
    t.same(readdirSync(join(dataRoot, 'vm-slots', slots[0]!, 'data')), [], 'the waiting VM\'s slot holds no data');
  });

  await t.test('a VM killed from outside is reported and the next start works', async (t) => {
    await driver.start({ computeId: 'ep-vm-one', dataKey: 'br-one' });
    const [pid] = await driver.pids('ep-vm-one');
    process.kill(pid!, 'SIGKILL');
    const deadline = Date.now() + 10_000;
    while (!exits.length && Date.now() < deadline) await sleep(50);
    t.match(exits, [{ computeId: 'ep-vm-one', expected: false }], 'unexpected exit reported');
    t.equal(driver.status('ep-vm-one'), 'stopped');
    const a = await driver.start({ computeId: 'ep-vm-one', dataKey: 'br-one' });
    t.equal(String((await query(a.port, 'SELECT v FROM kept')).rows[0].v), '42', 'data intact after crash recovery');
    await driver.stop('ep-vm-one');
  });
});
