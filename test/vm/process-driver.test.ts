/**
 * vm/process.ts ProcessDriver with real Postgres: initdb once, start, SCRAM-only pg_hba, freeze
 * and thaw, clean stop, unexpected exit, data destruction, close.
 */
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, rmdirSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import t from 'tap';
import { XenonError } from '../../lib/errors.ts';
import { silentLogger } from '../../lib/logger.ts';
import { findPgBin, pgRunAs } from '../../lib/postgres.ts';
import type { ComputeExit } from '../../vm/api.ts';
import { FREEZER_ROOT } from '../../vm/freezer.ts';
import { ProcessDriver } from '../../vm/process.ts';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

const ADMIN = { user: 'cloud_admin', password: 'drv-test-Pa55word' };

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (err) {
    return (err as NodeJS.ErrnoException).code !== 'ESRCH';
  }
  // A zombie still answers kill(0); it is gone for our purposes.
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

async function waitGone(pids: number[], ms = 10_000): Promise<number[]> {
  const end = Date.now() + ms;
  let left = pids.filter(alive);
  while (left.length && Date.now() < end) {
    await sleep(25);
    left = left.filter(alive);
  }
  return left;
}

async function waitFor(cond: () => boolean, ms = 10_000): Promise<boolean> {
  const end = Date.now() + ms;
  while (!cond() && Date.now() < end) await sleep(20);
  return cond();
}

t.test('ProcessDriver with real Postgres', async (t) => {
  const pgBin = findPgBin(process.env);
  const runAs = pgRunAs(process.env);
  const dataRoot = mkdtempSync(join(tmpdir(), 'xenon-drv-'));
  chmodSync(dataRoot, 0o755); // computes run as `postgres` when we are root
  const logDir = mkdtempSync(join(tmpdir(), 'xenon-drv-log-'));
  const base = 20000 + Math.floor(Math.random() * 400) * 100;
  const portRange = [base, base + 99] as const;

  const driver = await ProcessDriver.create({ pgBin, dataRoot, logDir, runAs, portRange, logger: silentLogger, readyTimeoutMs: 60_000, stopTimeoutMs: 20_000 });

  /** Every pid the driver reported, so teardown can make sure none survives. */
  const seenPids = new Set<number>();
  const clients: pg.Client[] = [];
  const exits: ComputeExit[] = [];
  driver.onUnexpectedExit((e) => exits.push(e));

  const track = async (id: string): Promise<number[]> => {
    const pids = await driver.pids(id);
    for (const p of pids) seenPids.add(p);
    return pids;
  };
  const connect = async (port: number, password = ADMIN.password): Promise<pg.Client> => {
    const c = new pg.Client({ host: '127.0.0.1', port, user: ADMIN.user, password, database: 'postgres', connectionTimeoutMillis: 10_000 });
    c.on('error', () => {}); // a killed compute must not crash the test process
    clients.push(c);
    await c.connect();
    return c;
  };

  t.teardown(async () => {
    for (const c of clients) await c.end().catch(() => {});
    await driver.close().catch(() => {});
    // Anything still alive that we started (only postgres processes the driver reported).
    for (const pid of seenPids) {
      if (!alive(pid)) continue;
      let cmd = '';
      try { cmd = readFileSync(`/proc/${pid}/cmdline`, 'utf8'); } catch { continue; }
      if (cmd.includes('postgres')) {
        try { process.kill(pid, 'SIGCONT'); } catch { /* gone */ }
        try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ }
      }
    }
    await waitGone([...seenPids], 5_000);
    rmSync(dataRoot, { recursive: true, force: true });
    rmSync(logDir, { recursive: true, force: true });
    if (driver.freezerKind === 'cgroup') {
      // The driver's per-data-root freezer scope. Per-compute groups are released asynchronously
      // after each exit (not awaited by stop/close), so give them a moment to go first.
      const scopeDir = join(FREEZER_ROOT, 'xenon', createHash('sha256').update(dataRoot).digest('hex').slice(0, 12));
      for (let i = 0; i < 100 && existsSync(scopeDir); i++) {
        try { rmdirSync(scopeDir); } catch { await sleep(30); }
      }
    }
  });

  t.comment(`freezer: ${driver.freezerKind}, runAs: ${runAs?.user ?? '(self)'}, ports ${portRange[0]}-${portRange[1]}`);

  await t.test('prepare creates the data once', async (t) => {
    t.equal(await driver.hasData('br-one'), false);
    t.same(await driver.prepare('br-one', ADMIN), { created: true });
    t.equal(await driver.hasData('br-one'), true);
    t.ok(existsSync(join(dataRoot, 'computes', 'br-one', 'pgdata', 'PG_VERSION')));
    t.same(await driver.prepare('br-one', ADMIN), { created: false }, 'second prepare is a no-op');
    const hba = readFileSync(join(dataRoot, 'computes', 'br-one', 'pgdata', 'pg_hba.conf'), 'utf8');
    t.notMatch(hba, /\btrust\b/, 'no trust lines');
  });

  await t.test('bad data keys and missing data', async (t) => {
    await t.rejects(driver.prepare('../escape', ADMIN), { code: 'CP_BAD_REQUEST' });
    await t.rejects(driver.start({ computeId: 'ep-x', dataKey: 'Bad/Key' }), { code: 'CP_BAD_REQUEST' });
    await t.rejects(driver.start({ computeId: 'ep-x', dataKey: 'br-never-prepared' }), { code: 'CP_COMPUTE_START_FAILED' });
    t.equal(driver.status('ep-x'), 'stopped');
  });

  let port = 0;
  let postmaster = 0;

  await t.test('start: an address in the port range; the admin user connects', async (t) => {
    t.equal(driver.status('ep-one'), 'stopped');
    const addr = await driver.start({ computeId: 'ep-one', dataKey: 'br-one' });
    t.equal(addr.host, '127.0.0.1');
    t.ok(addr.port >= portRange[0] && addr.port <= portRange[1], `port ${addr.port} in range`);
    t.same(driver.address('ep-one'), addr);
    t.equal(driver.status('ep-one'), 'running');
    port = addr.port;
    const pids = await track('ep-one');
    t.ok(pids.length >= 2, 'postmaster and its children');
    postmaster = pids[0]!;
    t.ok(alive(postmaster));

    const c = await connect(port);
    const r = await c.query<{ u: string; db: string; enc: string }>("select current_user as u, current_database() as db, current_setting('password_encryption') as enc");
    t.same(r.rows[0], { u: ADMIN.user, db: 'postgres', enc: 'scram-sha-256' });
    await c.end();

    await t.rejects(driver.start({ computeId: 'ep-one', dataKey: 'br-one' }), { code: 'CP_CONFLICT' }, 'already running');
  });

  await t.test('pg_hba requires the password', async (t) => {
    try {
      await connect(port, 'not-the-password');
      t.fail('connected with a wrong password');
    } catch (err) {
      t.equal((err as { code?: string }).code, '28P01', 'password authentication failed');
    }
    try {
      await connect(port, ADMIN.password + 'x');
      t.fail('connected with a wrong password');
    } catch (err) {
      t.equal((err as { code?: string }).code, '28P01', 'a near-miss password fails too');
    }
    const ok = await connect(port);
    t.equal((await ok.query('select 1 as x')).rows[0].x, 1, 'the right password still works');
    await ok.end();
  });

  await t.test('destroyData refuses while the compute is running', async (t) => {
    await t.rejects(driver.destroyData('br-one'), { code: 'CP_CONFLICT' });
    t.equal(await driver.hasData('br-one'), true, 'data untouched');
  });

  await t.test('suspend freezes queries; resume lets them finish', async (t) => {
    const c = await connect(port);
    t.equal((await c.query('select 1 as x')).rows[0].x, 1);
    await driver.suspend('ep-one');
    t.equal(driver.status('ep-one'), 'suspended');
    await driver.suspend('ep-one'); // idempotent
    let done = false;
    const q = c.query<{ x: number }>('select 2 as x').then((r) => {
      done = true;
      return r;
    });
    await sleep(500);
    t.equal(done, false, 'the query is still pending after 500 ms while suspended');
    const pidsNow = await track('ep-one');
    t.ok(pidsNow.length >= 2, 'processes are kept while suspended');
    for (const p of pidsNow) t.ok(alive(p), `pid ${p} still exists`);

    const resumedAt = Date.now();
    await driver.resume('ep-one');
    t.equal(driver.status('ep-one'), 'running');
    const r = await q;
    t.equal(r.rows[0]!.x, 2, 'the query completes after resume');
    t.ok(Date.now() - resumedAt < 5_000, 'promptly');
    await driver.resume('ep-one'); // idempotent
    await c.end();
  });

  await t.test('stop: the postmaster is gone and status is stopped', async (t) => {
    const pids = await track('ep-one');
    await driver.stop('ep-one');
    t.equal(driver.status('ep-one'), 'stopped');
    t.equal(driver.address('ep-one'), undefined);
    t.same(await driver.pids('ep-one'), []);
    t.equal(alive(postmaster), false, 'postmaster exited');
    t.same(await waitGone(pids), [], 'every compute process exited');
    t.same(exits, [], 'a requested stop is not an unexpected exit');
    await driver.stop('ep-one'); // no-op when stopped
    await t.rejects(driver.suspend('ep-one'), { code: 'CP_CONFLICT' }, 'cannot suspend a stopped compute');
    await t.rejects(driver.resume('ep-one'), { code: 'CP_CONFLICT' });
  });

  await t.test('restart from the same data keeps it', async (t) => {
    const addr = await driver.start({ computeId: 'ep-one', dataKey: 'br-one' });
    await track('ep-one');
    const c = await connect(addr.port);
    await c.query('create table kept(x int); insert into kept values (42)');
    await c.end();
    await driver.stop('ep-one');
    const again = await driver.start({ computeId: 'ep-one', dataKey: 'br-one' });
    await track('ep-one');
    port = again.port;
    const c2 = await connect(again.port);
    t.same((await c2.query('select x from kept')).rows, [{ x: 42 }]);
    await c2.end();
  });

  await t.test('an unexpected exit calls the onUnexpectedExit listeners', async (t) => {
    const pids = await track('ep-one');
    const pm = pids[0]!;
    t.equal(driver.status('ep-one'), 'running');
    process.kill(pm, 'SIGKILL');
    t.ok(await waitFor(() => exits.length > 0), 'listener called');
    t.equal(exits.length, 1);
    t.equal(exits[0]!.computeId, 'ep-one');
    t.equal(exits[0]!.expected, false);
    t.equal(driver.status('ep-one'), 'stopped');
    t.same(await driver.pids('ep-one'), []);
    // The postmaster's children notice its death and exit on their own.
    t.same(await waitGone(pids, 15_000), [], 'orphaned children exited');
    exits.length = 0;
  });

  await t.test('destroyData after stop removes the data', async (t) => {
    await driver.destroyData('br-one');
    t.equal(await driver.hasData('br-one'), false);
    t.notOk(existsSync(join(dataRoot, 'computes', 'br-one')));
    t.same(await driver.prepare('br-one', ADMIN), { created: true }, 'prepare creates it again');
  });

  await t.test('close() stops every compute, suspended ones too', async (t) => {
    await driver.prepare('br-two', ADMIN);
    const a = await driver.start({ computeId: 'ep-one', dataKey: 'br-one' });
    const b = await driver.start({ computeId: 'ep-two', dataKey: 'br-two' });
    t.not(a.port, b.port, 'distinct ports');
    const pids = [...(await track('ep-one')), ...(await track('ep-two'))];
    const c = await connect(b.port);
    await c.query('select 1');
    await driver.suspend('ep-two');
    t.equal(driver.status('ep-two'), 'suspended');
    await driver.close();
    t.equal(driver.status('ep-one'), 'stopped');
    t.equal(driver.status('ep-two'), 'stopped');
    t.same(await waitGone(pids), [], 'every process of both computes exited');
    t.same(exits, [], 'close() is not an unexpected exit');
    await c.end().catch(() => {});
  });
});
