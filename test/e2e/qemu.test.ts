// Acceptance (qemu driver): with XENON_VM_DRIVER=qemu the whole stack runs each endpoint's
// Postgres in its own QEMU VM (TCG here): cold start on connect through the proxy, paused after
// the idle timeout (QEMU still there, its CPU time flat), resumed by the next connection, stopped
// later (VM gone) with the data intact on the next wake; a VM killed from outside is noticed and
// the next connection wakes the endpoint again.
import t from 'tap';
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
  const stack = await startTestStack(t, { XENON_VM_DRIVER: 'qemu', XENON_VM_IMAGE_DIR: TEST_IMAGE_DIR });
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

  await t.test('a VM killed from outside: endpoint marked stopped, the next connection wakes it', async (t) => {
    const pid = qemuPid(stack, branch, ep)!;
    t.ok(pid);
    process.kill(pid, 'SIGKILL');
    t.ok(await waitFor(async () => (await state()) === 'stopped', 15_000), 'marked stopped');
    t.same((await query(stack, 'SELECT v FROM kept')).rows, [{ v: 'in a vm' }], 'woken again, data intact');
    t.ok(qemuPid(stack, branch, ep), 'in a new VM');
  });
});
