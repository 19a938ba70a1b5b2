/**
 * `npm run fuzz`: the long fuzz of the proxy's startup phase (not a tap test).
 *
 * Starts its own stack (`xenon up`, short startup/auth timeouts), plays FUZZ_CASES (default
 * 20,000) seeded cases from test/helpers/fuzz-gen.ts with FUZZ_CONCURRENCY (default 64)
 * connections at a time while a healthy client queries, prints a summary table, tears the stack
 * down and exits 1 on any failure.
 *
 *   FUZZ_SEED=7 FUZZ_CASES=50000 npm run fuzz
 *   FUZZ_REPLAY=sasl-final:7000077,truncated:7000003 npm run fuzz   # replays cases by id, verbose
 *
 * A case id is `<family>:<seed>`; run seed s plays case seeds s × 1,000,000 + k. Failures print
 * their id, and the proxy's log is kept in the temp directory.
 */
import { copyFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { caseFromId, FAMILIES, generateCases, truncationPlan, truncationSpace, type FuzzCase } from '../helpers/fuzz-gen.ts';
import { describeFailure, formatReport, fuzzStack, fuzzStackEnv, targetOf } from '../helpers/fuzz-run.ts';
import { startTestStack } from '../helpers/stack.ts';

const CASES = Number(process.env.FUZZ_CASES ?? 20_000);
const SEED = Number(process.env.FUZZ_SEED ?? 20_240_601);
const CONCURRENCY = Number(process.env.FUZZ_CONCURRENCY ?? 64);
const REPLAY = process.env.FUZZ_REPLAY?.split(',').map((s) => s.trim()).filter(Boolean);
const STARTUP_TIMEOUT_MS = 1_000;
const AUTH_TIMEOUT_MS = 1_000;

const teardowns: (() => unknown)[] = [];
let exitCode = 1;

async function main(): Promise<void> {
  if (!Number.isSafeInteger(CASES) || CASES < 1) throw new Error(`FUZZ_CASES must be a positive integer, got ${process.env.FUZZ_CASES}`);
  if (!Number.isSafeInteger(SEED) || SEED < 0) throw new Error(`FUZZ_SEED must be a non-negative integer, got ${process.env.FUZZ_SEED}`);
  if (!Number.isSafeInteger(CONCURRENCY) || CONCURRENCY < 1) throw new Error(`FUZZ_CONCURRENCY must be a positive integer, got ${process.env.FUZZ_CONCURRENCY}`);
  const t0 = performance.now();
  const stack = await startTestStack({ teardown: (fn) => teardowns.push(fn) }, fuzzStackEnv(STARTUP_TIMEOUT_MS, AUTH_TIMEOUT_MS));
  console.log(`stack up in ${((performance.now() - t0) / 1000).toFixed(1)} s (proxy port ${stack.info.proxy_port}, endpoint ${stack.info.endpoint_id})`);
  const target = targetOf(stack);
  let cases: FuzzCase[];
  if (REPLAY) {
    cases = REPLAY.map((id) => caseFromId(id, target));
    for (const c of cases) console.log(`replaying ${c.id}: ${c.what}; expect ${c.expect?.join(' or ') ?? 'any well-formed reply'}; steps ${c.steps.map((s) => (s.op === 'send' ? `send(${s.chunks.reduce((n, x) => n + x.length, 0)} B in ${s.chunks.length} chunks)` : s.op === 'final' ? `final(${s.mutation})` : s.op)).join(' → ')}`);
  } else {
    cases = generateCases(CASES, SEED, target);
    // How much of the truncation space (every offset of every base message) this run covers.
    const seen = new Set(cases.filter((c) => c.family === 'truncated').map((c) => {
      const { base, k } = truncationPlan(c.seed, target);
      return `${base}@${k}`;
    }));
    const total = truncationSpace(target).reduce((n, s) => n + s.len, 0);
    console.log(`${cases.length} cases over ${FAMILIES.length} families, seed ${SEED}, ${CONCURRENCY} at a time; truncations cover ${seen.size} of ${total} (message, offset) pairs`);
  }
  let last = performance.now();
  const report = await fuzzStack(stack, cases, {
    concurrency: REPLAY ? 1 : CONCURRENCY,
    startupTimeoutMs: STARTUP_TIMEOUT_MS,
    authTimeoutMs: AUTH_TIMEOUT_MS,
    onResult: (r, done) => {
      if (REPLAY) console.log(`${r.id}: outcome ${r.outcome}, reply ${r.kind}, ${Math.round(r.ms)} ms${r.problems.length ? `\n  FAILED: ${describeFailure(r)}` : ''}`);
      else if (r.problems.length) console.log(`FAILED ${describeFailure(r)}`);
      if (performance.now() - last > 10_000) {
        last = performance.now();
        console.log(`  … ${done}/${cases.length} cases`);
      }
    },
  });
  console.log('');
  console.log(formatReport(report, { seed: REPLAY ? undefined : SEED }));
  const ok = report.run.failures.length === 0 && report.checks.every((c) => c.ok);
  if (!ok) {
    // Keep the proxy's log for the diagnosis (the stack's directories go with the teardown).
    const kept = join(tmpdir(), `xenon-fuzz-proxy-${SEED}-${Date.now()}.log`);
    try {
      copyFileSync(join(stack.info.state_dir, 'logs', 'proxy.log'), kept);
      console.log(`\nproxy log kept in ${kept}`);
    } catch (err) {
      console.log(`could not keep the proxy log: ${(err as Error).message}`);
    }
  }
  console.log(`\n${ok ? 'PASS' : 'FAIL'}`);
  exitCode = ok ? 0 : 1;
}

try {
  await main();
} catch (err) {
  console.error(err);
  exitCode = 1;
} finally {
  for (const fn of teardowns.reverse()) await fn();
}
process.exit(exitCode);
