// A Postgres timeline switch: the safekeeper and pg_receivewal follow a standby that is then
// promoted. The server ends streaming on TLI 1 (CopyDone + next-timeline row); both continue on
// TLI 2 and hold the same files: the old timeline's last segment `.partial`, `00000002.history`
// and the new timeline's segments, byte for byte.
import t from 'tap';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import pg from 'pg';
import { formatLsn, parseLsn } from '../../lib/lsn.ts';
import { SafekeeperClient } from '../../safekeeper/client.ts';
import { startTestPostgres } from '../helpers/postgres.ts';
import {
  cloneCompute, compareSegments, computeOf, currentLsn, REPL_SETTINGS, segmentsIn, startReceivewal, startTestSafekeeper, tempDir, waitFor, waitReplicated, withClient,
} from './helpers.ts';

const TL = 'br-switch';

async function replayLsn(cfg: pg.ClientConfig): Promise<bigint> {
  return withClient(cfg, async (c) => parseLsn((await c.query<{ l: string }>('SELECT pg_last_wal_replay_lsn()::text AS l')).rows[0]!.l));
}

t.test('promotion of the followed standby: timeline history stored, files identical to pg_receivewal', async (t) => {
  const a = await startTestPostgres(t, 'xenon-sk-switch-', REPL_SETTINGS);
  await withClient(a.admin(), (c) => c.query("CREATE TABLE t AS SELECT g AS id, repeat('p', 100) AS pad FROM generate_series(1, 10000) g"));
  const s = await cloneCompute(t, a, 'standby', { standby: true });
  const root = tempDir(t, 'xenon-sk-switch-');
  const sk = await startTestSafekeeper(t, 'sk1', join(root, 'sk1'));
  const api = new SafekeeperClient(sk.url);
  await api.follow(TL, { generation: 1, compute: computeOf(s) });
  await waitFor('streaming from the standby', async () => (await api.status(TL))?.streaming);
  const rw = await startReceivewal(t, s, join(root, 'recv'), 'recv');

  // WAL made on A flows through the standby to both receivers.
  await withClient(a.admin(), async (c) => {
    await c.query("INSERT INTO t SELECT g, repeat('q', 100) FROM generate_series(10001, 40000) g");
    await c.query('SELECT pg_switch_wal()');
    await c.query("INSERT INTO t SELECT g, repeat('r', 100) FROM generate_series(40001, 45000) g");
  });
  const aEnd = await currentLsn(a);
  await waitFor('standby replay', async () => (await replayLsn(s.admin())) >= aEnd);
  await waitReplicated(s, ['sk1', 'recv'], aEnd);
  const st1 = (await api.status(TL))!;
  t.equal(st1.pg_timeline, 1);

  // Promote: the standby moves to timeline 2.
  await withClient(s.admin(), (c) => c.query('SELECT pg_promote(true, 30)'));
  await withClient(s.admin(), async (c) => {
    await c.query("INSERT INTO t SELECT g, repeat('s', 100) FROM generate_series(45001, 60000) g");
    await c.query('SELECT pg_switch_wal()');
    await c.query("INSERT INTO t SELECT g, repeat('u', 100) FROM generate_series(60001, 61000) g");
  });
  const sEnd = await currentLsn(s);
  await waitReplicated(s, ['sk1', 'recv'], sEnd);
  const st2 = (await api.status(TL))!;
  t.equal(st2.pg_timeline, 2, 'the safekeeper writes on timeline 2 now');
  t.equal(st2.last_error, null);
  t.ok(parseLsn(st2.flush_lsn) >= sEnd, `flushed ${st2.flush_lsn} >= ${formatLsn(sEnd)}`);

  const skDir = join(root, 'sk1', 'timelines', TL, 'wal');
  const mine = readFileSync(join(skDir, '00000002.history'));
  const theirs = readFileSync(join(rw.dir, '00000002.history'));
  t.ok(mine.equals(theirs), `00000002.history identical: ${JSON.stringify(mine.toString())}`);
  const { compared, diffs } = compareSegments(skDir, rw.dir, sEnd);
  t.comment(`compared: ${compared.join(' ')}`);
  t.same(diffs, [], 'all common segments identical');
  t.ok(compared.some((n) => n.startsWith('00000001')) && compared.some((n) => n.startsWith('00000002')), 'segments of both timelines compared');
  const skFiles = segmentsIn(skDir);
  for (const [base, f] of segmentsIn(rw.dir)) {
    const m = skFiles.get(base);
    if (m) t.equal(m.name, f.name, `${base}: named as pg_receivewal names it`);
  }
  const listing = await api.listWal(TL);
  t.ok(listing.files.some((f) => f.kind === 'history' && f.name === '00000002.history'), 'history file listed');
  const old = listing.files.filter((f) => f.kind === 'segment' && f.pg_timeline === 1 && f.partial);
  t.equal(old.length, 1, 'the old timeline ends in one .partial segment');
  const hist = await api.readWal(TL, '00000002.history');
  t.ok(hist.equals(theirs), 'history file served over HTTP');
  const switchLsn = parseLsn(/^1\t([0-9A-F]+\/[0-9A-F]+)/.exec(theirs.toString())![1]!);
  t.equal(old[0]!.end_lsn, formatLsn(switchLsn), 'its end is the switch point');
  await rw.stop();
});
