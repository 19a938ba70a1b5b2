/**
 * vm/wal-restore.ts cases that need no safekeeper: nothing to restore, and a data directory an
 * interrupted archive recovery left with recovery.signal (Postgres 15 refuses to start it without a
 * restore_command) — real clusters, real Postgres starts.
 */
import { writeFileSync, chownSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import pg from 'pg';
import t from 'tap';
import { createLogger } from '../../lib/logger.ts';
import { findFreePort, findPgBin, pgRunAs, PostgresProcess } from '../../lib/postgres.ts';
import { restoreWal } from '../../vm/wal-restore.ts';
import { startTestPostgres } from '../helpers/postgres.ts';

const logger = createLogger({ level: 'silent' });
const runAs = pgRunAs(process.env);

t.test('nothing to restore: no settings', async (t) => {
  const c = await startTestPostgres(t, 'xenon-walrestore-');
  await c.stop();
  const r = await restoreWal(c.dataDir, { timelineId: 'br-x', upTo: '0/0', safekeepers: [] }, runAs, logger);
  t.same(r, { restored: [], checked: 0, settings: {} });
});

t.test('a leftover recovery.signal gets the settings an archive recovery from pg_wal needs', async (t) => {
  const c = await startTestPostgres(t, 'xenon-walrestore-');
  const admin = new pg.Client(c.admin());
  await admin.connect();
  await admin.query('CREATE TABLE t AS SELECT generate_series(1, 1000) AS x');
  await admin.end();
  await c.stop();
  const signal = join(c.dataDir, 'recovery.signal');
  writeFileSync(signal, '');
  if (runAs) chownSync(signal, runAs.uid, runAs.gid);
  const r = await restoreWal(c.dataDir, { timelineId: 'br-x', upTo: '0/0', safekeepers: [] }, runAs, logger);
  t.same(r.settings, { restore_command: 'false', recovery_target_timeline: 'latest' });
  // Without them Postgres stops with "must specify restore_command when standby mode is not enabled".
  const pgp = await PostgresProcess.start({
    bin: findPgBin(process.env), dataDir: c.dataDir, port: await findFreePort(40000, 49999), runAs,
    logFile: join(c.root, 'again.log'), settings: r.settings,
  });
  t.teardown(() => pgp.stop('immediate'));
  const again = new pg.Client({ ...c.admin(), port: pgp.port });
  await again.connect();
  const { rows } = await again.query<{ n: string; rec: boolean }>('SELECT count(*) AS n, pg_is_in_recovery() AS rec FROM t');
  await again.end();
  t.same(rows[0], { n: '1000', rec: false }, 'it recovered, promoted, and has the data');
  t.notOk(existsSync(signal), 'the finished recovery removed recovery.signal');
  await pgp.stop('fast');
});
