// A safekeeper new to a timeline starts where the timeline's WAL starts on the other safekeepers,
// not at the compute's current position: it never reports as flushed WAL it does not hold, so a
// commit waiting for `ANY 2` is released only once a second safekeeper really has it.
// Real safekeeper processes.
import t from 'tap';
import { join } from 'node:path';
import pg from 'pg';
import { formatLsn, parseLsn, segmentOf, segmentStart } from '../../lib/lsn.ts';
import { SafekeeperClient } from '../../safekeeper/client.ts';
import { startTestPostgres } from '../helpers/postgres.ts';
import { computeOf, delay, REPL_SETTINGS, spawnSafekeeper, tempDir, waitFor } from './helpers.ts';

const TL = 'br-join';

t.test('a new safekeeper joins at the start of the WAL its peers hold', async (t) => {
  const pgc = await startTestPostgres(t, 'xenon-sk-join-', { ...REPL_SETTINGS, synchronous_commit: 'on', synchronous_standby_names: 'ANY 2 (sk1, sk2, sk3)' });
  const root = tempDir(t, 'xenon-sk-join-');
  const sk1 = await spawnSafekeeper(t, 'sk1', join(root, 'sk1'));
  const sk2 = await spawnSafekeeper(t, 'sk2', join(root, 'sk2'));
  const api1 = new SafekeeperClient(sk1.url);
  const api2 = new SafekeeperClient(sk2.url);
  const compute = computeOf(pgc);
  await api1.follow(TL, { generation: 1, compute, peers: [sk2.url] });
  await waitFor('sk1 streaming', async () => (await api1.status(TL))?.streaming);

  const a = new pg.Client(pgc.admin());
  await a.connect();
  t.teardown(() => a.end().catch(() => {}));
  await a.query('SET synchronous_commit = local');
  await a.query('CREATE TABLE j (i int)');
  const b = new pg.Client(pgc.admin());
  await b.connect();
  t.teardown(() => b.end().catch(() => {}));
  let ackedAt = 0;
  const commit = b.query<{ l: string }>('INSERT INTO j VALUES (1) RETURNING pg_current_wal_insert_lsn()::text AS l').then((r) => {
    ackedAt = Date.now();
    return parseLsn(r.rows[0]!.l);
  });
  await delay(500);
  t.equal(ackedAt, 0, 'with one safekeeper the commit waits (ANY 2)');
  // WAL moves on to later segments; then a fresh safekeeper joins.
  await a.query('SELECT pg_switch_wal()');
  await a.query('CREATE TABLE j2 AS SELECT 1 AS x');
  await a.query('SELECT pg_switch_wal()');
  const sk1Start = parseLsn((await api1.status(TL))!.start_lsn);
  await api2.follow(TL, { generation: 1, compute, peers: [sk1.url] });

  await waitFor('the commit to return', () => ackedAt > 0, 60_000, 20);
  const commitLsn = await commit;
  t.pass('the commit returns once sk2 holds it');
  // Right when the commit returned, sk2 must really hold it, contiguously from its start.
  const st2 = (await api2.status(TL))!;
  const files = (await api2.listWal(TL)).files;
  t.equal(st2.start_lsn, formatLsn(segmentStart(segmentOf(sk1Start))), 'sk2 starts where sk1 does');
  t.ok(parseLsn(st2.start_lsn) <= commitLsn && parseLsn(st2.flush_lsn) >= commitLsn, `sk2 holds ${st2.start_lsn}..${st2.flush_lsn}, the commit is at or before the latter`);
  const holding = files.find((f) => f.kind === 'segment' && parseLsn(f.start_lsn!) <= commitLsn - 1n && parseLsn(f.end_lsn!) >= commitLsn);
  t.ok(holding, `sk2 has the segment with the commit (${files.map((f) => `${f.name}:${f.start_lsn}-${f.end_lsn}`).join(' ')})`);
  await waitFor('sk2 streaming', async () => (await api2.status(TL))?.streaming);
});
