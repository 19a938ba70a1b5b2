/**
 * Quorum-commit benchmark (not a tap test; run by hand on a quiet machine):
 *   node --import tsx test/bench/safekeeper.ts [seconds=5] [rounds=3] [sync methods=open_datasync_inline,open_datasync,fdatasync]
 * One PG 15 cluster; pgbench TPC-B -c 4 and -c 1 with (a) no standbys, (b) pg_receivewal ×3
 * (--synchronous) in ANY 2, (c) Xenon safekeepers ×3 (separate processes) in ANY 2 per sync
 * method. Configurations are interleaved for `rounds` rounds and medians reported, so that load
 * from other work on the machine hits them alike. Also prints CPU seconds per receiver.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { SafekeeperClient } from '../../safekeeper/client.ts';
import { startTestPostgres } from '../helpers/postgres.ts';
import { computeOf, PG_BIN, REPL_SETTINGS, runTool, spawnSafekeeper, startReceivewal, tempDir, waitFor, withClient } from '../safekeeper/helpers.ts';

const seconds = Number(process.argv[2] ?? 5);
const rounds = Number(process.argv[3] ?? 3);
const methods = (process.argv[4] ?? 'open_datasync_inline,open_datasync,fdatasync').split(',');
type Teardown = { teardown(fn: () => unknown): void };
const outer: (() => unknown)[] = [];
const t: Teardown = { teardown: (fn) => void outer.push(fn) };

const pgc = await startTestPostgres(t, 'xenon-sk-bench-', { ...REPL_SETTINGS, synchronous_commit: 'on', max_wal_size: '1GB' });
const conn = ['-h', '127.0.0.1', '-p', String(pgc.port), '-U', 'admin', 'postgres'];
const env = { PGPASSWORD: 'admin-pw' };
await runTool(join(PG_BIN, 'pgbench'), ['-i', '-s', '5', '-q', ...conn], { env });

async function setSync(names: string): Promise<void> {
  await withClient(pgc.admin(), async (c) => {
    await c.query(`ALTER SYSTEM SET synchronous_standby_names = '${names}'`);
    await c.query('SELECT pg_reload_conf()');
  });
  await new Promise((r) => setTimeout(r, 300));
}

async function pgbench(clients: number): Promise<number> {
  const out = await runTool(join(PG_BIN, 'pgbench'), ['-c', String(clients), '-j', String(clients), '-T', String(seconds), '-n', ...conn], { env });
  return Number(/tps = ([\d.]+)/.exec(out)?.[1]);
}

const cpuOf = (pid: number): number => {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
  return (Number(f[11]) + Number(f[12])) / 100; // utime + stime, clock ticks
};

const results = new Map<string, { c4: number[]; c1: number[]; cpuPerTx: number[] }>();
async function phase(name: string, pids: () => number[]): Promise<void> {
  const cpu0 = pids().reduce((a, p) => a + cpuOf(p), 0);
  const c4 = await pgbench(4);
  const c1 = await pgbench(1);
  const cpu = pids().reduce((a, p) => a + cpuOf(p), 0) - cpu0;
  const r = results.get(name) ?? { c4: [], c1: [], cpuPerTx: [] };
  r.c4.push(c4);
  r.c1.push(c1);
  const tx = (c4 + c1) * seconds;
  if (pids().length) r.cpuPerTx.push((cpu / tx) * 1e6);
  results.set(name, r);
  console.log(`${name}: -c 4 ${c4.toFixed(0)} tps; -c 1 ${c1.toFixed(0)} tps${pids().length ? `; receivers' CPU ${((cpu / tx) * 1e6).toFixed(0)} µs per transaction` : ''}`);
}

async function withReceivers(kind: string, fn: (pids: number[]) => Promise<void>): Promise<void> {
  const inner: (() => unknown)[] = [];
  const ti: Teardown = { teardown: (f) => void inner.push(f) };
  const root = tempDir(ti, 'xenon-sk-bench-');
  const pids: number[] = [];
  try {
    if (kind === 'pg_receivewal') {
      for (const n of ['rw1', 'rw2', 'rw3']) pids.push((await startReceivewal(ti, pgc, join(root, n), n)).child.pid!);
      await setSync('ANY 2 (rw1, rw2, rw3)');
    } else {
      const urls: string[] = [];
      for (const n of ['sk1', 'sk2', 'sk3']) {
        const sk = await spawnSafekeeper(ti, n, join(root, n), 0, { XENON_SAFEKEEPER_SYNC_METHOD: kind });
        pids.push(sk.child.pid!);
        urls.push(sk.url);
        await new SafekeeperClient(sk.url).follow('br-bench', { generation: 1, compute: computeOf(pgc) });
      }
      for (const u of urls) await waitFor('streaming', async () => (await new SafekeeperClient(u).status('br-bench'))?.streaming);
      await setSync('ANY 2 (sk1, sk2, sk3)');
    }
    await fn(pids);
  } finally {
    await setSync('');
    while (inner.length) await inner.pop()!();
    // Receivers leave slots behind: drop them so WAL is not retained between phases.
    await withClient(pgc.admin(), (c) => c.query('SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE NOT active'));
  }
}

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
try {
  for (let r = 0; r < rounds; r++) {
    console.log(`--- round ${r + 1}/${rounds}`);
    await setSync('');
    await phase('no standbys', () => []);
    await withReceivers('pg_receivewal', (pids) => phase('pg_receivewal x3 ANY 2', () => pids));
    for (const m of methods) await withReceivers(m, (pids) => phase(`Xenon x3 ANY 2 (${m})`, () => pids));
  }
  console.log(`--- medians of ${rounds} rounds, ${seconds} s each`);
  const base = results.get('no standbys')!;
  const rw = results.get('pg_receivewal x3 ANY 2')!;
  for (const [name, r] of results) {
    const vsRw = name.startsWith('Xenon') ? `; vs pg_receivewal -c 4 ${(median(r.c4) / median(rw.c4)).toFixed(2)}, -c 1 ${(median(r.c1) / median(rw.c1)).toFixed(2)}; vs no standbys -c 4 ${(median(r.c4) / median(base.c4)).toFixed(2)}, -c 1 ${(median(r.c1) / median(base.c1)).toFixed(2)}` : '';
    const cpu = r.cpuPerTx.length ? `; receivers' CPU ${median(r.cpuPerTx).toFixed(0)} µs/tx` : '';
    console.log(`${name}: -c 4 ${median(r.c4).toFixed(0)} tps, -c 1 ${median(r.c1).toFixed(0)} tps (${(1000 / median(r.c1)).toFixed(2)} ms/commit)${cpu}${vsRw}`);
  }
} finally {
  await setSync('').catch(() => {});
  while (outer.length) await outer.pop()!();
}
