/**
 * `npm run bench` part: the qemu driver through the whole stack (`xenon up` with
 * XENON_VM_DRIVER=qemu). Medians of BENCH_QEMU_RUNS (default 5) runs each:
 * - cold start: endpoint stopped → first row through the proxy (a VM boot + Postgres start);
 * - the same with a warm pool of one VM (XENON_VM_WARM_POOL=1: Postgres start only; the pool
 *   refills between runs);
 * - resume: endpoint paused (QMP stop), 300 ms (as run.ts: the proxy's heartbeat carries the
 *   invalidation of its cached address), → first row through the proxy.
 * Prints the accelerator used (kvm where the CPU has vmx/svm, else tcg).
 */
import { firstRow, spread } from './harness.ts';
import { startTestStack, waitFor, type TestStack } from '../helpers/stack.ts';
import { TEST_IMAGE_DIR, testVmImage } from '../helpers/qemu.ts';
import { detectAccel } from '../../vm/index.ts';

const RUNS = Number(process.env.BENCH_QEMU_RUNS ?? 5);
const teardowns: (() => unknown)[] = [];
const t = { teardown: (fn: () => unknown) => void teardowns.push(fn) };

async function state(stack: TestStack): Promise<string> {
  return (await stack.api.getEndpoint(stack.info.endpoint_id)).endpoint.state;
}

async function coldStarts(stack: TestStack, beforeEach: () => Promise<void>): Promise<number[]> {
  const out: number[] = [];
  for (let i = 0; i < RUNS; i++) {
    await stack.api.endpointAction(stack.info.endpoint_id, 'stop');
    await beforeEach();
    out.push(await firstRow({ ...stack.pgConfig(), connectionTimeoutMillis: 120_000 }));
  }
  return out;
}

async function main(): Promise<void> {
  await testVmImage();
  const accel = detectAccel();
  const rows: [string, number[]][] = [];
  try {
    const env = { XENON_VM_DRIVER: 'qemu', XENON_VM_IMAGE_DIR: TEST_IMAGE_DIR, XENON_SUSPEND_TIMEOUT_SECONDS: '0', XENON_STOP_TIMEOUT_SECONDS: '0' };
    const cold = await startTestStack(t, env);
    rows.push(['cold start (stopped → first row through the proxy)', await coldStarts(cold, async () => {})]);
    const resumes: number[] = [];
    for (let i = 0; i < RUNS; i++) {
      await firstRow(cold.pgConfig());
      await cold.api.endpointAction(cold.info.endpoint_id, 'suspend');
      if (!(await waitFor(async () => (await state(cold)) === 'suspended', 10_000))) throw new Error('not suspended');
      await new Promise((r) => setTimeout(r, 300)); // as run.ts: the proxy's heartbeat carries the invalidation of its cached address
      resumes.push(await firstRow(cold.pgConfig()));
    }
    rows.push(['resume (paused → first row through the proxy)', resumes]);
    await cold.stop();

    const warm = await startTestStack(t, { ...env, XENON_VM_WARM_POOL: '1' });
    const poolReady = async (): Promise<void> => {
      // The pool refills in the background after each start: wait until a VM booted and waits.
      const text = async (): Promise<string> => (await fetch(`${warm.info.api_url}/metrics`)).text();
      if (!(await waitFor(async () => /xenon_vm_warm_pool 1\b/.test(await text()), 120_000, 250))) throw new Error('the warm pool did not fill');
    };
    rows.push(['cold start with a warm pool of 1 VM', await coldStarts(warm, poolReady)]);
  } finally {
    for (const fn of teardowns.reverse()) await fn();
  }
  process.stdout.write(`\nqemu driver (${accel}, ${RUNS} runs each; ms, median (min–max))\n\n| path | ms |\n|---|---|\n`);
  for (const [name, xs] of rows) process.stdout.write(`| ${name} | ${spread(xs, 0)} |\n`);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
