/**
 * A real Postgres 15 cluster for in-process tests: initdb (superuser `admin`, SCRAM) in a temp
 * directory, started on a free port as the `postgres` user when root; stopped and removed at
 * teardown. `restart()` starts it again on another free port (a compute that moved).
 */
import { chmodSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type pg from 'pg';
import { findFreePort, findPgBin, initdb, pgRunAs, PostgresProcess } from '../../lib/postgres.ts';

export interface TestPostgres {
  readonly port: number;
  /** node-postgres config of the superuser. */
  admin(): pg.ClientConfig;
  restart(): Promise<void>;
  /** Fast shutdown (a shutdown checkpoint); `start()` brings it back on a new free port. */
  stop(): Promise<void>;
  start(): Promise<void>;
}

export async function startTestPostgres(
  t: { teardown(fn: () => unknown): void },
  prefix: string,
  settings: Record<string, string | number> = {},
): Promise<TestPostgres & { dataDir: string; root: string }> {
  const bin = findPgBin(process.env);
  const runAs = pgRunAs(process.env);
  const root = mkdtempSync(join(tmpdir(), prefix));
  chmodSync(root, 0o755); // the cluster runs as `postgres` when we are root
  t.teardown(() => rmSync(root, { recursive: true, force: true }));
  const dataDir = join(root, 'c', 'pgdata');
  await initdb({ bin, dataDir, superuser: 'admin', password: 'admin-pw', runAs, noSync: true });
  const start = async (): Promise<PostgresProcess> =>
    PostgresProcess.start({ bin, dataDir, port: await findFreePort(30000, 39999), runAs, logFile: join(root, 'pg.log'), settings });
  let proc = await start();
  t.teardown(() => proc.stop('immediate'));
  return {
    dataDir,
    root,
    get port() { return proc.port; },
    admin: () => ({ host: '127.0.0.1', port: proc.port, user: 'admin', password: 'admin-pw', database: 'postgres' }),
    async restart() {
      await proc.stop('fast');
      proc = await start();
    },
    async stop() {
      await proc.stop('fast');
    },
    async start() {
      if (proc.running) throw new Error('already running');
      proc = await start();
    },
  };
}
