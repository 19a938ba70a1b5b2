/**
 * `node --import tsx test/bench/pipe-ab.ts`: the proxy's pipe alone, variant against variant, under
 * pgbench -S (see pipe-harness.ts: TLS terminated as the proxy does, SCRAM end to end, so the
 * harness process's CPU is the pipe's). Every variant lives in the same harness process, and the
 * runs alternate variant after variant, repetition after repetition, so that load from elsewhere on
 * the machine falls on all of them alike.
 *
 * Two measures:
 * - default: CPU per query of the harness process (schedstat, ns; user/system split from
 *   /proc/<pid>/stat), pgbench -S -c 16 -j 2 -T AB_SECONDS (8) at full speed;
 * - AB_CALLGRIND=1: instructions per query executed in user space (valgrind callgrind; the kernel's
 *   part is not counted), which does not depend on the machine's load: each window is pgbench
 *   -c 4 -R 100 -t 300 minus -t 50 (the connection setup cancels out), after a warm-up.
 *
 * AB_VARIANTS (pipe,current; see VARIANTS in pipe-harness.ts), AB_MODES (tls,plain), AB_REPS (5).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import pg from 'pg';
import { findPgBin } from '../../lib/postgres.ts';
import { ROOT, startTestStack } from '../helpers/stack.ts';

const VARIANTS = (process.env.AB_VARIANTS ?? 'pipe,current').split(',');
const MODES = (process.env.AB_MODES ?? 'tls,plain').split(',');
const REPS = Number(process.env.AB_REPS ?? 5);
const SECONDS = Number(process.env.AB_SECONDS ?? 8);
const CALLGRIND = process.env.AB_CALLGRIND === '1';
const teardowns: (() => unknown)[] = [];
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}
const spread = (xs: number[], d = 1): string => `${median(xs).toFixed(d)} (${Math.min(...xs).toFixed(d)}–${Math.max(...xs).toFixed(d)})`;

function run(bin: string, args: string[], env: NodeJS.ProcessEnv = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(bin, args, { env: { ...process.env, ...env } });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (out += d.toString()));
    child.on('exit', (code) => (code === 0 ? resolve(out) : reject(new Error(`${bin} ${args.join(' ')} exited ${code}:\n${out}`))));
  });
}

/** [total µs (schedstat), user µs, system µs] of a process, all threads. */
function cpu(pid: number): [number, number, number] {
  let ns = 0;
  for (const tid of readdirSync(`/proc/${pid}/task`)) {
    try { ns += Number(readFileSync(`/proc/${pid}/task/${tid}/schedstat`, 'utf8').split(' ')[0]); } catch { /* gone */ }
  }
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return [ns / 1000, Number(f[11]) * 10_000, Number(f[12]) * 10_000];
}

async function main(): Promise<void> {
  const stack = await startTestStack({ teardown: (fn) => teardowns.push(fn) }, { XENON_LOG_LEVEL: 'warn' });
  const ep = stack.info.endpoint_id;
  await stack.api.updateEndpoint(ep, { suspend_timeout_seconds: 0, stop_timeout_seconds: 0 }); // only the harness talks to it
  const c = new pg.Client(stack.pgConfig());
  await c.connect();
  await c.end();
  const branch = (await stack.api.getEndpoint(ep)).endpoint.branch_id;
  const computePort = Number(readFileSync(join(stack.dirs.data, 'computes', branch, 'pgdata', 'postmaster.pid'), 'utf8').split('\n')[3]);
  const pgbenchBin = join(findPgBin(process.env), 'pgbench');
  const env = { PGPASSWORD: stack.info.password };
  const conninfo = (port: number, mode: string): string => `host=127.0.0.1 port=${port} user=${stack.info.role} dbname=${stack.info.database} sslmode=${mode === 'tls' ? 'require' : 'disable'}`;
  await run(pgbenchBin, ['-i', '-s', '10', '-q', conninfo(computePort, 'plain')], env);

  const cgDir = mkdtempSync(join(tmpdir(), 'xenon-pipe-ab-'));
  teardowns.push(() => rmSync(cgDir, { recursive: true, force: true }));
  const harnessArgs = ['--import', 'tsx', join(ROOT, 'test/bench/pipe-harness.ts'), VARIANTS.join(','), String(computePort), join(stack.dirs.state, 'certs')];
  const harness: ChildProcess = CALLGRIND
    ? spawn('valgrind', ['--tool=callgrind', '--instr-atstart=no', `--callgrind-out-file=${join(cgDir, 'cg.out')}`, process.execPath, ...harnessArgs], { cwd: ROOT, stdio: ['ignore', 'pipe', 'ignore'] })
    : spawn(process.execPath, harnessArgs, { cwd: ROOT, stdio: ['ignore', 'pipe', 'inherit'] });
  teardowns.push(async () => {
    if (harness.exitCode !== null || harness.signalCode !== null) return;
    harness.kill('SIGINT');
    await Promise.race([once(harness, 'exit'), sleep(5_000)]);
    if (harness.exitCode === null && harness.signalCode === null) harness.kill('SIGKILL');
  });
  const ports = await new Promise<Record<string, number>>((resolve, reject) => {
    harness.once('exit', (code) => reject(new Error(`the harness exited with ${code}`)));
    createInterface({ input: harness.stdout! }).on('line', (line) => {
      if (line.startsWith('{')) resolve((JSON.parse(line) as { ports: Record<string, number> }).ports);
    });
  });
  const pid = harness.pid!;
  const pgbench = async (args: string[], v: string, mode: string): Promise<{ tx: number; tps: number }> => {
    const out = await run(pgbenchBin, ['-n', '-S', '-j', '2', ...args, conninfo(ports[v]!, mode)], env);
    return { tx: Number(/actually processed: (\d+)/.exec(out)?.[1]), tps: Number(/tps = ([\d.]+)/.exec(out)?.[1]) };
  };

  const results = new Map<string, Record<string, number[]>>();
  const add = (v: string, mode: string, vals: Record<string, number>): void => {
    const k = `${v} ${mode}`;
    const r = results.get(k) ?? {};
    for (const [n, x] of Object.entries(vals)) (r[n] ??= []).push(x);
    results.set(k, r);
  };

  if (!CALLGRIND) {
    for (const mode of MODES) for (const v of VARIANTS) await pgbench(['-c', '16', '-T', '3'], v, mode); // warm-up
    for (let rep = 0; rep < REPS; rep++) {
      for (const mode of MODES) {
        for (const v of VARIANTS) {
          const a = cpu(pid);
          const { tx, tps } = await pgbench(['-c', '16', '-T', String(SECONDS)], v, mode);
          const b = cpu(pid);
          add(v, mode, { cpu: (b[0] - a[0]) / tx, user: (b[1] - a[1]) / tx, sys: (b[2] - a[2]) / tx, tps });
        }
      }
    }
  } else {
    // callgrind_control's requests are served only while the process runs: poke it with a connection.
    const poke = (): void => { connect({ host: '127.0.0.1', port: Object.values(ports)[0]! }).on('error', () => {}).on('connect', function (this: ReturnType<typeof connect>) { this.destroy(); }); };
    const dumps = (): string[] => readdirSync(cgDir).filter((f) => /^cg\.out\.\d+$/.test(f));
    /** Runs callgrind_control and pokes the harness until the request was served. */
    const control = async (...flags: string[]): Promise<void> => {
      let served = false;
      const done = run('callgrind_control', [...flags, String(pid)]).finally(() => (served = true));
      for (let i = 0; i < 300 && !served; i++) {
        poke();
        await sleep(100);
      }
      await done;
    };
    const dump = async (): Promise<number> => {
      await control('-d');
      const last = dumps().sort((a, b) => Number(a.split('.').pop()) - Number(b.split('.').pop())).pop()!;
      await sleep(200);
      const ir = Number(/^summary: (\d+)/m.exec(readFileSync(join(cgDir, last), 'utf8'))?.[1]);
      rmSync(join(cgDir, last));
      return ir;
    };
    await control('-i', 'on');
    for (const mode of MODES) for (const v of VARIANTS) await pgbench(['-c', '4', '-R', '100', '-T', '20'], v, mode); // warm-up (JIT)
    for (let rep = 0; rep < REPS; rep++) {
      for (const mode of MODES) {
        for (const v of VARIANTS) {
          await dump();
          await pgbench(['-c', '4', '-R', '100', '-t', '50'], v, mode);
          const small = await dump();
          await pgbench(['-c', '4', '-R', '100', '-t', '300'], v, mode);
          const big = await dump();
          add(v, mode, { instructions: (big - small) / (4 * 250) });
        }
      }
    }
  }

  const out: string[] = [];
  if (CALLGRIND) {
    out.push(`user-space instructions per query (callgrind), pgbench -S -c 4 -R 100, ${REPS} windows: median (min–max)`, '', '| pipe | client | instructions per query |', '|---|---|---|');
    for (const [k, r] of results) out.push(`| ${k.split(' ')[0]} | ${k.split(' ')[1]} | ${spread(r.instructions!, 0)} |`);
  } else {
    out.push(`pgbench -S -c 16 -j 2 -T ${SECONDS}, ${REPS} runs: median (min–max)`, '', '| pipe | client | CPU µs per query | user | system | TPS |', '|---|---|---|---|---|---|');
    for (const [k, r] of results) out.push(`| ${k.split(' ')[0]} | ${k.split(' ')[1]} | ${spread(r.cpu!)} | ${spread(r.user!)} | ${spread(r.sys!)} | ${spread(r.tps!, 0)} |`);
  }
  process.stdout.write(out.join('\n') + '\n');
}

try {
  if (CALLGRIND && !existsSync('/usr/bin/valgrind') && !process.env.PATH?.split(':').some((d) => existsSync(join(d, 'valgrind')))) throw new Error('AB_CALLGRIND=1 needs valgrind');
  await main();
} finally {
  for (const fn of teardowns.reverse()) await fn();
}
