// Quorum commit with safekeeper processes killed with -9 under a write workload (issue 5's
// acceptance): one killed → the workload goes on without errors; a second killed → commits wait;
// one restarted → the waiting commit completes within about a second; every acknowledged row is
// there.
import t from 'tap';
import { join } from 'node:path';
import pg from 'pg';
import { SafekeeperClient } from '../../safekeeper/client.ts';
import { startTestPostgres } from '../helpers/postgres.ts';
import { computeOf, delay, REPL_SETTINGS, spawnSafekeeper, tempDir, waitFor, type SafekeeperProcess } from './helpers.ts';

const TL = 'br-kill';

t.test('kill -9 safekeepers under a ledger workload', async (t) => {
  const pgc = await startTestPostgres(t, 'xenon-sk-kill-', { ...REPL_SETTINGS, synchronous_commit: 'on', synchronous_standby_names: 'ANY 2 (sk1, sk2, sk3)' });
  const root = tempDir(t, 'xenon-sk-kill-');
  const sks = new Map<string, SafekeeperProcess>();
  for (const id of ['sk1', 'sk2', 'sk3']) {
    const sk = await spawnSafekeeper(t, id, join(root, id));
    sks.set(id, sk);
    await new SafekeeperClient(sk.url).follow(TL, { generation: 1, compute: computeOf(pgc) });
  }
  const db = new pg.Client(pgc.admin());
  await db.connect();
  t.teardown(() => db.end().catch(() => {}));
  await waitFor('three quorum standbys', async () => Number((await db.query<{ n: string }>("SELECT count(*) AS n FROM pg_stat_replication WHERE sync_state = 'quorum' AND state = 'streaming'")).rows[0]!.n) === 3);
  await db.query('CREATE TABLE ledger (id int PRIMARY KEY)');

  // The workload: numbered inserts, each acknowledged id recorded.
  const acked: number[] = [];
  const errors: string[] = [];
  let stop = false;
  let lastAck = Date.now();
  const w = new pg.Client(pgc.admin());
  await w.connect();
  t.teardown(() => w.end().catch(() => {}));
  const workload = (async () => {
    for (let id = 1; !stop; id++) {
      try {
        await w.query('INSERT INTO ledger VALUES ($1)', [id]);
        acked.push(id);
        lastAck = Date.now();
      } catch (err) {
        errors.push((err as Error).message);
      }
    }
  })();
  await delay(1_000);
  const a0 = acked.length;
  t.ok(a0 > 10, `commits with three safekeepers (${a0})`);

  t.equal(await sks.get('sk3')!.kill('SIGKILL'), null, 'sk3 killed with -9');
  await delay(1_000);
  const a1 = acked.length;
  t.ok(a1 > a0 + 10, `the workload goes on with two (${a1 - a0} more commits)`);
  t.same(errors, [], 'no errors');

  t.equal(await sks.get('sk2')!.kill('SIGKILL'), null, 'sk2 killed with -9');
  await delay(300); // a commit or two may have been flushed by sk2 just before
  const a2 = acked.length;
  await delay(1_500);
  t.equal(acked.length, a2, 'with one safekeeper no commit returns for 1.5 s');
  const waiting = await db.query<{ wait_event: string | null }>("SELECT wait_event FROM pg_stat_activity WHERE query LIKE 'INSERT INTO ledger%' AND state = 'active'");
  t.same(waiting.rows.map((r) => r.wait_event), ['SyncRep'], 'the workload waits in SyncRep');

  const t0 = performance.now();
  sks.set('sk2', await spawnSafekeeper(t, 'sk2', join(root, 'sk2')));
  const up = performance.now();
  await waitFor('a commit after the restart', () => acked.length > a2, 5_000, 5);
  const took = performance.now() - up;
  t.comment(`restarted sk2 ready in ${(up - t0).toFixed(0)} ms (process start); the waiting commit completed ${took.toFixed(0)} ms after its ready line`);
  t.ok(took < 1_500, `completed within ~1 s of the safekeeper being up (${took.toFixed(0)} ms)`);
  await delay(500);
  t.ok(Date.now() - lastAck < 500, 'and the workload flows again');

  stop = true;
  await workload;
  t.same(errors, [], 'no errors at all');
  const rows = await db.query<{ id: number }>('SELECT id FROM ledger');
  const have = new Set(rows.rows.map((r) => r.id));
  const lost = acked.filter((id) => !have.has(id));
  t.comment(`acknowledged ${acked.length}, present ${have.size}, lost ${lost.length}`);
  t.same(lost, [], 'no acknowledged row lost');
});
