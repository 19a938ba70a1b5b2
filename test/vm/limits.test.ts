/**
 * Compute sizes on the process driver (vm/limits.ts through vm/process.ts), real Postgres: the
 * cgroup v1 CPU quota and memory limit follow the size at start and on a live resize, and a
 * CPU-bound query under a quarter CPU gets about a quarter of a CPU.
 */
import { chmodSync, existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import t from 'tap';
import { silentLogger } from '../../lib/logger.ts';
import { findPgBin, pgRunAs } from '../../lib/postgres.ts';
import { CGROUP_ROOT } from '../../vm/limits.ts';
import { ProcessDriver } from '../../vm/process.ts';

const ADMIN = { user: 'cloud_admin', password: 'limits-test-Pa55word' };

t.test('process driver: cgroup v1 limits from the compute size', { skip: existsSync(join(CGROUP_ROOT, 'cpu', 'cpu.cfs_quota_us')) ? false : 'no cgroup v1 cpu controller on this host (limits are a no-op there)' }, async (t) => {
  const root = mkdtempSync(join(tmpdir(), 'xenon-limits-'));
  chmodSync(root, 0o755);
  t.teardown(() => rmSync(root, { recursive: true, force: true }));
  const base = 20000 + Math.floor(Math.random() * 400) * 100;
  const driver = await ProcessDriver.create({ pgBin: findPgBin(process.env), dataRoot: join(root, 'data'), logDir: join(root, 'logs'), runAs: pgRunAs(process.env), portRange: [base, base + 99], logger: silentLogger });
  t.teardown(() => driver.close());
  await driver.prepare('br-lim', ADMIN);
  const addr = await driver.start({
    computeId: 'ep-lim', dataKey: 'br-lim',
    size: { min: { cpu: 0.25, memoryMiB: 1024 }, max: { cpu: 1, memoryMiB: 4096 }, use: { cpu: 0.25, memoryMiB: 1024 } },
  });
  t.same(await driver.limitsOf('ep-lim').then((l) => ({ cpu: l.cpu, memoryMiB: l.memoryMiB })), { cpu: 0.25, memoryMiB: 1024 }, 'limits of the starting size');

  const c = new pg.Client({ host: addr.host, port: addr.port, user: ADMIN.user, password: ADMIN.password, database: 'postgres' });
  await c.connect();
  t.teardown(() => c.end());
  const burn = async (): Promise<number> => {
    const before = (await driver.usage('ep-lim'))!.cpuSeconds;
    const t0 = Date.now();
    await c.query(`DO $$ BEGIN PERFORM clock_timestamp() WHERE false; WHILE clock_timestamp() < now() + interval '2 s' LOOP END LOOP; END $$`);
    return ((await driver.usage('ep-lim'))!.cpuSeconds - before) / ((Date.now() - t0) / 1000);
  };
  const quarter = await burn();
  t.ok(quarter < 0.45, `a busy loop gets about a quarter CPU at 0.25 CU (${quarter.toFixed(2)})`);

  t.same(await driver.resize('ep-lim', { cpu: 1, memoryMiB: 4096 }), { cpu: 1, memoryMiB: 4096 });
  t.same(await driver.limitsOf('ep-lim').then((l) => ({ cpu: l.cpu, memoryMiB: l.memoryMiB })), { cpu: 1, memoryMiB: 4096 }, 'live resize to 1 CU');
  const whole = await burn();
  t.ok(whole > quarter * 1.5, `more CPU at 1 CU (${whole.toFixed(2)} against ${quarter.toFixed(2)})`);
  t.same(await driver.resize('ep-lim', { cpu: 8, memoryMiB: 64 }), { cpu: 1, memoryMiB: 1024 }, 'clamped to the bounds');
  const u = await driver.usage('ep-lim');
  t.ok(u && u.memoryUsedMiB! > 0, 'memory in use is seen');
});
