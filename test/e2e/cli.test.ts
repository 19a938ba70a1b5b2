// The `xenon` CLI against a running stack: status, connstr, certs, project create (its connection
// string works), endpoint list/get/suspend/stop/start, and clear errors for bad usage.
import t from 'tap';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { readFileSync } from 'node:fs';
import { psql, ROOT, startTestStack, waitFor } from '../helpers/stack.ts';

const TAP_TS_LOADER = process.execArgv.find((a) => a.includes('@tapjs/typescript'))?.replace(/^--import=/, '');

function xenon(args: string[], env: NodeJS.ProcessEnv, viaBin = false): Promise<{ code: number | null; stdout: string; stderr: string }> {
  // The bin loads TypeScript with tsx, whose coverage data would be wrong: collect none for it.
  const { NODE_V8_COVERAGE: _drop, ...plain } = env;
  const argv = viaBin || !TAP_TS_LOADER ? [join(ROOT, 'wake-compute/bin/xenon.js'), ...args] : ['--import', TAP_TS_LOADER, join(ROOT, 'wake-compute/cli.ts'), ...args];
  return new Promise((res) => {
    const child = spawn(process.execPath, argv, { env: viaBin ? plain : env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('exit', (code) => res({ code, stdout, stderr }));
  });
}

// One stack for the two tests that need one (the second runs after the first is done). Started
// before any test is queued: tap ends the root test when its queue runs dry.
const stack = await startTestStack(t);

t.test('xenon bin: help, unknown commands, no stack', async (t) => {
  const env = { ...process.env, XENON_STATE_DIR: join(ROOT, '.tap', 'no-such-state') };
  const help = await xenon(['help'], env, true);
  t.equal(help.code, 0);
  t.match(help.stdout, /usage: xenon <command>/);
  const bad = await xenon(['frobnicate'], env, true);
  t.equal(bad.code, 2, 'unknown command exits 2');
  t.match(bad.stderr, /unknown command 'frobnicate'/);
  const status = await xenon(['status'], env);
  t.equal(status.code, 1);
  t.match(status.stderr, /no running stack found .*run 'xenon up' first/);
});

t.test('xenon commands against a running stack', async (t) => {
  const env = stack.env;

  const certs = await xenon(['certs'], env);
  t.equal(certs.code, 0, certs.stderr);
  t.match(certs.stdout, new RegExp(`CA certificate: +${stack.info.ca_cert.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}`));

  const connstr = await xenon(['connstr'], env);
  t.equal(connstr.code, 0, connstr.stderr);
  t.match(connstr.stdout, stack.info.endpoint_id);
  t.match(connstr.stdout, `:${stack.info.proxy_port}/neondb?sslmode=verify-full`);

  const status = await xenon(['status'], env);
  t.equal(status.code, 0, status.stderr);
  t.match(status.stdout, new RegExp(`${stack.info.endpoint_id} +active`));

  // A new project prints a connection string that works as printed (psql line).
  const created = await xenon(['project', 'create', '--name', 'second'], env);
  t.equal(created.code, 0, created.stderr);
  const psqlLine = /psql "([^"]+)"/.exec(created.stdout)?.[1];
  t.ok(psqlLine, 'prints a psql line');
  const r = await psql(psqlLine!, 'SELECT current_database()');
  t.equal(r.code, 0, r.stderr);
  t.equal(r.stdout, 'neondb');
  const second = /endpoint (ep-[a-z0-9-]+)/.exec(created.stdout)![1]!;

  const list = await xenon(['endpoint', 'list'], env);
  t.equal(list.code, 0, list.stderr);
  t.match(list.stdout, stack.info.endpoint_id);
  t.match(list.stdout, second);

  for (const [action, state] of [['suspend', 'suspended'], ['stop', 'stopped'], ['start', 'active']] as const) {
    const out = await xenon(['endpoint', action, second], env);
    t.equal(out.code, 0, out.stderr);
    t.equal(out.stdout.trim(), `${second} ${state}`, `endpoint ${action}`);
  }
  const got = await xenon(['endpoint', 'get', second], env);
  t.equal(JSON.parse(got.stdout).state, 'active');
  // Started three times by now (the first query, then start after stop): generation 2 or more.
  const wal = await xenon(['endpoint', 'wal', second], env);
  t.equal(wal.code, 0, wal.stderr);
  t.match(wal.stdout, /^timeline br-[a-z0-9-]+, generation [1-9]\d*, quorum 2 of 3\n/);
  t.equal(wal.stdout.match(/\tstreaming\t/g)?.length, 3, `every safekeeper streams:\n${wal.stdout}`);

  const missing = await xenon(['endpoint', 'stop', 'ep-no-such-000000'], env);
  t.equal(missing.code, 1);
  t.match(missing.stderr, /endpoint ep-no-such-000000 not found/);
});

t.test('one xenon up per state dir; a crashed control plane\'s compute is reclaimed at the next start', async (t) => {
  const second = await xenon(['up', '--json'], stack.env);
  t.equal(second.code, 1, 'a second xenon up on the same state dir fails');
  t.match(second.stderr, /already running on .* \(pid \d+\)/);
  const ok = await psql(stack.psqlConn(), 'CREATE TABLE survivor AS SELECT 42 AS v');
  t.equal(ok.code, 0, `the first stack is unharmed: ${ok.stderr}`);

  // SIGKILL the control plane: it cannot stop its compute, which is left running.
  const branch = (await stack.api.getEndpoint(stack.info.endpoint_id)).endpoint.branch_id;
  const pidFile = join(stack.dirs.data, 'computes', branch, 'pgdata', 'postmaster.pid');
  const orphan = Number(readFileSync(pidFile, 'utf8').split('\n')[0]);
  const children = readFileSync(`/proc/${stack.child.pid}/task/${stack.child.pid}/children`, 'utf8').trim().split(/\s+/).map(Number);
  const cp = children.find((pid) => readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('wake-compute/main.ts'));
  t.ok(cp, 'found the control-plane process');
  process.kill(cp!, 'SIGKILL');
  t.equal(await new Promise((r) => stack.child.once('exit', r)), 1, 'xenon up notices and exits 1');
  t.ok(alive(orphan), 'the compute outlived its control plane');

  await stack.restart();
  t.ok(await waitFor(() => !alive(orphan), 10_000), 'the next start stopped the leftover compute');
  const again = await psql(stack.psqlConn(), 'SELECT v FROM survivor');
  t.equal(again.code, 0, again.stderr);
  t.equal(again.stdout, '42', 'data intact, served by a fresh compute');
});

function alive(pid: number): boolean {
  try { process.kill(pid, 0); return true; } catch { return false; }
}
