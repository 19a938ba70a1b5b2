// The segment store and the control file without Postgres: writes across segment boundaries,
// pre-filled partial segments, recovery of the durable end from page headers, truncation,
// atomic control files (mode 0600) and their corruption detection.
import t from 'tap';
import { existsSync, readFileSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { WAL_SEGMENT_SIZE } from '../../lib/lsn.ts';
import { parseControl, readControl, writeControl, type ControlState } from '../../safekeeper/control.ts';
import { scanWrittenEnd, SegmentStore } from '../../safekeeper/store.ts';
import { tempDir } from './helpers.ts';

const SEG = BigInt(WAL_SEGMENT_SIZE);
const PAGE = 8192;

/** WAL-looking bytes for [start, end): a page header (magic, pageaddr) at every 8 KiB page start, 0xAB elsewhere. */
function walBytes(start: bigint, end: bigint): Buffer {
  const buf = Buffer.alloc(Number(end - start), 0xab);
  for (let p = start - (start % BigInt(PAGE)); p < end; p += BigInt(PAGE)) {
    const hdr = Buffer.alloc(16);
    hdr.writeUInt16LE(0xd110, 0);
    hdr.writeBigUInt64LE(p, 8);
    for (let i = 0; i < 16; i++) {
      const at = p + BigInt(i);
      if (at >= start && at < end) buf[Number(at - start)] = hdr[i]!;
    }
  }
  return buf;
}

t.test('writes across a segment boundary: complete one renamed, next one partial and zero-filled', async (t) => {
  const dir = tempDir(t, 'xenon-sk-store-');
  const syncs: number[] = [];
  const store = new SegmentStore(dir, { onSync: (s) => syncs.push(s) });
  const start = 2n * SEG - 10_000n;
  const data = walBytes(start, 2n * SEG + 5_000n);
  // Several chunks, one of them straddling the boundary.
  const end = await store.write(1, start, [data.subarray(0, 3000), data.subarray(3000, 12_000), data.subarray(12_000)]);
  await store.sync();
  t.equal(end, 2n * SEG + 5_000n);
  t.same(readdirSync(dir).sort(), ['000000010000000000000001', '000000010000000000000002.partial']);
  const a = readFileSync(join(dir, '000000010000000000000001'));
  const b = readFileSync(join(dir, '000000010000000000000002.partial'));
  t.equal(a.length, WAL_SEGMENT_SIZE);
  t.equal(b.length, WAL_SEGMENT_SIZE, 'partial pre-filled to full size');
  t.ok(a.subarray(WAL_SEGMENT_SIZE - 10_000).equals(data.subarray(0, 10_000)), 'tail of the first segment');
  t.ok(a.subarray(0, WAL_SEGMENT_SIZE - 10_000).every((x) => x === 0), 'never-written start is zeros');
  t.ok(b.subarray(0, 5000).equals(data.subarray(10_000)), 'head of the second segment');
  t.ok(b.subarray(5000).every((x) => x === 0), 'rest zeros');
  t.ok(syncs.length >= 3, `fdatasyncs: pre-fills, completed segment, batch (${syncs.length})`);
  await store.close();
  t.equal((statSync(join(dir, '000000010000000000000002.partial')).mode & 0o777), 0o600, 'segment files are 0600');
});

t.test('scanWrittenEnd: page headers with their own address, then the last non-zero byte', async (t) => {
  const base = 5n * SEG;
  const seg = Buffer.alloc(WAL_SEGMENT_SIZE);
  walBytes(base, base + 3n * BigInt(PAGE) + 100n).copy(seg, 0);
  t.equal(scanWrittenEnd(seg, base, 0), 3 * PAGE + 100);
  t.equal(scanWrittenEnd(seg, base, 2 * PAGE + 5), 3 * PAGE + 100, 'from inside a page');
  t.equal(scanWrittenEnd(seg, base, 3 * PAGE + 200), 3 * PAGE + 200, 'never below the known-durable start');
  const wrongAddr = Buffer.from(seg);
  wrongAddr.writeBigUInt64LE(base + 999n, 2 * PAGE + 8); // page 2 written for another address (stale)
  t.equal(scanWrittenEnd(wrongAddr, base, 0), 2 * PAGE, 'stops before a page with a wrong address');
  const hole = Buffer.from(seg);
  hole.fill(0, PAGE, 2 * PAGE); // page 1 lost
  t.equal(scanWrittenEnd(hole, base, 0), PAGE, 'stops at a missing page');
  t.equal(scanWrittenEnd(Buffer.alloc(WAL_SEGMENT_SIZE), base, 0), 0, 'empty segment');
});

t.test('recoverEnd: a stale control flush LSN is advanced to what the files hold', async (t) => {
  const dir = tempDir(t, 'xenon-sk-recover-');
  const store = new SegmentStore(dir);
  const start = 3n * SEG;
  await store.write(1, start, [walBytes(start, 4n * SEG + 20_000n)]);
  await store.sync();
  await store.close();
  t.equal(await store.recoverEnd(1, start + 100n), 4n * SEG + 20_000n, 'through the complete segment into the partial one');
  t.equal(await store.recoverEnd(1, 4n * SEG + 20_000n), 4n * SEG + 20_000n, 'already exact');
  // A complete segment still named .partial (crash between its sync and its rename).
  const d2 = tempDir(t, 'xenon-sk-recover2-');
  const s2 = new SegmentStore(d2);
  await s2.write(1, start, [walBytes(start, start + SEG - 1n)]);
  await s2.sync();
  await s2.close();
  const full = readFileSync(join(d2, '000000010000000000000003.partial'));
  full[WAL_SEGMENT_SIZE - 1] = 0xab;
  writeFileSync(join(d2, '000000010000000000000003.partial'), full);
  t.equal(await s2.recoverEnd(1, start), start + SEG);
  t.ok(existsSync(join(d2, '000000010000000000000003')), 'renamed to its final name');
  // A control flush LSN inside a segment whose file is gone: fall back to the segment start.
  const d3 = tempDir(t, 'xenon-sk-recover3-');
  t.equal(await new SegmentStore(d3).recoverEnd(1, 7n * SEG + 123n), 7n * SEG, 'missing file: back to its segment start');
});

t.test('truncate: zero the tail, make it partial again, drop later segments and newer timelines', async (t) => {
  const dir = tempDir(t, 'xenon-sk-trunc-');
  const store = new SegmentStore(dir);
  const start = 1n * SEG;
  await store.write(1, start, [walBytes(start, 3n * SEG + 4096n)]);
  await store.sync();
  await store.writeHistory(2, Buffer.from('1\t0/2800000\tno recovery target specified\n'));
  await store.close();
  writeFileSync(join(dir, '000000020000000000000002.partial'), Buffer.alloc(WAL_SEGMENT_SIZE));
  const cut = 2n * SEG + 777n;
  await store.truncate(1, cut);
  t.same(readdirSync(dir).sort(), ['000000010000000000000001', '000000010000000000000002.partial']);
  const f = readFileSync(join(dir, '000000010000000000000002.partial'));
  t.ok(f.subarray(777).every((x) => x === 0), 'zeroed past the cut');
  t.ok(f.subarray(0, 777).equals(walBytes(2n * SEG, cut)), 'kept before it');
  await store.truncate(1, 2n * SEG);
  t.same(readdirSync(dir).sort(), ['000000010000000000000001'], 'a cut at a segment start removes that segment');
});

t.test('control file: atomic, 0600, validated', async (t) => {
  const dir = tempDir(t, 'xenon-sk-control-');
  const s: ControlState = {
    timelineId: 'br-a', generation: 7, compute: { host: '127.0.0.1', port: 5432, user: 'admin', password: 'sécret' },
    systemId: '7301234567890123456', pgTimeline: 2, flushLsn: 0x3000060n, history: [{ tli: 1, switchLsn: 0x2800000n }],
  };
  await writeControl(dir, s);
  t.same(await readControl(dir), s, 'round trip');
  t.equal(statSync(join(dir, 'control.json')).mode & 0o777, 0o600, 'mode 0600 (it holds the compute password)');
  t.same(readdirSync(dir), ['control.json'], 'no temporary file left');
  const good = readFileSync(join(dir, 'control.json'), 'utf8');
  const corruptions: [string, RegExp][] = [
    [good.slice(0, good.length / 2), /not JSON/],
    ['null', /not an object/],
    [good.replace('"version": 1', '"version": 99'), /format version/],
    [good.replace('"generation": 7', '"generation": -7'), /generation/],
    [good.replace('"flush_lsn": "0/3000060"', '"flush_lsn": "nope"'), /not an LSN/],
    [good.replace('"port": 5432', '"port": 0'), /compute/],
    [good.replace('"system_id": "7301234567890123456"', '"system_id": 5'), /system_id/],
    [good.replace('"tli": 1', '"tli": 0'), /history/],
  ];
  for (const [text, why] of corruptions) {
    t.throws(() => parseControl(text, '/x/control.json'), { code: 'SK_CONTROL_FILE_CORRUPT', message: why }, `rejected: ${why}`);
  }
});

t.test('standby status update framing', async (t) => {
  const { standbyStatusUpdate, standbyStatusUpdateFrame, parseReplicationMessage } = await import('../../safekeeper/protocol.ts');
  const payload = standbyStatusUpdate(0x1234n, 0x1000n, 0n, true, 42n);
  const frame = standbyStatusUpdateFrame(0x1234n, 0x1000n, 0n, true, 42n);
  t.equal(frame[0], 0x64, 'CopyData');
  t.equal(frame.readInt32BE(1), 4 + payload.length, 'length includes itself');
  t.ok(frame.subarray(5).equals(payload), 'payload is the status update');
  t.equal(payload.length, 34);
  const w = Buffer.concat([Buffer.from('w'), Buffer.alloc(24), Buffer.from('abc')]);
  w.writeBigUInt64BE(0x10n, 1);
  t.match(parseReplicationMessage(w), { tag: 'w', dataStart: 0x10n });
  t.throws(() => parseReplicationMessage(Buffer.from('x')), /unexpected replication message/);
  t.throws(() => parseReplicationMessage(Buffer.from('w')), /too short/);
});

t.test('the next segment is pre-filled in the background once the current one is half full', async (t) => {
  const dir = tempDir(t, 'xenon-sk-prealloc-');
  const store = new SegmentStore(dir);
  const start = 4n * SEG;
  await store.write(1, start, [walBytes(start, start + SEG / 2n + 100n)]);
  await store.sync();
  await waitUntil(() => existsSync(join(dir, '000000010000000000000005.partial.prealloc')) && statSync(join(dir, '000000010000000000000005.partial.prealloc')).size === WAL_SEGMENT_SIZE);
  t.pass('000000010000000000000005.partial.prealloc prepared');
  const listed = (await store.list()).map((f) => f.name);
  t.same(listed, ['000000010000000000000004.partial'], 'not listed as WAL');
  await store.write(1, start + SEG / 2n + 100n, [walBytes(start + SEG / 2n + 100n, start + SEG + 10n)]);
  await store.sync();
  t.same(readdirSync(dir).sort(), ['000000010000000000000004', '000000010000000000000005.partial'], 'used: renamed into place');
  const next = readFileSync(join(dir, '000000010000000000000005.partial'));
  t.ok(next.subarray(0, 10).equals(walBytes(start + SEG, start + SEG + 10n)) && next.subarray(10).every((x) => x === 0));
  // Half-way through this one too, then closed (a timeline switch, a shutdown): the spare goes.
  await store.write(1, start + SEG + 10n, [walBytes(start + SEG + 10n, start + SEG + SEG / 2n + 10n)]);
  await store.close();
  t.same(readdirSync(dir).sort(), ['000000010000000000000004', '000000010000000000000005.partial'], 'no spare left after close');
});

async function waitUntil(fn: () => boolean): Promise<void> {
  for (let i = 0; i < 200 && !fn(); i++) await new Promise((r) => setTimeout(r, 25));
}
