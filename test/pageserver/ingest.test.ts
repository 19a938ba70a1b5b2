// WAL ingest against real parts: a PG 15 compute streaming to three real safekeepers; the ingest
// copies quorum-committed complete segments into the store byte for byte, raises the tip, samples
// it, records pg_history, and goes on with one safekeeper down.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import t from 'tap';
import { silentLogger } from '../../lib/logger.ts';
import { formatLsn, parseLsn, parseSegmentFileName, WAL_SEGMENT_SIZE } from '../../lib/lsn.ts';
import { boundSamples, historySwitchPoint, quorumLsn, startIngest } from '../../pageserver/ingest.ts';
import { keys } from '../../pageserver/types.ts';
import { currentLsn, waitReplicated } from '../safekeeper/helpers.ts';
import { skWalDir, streamingCompute, testTimelines } from './ps-test-helpers.ts';

const TENANT = 'tenant-ingest';

t.test('pure helpers', async (t) => {
  t.equal(quorumLsn([5n, 9n, 7n], 2), 7n);
  t.equal(quorumLsn([5n], 2), undefined);
  t.equal(quorumLsn([5n, 0n], 2), 0n);
  t.same(historySwitchPoint('1\t0/3000000\tno recovery target specified\n\n2\t0/5000A28\tbefore 2026-01-01\n'), { parentTli: 2, lsn: 0x5000a28n });
  t.equal(historySwitchPoint('# nothing\n'), undefined);
  const many = Array.from({ length: 10_050 }, (_, i): [string, string] => [new Date(i * 1000).toISOString(), formatLsn(BigInt(i))]);
  const b = boundSamples(many);
  t.ok(b.length <= 10_000 && b.length > 7_000, `bounded to ${b.length}`);
  t.same(b.at(-1), many.at(-1), 'the newest sample is kept');
  t.same(b.slice(-5000), many.slice(-5000), 'recent samples are all kept');
  t.same(b[0], many[0], 'the oldest sample is kept');
});

t.test('ingests quorum-committed segments byte-identical, raises the tip, samples it; 2 of 3 suffice', async (t) => {
  const TL = 'br-ingest-main';
  const c = await streamingCompute(t, TL);
  const timelines = testTimelines(t);
  await timelines.create(TENANT, TL);
  let clock = Date.parse('2026-12-02T04:00:00Z');
  // Polled by hand only (pollNow): the loop's first round is an hour away.
  const ingest = startIngest({ timelines, safekeepers: c.members, intervalMs: 3_600_000, logger: silentLogger, now: () => new Date((clock += 1000)) });
  t.teardown(() => ingest.close());

  await c.sql("CREATE TABLE t AS SELECT g AS id, repeat('x', 200) AS pad FROM generate_series(1, 60000) g"); // ~17 MB of WAL
  await c.sql('SELECT pg_switch_wal()');
  await c.sql("INSERT INTO t SELECT g, repeat('y', 200) FROM generate_series(60001, 61000) g");
  const flushed1 = await currentLsn(c.pgc);
  await waitReplicated(c.pgc, ['sk1', 'sk2', 'sk3'], flushed1);
  await ingest.pollNow(TENANT, TL);
  const ix1 = await timelines.read(TENANT, TL);
  t.ok(parseLsn(ix1.last_record_lsn) >= flushed1, `last_record_lsn ${ix1.last_record_lsn} >= flushed ${formatLsn(flushed1)}`);
  t.equal(ix1.lsn_samples.length, 1, 'one sample');
  t.equal(ix1.lsn_samples[0]![1], ix1.last_record_lsn);
  const segs1 = ix1.wal.filter((w) => w.kind === 'segment');
  t.ok(segs1.length >= 1, `segments ingested: ${segs1.map((s) => s.name).join(', ')}`);
  t.same(ix1.pg_history, [{ pg_timeline: 1, begin_lsn: segs1[0]!.start_lsn }], 'pg_history: TLI 1 from the first segment');
  const skDir = skWalDir(c.skDirs[0]!, TL);
  for (const w of segs1) {
    const stored = await timelines.store.getBuffer(keys.wal(TENANT, TL, w.name));
    t.equal(stored.length, WAL_SEGMENT_SIZE);
    t.ok(stored.equals(readFileSync(join(skDir, w.name))), `${w.name} byte-identical to sk1's copy`);
    t.ok(parseLsn(w.end_lsn!) <= parseLsn(ix1.last_record_lsn), `${w.name} ends before the tip`);
    t.equal(w.pg_timeline, 1);
  }
  const names1 = new Set(segs1.map((s) => s.name));
  t.equal(names1.size, segs1.length, 'no duplicates');
  t.ok((await ingest.quorumTip(TL))! >= parseLsn(ix1.last_record_lsn), 'quorumTip: at least the tip ingested (background WAL may follow)');

  // No new commits: a sample only if background WAL (running-xacts records) moved the tip.
  await ingest.pollNow(TENANT, TL);
  const ix1b = await timelines.read(TENANT, TL);
  t.equal(ix1b.lsn_samples.length, ix1b.last_record_lsn === ix1.last_record_lsn ? 1 : 2, 'a sample only when the tip moved');
  t.equal(ix1b.wal.length, ix1.wal.length, 'no new files');

  // One safekeeper down: still ingests with the other two.
  await c.sks[2]!.close();
  await c.sql("INSERT INTO t SELECT g, repeat('z', 200) FROM generate_series(61001, 130000) g");
  await c.sql('SELECT pg_switch_wal()');
  await c.sql('INSERT INTO t VALUES (0)');
  const flushed2 = await currentLsn(c.pgc);
  await waitReplicated(c.pgc, ['sk1', 'sk2'], flushed2);
  await ingest.pollNow(TENANT, TL);
  const ix2 = await timelines.read(TENANT, TL);
  t.ok(parseLsn(ix2.last_record_lsn) >= flushed2, `tip ${ix2.last_record_lsn} >= ${formatLsn(flushed2)} with 2 of 3`);
  t.ok(ix2.lsn_samples.length > ix1b.lsn_samples.length, 'samples grow');
  t.equal(ix2.lsn_samples.at(-1)![1], ix2.last_record_lsn, 'the newest sample is the tip');
  t.ok(Date.parse(ix2.lsn_samples.at(-1)![0]) > Date.parse(ix2.lsn_samples[0]![0]));
  const segs2 = ix2.wal.filter((w) => w.kind === 'segment');
  t.ok(segs2.length > segs1.length, `more segments: ${segs2.length}`);
  // Every complete segment below the flushed LSN is there, contiguous.
  const segnos = segs2.map((w) => parseSegmentFileName(w.name)!.segno).sort((a, b) => (a < b ? -1 : 1));
  for (let i = 1; i < segnos.length; i++) t.equal(segnos[i], segnos[i - 1]! + 1n, 'contiguous');
  t.ok(BigInt(WAL_SEGMENT_SIZE) * (segnos.at(-1)! + 1n) + BigInt(WAL_SEGMENT_SIZE) > flushed2, 'up to the segment holding the tip');
  for (const w of segs2.filter((s) => !names1.has(s.name))) {
    const stored = await timelines.store.getBuffer(keys.wal(TENANT, TL, w.name));
    t.ok(stored.equals(readFileSync(join(skWalDir(c.skDirs[1]!, TL), w.name))), `${w.name} byte-identical to sk2's copy`);
  }
  // WAL that GC removed (ending at or before the cutoff) is not fetched again.
  const gone = segs2[0]!;
  await timelines.update(TENANT, TL, (x) => {
    x.wal = x.wal.filter((w) => w.name !== gone.name);
    x.gc_cutoff_lsn = gone.end_lsn!;
  });
  await timelines.store.delete(keys.wal(TENANT, TL, gone.name));
  await ingest.pollNow(TENANT, TL);
  t.notOk((await timelines.read(TENANT, TL)).wal.some((w) => w.name === gone.name), `${gone.name} (before the GC cutoff) stays gone`);
  t.equal(await timelines.store.head(keys.wal(TENANT, TL, gone.name)), undefined);

  // Two down: no quorum tip, nothing moves.
  const tipBefore = (await timelines.read(TENANT, TL)).last_record_lsn;
  await c.sks[1]!.close();
  t.equal(await ingest.quorumTip(TL), undefined, 'no majority answers: no tip');
  await ingest.pollNow(TENANT, TL);
  t.equal((await timelines.read(TENANT, TL)).last_record_lsn, tipBefore, 'the tip is never lowered nor guessed');
});

t.test('the loop polls on its own; a corrupt index is skipped; an unknown timeline is nothing', async (t) => {
  const TL = 'br-ingest-loop';
  const c = await streamingCompute(t, TL);
  const timelines = testTimelines(t);
  await timelines.create(TENANT, TL);
  await timelines.create(TENANT, 'br-unknown-to-sks');
  await timelines.store.put(keys.index(TENANT, 'br-corrupt'), Buffer.from('{not json'));
  await timelines.refresh(TENANT, 'br-corrupt'); // as after a bad write: listed, marked corrupt
  const warnings: string[] = [];
  const logger = { ...silentLogger, warn: (m: string) => warnings.push(m), child: () => logger } as typeof silentLogger;
  const ingest = startIngest({ timelines, safekeepers: c.members, intervalMs: 100, logger });
  t.teardown(() => ingest.close());
  await c.sql('CREATE TABLE u (x int)');
  await c.sql('INSERT INTO u SELECT generate_series(1, 100)');
  const lsn = await currentLsn(c.pgc);
  const deadline = Date.now() + 20_000;
  while (parseLsn((await timelines.read(TENANT, TL)).last_record_lsn) < lsn && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
  t.ok(parseLsn((await timelines.read(TENANT, TL)).last_record_lsn) >= lsn, 'the loop raised the tip');
  t.ok(warnings.includes('skipping a timeline whose index is corrupt'), 'corrupt index skipped with a warning');
  const other = await timelines.read(TENANT, 'br-unknown-to-sks');
  t.equal(other.last_record_lsn, '0/0');
  t.same(other.wal, []);
  t.equal((await timelines.store.getBuffer(keys.index(TENANT, 'br-corrupt'))).toString(), '{not json', 'the corrupt index is untouched');
});
