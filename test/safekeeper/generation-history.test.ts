// Generation history (Raft's term history) on one safekeeper: the divergence rule, the control
// file (old files without a history still load), truncation at the divergence point rather than
// only at start_lsn, request validation, and the fence call. Real safekeeper processes; the WAL
// is laid out as files (a compute is never reachable here: port 1).
import t from 'tap';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { divergenceLsn, historyUpTo, lastGeneration, parseControl, serializeControl } from '../../safekeeper/control.ts';
import { SafekeeperClient } from '../../safekeeper/client.ts';
import { spawnSafekeeper, tempDir } from './helpers.ts';

const TL = 'br-genhist';
const SEG = 16 * 1024 * 1024;
const compute = { host: '127.0.0.1', port: 1, user: 'x', password: 'y' }; // never reachable
const h = (...e: [number, bigint][]): { generation: number; startLsn: bigint }[] => e.map(([generation, startLsn]) => ({ generation, startLsn }));

/** A complete segment `segno` whose first page header carries its own address. */
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

t.test('the divergence rule', async (t) => {
  // Same lineage, the request one generation further: valid up to where the new one starts.
  t.equal(divergenceLsn(h([1, 0n]), h([1, 0n], [2, 0x500n])), 0x500n);
  // Ours has a generation that lost (3) after the common one (2): cut where the request's next
  // generation (4) started, or where ours (3) did, whichever is lower.
  t.equal(divergenceLsn(h([1, 0n], [2, 0x100n], [3, 0x900n]), h([1, 0n], [2, 0x100n], [4, 0x700n])), 0x700n);
  t.equal(divergenceLsn(h([1, 0n], [2, 0x100n], [3, 0x600n]), h([1, 0n], [2, 0x100n], [4, 0x700n])), 0x600n);
  // The scenario of the known limit: ours stopped at generation 1; the request went 1 → 2 → 3.
  t.equal(divergenceLsn(h([1, 0n]), h([1, 0n], [2, 0x300n], [3, 0x400n])), 0x300n);
  // Identical histories: nothing to cut.
  t.equal(divergenceLsn(h([1, 0n], [2, 0x300n]), h([1, 0n], [2, 0x300n])), null);
  // No history here (an older control file): the request's first entry bounds it (the old rule
  // when the donor has no history either: cut at start_lsn).
  t.equal(divergenceLsn([], h([5, 0x800n])), 0x800n);
  // The same generation with another start LSN is not common.
  t.equal(divergenceLsn(h([1, 0n], [2, 0x300n]), h([1, 0n], [2, 0x200n], [3, 0x900n])), 0x200n);
  // Histories cut short at the front (at most 500 entries) still match on their common entries.
  const long = Array.from({ length: 500 }, (_, i): [number, bigint] => [i + 1, BigInt(i) * 0x1000n]);
  t.equal(divergenceLsn(h(...long), h(...long.slice(1), [501, 500n * 0x1000n])), 500n * 0x1000n, 'a front-trimmed history: valid up to the new start');
  t.equal(divergenceLsn(h(...long.slice(0, 300)), h(...long.slice(1), [501, 500n * 0x1000n])), 300n * 0x1000n, 'a safekeeper 200 generations behind: up to the next generation\'s start');
  t.equal(divergenceLsn(h([1, 0n], [2, 0x100n]), h([7, 0x900n], [8, 0xa00n])), 0n, 'nothing in common: the first entries bound it');
  t.equal(lastGeneration(h([1, 0n], [2, 0x300n]), 0x2ffn), 1, 'an entry counts once the WAL reaches its start');
  t.equal(lastGeneration(h([1, 0n], [2, 0x300n]), 0x300n), 2);
  t.equal(lastGeneration([], 0x300n), 0);
  t.same(historyUpTo(h([1, 0n], [2, 0x300n], [3, 0x400n]), 0x300n), h([1, 0n], [2, 0x300n]));
});

t.test('control file: the history round-trips; older files without it load', async (t) => {
  const old = JSON.stringify({ version: 1, timeline_id: TL, generation: 3, compute: null, system_id: '1', pg_timeline: 1, flush_lsn: '0/3000000', history: [] });
  const s = parseControl(old, 'c');
  t.equal(s.generationHistory, undefined, 'an older file has no history');
  const text = serializeControl({ ...s, generationHistory: h([1, 0n], [3, 0x2000000n]) });
  t.match(text, /"generation_history": \[/);
  t.same(parseControl(text, 'c').generationHistory, h([1, 0n], [3, 0x2000000n]));
  t.throws(() => parseControl(text.replace('"generation": 3,\n      "start_lsn"', '"generation": 0,\n      "start_lsn"'), 'c'), { code: 'SK_CONTROL_FILE_CORRUPT', message: /not ordered/ });
});

t.test('a generation change truncates where the histories diverge, not only at start_lsn', async (t) => {
  const root = tempDir(t, 'xenon-sk-genhist-');
  // This safekeeper holds generation 1's WAL up to 0/5000000 (segments 2..4): generation 2
  // started at 0/2800000 elsewhere while it was down, so everything of generation 1 past that
  // is a tail nobody acknowledged.
  const dir = layout(root, { generation: 1, flush_lsn: '0/5000000', generation_history: [{ generation: 1, start_lsn: '0/2000000' }] }, [2, 3, 4]);
  let sk = await spawnSafekeeper(t, 'sk1', root);
  let api = new SafekeeperClient(sk.url);
  const st0 = (await api.status(TL))!;
  t.same(st0.history, [{ generation: 1, start_lsn: '0/2000000' }]);
  t.equal(st0.last_generation, 1);

  // Malformed histories are refused before anything changes.
  const bad = async (history: unknown, start_lsn?: string): Promise<void> => {
    await t.rejects(api.follow(TL, { generation: 3, compute, history: history as never, ...(start_lsn ? { start_lsn } : {}) }), { code: 'CP_BAD_REQUEST' }, JSON.stringify(history));
  };
  await bad([]);
  await bad([{ generation: 2, start_lsn: '0/3000000' }, { generation: 1, start_lsn: '0/2000000' }, { generation: 3, start_lsn: '0/3000000' }]);
  await bad([{ generation: 1, start_lsn: '0/3000000' }, { generation: 3, start_lsn: '0/2000000' }]);
  await bad([{ generation: 1, start_lsn: '0/2000000' }, { generation: 2, start_lsn: '0/3000000' }], undefined); // the last is not generation 3
  await bad([{ generation: 1, start_lsn: '0/2000000' }, { generation: 3, start_lsn: '0/3000000' }], '0/3000100'); // start_lsn differs
  await bad([{ generation: 1, start_lsn: 'zz' }, { generation: 3, start_lsn: '0/3000000' }]);
  t.equal((await api.status(TL))!.flush_lsn, '0/5000000', 'nothing changed');

  const history = [{ generation: 1, start_lsn: '0/2000000' }, { generation: 2, start_lsn: '0/2800000' }, { generation: 3, start_lsn: '0/4800000' }];
  const st = await api.follow(TL, { generation: 3, compute, start_lsn: '0/4800000', history });
  t.equal(st.flush_lsn, '0/2800000', 'cut at generation 2\'s start (where the histories diverge), not at start_lsn 0/4800000');
  t.same(st.history, history, 'the request\'s history adopted');
  t.equal(st.last_generation, 2, 'its WAL is now a prefix of generation 2\'s');
  t.notOk(existsSync(join(dir, 'wal', '000000010000000000000003')), 'segments past the cut are gone');
  t.ok(existsSync(join(dir, 'wal', '000000010000000000000002.partial')));
  const control = JSON.parse(readFileSync(join(dir, 'control.json'), 'utf8')) as Record<string, unknown>;
  t.same(control.generation_history, history, 'persisted in the control file');
  t.equal(control.generation, 3);

  // Survives a restart.
  await sk.kill('SIGTERM');
  sk = await spawnSafekeeper(t, 'sk1', root);
  api = new SafekeeperClient(sk.url);
  t.same((await api.status(TL))!.history, history, 'history loaded after a restart');

  // A follow without a history (an older control plane) cuts at start_lsn only and appends.
  const st4 = await api.follow(TL, { generation: 4, compute, start_lsn: '0/2400000' });
  t.equal(st4.flush_lsn, '0/2400000');
  t.same(st4.history, [{ generation: 1, start_lsn: '0/2000000' }, { generation: 4, start_lsn: '0/2400000' }], 'entries past the cut dropped, the new one appended');
  await sk.kill('SIGTERM');
});

t.test('fence: stores a newer generation, stops following, answers the final status', async (t) => {
  const root = tempDir(t, 'xenon-sk-fence-call-');
  layout(root, { generation: 2, flush_lsn: '0/3000000', generation_history: [{ generation: 2, start_lsn: '0/2000000' }] }, [2]);
  const sk = await spawnSafekeeper(t, 'sk1', root);
  const api = new SafekeeperClient(sk.url);
  await t.rejects(api.fence(TL, 1), { code: 'SK_GENERATION_FENCED' }, 'a lower generation is refused');
  const same = await api.fence(TL, 2);
  t.equal(same.generation, 2);
  t.same(same.compute, { host: '127.0.0.1', port: 1, user: 'x' }, 'the same generation changes nothing');
  const st = await api.fence(TL, 5);
  t.equal(st.generation, 5, 'a higher generation is stored');
  t.equal(st.compute, null, 'and the older compute is no longer followed');
  t.equal(st.last_generation, 2, 'the WAL is still generation 2\'s');
  t.equal(st.flush_lsn, '0/3000000', 'nothing cut by a fence');
  await t.rejects(api.follow(TL, { generation: 4, compute }), { code: 'SK_GENERATION_FENCED' }, 'an older compute can no longer be followed');
  const f = await api.follow(TL, { generation: 5, compute, history: [{ generation: 2, start_lsn: '0/2000000' }, { generation: 5, start_lsn: '0/2100000' }] });
  t.equal(f.flush_lsn, '0/2100000', 'the follow of the fenced generation is still a generation change (it cuts)');
  // An unknown timeline is created by a fence, holding nothing: the fence holds for it too.
  const fresh = await api.fence('br-fresh', 3);
  t.match(fresh, { generation: 3, flush_lsn: '0/0', history: [], last_generation: 0, compute: null });
  await t.rejects(api.follow('br-fresh', { generation: 2, compute }), { code: 'SK_GENERATION_FENCED' });
  await t.rejects(api.fence('br-x', -1), { code: 'CP_BAD_REQUEST' });
  await sk.kill('SIGTERM');
});
