import t from 'tap';
import {
  AUTH_CODES,
  DatabaseError,
  FrontendReader,
  MAX_STARTUP_PACKET,
  MESSAGE_TYPES,
  NoticeMessage,
  Parser,
  PgWireError,
  STARTUP_CODES,
  backend,
  parseErrorFields,
  parsePasswordMessage,
  parseSaslInitialResponse,
  serialize,
} from '../../proxy/pgwire/index.ts';
import type {
  AuthenticationSASLContinueMessage,
  AuthenticationSASLMessage,
  BackendKeyDataMessage,
  BackendMessage,
  FrontendMessage,
  ParameterStatusMessage,
  PgWireErrorCode,
  ReadyForQueryMessage,
  StartupPacket,
} from '../../proxy/pgwire/index.ts';
import { prng } from '../helpers/prng.ts';

// ---------------------------------------------------------------- helpers

/** The assertions the helpers use; a subtest's `t` has them too. */
type Assert = Pick<typeof t, 'ok' | 'equal' | 'same' | 'fail'>;

function int32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeInt32BE(n | 0);
  return b;
}

/** A startup-phase packet: int32 length (computed unless given), int32 code, body. */
function startupPacket(code: number, body: Buffer = Buffer.alloc(0), length?: number): Buffer {
  return Buffer.concat([int32(length ?? 8 + body.length), int32(code), body]);
}

/** StartupMessage body from raw strings: each is written followed by a NUL; `terminator` adds the final NUL. */
function paramsBody(strings: Array<string | Buffer>, terminator = true): Buffer {
  const parts: Buffer[] = [];
  for (const s of strings) parts.push(typeof s === 'string' ? Buffer.from(s) : s, Buffer.from([0]));
  if (terminator) parts.push(Buffer.from([0]));
  return Buffer.concat(parts);
}

function startupMessage(params: Record<string, string>, version: number = STARTUP_CODES.PROTOCOL_3_0): Buffer {
  return startupPacket(version, paramsBody(Object.entries(params).flat()));
}

function typed(type: number, body: Buffer): Buffer {
  return Buffer.concat([Buffer.from([type]), int32(body.length + 4), body]);
}

type Read = { startup: unknown } | { message: { type: number; body: string } };

function normStartup(p: StartupPacket): unknown {
  return p.kind === 'startup' ? { ...p, params: [...p.params] } : p;
}
function normMessage(m: FrontendMessage): { type: number; body: string } {
  return { type: m.type, body: m.body.toString('hex') };
}

/**
 * Drives a reader the way the proxy does: startup packets until a StartupMessage, then typed
 * messages. Returns false if a read would need more bytes.
 */
function drive(r: FrontendReader, state: { phase: 'startup' | 'message' }, out: Read[]): void {
  for (;;) {
    if (state.phase === 'startup') {
      const p = r.readStartup();
      if (!p) return;
      out.push({ startup: normStartup(p) });
      if (p.kind === 'startup') state.phase = 'message';
    } else {
      const m = r.readMessage();
      if (!m) return;
      out.push({ message: normMessage(m) });
    }
  }
}

function readWhole(bytes: Buffer): Read[] {
  const r = new FrontendReader();
  const out: Read[] = [];
  r.push(bytes);
  drive(r, { phase: 'startup' }, out);
  return out;
}

/** Feeds `bytes` split at every offset, and byte by byte; every way must give `expected`. */
function checkSplits(t: Assert, name: string, bytes: Buffer, expected: Read[]): void {
  let bad = 0;
  for (let k = 0; k <= bytes.length; k++) {
    const r = new FrontendReader();
    const out: Read[] = [];
    const state = { phase: 'startup' as 'startup' | 'message' };
    r.push(bytes.subarray(0, k));
    drive(r, state, out);
    r.push(bytes.subarray(k));
    drive(r, state, out);
    if (JSON.stringify(out) !== JSON.stringify(expected) || r.buffered !== 0) {
      if (bad++ === 0) t.same(out, expected, `${name}: split at ${k}`);
    }
  }
  t.equal(bad, 0, `${name}: same result split at each of ${bytes.length + 1} offsets`);

  const r = new FrontendReader();
  const out: Read[] = [];
  const state = { phase: 'startup' as 'startup' | 'message' };
  for (let i = 0; i < bytes.length; i++) {
    r.push(bytes.subarray(i, i + 1));
    drive(r, state, out);
  }
  t.same(out, expected, `${name}: byte by byte`);
  t.equal(r.buffered, 0, `${name}: nothing left over`);
}

function expectCode(t: Assert, fn: () => unknown, code: PgWireErrorCode, name: string): void {
  try {
    fn();
    t.fail(`${name}: expected ${code}, nothing thrown`);
  } catch (err) {
    t.ok(err instanceof PgWireError, `${name}: throws PgWireError`);
    t.equal((err as PgWireError).code, code, `${name}: ${code}`);
  }
}

/** Pushes `bytes` and reads one startup packet. */
function startupOf(bytes: Buffer): StartupPacket | null {
  const r = new FrontendReader();
  r.push(bytes);
  return r.readStartup();
}

function parseBackend(bytes: Buffer): BackendMessage[] {
  const msgs: BackendMessage[] = [];
  new Parser().parse(bytes, (m) => msgs.push(m));
  return msgs;
}


// ---------------------------------------------------------------- framing

t.test('frontend packets round-trip split at every offset', async (t) => {
  const params = { user: 'alice', database: 'neondb', options: 'endpoint=ep-cool-darkness-123456', application_name: 'psql ✓' };
  const startup = startupMessage(params);
  const startupRead: Read = { startup: { kind: 'startup', major: 3, minor: 0, params: Object.entries(params) } };

  checkSplits(t, 'ssl', startupPacket(STARTUP_CODES.SSL_REQUEST), [{ startup: { kind: 'ssl' } }]);
  checkSplits(t, 'gssenc', startupPacket(STARTUP_CODES.GSSENC_REQUEST), [{ startup: { kind: 'gssenc' } }]);
  checkSplits(t, 'cancel', startupPacket(STARTUP_CODES.CANCEL_REQUEST, Buffer.concat([int32(4242), int32(-123456789)])), [
    { startup: { kind: 'cancel', processId: 4242, secretKey: -123456789 } },
  ]);
  checkSplits(t, 'startup', startup, [startupRead]);
  checkSplits(t, 'startup 3.2', startupMessage({ user: 'u' }, (3 << 16) | 2), [
    { startup: { kind: 'startup', major: 3, minor: 2, params: [['user', 'u']] } },
  ]);
  checkSplits(t, 'empty value', startupMessage({ user: 'u', options: '' }), [
    { startup: { kind: 'startup', major: 3, minor: 0, params: [['user', 'u'], ['options', '']] } },
  ]);

  const password = typed(MESSAGE_TYPES.PASSWORD, Buffer.from('s3cret\0'));
  const sasl = serialize.sendSASLInitialResponseMessage('SCRAM-SHA-256', 'n,,n=,r=abcdef');
  const saslFinal = serialize.sendSCRAMClientFinalMessage('c=biws,r=abcdefXYZ,p=proof');
  const query = typed(MESSAGE_TYPES.QUERY, Buffer.from('select 1\0'));
  const terminate = typed(MESSAGE_TYPES.TERMINATE, Buffer.alloc(0));
  const msg = (b: Buffer): Read => ({ message: { type: b[0]!, body: b.subarray(5).toString('hex') } });

  // SSLRequest, then (in real life after TLS) startup and pipelined messages in one chunk.
  checkSplits(t, 'pipelined startup + password + query + terminate',
    Buffer.concat([startupPacket(STARTUP_CODES.SSL_REQUEST), startup, password, query, terminate]),
    [{ startup: { kind: 'ssl' } }, startupRead, msg(password), msg(query), msg(terminate)]);
  checkSplits(t, 'startup + SASL exchange', Buffer.concat([startup, sasl, saslFinal]), [startupRead, msg(sasl), msg(saslFinal)]);

  // A bigger packet near the cap, and a message near maxMessage.
  const big = { user: 'u', options: 'x'.repeat(MAX_STARTUP_PACKET - 8 - 'user\0u\0options\0'.length - 2) };
  const bigPacket = startupMessage(big);
  t.equal(bigPacket.length, MAX_STARTUP_PACKET, 'packet of exactly MAX_STARTUP_PACKET bytes');
  t.same(readWhole(bigPacket), [{ startup: { kind: 'startup', major: 3, minor: 0, params: Object.entries(big) } }]);

  const r = new FrontendReader({ maxMessage: 100 });
  r.push(typed(0x70, Buffer.alloc(100, 1)));
  t.equal(r.readMessage()?.body.length, 100, 'body of exactly maxMessage is accepted');
});

t.test('many tiny chunks: linear, and drain returns the rest', async (t) => {
  const r = new FrontendReader();
  const body = Buffer.alloc(200_000, 0x61);
  const bytes = typed(MESSAGE_TYPES.QUERY, body);
  const start = process.hrtime.bigint();
  let early = 0;
  for (let i = 0; i < bytes.length; i++) {
    r.push(bytes.subarray(i, i + 1));
    if (i < bytes.length - 1 && r.readMessage() !== null) early++;
  }
  t.equal(early, 0, 'incomplete until the last byte');
  const m = r.readMessage();
  const ms = Number(process.hrtime.bigint() - start) / 1e6;
  t.ok(m && m.body.equals(body), 'message reassembled from 1-byte chunks');
  t.ok(ms < 5000, `took ${ms.toFixed(0)} ms`);

  r.push(Buffer.from([1, 2]));
  r.push(Buffer.from([3]));
  t.equal(r.buffered, 3);
  t.same([...r.drain()], [1, 2, 3]);
  t.equal(r.buffered, 0);
  t.equal(r.drain().length, 0);
});

// ---------------------------------------------------------------- pg-protocol interop (frontend)

t.test("pg-protocol's serialize parses as expected", async (t) => {
  const params = { user: 'bob', database: 'db1', options: '-c search_path=x endpoint=ep-a-b-123456' };
  const p = startupOf(serialize.startup(params));
  t.same(p && normStartup(p), {
    kind: 'startup', major: 3, minor: 0,
    params: [...Object.entries(params), ['client_encoding', 'UTF8']],
  });
  t.same(startupOf(serialize.requestSsl()), { kind: 'ssl' });
  t.same(startupOf(serialize.cancel(31337, 0x7fffffff)), { kind: 'cancel', processId: 31337, secretKey: 0x7fffffff });

  // BackendKeyData → pg-protocol Parser → serialize.cancel → FrontendReader keeps the same numbers.
  for (const [pid, key] of [[1, -5], [0x7fffffff, 0xdeadbeef | 0], [2, 0xdeadbeef]] as const) {
    const [kd] = parseBackend(backend.backendKeyData(pid, key)) as BackendKeyDataMessage[];
    const c = startupOf(serialize.cancel(kd!.processID, kd!.secretKey));
    t.same(c, { kind: 'cancel', processId: pid | 0, secretKey: key | 0 }, `key data ${pid}/${key} round-trips (signed)`);
  }

  const r = new FrontendReader();
  r.push(Buffer.concat([serialize.password('pässword'), serialize.sendSASLInitialResponseMessage('SCRAM-SHA-256', 'n,,n=,r=xyz')]));
  const pw = r.readMessage()!;
  t.equal(pw.type, MESSAGE_TYPES.PASSWORD);
  t.equal(parsePasswordMessage(pw.body), 'pässword');
  const sasl = r.readMessage()!;
  const parsed = parseSaslInitialResponse(sasl.body);
  t.equal(parsed.mechanism, 'SCRAM-SHA-256');
  t.equal(parsed.data?.toString(), 'n,,n=,r=xyz');
  t.equal(r.readMessage(), null);
});

// ---------------------------------------------------------------- rejections

t.test('startup rejections', async (t) => {
  const tooLong = new FrontendReader();
  tooLong.push(int32(10_001));
  expectCode(t, () => tooLong.readStartup(), 'PROXY_STARTUP_TOO_LARGE', 'length 10_001 after 4 bytes');
  t.equal(tooLong.buffered, 4, 'nothing more was needed');

  const lengthWordOnly = (n: number) => () => { const r = new FrontendReader(); r.push(int32(n)); return r.readStartup(); };
  expectCode(t, lengthWordOnly(3), 'PROXY_PROTOCOL_VIOLATION', 'length 3');
  expectCode(t, lengthWordOnly(7), 'PROXY_PROTOCOL_VIOLATION', 'length 7');
  expectCode(t, lengthWordOnly(0xffffffff), 'PROXY_PROTOCOL_VIOLATION', 'length 0xFFFFFFFF (negative)');
  expectCode(t, lengthWordOnly(0x80000000), 'PROXY_PROTOCOL_VIOLATION', 'length 0x80000000 (most negative)');
  expectCode(t, lengthWordOnly(0x7fffffff), 'PROXY_STARTUP_TOO_LARGE', 'length 0x7FFFFFFF');

  expectCode(t, () => startupOf(startupPacket(STARTUP_CODES.SSL_REQUEST, Buffer.alloc(4))), 'PROXY_PROTOCOL_VIOLATION', 'ssl with length 12');
  expectCode(t, () => startupOf(startupPacket(STARTUP_CODES.SSL_REQUEST, Buffer.alloc(0), 12)), 'PROXY_PROTOCOL_VIOLATION', 'ssl length 12, rejected after 8 bytes');
  expectCode(t, () => startupOf(startupPacket(STARTUP_CODES.GSSENC_REQUEST, Buffer.alloc(4))), 'PROXY_PROTOCOL_VIOLATION', 'gssenc with length 12');
  expectCode(t, () => startupOf(startupPacket(STARTUP_CODES.CANCEL_REQUEST, Buffer.alloc(4))), 'PROXY_PROTOCOL_VIOLATION', 'cancel with length 12');
  expectCode(t, () => startupOf(startupPacket(STARTUP_CODES.CANCEL_REQUEST, Buffer.alloc(12))), 'PROXY_PROTOCOL_VIOLATION', 'cancel with length 20');

  const v3 = STARTUP_CODES.PROTOCOL_3_0;
  expectCode(t, () => startupOf(startupPacket(v3, paramsBody(['database', 'x']))), 'PROXY_PROTOCOL_VIOLATION', 'missing user');
  expectCode(t, () => startupOf(startupPacket(v3, paramsBody(['user', '']))), 'PROXY_PROTOCOL_VIOLATION', 'empty user');
  expectCode(t, () => startupOf(startupPacket(v3, paramsBody(['user', 'a'], false))), 'PROXY_PROTOCOL_VIOLATION', 'missing final NUL');
  expectCode(t, () => startupOf(startupPacket(v3)), 'PROXY_PROTOCOL_VIOLATION', 'no parameters at all');
  expectCode(t, () => startupOf(startupPacket(v3, paramsBody(['user', 'a', 'database']))), 'PROXY_PROTOCOL_VIOLATION', 'odd number of strings');
  expectCode(t, () => startupOf(startupPacket(v3, paramsBody(['user']))), 'PROXY_PROTOCOL_VIOLATION', 'odd number of strings (key only)');
  expectCode(t, () => startupOf(startupPacket(v3, Buffer.from('user\0a'))), 'PROXY_PROTOCOL_VIOLATION', 'unterminated value');
  expectCode(t, () => startupOf(startupPacket(v3, Buffer.concat([paramsBody(['user', 'a']), Buffer.from('x')]))), 'PROXY_PROTOCOL_VIOLATION', 'bytes after terminator');
  expectCode(t, () => startupOf(startupPacket(v3, paramsBody(['user', Buffer.from([0xff, 0xfe])]))), 'PROXY_PROTOCOL_VIOLATION', 'invalid UTF-8 value');
  expectCode(t, () => startupOf(startupPacket(v3, paramsBody(['user', 'a', Buffer.from([0xc3, 0x28]), 'v']))), 'PROXY_PROTOCOL_VIOLATION', 'invalid UTF-8 key');
  expectCode(t, () => startupOf(startupPacket(v3, paramsBody(['user', 'a', 'database', 'x', 'user', 'b']))), 'PROXY_PROTOCOL_VIOLATION', 'duplicate key');
  expectCode(t, () => startupOf(startupPacket(2 << 16, paramsBody(['user', 'a']))), 'PROXY_UNSUPPORTED_PROTOCOL', 'major 2');
  expectCode(t, () => startupOf(startupPacket(4 << 16, paramsBody(['user', 'a']))), 'PROXY_UNSUPPORTED_PROTOCOL', 'major 4');
  expectCode(t, () => startupOf(startupPacket((1234 << 16) | 5681, Buffer.alloc(0), 8)), 'PROXY_UNSUPPORTED_PROTOCOL', 'unknown 1234.5681 request');
  expectCode(t, () => startupOf(startupPacket(4 << 16, Buffer.alloc(0), 100)), 'PROXY_UNSUPPORTED_PROTOCOL', 'major 4 rejected after 8 bytes');

  // A failed read consumes nothing and fails the same way again.
  const r = new FrontendReader();
  r.push(startupPacket(v3, paramsBody(['database', 'x'])));
  const before = r.buffered;
  expectCode(t, () => r.readStartup(), 'PROXY_PROTOCOL_VIOLATION', 'first');
  expectCode(t, () => r.readStartup(), 'PROXY_PROTOCOL_VIOLATION', 'again');
  t.equal(r.buffered, before);

  const err = (() => { try { startupOf(startupPacket(v3, paramsBody(['user', Buffer.from([0xff])]))); } catch (e) { return e as PgWireError; } })();
  t.equal(err?.sqlstate, '08P01');
  t.notMatch(err?.message ?? '', /\ufffd/, 'message does not echo client bytes');
});

t.test('typed message rejections', async (t) => {
  const header = (type: number, len: number) => Buffer.concat([Buffer.from([type]), int32(len)]);
  const read = (b: Buffer, maxMessage?: number) => () => {
    const r = new FrontendReader(maxMessage === undefined ? {} : { maxMessage });
    r.push(b);
    return r.readMessage();
  };
  expectCode(t, read(header(0x70, 2)), 'PROXY_PROTOCOL_VIOLATION', 'length 2');
  expectCode(t, read(header(0x70, 0)), 'PROXY_PROTOCOL_VIOLATION', 'length 0');
  expectCode(t, read(header(0x70, -1)), 'PROXY_PROTOCOL_VIOLATION', 'length -1');
  expectCode(t, read(header(0x70, 0x80000000)), 'PROXY_PROTOCOL_VIOLATION', 'length -2^31');
  expectCode(t, read(header(0x70, 1024 * 1024 + 5)), 'PROXY_MESSAGE_TOO_LARGE', 'default max 1 MiB, after 5 bytes');
  t.equal(read(header(0x70, 1024 * 1024 + 4))(), null, 'exactly 1 MiB body waits for more');
  expectCode(t, read(header(0x70, 105), 100), 'PROXY_MESSAGE_TOO_LARGE', 'above maxMessage 100');
  expectCode(t, read(header(0x70, 0x7fffffff), 100), 'PROXY_MESSAGE_TOO_LARGE', 'length 2^31-1');
  t.equal(read(header(0x58, 4))()?.body.length, 0, 'length 4 is an empty body');
  t.throws(() => new FrontendReader({ maxMessage: -1 }), RangeError);
});

t.test('password and SASLInitialResponse bodies', async (t) => {
  t.equal(parsePasswordMessage(Buffer.from('pw\0')), 'pw');
  t.equal(parsePasswordMessage(Buffer.from('\0')), '');
  expectCode(t, () => parsePasswordMessage(Buffer.alloc(0)), 'PROXY_PROTOCOL_VIOLATION', 'empty body');
  expectCode(t, () => parsePasswordMessage(Buffer.from('pw')), 'PROXY_PROTOCOL_VIOLATION', 'no NUL');
  expectCode(t, () => parsePasswordMessage(Buffer.from('pw\0x\0')), 'PROXY_PROTOCOL_VIOLATION', 'two strings');
  expectCode(t, () => parsePasswordMessage(Buffer.from('pw\0\0')), 'PROXY_PROTOCOL_VIOLATION', 'trailing NUL');
  expectCode(t, () => parsePasswordMessage(Buffer.from([0xff, 0])), 'PROXY_PROTOCOL_VIOLATION', 'invalid UTF-8');

  const sir = (mech: string, len: number, data: Buffer) => Buffer.concat([Buffer.from(mech + '\0'), int32(len), data]);
  t.same(parseSaslInitialResponse(sir('SCRAM-SHA-256', 3, Buffer.from('abc'))), { mechanism: 'SCRAM-SHA-256', data: Buffer.from('abc') });
  t.same(parseSaslInitialResponse(sir('SCRAM-SHA-256', -1, Buffer.alloc(0))), { mechanism: 'SCRAM-SHA-256', data: null });
  t.same(parseSaslInitialResponse(sir('SCRAM-SHA-256', 0, Buffer.alloc(0))).data, Buffer.alloc(0));
  expectCode(t, () => parseSaslInitialResponse(Buffer.alloc(0)), 'PROXY_PROTOCOL_VIOLATION', 'empty');
  expectCode(t, () => parseSaslInitialResponse(Buffer.from('SCRAM')), 'PROXY_PROTOCOL_VIOLATION', 'unterminated mechanism');
  expectCode(t, () => parseSaslInitialResponse(sir('', 0, Buffer.alloc(0))), 'PROXY_PROTOCOL_VIOLATION', 'empty mechanism');
  expectCode(t, () => parseSaslInitialResponse(Buffer.from('M\0\0\0')), 'PROXY_PROTOCOL_VIOLATION', 'truncated length');
  expectCode(t, () => parseSaslInitialResponse(sir('M', 4, Buffer.from('abc'))), 'PROXY_PROTOCOL_VIOLATION', 'length beyond body');
  expectCode(t, () => parseSaslInitialResponse(sir('M', 2, Buffer.from('abc'))), 'PROXY_PROTOCOL_VIOLATION', 'trailing bytes');
  expectCode(t, () => parseSaslInitialResponse(sir('M', -1, Buffer.from('a'))), 'PROXY_PROTOCOL_VIOLATION', 'null with trailing bytes');
  expectCode(t, () => parseSaslInitialResponse(sir('M', -2, Buffer.alloc(0))), 'PROXY_PROTOCOL_VIOLATION', 'length -2');
  expectCode(t, () => parseSaslInitialResponse(sir('M', 0x7fffffff, Buffer.alloc(0))), 'PROXY_PROTOCOL_VIOLATION', 'huge length');
});

// ---------------------------------------------------------------- backend serializers

t.test('backend serializers decode with pg-protocol Parser', async (t) => {
  const [ok] = parseBackend(backend.authenticationOk());
  t.equal(ok?.name, 'authenticationOk');
  t.same([...backend.authenticationOk()], [0x52, 0, 0, 0, 8, 0, 0, 0, AUTH_CODES.OK]);
  t.equal(parseBackend(backend.authenticationCleartextPassword())[0]?.name, 'authenticationCleartextPassword');

  const [sasl] = parseBackend(backend.authenticationSASL(['SCRAM-SHA-256-PLUS', 'SCRAM-SHA-256'])) as AuthenticationSASLMessage[];
  t.equal(sasl?.name, 'authenticationSASL');
  t.same(sasl?.mechanisms, ['SCRAM-SHA-256-PLUS', 'SCRAM-SHA-256']);

  const first = 'r=clientnonceServerNonce,s=c2FsdA==,i=4096';
  for (const data of [first, Buffer.from(first)]) {
    const [m] = parseBackend(backend.authenticationSASLContinue(data)) as AuthenticationSASLContinueMessage[];
    t.equal(m?.name, 'authenticationSASLContinue');
    t.equal(m?.data, first);
  }
  const [fin] = parseBackend(backend.authenticationSASLFinal('v=c2lnbmF0dXJl')) as AuthenticationSASLContinueMessage[];
  t.equal(fin?.name, 'authenticationSASLFinal');
  t.equal(fin?.data, 'v=c2lnbmF0dXJl');

  const [ps] = parseBackend(backend.parameterStatus('server_version', '16.4 ✓')) as ParameterStatusMessage[];
  t.equal(ps?.name, 'parameterStatus');
  t.equal(ps?.parameterName, 'server_version');
  t.equal(ps?.parameterValue, '16.4 ✓');

  const [kd] = parseBackend(backend.backendKeyData(12345, -987654321)) as BackendKeyDataMessage[];
  t.equal(kd?.name, 'backendKeyData');
  t.equal(kd?.processID, 12345);
  t.equal(kd?.secretKey, -987654321);

  for (const s of ['I', 'T', 'E'] as const) {
    const [rq] = parseBackend(backend.readyForQuery(s)) as ReadyForQueryMessage[];
    t.equal(rq?.name, 'readyForQuery');
    t.equal(rq?.status, s);
  }

  const errBytes = backend.errorResponse({ severity: 'ERROR', code: '28P01', message: 'password authentication failed for user "bob"', detail: 'd', hint: 'h' });
  const [err] = parseBackend(errBytes);
  t.ok(err instanceof DatabaseError, 'ErrorResponse → DatabaseError');
  const de = err as DatabaseError;
  t.equal(de.severity, 'ERROR');
  t.equal(de.code, '28P01');
  t.equal(de.message, 'password authentication failed for user "bob"');
  t.equal(de.detail, 'd');
  t.equal(de.hint, 'h');
  t.same(parseErrorFields(errBytes.subarray(5)), { S: 'ERROR', V: 'ERROR', C: '28P01', M: 'password authentication failed for user "bob"', D: 'd', H: 'h' });

  const [fatal] = parseBackend(backend.errorResponse({ code: '08P01', message: 'bad\0 nul' })) as DatabaseError[];
  t.equal(fatal?.severity, 'FATAL', 'default severity FATAL');
  t.equal(fatal?.message, 'bad nul', 'NUL stripped from text');
  t.equal(fatal?.detail, undefined);

  const [notice] = parseBackend(backend.noticeResponse({ code: '01000', message: 'hello', severity: 'WARNING' }));
  t.ok(notice instanceof NoticeMessage);
  t.equal((notice as NoticeMessage).severity, 'WARNING');
  t.equal((notice as NoticeMessage).message, 'hello');
  t.equal((parseBackend(backend.noticeResponse({ code: '00000', message: 'x' }))[0] as NoticeMessage).severity, 'NOTICE');

  // pg-protocol does not decode 'v': check the bytes.
  const npv = backend.negotiateProtocolVersion(0, ['_pq_.foo', '_pq_.bar']);
  t.equal(npv[0], 0x76);
  t.equal(npv.readInt32BE(1), npv.length - 1);
  t.equal(npv.readInt32BE(5), STARTUP_CODES.PROTOCOL_3_0, 'newest version as full protocol code 3.0');
  t.equal(npv.readInt32BE(9), 2);
  t.equal(npv.subarray(13).toString(), '_pq_.foo\0_pq_.bar\0');
  t.equal(backend.negotiateProtocolVersion(2, []).readInt32BE(5), (3 << 16) | 2);

  // All of them back to back, split at every offset, through one Parser.
  const all = [
    backend.authenticationSASL(['SCRAM-SHA-256']), backend.authenticationSASLContinue(first),
    backend.authenticationSASLFinal('v=x'), backend.authenticationOk(), backend.parameterStatus('a', 'b'),
    backend.backendKeyData(1, 2), backend.readyForQuery('I'), errBytes,
  ];
  const joined = Buffer.concat(all);
  const names = all.map((b) => parseBackend(b)[0]?.name);
  let bad = 0;
  for (let k = 0; k <= joined.length; k++) {
    const p = new Parser();
    const got: string[] = [];
    // Copies: pg-protocol's Parser may compact leftovers into a buffer it was given earlier.
    p.parse(Buffer.from(joined.subarray(0, k)), (m) => got.push(m.name));
    p.parse(Buffer.from(joined.subarray(k)), (m) => got.push(m.name));
    if (JSON.stringify(got) !== JSON.stringify(names)) bad++;
  }
  t.equal(bad, 0, 'backend stream decodes the same at every split');

  t.throws(() => backend.parameterStatus('a\0b', 'x'), TypeError);
  t.throws(() => backend.authenticationSASL([]), RangeError);
  t.throws(() => backend.backendKeyData(2 ** 32, 1), RangeError);
  t.throws(() => backend.errorResponse({ code: 'bad', message: 'x' }), RangeError);
});

t.test('parseErrorFields rejects malformed bodies', async (t) => {
  t.same(parseErrorFields(Buffer.from([0])), {});
  expectCode(t, () => parseErrorFields(Buffer.alloc(0)), 'PROXY_PROTOCOL_VIOLATION', 'empty');
  expectCode(t, () => parseErrorFields(Buffer.from('Sx')), 'PROXY_PROTOCOL_VIOLATION', 'unterminated');
  expectCode(t, () => parseErrorFields(Buffer.from('Sx\0')), 'PROXY_PROTOCOL_VIOLATION', 'no final zero');
  expectCode(t, () => parseErrorFields(Buffer.from('Sx\0\0M')), 'PROXY_PROTOCOL_VIOLATION', 'trailing bytes');
});

// ---------------------------------------------------------------- fuzz


t.test('fuzz: only PgWireError, bounded buffering', async (t) => {
  const rnd = prng(0x5eed_c0de);
  const int = (n: number) => Math.floor(rnd() * n);
  const bytes = (n: number) => Buffer.from(Array.from({ length: n }, () => int(256)));
  const pick = <T>(xs: readonly T[]): T => xs[int(xs.length)]!;
  const MAX_MESSAGE = 4096;

  const valid = (): Buffer => {
    const parts: Buffer[] = [];
    if (rnd() < 0.3) parts.push(startupPacket(pick([STARTUP_CODES.SSL_REQUEST, STARTUP_CODES.GSSENC_REQUEST])));
    if (rnd() < 0.1) return Buffer.concat([...parts, serialize.cancel(int(2 ** 31), int(2 ** 31))]);
    const params: Record<string, string> = { user: 'u'.repeat(1 + int(20)) };
    for (let i = int(4); i > 0; i--) params[`k${i}`] = 'v'.repeat(int(rnd() < 0.1 ? 3000 : 30));
    parts.push(startupMessage(params, STARTUP_CODES.PROTOCOL_3_0 | (rnd() < 0.1 ? int(3) : 0)));
    for (let i = int(4); i > 0; i--) {
      parts.push(pick([
        () => serialize.password('pw' + int(1000)),
        () => serialize.sendSASLInitialResponseMessage('SCRAM-SHA-256', 'n,,n=,r=' + int(1e9)),
        () => serialize.sendSCRAMClientFinalMessage('c=biws,r=x,p=y'),
        () => serialize.query('select ' + int(1000)),
        () => serialize.end(),
      ])());
    }
    return Buffer.concat(parts);
  };

  const mutate = (b: Buffer): Buffer => {
    const out = Buffer.from(b);
    for (let i = 1 + int(4); i > 0 && out.length > 0; i--) {
      const pos = int(out.length);
      switch (int(5)) {
        case 0: out[pos] = int(256); break;
        case 1: out[pos]! ^= 1 << int(8); break;
        case 2: if (pos + 4 <= out.length) out.writeUInt32BE(pick([0, 3, 4, 7, 8, 16, 9999, 10_000, 10_001, 0x7fffffff, 0x80000000, 0xffffffff, int(2 ** 32)]), pos); break;
        case 3: return Buffer.concat([out.subarray(0, pos), bytes(int(50)), out.subarray(pos)]);
        case 4: return out.subarray(0, pos);
      }
    }
    return out;
  };

  const hugeClaim = (): Buffer => {
    // A plausible length word followed by lots of bytes: the buffer must stay bounded.
    const len = 8 + int(20_000);
    return Buffer.concat([int32(len), int32(pick([STARTUP_CODES.PROTOCOL_3_0, (3 << 16) | 1, int(2 ** 31)])), bytes(int(15_000))]);
  };

  const failures: string[] = [];
  const codes = new Map<string, number>();
  let packets = 0;
  const ITERATIONS = 3000;
  for (let it = 0; it < ITERATIONS; it++) {
    const kind = int(4);
    const input = kind === 0 ? bytes(int(300)) : kind === 1 ? hugeClaim() : kind === 2 ? mutate(valid()) : valid();
    const r = new FrontendReader({ maxMessage: MAX_MESSAGE });
    let phase: 'startup' | 'message' = 'startup';
    let off = 0;
    try {
      while (off < input.length) {
        const size = 1 + int(rnd() < 0.5 ? 16 : 4096);
        const chunk = input.subarray(off, off + size);
        off += chunk.length;
        r.push(chunk);
        const cap = phase === 'startup' ? MAX_STARTUP_PACKET + chunk.length : MAX_MESSAGE + 5 + chunk.length;
        if (r.buffered > cap) failures.push(`it ${it}: buffered ${r.buffered} > ${cap} in ${phase} phase`);
        for (;;) {
          if (phase === 'startup') {
            const p = r.readStartup();
            if (!p) break;
            packets++;
            if (p.kind === 'startup') phase = 'message';
          } else {
            const m = r.readMessage();
            if (!m) break;
            packets++;
            if (m.body.length > MAX_MESSAGE) failures.push(`it ${it}: body ${m.body.length} > max`);
            if (m.type === MESSAGE_TYPES.PASSWORD) {
              for (const f of [parsePasswordMessage, parseSaslInitialResponse, parseErrorFields]) {
                try { f(m.body); } catch (err) {
                  if (!(err instanceof PgWireError)) failures.push(`it ${it}: ${f.name} threw ${String(err)}`);
                }
              }
            }
          }
        }
      }
      codes.set('ok', (codes.get('ok') ?? 0) + 1);
    } catch (err) {
      if (err instanceof PgWireError) codes.set(err.code, (codes.get(err.code) ?? 0) + 1);
      else failures.push(`it ${it}: non-PgWireError ${String(err)} for input ${input.subarray(0, 64).toString('hex')}`);
    }
  }
  t.same(failures.slice(0, 5), [], 'no unexpected throws or unbounded buffering');
  t.equal(failures.length, 0);
  t.ok(packets > ITERATIONS / 2, `decoded ${packets} packets`);
  t.ok((codes.get('ok') ?? 0) > ITERATIONS / 10, `outcomes ${JSON.stringify(Object.fromEntries(codes))}`);
  for (const c of ['PROXY_PROTOCOL_VIOLATION', 'PROXY_STARTUP_TOO_LARGE', 'PROXY_UNSUPPORTED_PROTOCOL']) {
    t.ok((codes.get(c) ?? 0) > 0, `fuzz reached ${c}`);
  }
});
