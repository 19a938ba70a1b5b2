// Acceptance (quick variant; `npm run fuzz` runs 20,000+): a seeded generator sends malformed
// startup-phase inputs of every family to the real proxy — the proxy never crashes or leaks a
// connection slot, every reply is a well-formed ErrorResponse or a close, and a healthy client
// querying throughout sees no error. The first tests prove the fuzzer's own checks can fail.
import t from 'tap';
import { createServer, type Socket } from 'node:net';
import {
  caseBytes,
  caseFromId,
  FAMILIES,
  generateCase,
  generateCases,
  SSL_REQUEST,
  truncationPlan,
  truncationSpace,
  type FuzzCase,
} from '../helpers/fuzz-gen.ts';
import {
  ALLOWED_SQLSTATES,
  badLogLines,
  describeFailure,
  formatReport,
  fuzzStack,
  fuzzStackEnv,
  HealthyTraffic,
  mayBeLate,
  metricValue,
  runCase,
  runCases,
  settle,
  spreadLoopback,
  targetOf,
  validateReply,
  type CaseResult,
} from '../helpers/fuzz-run.ts';
import parsePrometheusTextFormat from 'parse-prometheus-text-format';
import { startTestStack } from '../helpers/stack.ts';

const SEED = 7;
const CASES = 3_000;
// Under `npm test` another heavy test runs alongside: 2 s leaves the healthy client's fresh
// connections room (`npm run fuzz` uses 1 s on a quiet machine).
const STARTUP_TIMEOUT_MS = 2_000;
const AUTH_TIMEOUT_MS = 2_000;

// ---------------------------------------------------------------- replies, by hand

function msg(type: string, body: Buffer | string): Buffer {
  const b = typeof body === 'string' ? Buffer.from(body, 'latin1') : body;
  const len = Buffer.alloc(4);
  len.writeInt32BE(b.length + 4);
  return Buffer.concat([Buffer.from(type, 'latin1'), len, b]);
}

function error(fields: Record<string, string>): Buffer {
  return msg('E', Buffer.concat([...Object.entries(fields).map(([k, v]) => Buffer.from(`${k}${v}\0`, 'utf8')), Buffer.from([0])]));
}

const int32 = (n: number): Buffer => {
  const b = Buffer.alloc(4);
  b.writeInt32BE(n);
  return b;
};

const FATAL = (code: string, m = 'no'): Buffer => error({ S: 'FATAL', V: 'FATAL', C: code, M: m });
const R10 = msg('R', Buffer.concat([int32(10), Buffer.from('SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0')]));
const R11 = msg('R', Buffer.concat([int32(11), Buffer.from('r=abcDEF123,s=c2FsdA==,i=4096')]));
const NONE = Buffer.alloc(0);

t.test('generator: deterministic, replayable, every family, every truncation offset', async (t) => {
  const a = generateCases(400, 3);
  const b = generateCases(400, 3);
  t.same(a.map((c) => c.id), b.map((c) => c.id), 'same ids for the same seed');
  t.ok(a.every((c, i) => caseBytes(c).equals(caseBytes(b[i]!))), 'same bytes for the same seed');
  t.ok(a.every((c) => caseBytes(caseFromId(c.id)).equals(caseBytes(c))), 'every case is rebuilt from its id alone');
  const other = generateCases(400, 4);
  t.ok(other.filter((c, i) => caseBytes(c).equals(caseBytes(a[i]!))).length < 40, 'another seed gives other cases');
  t.same([...new Set(a.map((c) => c.family))].sort(), [...FAMILIES].sort(), 'every family in a run');
  t.throws(() => caseFromId('nope:1'), /not a fuzz case id/);

  // Any run of consecutive `truncated` seeds as long as the space cuts every message at every offset.
  const space = truncationSpace();
  const total = space.reduce((n, s) => n + s.len, 0);
  const seen = new Set<string>();
  let outOfRange = 0;
  for (let s = 12_345; s < 12_345 + total; s++) {
    const { base, k } = truncationPlan(s);
    if (k < 0 || k >= space.find((x) => x.base === base)!.len) outOfRange++;
    seen.add(`${base}@${k}`);
  }
  t.equal(outOfRange, 0, 'every offset is inside its message');
  t.equal(seen.size, total, `${total} consecutive seeds cover all ${total} (message, offset) pairs`);
  t.equal(space[0]!.base, 'ssl');
  const sentBytes = (c: FuzzCase): number => c.steps.reduce((n, s) => n + (s.op === 'send' ? s.chunks.reduce((m, x) => m + x.length, 0) : 0), 0);
  t.equal(sentBytes(generateCase('truncated', total)), 0, 'seed ≡ 0: the SSLRequest cut at offset 0, nothing sent');
  const typical = space.findIndex((x) => x.base === 'startup-typical');
  const lastOffset = space.slice(0, typical).reduce((n, s) => n + s.len, 0) + space[typical]!.len - 1;
  t.equal(sentBytes(generateCase('truncated', lastOffset)), space[typical]!.len - 1, 'the last offset of a StartupMessage sends all of it but its last byte');

  // Each family's contents, as described (spot checks on the bytes).
  const sent = (c: FuzzCase): Buffer => caseBytes(c);
  const oversized = a.filter((c) => c.family === 'oversized-startup' && c.what.startsWith('whole'));
  t.ok(oversized.every((c) => sent(c).readInt32BE(0) > 10_000), 'oversized startup packets are over 10,000 bytes');
  t.ok(a.some((c) => c.family === 'repeated-ssl' && sent(c).indexOf(Buffer.concat([SSL_REQUEST, SSL_REQUEST])) >= 0), 'repeated SSLRequests');
  t.ok(a.some((c) => c.family === 'sasl-final' && c.steps.some((s) => s.op === 'final' && s.plus)), 'SCRAM-SHA-256-PLUS client-finals');
  t.ok(a.some((c) => c.steps.some((s) => s.op === 'send' && s.chunks.length > 1)), 'inputs split at random chunk boundaries');
  t.ok(a.some((c) => c.steps.some((s) => s.op === 'ssl' && s.then === 'tls')) && a.some((c) => c.steps.some((s) => s.op === 'ssl' && s.then === 'raw')), 'inputs inside TLS, and in place of a ClientHello');
});

t.test('validator: accepts what the proxy may send, rejects everything else', async (t) => {
  const ok = (plain: Buffer, tls: Buffer | undefined, sent: Buffer, what: string, outcome: string): void => {
    const v = validateReply(plain, tls, sent);
    t.same(v.problems, [], `${what}: accepted`);
    t.equal(v.outcome, outcome, `${what}: outcome ${outcome}`);
  };
  const bad = (plain: Buffer, tls: Buffer | undefined, sent: Buffer, what: string, why: RegExp): void => {
    const v = validateReply(plain, tls, sent);
    t.ok(v.problems.some((p) => why.test(p)), `${what}: rejected (${JSON.stringify(v.problems)})`);
  };
  const gss = Buffer.concat([int32(8), int32(80877104)]);
  ok(NONE, undefined, Buffer.from('junk'), 'a plain close', 'close');
  ok(FATAL('08P01'), undefined, Buffer.from('junk'), 'one ErrorResponse', '08P01');
  ok(Buffer.from('S'), Buffer.concat([R10, R11, FATAL('28P01')]), SSL_REQUEST, "'S', then SASL and 28P01 inside TLS", '28P01');
  ok(Buffer.concat([Buffer.from('N'), FATAL('28000')]), undefined, gss, "'N' to a GSSENCRequest, then 28000", '28000');
  ok(Buffer.from('S\x15\x03\x03\x00\x02\x02\x32'), undefined, SSL_REQUEST, "'S', then a TLS alert", 'close');
  ok(Buffer.from('S'), Buffer.concat([msg('v', Buffer.concat([int32(196608), int32(1), Buffer.from('_pq_.x\0')])), R10, FATAL('08006')]), SSL_REQUEST, 'NegotiateProtocolVersion, then SASL', '08006');
  ok(Buffer.from('S'), Buffer.concat([msg('R', int32(3)), FATAL('08004')]), SSL_REQUEST, 'a cleartext password request (password hack)', '08004');
  ok(FATAL('28P01', 'password authentication failed for user "' + 'a'.repeat(9_000) + '"'), undefined, NONE, 'a long (quoted user) message', '28P01');

  bad(FATAL('XX000'), undefined, NONE, 'an internal error', /SQLSTATE XX000 is not one/);
  bad(FATAL('08p01'), undefined, NONE, 'a lowercase SQLSTATE', /not 5 characters/);
  bad(FATAL('08P0'), undefined, NONE, 'a 4-character SQLSTATE', /not 5 characters/);
  bad(error({ S: 'ERROR', V: 'ERROR', C: '08P01', M: 'x' }), undefined, NONE, 'severity ERROR', /not FATAL/);
  bad(error({ S: 'FATAL', C: '08P01', M: 'x' }), undefined, NONE, 'no V field', /field V missing/);
  bad(error({ S: 'FATAL', V: 'FATAL', M: 'x' }), undefined, NONE, 'no C field', /field C missing/);
  bad(error({ S: 'FATAL', V: 'FATAL', C: '08P01' }), undefined, NONE, 'no M field', /field M missing/);
  bad(error({ S: 'FATAL', V: 'FATAL', C: '08P01', M: 'x', '\x01': 'y' }), undefined, NONE, 'an unknown field code', /unknown field code/);
  bad(msg('E', Buffer.from('SFATAL\0VFATAL\0C08P01\0Mx\0')), undefined, NONE, 'no terminator', /no terminating zero/);
  bad(msg('E', Buffer.from('SFATAL\0VFATAL\0C08P01\0Mx\0\0junk')), undefined, NONE, 'bytes after the terminator', /after the terminator/);
  bad(msg('E', Buffer.from('SFATAL\0VFATAL\0C08P01\0Mx')), undefined, NONE, 'an unterminated field', /unterminated field/);
  bad(msg('E', Buffer.concat([Buffer.from('SFATAL\0VFATAL\0C08P01\0M'), Buffer.from([0xff, 0xfe]), Buffer.from('\0\0')])), undefined, NONE, 'a message not UTF-8', /not UTF-8/);
  bad(Buffer.concat([FATAL('08P01'), FATAL('08P01')]), undefined, NONE, 'two ErrorResponses', /after the ErrorResponse/);
  bad(FATAL('08P01').subarray(0, 20), undefined, NONE, 'a truncated ErrorResponse', /partial 'E'/);
  bad(Buffer.from('E\0\0'), undefined, NONE, 'a truncated header', /partial message header/);
  bad(Buffer.concat([Buffer.from('E'), int32(1 << 20)]), undefined, NONE, 'an insane length', /insane length/);
  bad(msg('R', int32(0)), undefined, NONE, 'AuthenticationOk in plaintext', /unexpected message 'R'/);
  bad(msg('Z', 'I'), undefined, NONE, 'ReadyForQuery', /unexpected message 'Z'/);
  bad(Buffer.from('S'), undefined, NONE, "'S' without an SSLRequest", /without a matching SSLRequest/);
  bad(Buffer.from('N'), undefined, SSL_REQUEST, "'N' to an SSLRequest", /without a matching GSSENCRequest/);
  bad(Buffer.from('S\x45\x00\x00\x00\x04'), undefined, SSL_REQUEST, "plaintext after 'S'", /not a TLS record/);
  bad(Buffer.from('S\x15\x03\x03\x00\x09\x02'), undefined, SSL_REQUEST, "a cut TLS record after 'S'", /truncated TLS record/);
  bad(Buffer.from('S'), Buffer.concat([R10, msg('R', int32(0))]), SSL_REQUEST, 'AuthenticationOk inside TLS', /authentication SUCCEEDED/);
  bad(Buffer.from('S'), Buffer.concat([R10, R11, msg('R', Buffer.concat([int32(12), Buffer.from('v=x')]))]), SSL_REQUEST, 'SASLFinal inside TLS', /authentication SUCCEEDED/);
  bad(Buffer.from('S'), Buffer.concat([R11]), SSL_REQUEST, 'SASLContinue first', /without a preceding AuthenticationSASL/);
  bad(Buffer.from('S'), Buffer.concat([R10, R10]), SSL_REQUEST, 'AuthenticationSASL twice', /AuthenticationSASL twice/);
  bad(Buffer.from('S'), msg('R', Buffer.concat([int32(10), Buffer.from('PLAIN\0\0')])), SSL_REQUEST, 'no SCRAM-SHA-256 offered', /without SCRAM-SHA-256/);
  bad(Buffer.from('S'), msg('R', Buffer.concat([int32(10), Buffer.from('SCRAM-SHA-256\0')])), SSL_REQUEST, 'a mechanism list without its final NUL', /bad mechanism list/);
  bad(Buffer.from('S'), Buffer.concat([R10, msg('R', Buffer.concat([int32(11), Buffer.from('s=x,r=y')]))]), SSL_REQUEST, 'a bad server-first-message', /bad server-first-message/);
  bad(Buffer.from('S'), Buffer.concat([R10, msg('v', Buffer.concat([int32(196608), int32(0)]))]), SSL_REQUEST, 'NegotiateProtocolVersion after SASL', /after authentication began/);
  bad(Buffer.from('S'), msg('v', Buffer.concat([int32(196608), int32(2), Buffer.from('_pq_.x\0')])), SSL_REQUEST, 'NegotiateProtocolVersion with a wrong count', /do not fill the body/);
  bad(Buffer.from('S'), Buffer.concat([R10, msg('S', 'a\0b\0')]), SSL_REQUEST, 'ParameterStatus inside TLS', /unexpected message type 'S'/);
  bad(NONE, FATAL('08P01'), NONE, 'a TLS stream without an S', /without an 'S'/);
  t.ok(ALLOWED_SQLSTATES.has('08P01') && ALLOWED_SQLSTATES.has('28P01') && !ALLOWED_SQLSTATES.has('XX000'), 'the allowed SQLSTATEs come from the catalogue, without XX000');
});

t.test('runner: reports a hang, a malformed reply, a missed expectation (fake proxy)', async (t) => {
  // A fake "proxy" that misbehaves on request: the first bytes of a connection say how.
  const sockets = new Set<Socket>();
  const server = createServer((s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
    s.on('error', () => {});
    s.once('data', (d: Buffer) => {
      if (d.equals(SSL_REQUEST)) { s.write('S'); setTimeout(() => s.destroy(), 20); return; }
      const how = d.toString('latin1');
      const reply: Record<string, Buffer | undefined> = {
        GOOD: FATAL('08P01'), XX000: FATAL('XX000'), TRAIL: Buffer.concat([FATAL('08P01'), msg('Z', 'I')]),
        PARTIAL: FATAL('08P01').subarray(0, 9), AUTHOK: msg('R', int32(0)), CLOSE: NONE,
      };
      if (how === 'HANG') return;
      if (how === 'ERRHANG') { s.write(FATAL('08P01')); return; }
      s.end(reply[how] ?? FATAL('08P01'));
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  t.teardown(() => { for (const s of sockets) s.destroy(); server.close(); });
  const env = { host: '127.0.0.1', port: (server.address() as { port: number }).port, ca: '', caseTimeoutMs: 400 };
  const fake = (how: string | Buffer, expect?: string[]): FuzzCase => ({
    id: `random-bytes:${typeof how === 'string' ? how.length : 0}`, family: 'random-bytes', seed: 0, what: String(how), pace: 'none',
    steps: typeof how === 'string' ? [{ op: 'send', chunks: [Buffer.from(how)] }] : [{ op: 'ssl', then: 'tls', servername: 'x', chunks: [how] }],
    ...(expect ? { expect } : {}),
  });
  const play = (how: string | Buffer, expect?: string[]): Promise<CaseResult> => runCase(fake(how, expect), env);

  const good = await play('GOOD', ['08P01']);
  t.same(good.problems, [], 'a FATAL 08P01 and a close pass');
  t.equal((await play('CLOSE', ['close'])).problems.length, 0, 'a silent close passes');
  const hang = await play('HANG');
  t.equal(hang.outcome, 'hang', 'no close: a hang');
  t.match(hang.problems.join(), /did not close the connection within 400 ms/);
  t.match((await play('ERRHANG')).problems.join(), /did not close/, 'an ErrorResponse without a close is a hang too');
  t.match((await play('XX000')).problems.join(), /SQLSTATE XX000/, 'an internal error fails');
  t.match((await play('TRAIL')).problems.join(), /after the ErrorResponse/, 'a message after the ErrorResponse fails');
  t.match((await play('PARTIAL')).problems.join(), /partial/, 'a cut ErrorResponse fails');
  t.match((await play('AUTHOK')).problems.join(), /unexpected message 'R'/, 'AuthenticationOk fails');
  t.match((await play('GOOD', ['28000'])).problems.join(), /expected 28000, got 08P01/, 'a missed expectation fails');
  t.match((await play(SSL_REQUEST)).problems.join(), /TLS handshake failed/, "'S' without a TLS handshake fails");

  const summary = await runCases([fake('GOOD'), fake('XX000'), fake('HANG'), fake('CLOSE')], env, { concurrency: 4 });
  t.equal(summary.cases, 4, 'runCases plays every case');
  t.same(summary.failures.map((f) => f.what).sort(), ['HANG', 'XX000'], 'and reports exactly the bad ones');
  t.match(describeFailure(summary.failures[0]!), /replay: FUZZ_REPLAY=random-bytes:\d+ npm run fuzz/, 'with a replay line');

  // Load may make timers fire first: only the proxy's timeout (or a close) instead of the expected
  // answer, or a TLS handshake that died after the startup timeout, is played again — never a
  // hang, a malformed reply or another code.
  const r = (o: Partial<CaseResult>): CaseResult => ({ id: 'x:1', family: 'truncated', what: '', problems: ['expected 08P01, got 08006 (…)'], outcome: '08006', kind: '', ms: 0, reset: false, lastWriteMs: 900, ...o });
  t.ok(mayBeLate(r({}), 1_000), 'the timeout instead of the expected answer may be load');
  t.notOk(mayBeLate(r({ outcome: '08P01', problems: ['expected 28000, got 08P01'] }), 1_000), 'not another code');
  t.notOk(mayBeLate(r({ problems: ['expected 08P01, got 08006', 'ErrorResponse: field V missing'] }), 1_000), 'not with a malformed reply');
  const tlsDied = { outcome: 'close', lastWriteMs: 10, problems: ['TLS handshake failed: closed during the TLS handshake', 'expected 08P01, got close'] };
  t.ok(mayBeLate(r({ ...tlsDied, tlsFailedAtMs: 1_200 }), 1_000), 'a TLS handshake that died after the startup timeout may be load');
  t.notOk(mayBeLate(r({ ...tlsDied, tlsFailedAtMs: 300 }), 1_000), 'not one that died before it');
  t.notOk(mayBeLate(r({ ...tlsDied, tlsFailedAtMs: 1_200, outcome: '08P01', problems: ['TLS handshake failed: x', 'ErrorResponse: field V missing'] }), 1_000), 'not with a malformed reply');
  t.notOk(mayBeLate(r({ outcome: 'hang', problems: ['the proxy did not close the connection within 9000 ms'], lastWriteMs: 5_000 }), 1_000), 'never a hang');
  t.ok(mayBeLate(r({ outcome: 'close', problems: ['expected 0A000, got close (S tls:)'] }), 1_000), 'so may a close');
  t.notOk(mayBeLate(r({ outcome: 'close', problems: ['unexpected message type \'Z\' during startup'] }), 1_000), 'not a bad message before the close');
});

t.test('metrics, slot settling and log checks can fail', async (t) => {
  const fams = parsePrometheusTextFormat('# TYPE xenon_proxy_connections_active gauge\nxenon_proxy_connections_active{protocol="tcp"} 3\n');
  t.equal(metricValue(fams, 'xenon_proxy_connections_active', { protocol: 'tcp' }), 3, 'reads a labelled gauge');
  t.equal(metricValue(fams, 'xenon_proxy_connections_active', { protocol: 'ws' }), undefined, 'absent labels: undefined');
  t.same(await settle(async () => 2, 1, 300, 50), { ok: false, last: 2 }, 'a gauge that stays above the baseline is a leak');
  let n = 3;
  t.same(await settle(async () => n--, 1, 2_000, 10), { ok: true, last: 1 }, 'one that drains settles');
  const log = [
    '{"level":"info","msg":"connection rejected","role":"unhandled error"}',
    '{"level":"error","msg":"listener error"}',
    '{"level":"info","msg":"x","code":"INTERNAL"}',
    '{"level":"warn","msg":"unhandled connection error"}',
    'TypeError: Cannot read properties of undefined',
    '(node:1) ExperimentalWarning: something',
    '',
  ].join('\n');
  t.same(badLogLines(log), [
    '{"level":"error","msg":"listener error"}',
    '{"level":"info","msg":"x","code":"INTERNAL"}',
    '{"level":"warn","msg":"unhandled connection error"}',
    'TypeError: Cannot read properties of undefined',
  ], 'error-level, INTERNAL, unhandled and crash lines are found; client text in other fields is not');
  t.equal(spreadLoopback(0), '127.1.0.1');
  t.not(spreadLoopback(1).split('.').slice(0, 3).join('.'), spreadLoopback(0).split('.').slice(0, 3).join('.'), 'neighbouring cases come from different /24 networks');
});

t.test(`${CASES} seeded malformed startup-phase inputs against the real proxy`, async (t) => {
  const stack = await startTestStack(t, fuzzStackEnv(STARTUP_TIMEOUT_MS, AUTH_TIMEOUT_MS));

  // The healthy-client check can fail: a client with a wrong password reports errors.
  const wrong = new HealthyTraffic({ ...stack.pgConfig(), password: 'not-the-password' });
  await wrong.start();
  const wrongReport = await wrong.stop();
  await wrong.close();
  t.match(wrongReport.errors.join(), /password authentication failed/, 'a failing healthy client is noticed');

  const cases = generateCases(CASES, SEED, targetOf(stack));
  const report = await fuzzStack(stack, cases, { concurrency: 64, startupTimeoutMs: STARTUP_TIMEOUT_MS, authTimeoutMs: AUTH_TIMEOUT_MS });
  t.comment(formatReport(report, { seed: SEED }));
  t.equal(report.run.cases, CASES, `all ${CASES} cases played`);
  for (const f of FAMILIES) t.ok((report.run.byFamily[f]?.cases ?? 0) >= CASES / FAMILIES.length - 1, `family ${f} represented (${report.run.byFamily[f]?.cases} cases)`);
  t.same(report.run.failures.slice(0, 20).map(describeFailure), [], 'every case got a well-formed reply (or none) and a close within the limit');
  t.ok(report.run.lateRetried.length <= CASES * 0.05, `cases played again after a timeout under load stay few (${report.run.lateRetried.length})`);
  for (const c of report.checks) t.ok(c.ok, `${c.name}: ${c.detail}`);
  // The run exercised what it claims: errors of several classes, SASL exchanges, TLS upgrades.
  for (const code of ['08P01', '0A000', '28000', '28P01', '08006', 'close']) t.ok((report.run.outcomes[code] ?? 0) > 0, `some cases ended with ${code} (${report.run.outcomes[code] ?? 0})`);
  t.ok(Object.keys(report.run.kinds).some((k) => k.includes('R10 R11 E')), 'some cases got through a SASL exchange to its error');
});
