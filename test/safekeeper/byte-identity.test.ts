// A Xenon safekeeper and pg_receivewal follow one real PG 15 compute: every segment both hold is
// byte-identical (complete ones whole, the partial one up to the flush LSN), and group commit
// makes far fewer fdatasyncs than XLogData messages.
import t from 'tap';
import { join } from 'node:path';
import { formatLsn, parseLsn } from '../../lib/lsn.ts';
import { SafekeeperClient } from '../../safekeeper/client.ts';
import { startTestPostgres } from '../helpers/postgres.ts';
import {
  compareSegments, computeOf, currentLsn, REPL_SETTINGS, segmentsIn, startReceivewal, startTestSafekeeper, tempDir, waitFor, waitReplicated, withClient,
} from './helpers.ts';

t.test('segments are byte-identical to pg_receivewal\'s', async (t) => {
  const pgc = await startTestPostgres(t, 'xenon-sk-ident-', REPL_SETTINGS);
  const root = tempDir(t, 'xenon-sk-ident-');
  const completed: string[] = [];
  const sk = await startTestSafekeeper(t, 'sk1', join(root, 'sk1'), { onSegmentComplete: (e) => completed.push(`${e.timelineId}/${e.fileName}`) });
  const api = new SafekeeperClient(sk.url);
  const st0 = await api.follow('br-ident', { generation: 1, compute: computeOf(pgc) });
  t.equal(st0.generation, 1);
  t.equal(st0.safekeeper_id, 'sk1');
  await waitFor('safekeeper streaming', async () => (await api.status('br-ident'))?.streaming);
  const rw = await startReceivewal(t, pgc, join(root, 'recv'), 'recv');

  await withClient(pgc.admin(), async (c) => {
    await c.query('CREATE TABLE t (id int PRIMARY KEY, pad text)');
    for (let i = 0; i < 3; i++) {
      await c.query(`INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series(${i * 20000 + 1}, ${(i + 1) * 20000}) g`);
      await c.query('SELECT pg_switch_wal()');
    }
    // Many small commits too: the flush LSN and replies move in small steps.
    for (let i = 0; i < 200; i++) await c.query(`INSERT INTO t VALUES (${100000 + i}, 'small')`);
  });
  const target = await currentLsn(pgc);
  await waitReplicated(pgc, ['sk1', 'recv'], target);
  const st = await api.status('br-ident');
  t.ok(parseLsn(st!.flush_lsn) >= target, `safekeeper flush ${st!.flush_lsn} >= ${formatLsn(target)}`);
  t.equal(st!.pg_timeline, 1);
  t.match(st!.system_id, /^\d+$/);
  t.equal(st!.last_error, null);

  const skDir = join(root, 'sk1', 'timelines', 'br-ident', 'wal');
  const upTo = parseLsn(st!.flush_lsn) < target ? parseLsn(st!.flush_lsn) : target;
  const { compared, diffs } = compareSegments(skDir, rw.dir, upTo);
  t.comment(`compared: ${compared.join(' ')}`);
  t.same(diffs, [], 'no differences');
  const completeCompared = compared.filter((n) => !n.includes('['));
  t.ok(completeCompared.length >= 3, `at least 3 complete segments compared (${completeCompared.length})`);
  // Same set of file names (complete vs partial) for the segments both hold.
  const mine = segmentsIn(skDir);
  for (const [base, f] of segmentsIn(rw.dir)) {
    const m = mine.get(base);
    if (m) t.equal(m.name, f.name, `${base}: same name (complete/partial) as pg_receivewal`);
  }

  // Group commit: fdatasyncs counted by the histogram vs XLogData messages flushed.
  const metrics = await sk.metrics.registry.getMetricsAsJSON();
  const batches = metrics.find((m) => m.name === 'xenon_safekeeper_flush_batch_messages') as unknown as { values: { metricName?: string; value: number }[] };
  const count = batches.values.find((v) => v.metricName === 'xenon_safekeeper_flush_batch_messages_count')!.value;
  const sum = batches.values.find((v) => v.metricName === 'xenon_safekeeper_flush_batch_messages_sum')!.value;
  t.comment(`group commit: ${sum} XLogData messages in ${count} flushes`);
  t.ok(count > 0 && sum > count, `group commit: fewer flushes (${count}) than XLogData messages (${sum})`);
  const fsync = metrics.find((m) => m.name === 'xenon_safekeeper_fsync_seconds') as unknown as { values: { metricName?: string; value: number }[] };
  const fc = fsync.values.find((v) => v.metricName === 'xenon_safekeeper_fsync_seconds_count')!.value;
  const fs = fsync.values.find((v) => v.metricName === 'xenon_safekeeper_fsync_seconds_sum')!.value;
  t.comment(`fdatasync: ${fc} calls, mean ${((fs / fc) * 1000).toFixed(2)} ms`);

  // The listing agrees with the files.
  const listing = await api.listWal('br-ident');
  t.equal(listing.pg_timeline, 1);
  const partial = listing.files.filter((f) => f.partial);
  t.equal(partial.length, 1, 'one partial segment');
  t.equal(partial[0]!.end_lsn, listing.flush_lsn, 'the partial one ends at the flush LSN');
  const complete = listing.files.filter((f) => f.kind === 'segment' && !f.partial).map((f) => `br-ident/${f.name}`);
  t.same(completed.sort(), complete.sort(), 'the segment-complete hook saw every complete segment once');
  await rw.stop();
});
