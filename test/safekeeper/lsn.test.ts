// lib/lsn.ts: LSN text round trips, rejection of malformed text, and WAL file names against the
// ones a real Postgres 15 computes (pg_walfile_name).
import t from 'tap';
import { formatLsn, historyFileName, parseLsn, parseSegmentFileName, prevSegmentOf, segmentFileName, segmentOf, segmentStart, WAL_SEGMENT_SIZE } from '../../lib/lsn.ts';
import { startTestPostgres } from '../helpers/postgres.ts';
import { withClient } from './helpers.ts';

const SEG = BigInt(WAL_SEGMENT_SIZE);

t.test('parse/format round trips', async (t) => {
  const fixed: [string, bigint][] = [
    ['0/0', 0n],
    ['0/16B3748', 0x16b3748n],
    ['16/B374D848', 0x16b374d848n],
    ['FFFFFFFF/FFFFFFFF', (1n << 64n) - 1n],
    ['1/0', 1n << 32n],
  ];
  for (const [text, v] of fixed) {
    t.equal(parseLsn(text), v, `parse ${text}`);
    t.equal(formatLsn(v), text, `format ${text}`);
  }
  t.equal(parseLsn('0/16b3748'), 0x16b3748n, 'lower case accepted');
  t.equal(parseLsn('00000000/0016B3748'.replace('0016B3748', '016B3748')), 0x16b3748n, 'leading zeros accepted');
  let x = 0x9e3779b97f4a7c15n;
  for (let i = 0; i < 2000; i++) {
    x = (x * 6364136223846793005n + 1442695040888963407n) & ((1n << 64n) - 1n);
    const v = i % 3 === 0 ? x >> 20n : x;
    if (parseLsn(formatLsn(v)) !== v) t.fail(`round trip of ${v}`);
  }
  t.pass('2000 pseudo-random LSNs round-trip');
  for (const bad of ['', '0', '/', '0/', '/0', '0/0/0', 'G/0', '0/123456789', '123456789/0', ' 0/0', '0/0 ', '-1/0', '0x1/0', '0/1\n']) {
    t.throws(() => parseLsn(bad), { code: 'CP_BAD_REQUEST' }, `rejects ${JSON.stringify(bad)}`);
  }
  t.throws(() => formatLsn(-1n), RangeError);
  t.throws(() => formatLsn(1n << 64n), RangeError);
});

t.test('segment names', async (t) => {
  t.equal(segmentFileName(1, 0n), '000000010000000000000000');
  t.equal(segmentFileName(1, 3n), '000000010000000000000003');
  t.equal(segmentFileName(2, 0x1ffn), '0000000200000001000000FF', '256 segments per xlogid');
  t.equal(segmentFileName(0xabcdef12, 0x100n), '00000000ABCDEF12'.slice(8) + '0000000100000000', 'tli in hex');
  t.equal(segmentOf(0x16b3748n), 1n);
  t.equal(prevSegmentOf(0x2000000n), 1n);
  t.equal(prevSegmentOf(0n), 0n);
  t.equal(segmentStart(3n), 3n * SEG);
  t.same(parseSegmentFileName('0000000200000001000000FF'), { tli: 2, segno: 0x1ffn, partial: false });
  t.same(parseSegmentFileName('0000000200000001000000FF.partial'), { tli: 2, segno: 0x1ffn, partial: true });
  for (const bad of ['000000000000000000000001', '000000010000000000000100', '00000001000000000000000g', '00000001000000000000001', '000000010000000000000001.part', '../000000010000000000000001', '00000002.history']) {
    t.equal(parseSegmentFileName(bad), undefined, `not a segment: ${bad}`);
  }
  t.equal(historyFileName(2), '00000002.history');
  t.equal(historyFileName(0x1a), '0000001A.history');
});

t.test('segment names agree with pg_walfile_name() of a real server', async (t) => {
  const pgc = await startTestPostgres(t, 'xenon-lsn-');
  const lsns = [0x1000000n, 0x16b3748n, 0x1ffffffn, 0x100000000n + 0x123n, 0x2ff0000000n + 0x0abcdefn, 0xabcdef0012345678n, 0x5000000n];
  await withClient(pgc.admin(), async (c) => {
    const tli = Number((await c.query<{ t: number }>('SELECT timeline_id AS t FROM pg_control_checkpoint()')).rows[0]!.t);
    for (const lsn of lsns) {
      // Both functions name the segment holding the byte *before* lsn (XLByteToPrevSeg): for an
      // LSN exactly at a segment start, the previous segment.
      const r = await c.query<{ f: string; o: number; n: string }>('SELECT file_name AS f, file_offset AS o, pg_walfile_name($1::pg_lsn) AS n FROM pg_walfile_name_offset($1::pg_lsn)', [formatLsn(lsn)]);
      const { f, o, n } = r.rows[0]!;
      t.equal(segmentFileName(tli, prevSegmentOf(lsn)), f, `${formatLsn(lsn)} → ${f}`);
      t.equal(n, f, 'pg_walfile_name agrees');
      t.equal(BigInt(o), lsn % SEG, 'offset');
      t.same(parseSegmentFileName(f), { tli, segno: prevSegmentOf(lsn), partial: false }, 'parses back');
      if (lsn % SEG !== 0n) t.equal(prevSegmentOf(lsn), segmentOf(lsn), 'inside a segment: the same segment');
      else t.equal(prevSegmentOf(lsn), segmentOf(lsn) - 1n, 'at a segment start: the previous one');
    }
  });
});
