// A safekeeper process killed (-9) in the middle of a write workload and started again resumes
// on its own from its control file and files, with no gap: its segments stay byte-identical to
// pg_receivewal's. SIGTERM persists the flush LSN in the control file and exits 0.
import t from 'tap';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseLsn, segmentFileName, segmentOf, WAL_SEGMENT_SIZE } from '../../lib/lsn.ts';

const segName = (lsn: bigint): string => {
  const base = segmentFileName(1, segmentOf(lsn));
  return existsSync(join(dataDirOf, 'timelines', TL, 'wal', base)) ? base : `${base}.partial`;
};
let dataDirOf = '';
import { SafekeeperClient } from '../../safekeeper/client.ts';
import { startTestPostgres } from '../helpers/postgres.ts';
import {
  compareSegments, computeOf, currentLsn, delay, REPL_SETTINGS, spawnSafekeeper, startReceivewal, tempDir, waitFor, waitReplicated, withClient,
} from './helpers.ts';

const TL = 'br-restart';

t.test('kill -9 mid-stream, restart: resumes from its flush LSN with no gap', async (t) => {
  const pgc = await startTestPostgres(t, 'xenon-sk-restart-', REPL_SETTINGS);
  const root = tempDir(t, 'xenon-sk-restart-');
  const dataDir = join(root, 'sk1');
  dataDirOf = dataDir;
  let sk = await spawnSafekeeper(t, 'sk1', dataDir);
  t.match(sk.url, /^http:\/\/127\.0\.0\.1:\d+$/, 'ready line carries the url');
  let api = new SafekeeperClient(sk.url);
  await api.follow(TL, { generation: 1, compute: computeOf(pgc) });
  await waitFor('streaming', async () => (await api.status(TL))?.streaming);
  const rw = await startReceivewal(t, pgc, join(root, 'recv'), 'recv');

  // A steady write workload in the background for the whole test.
  let stop = false;
  let inserted = 0;
  const workload = withClient(pgc.admin(), async (c) => {
    await c.query('CREATE TABLE w (id serial PRIMARY KEY, pad text)');
    while (!stop) {
      await c.query("INSERT INTO w (pad) SELECT repeat('y', 200) FROM generate_series(1, 100)");
      inserted += 100;
      if (inserted % 10_000 === 0) await c.query('SELECT pg_switch_wal()');
      await delay(2); // a steady stream, not a flood: the machine is shared
    }
  });

  for (let round = 0; round < 3; round++) {
    await delay(400 + round * 200);
    const before = await api.status(TL);
    t.equal(await sk.kill('SIGKILL'), null, `round ${round}: killed with -9 at flush ${before?.flush_lsn}`);
    await delay(200);
    sk = await spawnSafekeeper(t, 'sk1', dataDir);
    api = new SafekeeperClient(sk.url);
    const st = await waitFor('streaming again', async () => {
      const s = await api.status(TL);
      return s?.streaming ? s : undefined;
    });
    const resumed = parseLsn(st.flush_lsn);
    const seen = parseLsn(before!.flush_lsn);
    if (resumed >= seen) t.pass(`round ${round}: resumed at ${st.flush_lsn} (>= ${before!.flush_lsn} seen before the kill)`);
    else {
      // Recovery from the files may stop short of the real end by trailing zero bytes of a record
      // (it cannot tell them from never-written bytes) — but never by data.
      const seg = readFileSync(join(dataDir, 'timelines', TL, 'wal', segName(resumed)));
      const from = Number(resumed % BigInt(WAL_SEGMENT_SIZE));
      const gap = seg.subarray(from, from + Number(seen - resumed));
      t.ok(gap.length > 0 && gap.every((b) => b === 0), `round ${round}: resumed at ${st.flush_lsn}, ${seen - resumed} bytes below ${before!.flush_lsn}: only zero bytes`);
    }
  }
  stop = true;
  await workload;
  await withClient(pgc.admin(), (c) => c.query('SELECT pg_switch_wal()'));
  const target = await currentLsn(pgc);
  await waitReplicated(pgc, ['sk1', 'recv'], target);
  const st = (await api.status(TL))!;
  const { compared, diffs } = compareSegments(join(dataDir, 'timelines', TL, 'wal'), rw.dir, parseLsn(st.flush_lsn) < target ? parseLsn(st.flush_lsn) : target);
  t.comment(`${inserted} rows written; compared ${compared.length} segments: ${compared.join(' ')}`);
  t.ok(compared.filter((c) => !c.includes('[')).length >= 3, 'at least 3 complete segments compared');
  t.same(diffs, [], 'identical to pg_receivewal after three kill -9 restarts');

  // SIGTERM: stops streaming, persists the flush LSN, exits 0.
  const flushed = (await api.status(TL))!.flush_lsn;
  t.equal(await sk.kill('SIGTERM'), 0, 'SIGTERM exits 0');
  const control = JSON.parse(readFileSync(join(dataDir, 'timelines', TL, 'control.json'), 'utf8')) as { flush_lsn: string; generation: number };
  t.ok(parseLsn(control.flush_lsn) >= parseLsn(flushed), `control file flush ${control.flush_lsn} >= ${flushed}`);
  t.equal(control.generation, 1);
  await rw.stop();
});
