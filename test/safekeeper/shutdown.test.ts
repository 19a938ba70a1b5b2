// A compute's clean shutdown: Postgres' walsender waits until the safekeeper has confirmed the flush
// of everything up to and including the shutdown checkpoint before it exits — so a stopped
// compute's last WAL is on the safekeeper (DESIGN §4: a stop waits for the quorum).
import t from 'tap';
import { join } from 'node:path';
import { formatLsn, parseLsn } from '../../lib/lsn.ts';
import { SafekeeperClient } from '../../safekeeper/client.ts';
import { startTestPostgres } from '../helpers/postgres.ts';
import { cloneCompute, computeOf, PG_BIN, REPL_SETTINGS, runTool, startTestSafekeeper, tempDir, waitFor, withClient } from './helpers.ts';

t.test('a clean compute stop leaves its shutdown checkpoint flushed on the safekeeper', async (t) => {
  const a = await startTestPostgres(t, 'xenon-sk-stop-', REPL_SETTINGS);
  const b = await cloneCompute(t, a, 'b');
  const root = tempDir(t, 'xenon-sk-stop-');
  const sk = await startTestSafekeeper(t, 'sk1', join(root, 'sk1'));
  const api = new SafekeeperClient(sk.url);
  await api.follow('br-stop', { generation: 1, compute: computeOf(b) });
  await waitFor('streaming', async () => (await api.status('br-stop'))?.streaming);
  await withClient(b.admin(), (c) => c.query("CREATE TABLE s AS SELECT g, repeat('s', 100) FROM generate_series(1, 20000) g"));
  await b.stop();
  const st = await waitFor('the stream to end', async () => {
    const s = await api.status('br-stop');
    return s && !s.streaming ? s : undefined;
  });
  const control = await runTool(join(PG_BIN, 'pg_controldata'), [b.dataDir], { env: { LC_ALL: 'C' } });
  t.match(control, /Database cluster state:\s+shut down\n/, 'compute shut down cleanly');
  const ckpt = parseLsn(/Latest checkpoint location:\s+(\S+)/.exec(control)![1]!);
  t.ok(parseLsn(st.flush_lsn) > ckpt, `safekeeper flushed ${st.flush_lsn}, past the shutdown checkpoint record at ${formatLsn(ckpt)}`);
  t.ok(parseLsn(st.flush_lsn) - ckpt < 1024n, 'and nothing beyond its end (no WAL after a shutdown checkpoint)');
  t.match(st.last_error ?? '', /./, `the compute being gone is reported: ${st.last_error}`);
});
