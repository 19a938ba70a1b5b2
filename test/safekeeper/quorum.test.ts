// Quorum commit with stock PG 15: synchronous_standby_names = 'ANY 2 (sk1, sk2, sk3)' and three
// Xenon safekeepers. Commits proceed with three and with two; with one they wait; a safekeeper
// coming back lets the waiting commit finish at once; no acknowledged row is lost.
import t from 'tap';
import { join } from 'node:path';
import pg from 'pg';
import { SafekeeperClient } from '../../safekeeper/client.ts';
import type { SafekeeperHandle } from '../../safekeeper/index.ts';
import { startTestPostgres } from '../helpers/postgres.ts';
import { computeOf, delay, REPL_SETTINGS, startTestSafekeeper, tempDir, waitFor, withClient } from './helpers.ts';

const TL = 'br-quorum';

function pct(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((sorted.length * p) / 100))]!;
}

t.test('ANY 2 of three safekeepers: commits wait for a quorum and complete when one returns', async (t) => {
  const pgc = await startTestPostgres(t, 'xenon-sk-quorum-', {
    ...REPL_SETTINGS,
    synchronous_commit: 'on',
    synchronous_standby_names: 'ANY 2 (sk1, sk2, sk3)',
  });
  const root = tempDir(t, 'xenon-sk-quorum-');
  const sks = new Map<string, SafekeeperHandle>();
  const start = async (id: string): Promise<SafekeeperHandle> => {
    const sk = await startTestSafekeeper(t, id, join(root, id));
    sks.set(id, sk);
    return sk;
  };
  for (const id of ['sk1', 'sk2', 'sk3']) {
    const sk = await start(id);
    await new SafekeeperClient(sk.url).follow(TL, { generation: 1, compute: computeOf(pgc) });
  }
  const db = new pg.Client(pgc.admin());
  await db.connect();
  t.teardown(() => db.end().catch(() => {}));
  await waitFor('three quorum standbys', async () => {
    const r = await db.query<{ n: string }>("SELECT count(*) AS n FROM pg_stat_replication WHERE sync_state = 'quorum' AND state = 'streaming'");
    return Number(r.rows[0]!.n) === 3;
  });
  await db.query('CREATE TABLE ledger (id int PRIMARY KEY, at timestamptz DEFAULT now())');
  let next = 1;
  const acked: number[] = [];
  const commit = async (c: pg.Client = db): Promise<number> => {
    const id = next++;
    await c.query('INSERT INTO ledger (id) VALUES ($1)', [id]);
    acked.push(id);
    return id;
  };

  // Three up: single-client commit latency.
  const lat: number[] = [];
  for (let i = 0; i < 200; i++) {
    const t0 = performance.now();
    await commit();
    lat.push(performance.now() - t0);
  }
  lat.sort((a, b) => a - b);
  t.comment(`commit latency, 3 safekeepers (ANY 2): p50 ${pct(lat, 50).toFixed(2)} ms, p99 ${pct(lat, 99).toFixed(2)} ms, max ${lat.at(-1)!.toFixed(2)} ms`);

  // Two up: still commits.
  await sks.get('sk3')!.close();
  const t2 = performance.now();
  for (let i = 0; i < 20; i++) await commit();
  t.comment(`20 commits with 2 safekeepers: ${(performance.now() - t2).toFixed(1)} ms`);
  t.equal(acked.length, 220, 'commits with two safekeepers');

  // One up: a commit waits.
  await sks.get('sk2')!.close();
  const waiter = new pg.Client(pgc.admin());
  await waiter.connect();
  t.teardown(() => waiter.end().catch(() => {}));
  let done = false;
  const pending = commit(waiter).then((id) => {
    done = true;
    return id;
  });
  await delay(1_500);
  t.equal(done, false, 'a commit with one safekeeper is still waiting after 1.5 s');
  const waiting = await db.query<{ wait_event: string | null }>("SELECT wait_event FROM pg_stat_activity WHERE state = 'active' AND query LIKE 'INSERT INTO ledger%'");
  t.same(waiting.rows.map((r) => r.wait_event), ['SyncRep'], 'it waits in SyncRep');

  // One back: the commit completes within about a second of the safekeeper being up.
  const t0 = performance.now();
  await start('sk2');
  const up = performance.now();
  const id = await Promise.race([pending, delay(5_000).then(() => -1)]);
  const took = performance.now() - up;
  t.not(id, -1, 'the waiting commit completed');
  t.comment(`waiting commit completed ${took.toFixed(0)} ms after the safekeeper was up (${(performance.now() - t0).toFixed(0)} ms after its start began)`);
  t.ok(took < 1_500, `completed within ~1 s of the safekeeper being up (${took.toFixed(0)} ms)`);

  // Nothing acknowledged is lost.
  const rows = await db.query<{ id: number }>('SELECT id FROM ledger ORDER BY id');
  const have = new Set(rows.rows.map((r) => r.id));
  const lost = acked.filter((x) => !have.has(x));
  t.comment(`acknowledged ${acked.length}, present ${have.size}, lost ${lost.length}`);
  t.same(lost, [], 'no acknowledged row lost');

  // The returning safekeeper resumed from its own flush LSN with no gap: it holds everything.
  const st = await new SafekeeperClient(sks.get('sk2')!.url).status(TL);
  const cur = await withClient(pgc.admin(), async (c) => (await c.query<{ l: string }>('SELECT pg_current_wal_flush_lsn()::text AS l')).rows[0]!.l);
  t.ok(st?.streaming, 'sk2 streams again');
  t.equal(st?.last_error, null);
  t.comment(`sk2 flush ${st?.flush_lsn}, compute ${cur}`);
});
