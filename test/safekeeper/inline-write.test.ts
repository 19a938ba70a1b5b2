// `open_datasync_inline` writes only small batches synchronously on the event loop: a large batch
// goes through the thread pool, so HTTP calls (and other timelines) are not starved while it is
// written. A real safekeeper process on a simulated slow disk (XENON_SAFEKEEPER_TEST_WRITE_MS_PER_MIB:
// every write takes that much longer per MiB, inside the write).
import t from 'tap';
import { join } from 'node:path';
import { formatLsn, parseLsn } from '../../lib/lsn.ts';
import { SafekeeperClient } from '../../safekeeper/client.ts';
import { startTestPostgres } from '../helpers/postgres.ts';
import { computeOf, currentLsn, REPL_SETTINGS, spawnSafekeeper, tempDir, waitFor, withClient } from './helpers.ts';

const TL = 'br-inline';

t.test('HTTP answers promptly while large batches are written', async (t) => {
  const pgc = await startTestPostgres(t, 'xenon-sk-inline-', REPL_SETTINGS);
  const root = tempDir(t, 'xenon-sk-inline-');
  // 200 ms per MiB: a 256 KiB inline batch blocks 50 ms, a 4 MiB one would block 0.8 s.
  const sk = await spawnSafekeeper(t, 'sk1', join(root, 'sk1'), 0, { XENON_SAFEKEEPER_SYNC_METHOD: 'open_datasync_inline', XENON_SAFEKEEPER_TEST_WRITE_MS_PER_MIB: '200' });
  const api = new SafekeeperClient(sk.url);
  await api.follow(TL, { generation: 1, compute: computeOf(pgc) });
  await waitFor('streaming', async () => (await api.status(TL))?.streaming);

  // ~40 MiB of WAL at once: it arrives faster than the slow disk takes it, so batches grow large.
  await withClient(pgc.admin(), (c) => c.query("CREATE TABLE big AS SELECT g, repeat('x', 1000) AS pad FROM generate_series(1, 35000) g"));
  const end = await currentLsn(pgc);
  let worst = 0;
  let calls = 0;
  for (;;) {
    const t0 = Date.now();
    const res = await fetch(`${sk.url}/v1/timelines`);
    const body = (await res.json()) as { timelines: { flush_lsn: string }[] };
    const ms = Date.now() - t0;
    calls++;
    if (ms > worst) worst = ms;
    if (parseLsn(body.timelines[0]!.flush_lsn) >= end) break;
    if (calls > 2000) throw new Error(`not caught up with ${formatLsn(end)}: ${body.timelines[0]!.flush_lsn}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  t.comment(`${calls} GET /v1/timelines while ${formatLsn(end)} was written; slowest ${worst} ms`);
  t.ok(calls >= 5, 'the writing took a while (the slow disk is in effect)');
  t.ok(worst < 1000, `every HTTP call answered within 1 s (slowest ${worst} ms)`);
  await sk.kill('SIGTERM');
});
