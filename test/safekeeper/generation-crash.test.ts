// A generation change that crashed before its WAL cut was durable is repaired at restart, and an
// unfollow of a higher generation does not skip the truncation of the later follow of it.
// Real safekeeper processes; the crash is simulated by the files a crash would leave behind.
import t from 'tap';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { SafekeeperClient } from '../../safekeeper/client.ts';
import { spawnSafekeeper, tempDir } from './helpers.ts';

const TL = 'br-gencrash';
const SEG = 16 * 1024 * 1024;
const compute = { host: '127.0.0.1', port: 1, user: 'x', password: 'y' }; // never reachable

/** A complete generation-1 segment `segno` whose first page header carries its own address. */
function segment(segno: number): Buffer {
  const b = Buffer.alloc(SEG, 1);
  b.writeUInt16LE(0xd110, 0);
  b.writeBigUInt64LE(BigInt(segno) * BigInt(SEG), 8);
  return b;
}

function layout(root: string, control: Record<string, unknown>, segnos: number[]): string {
  const dir = join(root, 'timelines', TL);
  mkdirSync(join(dir, 'wal'), { recursive: true });
  writeFileSync(join(dir, 'control.json'), JSON.stringify({ version: 1, timeline_id: TL, compute, system_id: '1', pg_timeline: 1, history: [], ...control }));
  for (const n of segnos) writeFileSync(join(dir, 'wal', `0000000100000000000000${n.toString(16).toUpperCase().padStart(2, '0')}`), segment(n));
  return dir;
}

t.test('a truncation interrupted by a crash is redone at load, before anything else', async (t) => {
  const root = tempDir(t, 'xenon-sk-gencrash-');
  // The crash came after the fence {generation 2, pending cut at 0/2000100} was persisted and
  // after segment 3 was deleted, before segment 4 was (the old lowest-first order): a gap.
  const dir = layout(root, { generation: 2, flush_lsn: '0/2000000', pending_truncate_lsn: '0/2000100' }, [2, 4]);
  const sk = await spawnSafekeeper(t, 'sk1', root);
  const api = new SafekeeperClient(sk.url);
  const st = (await api.status(TL))!;
  t.equal(st.generation, 2);
  t.equal(st.flush_lsn, '0/2000100', 'flush LSN is the cut point, not past the gap');
  t.notOk(existsSync(join(dir, 'wal', '000000010000000000000004')), 'the segment after the gap is gone');
  t.ok(existsSync(join(dir, 'wal', '000000010000000000000002.partial')), 'the cut segment is partial again');
  const seg2 = readFileSync(join(dir, 'wal', '000000010000000000000002.partial'));
  t.ok(seg2.subarray(0x100).every((x) => x === 0), 'the rest of the cut segment is zeroed');
  const control = JSON.parse(readFileSync(join(dir, 'control.json'), 'utf8')) as Record<string, unknown>;
  t.equal(control.pending_truncate_lsn, undefined, 'the pending cut is cleared once durable');
  t.equal(control.flush_lsn, '0/2000100');
  // The retried PUT of the same generation stays idempotent and correct.
  const again = await api.follow(TL, { generation: 2, compute, start_lsn: '0/2000100' });
  t.equal(again.flush_lsn, '0/2000100');
  await sk.kill('SIGTERM');
});

t.test('an unfollow of a higher generation does not skip the truncation of its follow', async (t) => {
  const root = tempDir(t, 'xenon-sk-genunf-');
  const dir = layout(root, { generation: 1, flush_lsn: '0/3000000' }, [2]);
  const sk = await spawnSafekeeper(t, 'sk1', root);
  const api = new SafekeeperClient(sk.url);
  t.equal((await api.status(TL))!.flush_lsn, '0/3000000');
  const un = await api.unfollow(TL, 2);
  t.equal(un.generation, 2, 'the higher generation is recorded (fences older computes)');
  await t.rejects(api.follow(TL, { generation: 1, compute }), { code: 'SK_GENERATION_FENCED' }, 'generation 1 is fenced');
  const st = await api.follow(TL, { generation: 2, compute, start_lsn: '0/2000100' });
  t.equal(st.flush_lsn, '0/2000100', 'the follow of generation 2 cuts WAL past its start_lsn');
  t.ok(existsSync(join(dir, 'wal', '000000010000000000000002.partial')));
  // From now on the same generation is idempotent: no further cut.
  const same = await api.follow(TL, { generation: 2, compute, start_lsn: '0/2000000' });
  t.equal(same.flush_lsn, '0/2000100', 'a repeated PUT of the followed generation does not truncate');
  // The marker survives a restart.
  const un3 = await api.unfollow(TL, 3);
  t.equal(un3.generation, 3);
  await sk.kill('SIGTERM');
  const sk2 = await spawnSafekeeper(t, 'sk1', root);
  const api2 = new SafekeeperClient(sk2.url);
  const st3 = await api2.follow(TL, { generation: 3, compute, start_lsn: '0/2000080' });
  t.equal(st3.flush_lsn, '0/2000080', 'after a restart the follow of the unfollowed generation still cuts');
  await sk2.kill('SIGTERM');
});
