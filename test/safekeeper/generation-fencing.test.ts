// Generation fencing at the compute: a compute started by the control plane carries
// `xenon.generation`; a safekeeper streams only from a compute whose generation is the one it
// follows for the timeline. A compute of another generation is refused before anything is written
// (no WAL, no slot), with a clear last_error, and retried with backoff; a compute without the
// setting is accepted.
import t from 'tap';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { formatLsn, parseLsn } from '../../lib/lsn.ts';
import { SafekeeperClient } from '../../safekeeper/client.ts';
import { startTestPostgres } from '../helpers/postgres.ts';
import { cloneCompute, computeOf, currentLsn, delay, REPL_SETTINGS, startTestSafekeeper, tempDir, waitFor, withClient } from './helpers.ts';

const TL = 'br-genfence';

async function slots(pgc: { admin(): import('pg').ClientConfig }): Promise<string[]> {
  return withClient(pgc.admin(), async (c) => (await c.query<{ slot_name: string }>('SELECT slot_name FROM pg_replication_slots ORDER BY 1')).rows.map((r) => r.slot_name));
}

t.test('a safekeeper streams only from the compute of the generation it follows', async (t) => {
  const a = await startTestPostgres(t, 'xenon-sk-genf-', { ...REPL_SETTINGS, 'xenon.generation': 1 });
  const b = await cloneCompute(t, a, 'b', { settings: { 'xenon.generation': 2 } });
  t.equal(await withClient(a.admin(), async (c) => (await c.query<{ g: string }>("SELECT current_setting('xenon.generation') AS g")).rows[0]!.g), '1', 'A runs generation 1');
  t.equal(await withClient(b.admin(), async (c) => (await c.query<{ g: string }>("SELECT current_setting('xenon.generation') AS g")).rows[0]!.g), '2', 'B runs generation 2');

  const root = tempDir(t, 'xenon-sk-genf-');
  const sk = await startTestSafekeeper(t, 'sk1', join(root, 'sk1'));
  const api = new SafekeeperClient(sk.url);
  const walDir = join(root, 'sk1', 'timelines', TL, 'wal');

  // Told generation 2, pointed at A (which runs generation 1): refused, nothing written.
  await api.follow(TL, { generation: 2, compute: computeOf(a) });
  const refused = await waitFor('a refusal of A', async () => {
    const s = await api.status(TL);
    return s?.last_error ? s : undefined;
  });
  t.match(refused.last_error, /compute runs generation 1, this timeline follows generation 2/, `last_error: ${refused.last_error}`);
  t.equal(refused.streaming, false);
  // It keeps retrying (a PUT may come): reconnects go up, still nothing written.
  const reconnects = async (): Promise<number> => {
    const m = await sk.metrics.registry.getSingleMetricAsString('xenon_safekeeper_reconnects_total');
    return Number(/reconnects_total\{[^}]*\} (\d+)/.exec(m)?.[1] ?? 0);
  };
  const r0 = await reconnects();
  await waitFor('more retries', async () => (await reconnects()) >= r0 + 2, 20_000);
  const still = (await api.status(TL))!;
  t.equal(still.flush_lsn, '0/0', 'no WAL position taken from A');
  t.equal(still.pg_timeline, 0);
  t.equal(still.system_id, null, 'not even the system id was stored');
  t.same(readdirSync(walDir), [], 'no file written');
  t.same(await slots(a), [], 'no slot created on A');
  const ra = await withClient(a.admin(), async (c) => (await c.query('SELECT 1 FROM pg_stat_replication')).rowCount);
  t.equal(ra, 0, 'A has no walsender streaming to the safekeeper');

  // Told generation 2 at B (which runs generation 2): streams B.
  await api.follow(TL, { generation: 2, compute: computeOf(b) });
  await withClient(b.admin(), (c) => c.query('CREATE TABLE g2 AS SELECT generate_series(1, 1000) AS x'));
  const bEnd = await currentLsn(b);
  const streaming = await waitFor(`B streamed up to ${formatLsn(bEnd)}`, async () => {
    const s = await api.status(TL);
    return s && s.streaming && parseLsn(s.flush_lsn) >= bEnd ? s : undefined;
  });
  t.equal(streaming.last_error, null, 'no error while streaming B');
  t.same(await slots(b), ['sk1'], 'slot on B');

  // The control plane moves on to generation 3 at the same address, but the compute there still
  // runs generation 2 (an old compute that was not stopped): refused, flush LSN stays.
  await api.follow(TL, { generation: 3, compute: computeOf(b) });
  const refused3 = await waitFor('a refusal of B at generation 3', async () => {
    const s = await api.status(TL);
    return s?.last_error ? s : undefined;
  });
  t.match(refused3.last_error, /compute runs generation 2, this timeline follows generation 3/, `last_error: ${refused3.last_error}`);
  const flushAt = refused3.flush_lsn;
  await withClient(b.admin(), (c) => c.query('INSERT INTO g2 SELECT generate_series(1, 1000)'));
  await delay(1500);
  const after = (await api.status(TL))!;
  t.equal(after.flush_lsn, flushAt, 'WAL the old-generation compute wrote after the refusal is not taken');
  t.equal(after.streaming, false);
  t.ok(parseLsn(after.flush_lsn) < (await currentLsn(b)), 'B is ahead of the safekeeper');
});

t.test('a compute without xenon.generation is accepted', async (t) => {
  const a = await startTestPostgres(t, 'xenon-sk-genf0-', REPL_SETTINGS);
  const root = tempDir(t, 'xenon-sk-genf0-');
  const sk = await startTestSafekeeper(t, 'sk1', join(root, 'sk1'));
  const api = new SafekeeperClient(sk.url);
  await api.follow(TL, { generation: 7, compute: computeOf(a) });
  const end = await currentLsn(a);
  const s = await waitFor('streaming', async () => {
    const st = await api.status(TL);
    return st?.streaming && parseLsn(st.flush_lsn) >= end ? st : undefined;
  });
  t.equal(s.last_error, null);
});
