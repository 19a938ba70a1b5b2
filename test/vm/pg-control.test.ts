/**
 * pg_control fields and the end of a shutdown checkpoint record, checked against Postgres' own
 * tools (pg_controldata, pg_waldump) on a real cluster.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import pg from 'pg';
import t from 'tap';
import { formatLsn, parseLsn } from '../../lib/lsn.ts';
import { findPgBin } from '../../lib/postgres.ts';
import { checkpointRecordEnd, crc32c, markNotShutDown, readControlData } from '../../vm/pg-control.ts';
import { startTestPostgres } from '../helpers/postgres.ts';

const bin = findPgBin(process.env);

function controldata(dataDir: string): Map<string, string> {
  const out = execFileSync(join(bin, 'pg_controldata'), ['-D', dataDir], { encoding: 'utf8', env: { ...process.env, LANG: 'C', LC_ALL: 'C' } });
  return new Map(out.split('\n').map((l) => { const i = l.indexOf(':'); return [l.slice(0, i).trim(), l.slice(i + 1).trim()]; }));
}

/** pg_waldump reads records from `start` and stops at the first invalid one: the end of WAL. */
function walEnd(dataDir: string, start: bigint): bigint {
  let out: string;
  try {
    out = execFileSync(join(bin, 'pg_waldump'), ['-p', join(dataDir, 'pg_wal'), '-s', formatLsn(start)], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (err) {
    out = String((err as { stderr?: string }).stderr ?? '') + String((err as { stdout?: string }).stdout ?? '');
  }
  const m = /invalid record length at ([0-9A-F]+\/[0-9A-F]+)|record with incorrect prev-link [0-9A-F/]+ at ([0-9A-F]+\/[0-9A-F]+)/.exec(out);
  if (!m) throw new Error(`no end of WAL in pg_waldump output: ${out.slice(-500)}`);
  return parseLsn(m[1] ?? m[2]!);
}

t.test('pg_control fields match pg_controldata, and a shutdown checkpoint ends where pg_waldump says', async (t) => {
  const cluster = await startTestPostgres(t, 'xenon-pgcontrol-');
  for (let round = 0; round < 3; round++) {
    const c = new pg.Client(cluster.admin());
    await c.connect();
    // Vary where the next checkpoint record lands within its page.
    await c.query(`CREATE TABLE IF NOT EXISTS filler (x text)`);
    await c.query(`INSERT INTO filler SELECT repeat('x', $1) FROM generate_series(1, $2)`, [37 + round * 501, 50 + round * 97]);
    await c.end();
    await cluster.stop(); // a fast shutdown writes a shutdown checkpoint, and nothing after it
    const ours = await readControlData(cluster.dataDir);
    const theirs = controldata(cluster.dataDir);
    t.equal(ours.systemId.toString(), theirs.get('Database system identifier'), 'system identifier');
    t.equal(formatLsn(ours.checkpoint), theirs.get("Latest checkpoint location"), 'checkpoint location');
    t.equal(formatLsn(ours.redo), theirs.get("Latest checkpoint's REDO location"), 'redo location');
    t.equal(String(ours.timeline), theirs.get("Latest checkpoint's TimeLineID"), 'timeline');
    t.equal(ours.state, theirs.get('Database cluster state'), 'state');
    t.equal(formatLsn(ours.minRecoveryPoint), theirs.get('Minimum recovery ending location'), 'minRecoveryPoint');
    t.equal(ours.state, 'shut down');
    t.equal(formatLsn(checkpointRecordEnd(ours.checkpoint)), formatLsn(walEnd(cluster.dataDir, ours.checkpoint)), 'the shutdown checkpoint record ends where WAL ends');
    await cluster.start();
  }
});

t.test('checkpointRecordEnd accounts for page and segment headers', async (t) => {
  t.equal(checkpointRecordEnd(0x1000028n), 0x1000028n + 120n, 'inside a page (114 bytes, aligned to 8)');
  // 8 bytes before a page boundary: 8 bytes there, a 24-byte page header, 112 after it.
  t.equal(checkpointRecordEnd(0x1001ff8n), 0x1002000n + 24n + 112n, 'across a page boundary');
  t.equal(checkpointRecordEnd(0x1fffff8n), 0x2000000n + 40n + 112n, 'across a segment boundary (long header)');
  t.equal(checkpointRecordEnd(0x1001f88n), 0x1002000n, 'ending exactly at a page boundary');
});

t.test('crc32c is CRC-32C (Castagnoli)', async (t) => {
  t.equal(crc32c(Buffer.from('123456789')), 0xe3069283, 'the standard check value');
  t.equal(crc32c(Buffer.alloc(0)), 0);
});

t.test('markNotShutDown: pg_controldata sees "in production" with a valid CRC; unknown layouts are refused', async (t) => {
  const cluster = await startTestPostgres(t, 'xenon-pgcontrol-mark-');
  await cluster.stop();
  const path = join(cluster.dataDir, 'global', 'pg_control');
  const before = readFileSync(path);
  t.equal(controldata(cluster.dataDir).get('Database cluster state'), 'shut down');
  await markNotShutDown(cluster.dataDir);
  const after = readFileSync(path);
  t.equal(after.length, 8192, 'still one 8 KiB block');
  const out = execFileSync(join(bin, 'pg_controldata'), ['-D', cluster.dataDir], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, LANG: 'C', LC_ALL: 'C' } });
  t.notMatch(out, /CRC/i, 'pg_controldata has no CRC complaint');
  t.equal(controldata(cluster.dataDir).get('Database cluster state'), 'in production');
  t.equal((await readControlData(cluster.dataDir)).state, 'in production');
  const changed = [...after.keys()].filter((i) => after[i] !== before[i]);
  t.ok(changed.every((i) => (i >= 16 && i < 20) || (i >= 288 && i < 292)), 'only the state and the CRC changed');
  // It starts, runs crash recovery, and is the same cluster.
  await cluster.start();
  const c = new pg.Client(cluster.admin());
  await c.connect();
  const { rows } = await c.query<{ timeline_id: number }>('SELECT timeline_id FROM pg_control_checkpoint()');
  await c.end();
  t.equal(rows[0]!.timeline_id, 1, 'same timeline');
  await cluster.stop();

  const corrupt = Buffer.from(readFileSync(path));
  corrupt[100] = corrupt[100]! ^ 0xff;
  writeFileSync(path, corrupt);
  await t.rejects(markNotShutDown(cluster.dataDir), { code: 'CP_COMPUTE_START_FAILED', message: /CRC does not match/ });
  t.same(readFileSync(path), corrupt, 'a refused file is left untouched');
});
