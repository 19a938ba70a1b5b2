// Acceptance (qemu driver): with XENON_VM_DRIVER=qemu the whole stack runs each endpoint's
// Postgres in its own QEMU VM (TCG here): cold start on connect through the proxy, paused after
// the idle timeout (QEMU still there, its CPU time flat), resumed by the next connection, stopped
// later (VM gone) with the data intact on the next wake; a VM killed from outside is noticed and
// the next connection wakes the endpoint again.
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import pg from 'pg';
import { startTestStack, waitFor, type TestStack } from '../helpers/stack.ts';
import { TEST_IMAGE_DIR, testVmImage } from '../helpers/qemu.ts';

function alive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

function cpuTicks(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return Number(f[11]) + Number(f[12]);
}

/** The endpoint's QEMU process (from the driver's pid file), if it runs one for this endpoint. */
function qemuPid(stack: TestStack, branchId: string, endpointId: string): number | undefined {
  try {
    const pid = Number(readFileSync(join(stack.dirs.data, 'vms', `${branchId}.pid`), 'utf8').trim());
    const cmdline = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
    return cmdline.includes(`xenon-compute-${endpointId}`) && alive(pid) ? pid : undefined;
  } catch {
    return undefined;
  }
}

async function query(stack: TestStack, sql: string): Promise<pg.QueryResult> {
  const c = new pg.Client({ ...stack.pgConfig(), connectionTimeoutMillis: 90_000 });
  await c.connect();
  try { return await c.query(sql); } finally { await c.end(); }
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

t.test('qemu driver end to end', { timeout: 600_000 }, async (t) => {
  await testVmImage(); // built by pretest; here only when this file runs alone
  const stack = await startTestStack(t, { XENON_VM_DRIVER: 'qemu', XENON_VM_IMAGE_DIR: TEST_IMAGE_DIR, XENON_AUTOSCALE_INTERVAL_MS: '500' });
  const ep = stack.info.endpoint_id;
  const branch = (await stack.api.getEndpoint(ep)).endpoint.branch_id;
  const state = async (): Promise<string> => (await stack.api.getEndpoint(ep)).endpoint.state;

  await t.test('a stopped endpoint cold-starts a VM on connect', async (t) => {
    await stack.api.endpointAction(ep, 'stop');
    t.equal(await state(), 'stopped');
    t.equal(qemuPid(stack, branch, ep), undefined, 'no VM while stopped');
    const t0 = Date.now();
    await query(stack, 'CREATE TABLE kept (v text); INSERT INTO kept VALUES ($$in a vm$$)');
    t.comment(`cold start through the proxy: ${Date.now() - t0} ms`);
    t.ok(qemuPid(stack, branch, ep), 'a QEMU process serves the endpoint');
    t.equal(await state(), 'active');
  });

  await t.test('idle: paused, resumed by a connection, then stopped with the data kept', async (t) => {
    await stack.api.updateEndpoint(ep, { suspend_timeout_seconds: 1, stop_timeout_seconds: 600 });
    const pid = qemuPid(stack, branch, ep)!;
    t.ok(await waitFor(async () => (await state()) === 'suspended', 15_000), 'suspended after the idle timeout');
    t.ok(alive(pid), 'the QEMU process is still there');
    await sleep(300);
    const a = cpuTicks(pid);
    await sleep(1500);
    t.ok(cpuTicks(pid) - a <= 3, `its CPU time is flat (${cpuTicks(pid) - a} ticks in 1.5 s)`);

    // A long suspend timeout now, so that it does not pause again while we look.
    await stack.api.updateEndpoint(ep, { suspend_timeout_seconds: 600, stop_timeout_seconds: 600 });
    const r0 = Date.now();
    t.same((await query(stack, 'SELECT v FROM kept')).rows, [{ v: 'in a vm' }], 'resumed on connect');
    t.comment(`resume through the proxy: ${Date.now() - r0} ms`);
    t.equal(qemuPid(stack, branch, ep), pid, 'the same VM (resumed, not rebooted)');

    await stack.api.updateEndpoint(ep, { suspend_timeout_seconds: 0, stop_timeout_seconds: 1 });
    t.ok(await waitFor(async () => (await state()) === 'stopped', 60_000), 'stopped after the stop timeout');
    t.ok(await waitFor(() => !alive(pid), 10_000), 'the VM is gone');
    await stack.api.updateEndpoint(ep, { suspend_timeout_seconds: 600, stop_timeout_seconds: 600 });
    t.same((await query(stack, 'SELECT v FROM kept')).rows, [{ v: 'in a vm' }], 'data intact on the next wake');
    t.not(qemuPid(stack, branch, ep), pid, 'a new VM');
  });

  await t.test('sizes: autoscaled between min_cu and max_cu under load, pinned by hand', async (t) => {
    const get = async () => (await stack.api.getEndpoint(ep)).endpoint;
    t.match(await get(), { min_cu: null, max_cu: null, cu: null }, 'unsized: the driver\'s default VM, no autoscaling');
    t.match((await stack.api.updateEndpoint(ep, { min_cu: 0.25, max_cu: 0.5 })).endpoint, { min_cu: 0.25, max_cu: 0.5, cu_override: null });
    await t.rejects(stack.api.updateEndpoint(ep, { cu: 2 }), /within min_cu and max_cu/, 'a pin outside the bounds is refused');
    // Sizes take effect at the next start (the running VM was booted without room to grow).
    await stack.api.endpointAction(ep, 'stop');
    await query(stack, 'SELECT 1');
    t.equal((await get()).cu, 0.25, 'started at min_cu');

    // A busy loop: more CPU than a quarter CU → one size up (1 GiB more memory plugged live).
    const c = new pg.Client({ ...stack.pgConfig(), connectionTimeoutMillis: 90_000 });
    await c.connect();
    const busy = c.query(`DO $$ BEGIN WHILE clock_timestamp() < now() + interval '8 s' LOOP END LOOP; END $$`);
    t.ok(await waitFor(async () => (await get()).cu === 0.5, 30_000, 250), 'scaled up to max_cu under load');
    await busy;
    await c.end();
    t.ok(await waitFor(async () => (await get()).cu === 0.25, 30_000, 250), 'scaled back down when idle');
    const events = (await stack.api.endpointEvents(ep)).events.filter((e) => e.event === 'resized').map((e) => e.detail);
    t.match(events, [/0\.25 → 0\.5 CU: cpu/, /0\.5 → 0\.25 CU: cpu/], 'decisions recorded with their reason');

    // By hand, with the CLI (as `kubectl patch … use` in NeonVM): pinned, applied live.
    const cli = spawnSync(process.execPath, ['--import', 'tsx', 'wake-compute/cli.ts', 'endpoint', 'set', ep, '--cu', '0.5'], { env: { ...process.env, XENON_API_URL: stack.info.api_url }, encoding: 'utf8' });
    t.equal(cli.status, 0, cli.stderr);
    t.match(cli.stdout, /cu=0\.5 .*pinned at 0\.5/);
    await sleep(2500);
    t.match(await get(), { cu: 0.5, cu_override: 0.5 }, 'a pinned size stays while idle');
    const metrics = await (await fetch(`${stack.info.api_url}/metrics`)).text();
    t.match(metrics, new RegExp(`xenon_compute_cu\\{endpoint="${ep}"\\} 0\\.5`), 'current size as a metric');
    t.match(metrics, /xenon_autoscaler_decisions_total\{direction="up"\} [1-9]/);
    t.match((await stack.api.updateEndpoint(ep, { cu: null })).endpoint, { cu_override: null }, 'back to autoscaling');
  });

  await t.test('a VM killed from outside: endpoint marked stopped, the next connection wakes it', async (t) => {
    const pid = qemuPid(stack, branch, ep)!;
    t.ok(pid);
    process.kill(pid, 'SIGKILL');
    t.ok(await waitFor(async () => (await state()) === 'stopped', 15_000), 'marked stopped');
    t.same((await query(stack, 'SELECT v FROM kept')).rows, [{ v: 'in a vm' }], 'woken again, data intact');
    t.ok(qemuPid(stack, branch, ep), 'in a new VM');
  });
});
