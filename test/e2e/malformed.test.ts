// Acceptance: malformed input — oversized, truncated and garbage startup packets, plaintext when TLS
// is required, silent clients, bytes injected before the TLS handshake, garbage instead of a TLS
// ClientHello, bad packets inside TLS — each gets a clean FATAL ErrorResponse (or a close), every
// connection slot is released, and a concurrent healthy client never notices (DESIGN §6).
import t from 'tap';
import { readFileSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { join } from 'node:path';
import { connect as tlsConnect, type TLSSocket } from 'node:tls';
import pg from 'pg';
import {
  MAX_STARTUP_PACKET,
  STARTUP_CODES,
  parseErrorFields,
  serialize,
} from '../../proxy/pgwire/index.ts';
import { startTestStack, waitFor, type TestStack } from '../helpers/stack.ts';
import { prng } from '../helpers/prng.ts';

/** The proxy's startup timeout in this test (XENON_PROXY_STARTUP_TIMEOUT_MS). */
const STARTUP_TIMEOUT_MS = 1_000;
/** Hard limit on any one hostile exchange: nothing may take longer than this. */
const LIMIT_MS = 6_000;
/** An answer the proxy gives without waiting for more input must come well before the startup timeout. */
const PROMPT_MS = 800;

// ---------------------------------------------------------------- bytes

function int32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeInt32BE(n | 0);
  return b;
}

function uint32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0);
  return b;
}

const SSL_REQUEST = Buffer.concat([int32(8), uint32(STARTUP_CODES.SSL_REQUEST)]);
const PROTOCOL_3_0 = uint32(STARTUP_CODES.PROTOCOL_3_0);

/** A well-formed StartupMessage of exactly `size` bytes (padded with an application_name). */
function startupOfSize(size: number): Buffer {
  const base = serialize.startup({ user: 'x', database: 'y', application_name: '' });
  const pad = size - base.length;
  if (pad < 0) throw new Error(`startup packet cannot be smaller than ${base.length}`);
  const pkt = serialize.startup({ user: 'x', database: 'y', application_name: 'a'.repeat(pad) });
  if (pkt.length !== size || pkt.readInt32BE(0) !== size) throw new Error('startupOfSize: wrong size');
  return pkt;
}


function garbage(rand: () => number, n: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = Math.floor(rand() * 256);
  return b;
}

// ---------------------------------------------------------------- a raw client

interface BackendMsg {
  type: string;
  body: Buffer;
}

/** Splits backend messages (type byte, int32 length incl. itself, body); `rest` is an incomplete tail. */
function parseBackend(buf: Buffer): { messages: BackendMsg[]; rest: Buffer } {
  const messages: BackendMsg[] = [];
  let off = 0;
  while (buf.length - off >= 5) {
    const len = buf.readInt32BE(off + 1);
    if (len < 4 || buf.length - off < len + 1) break;
    messages.push({ type: String.fromCharCode(buf[off]!), body: buf.subarray(off + 5, off + 1 + len) });
    off += len + 1;
  }
  return { messages, rest: buf.subarray(off) };
}

interface Reply {
  /** Everything the proxy sent (decrypted, for a TLS peer). */
  data: Buffer;
  /** The proxy closed the connection before our time limit (we never destroy before that). */
  closed: boolean;
  /** ms from the start of the exchange to the first byte / to the close. */
  firstByteMs: number | undefined;
  closeMs: number | undefined;
  /** A socket error we saw (e.g. ECONNRESET); not a failure by itself. */
  error: string | undefined;
}

/** Every socket this file opens, destroyed at the end whatever happens. */
const opened = new Set<Socket>();

/** One client connection: collects what the proxy sends and notices when it closes. */
class Peer {
  data = Buffer.alloc(0);
  closed = false;
  firstByteMs: number | undefined;
  closeMs: number | undefined;
  error: string | undefined;
  readonly t0: number;
  private waiters = new Set<() => void>();

  constructor(readonly socket: Socket, t0 = performance.now()) {
    this.t0 = t0;
    opened.add(socket);
    socket.on('data', this.onData);
    socket.on('error', (err: NodeJS.ErrnoException) => { this.error = err.code ?? err.message; });
    socket.on('close', () => {
      this.closed = true;
      this.closeMs = performance.now() - this.t0;
      opened.delete(socket);
      this.notify();
    });
  }

  private readonly onData = (chunk: Buffer): void => {
    this.firstByteMs ??= performance.now() - this.t0;
    this.data = Buffer.concat([this.data, chunk]);
    this.notify();
  };

  private notify(): void {
    for (const w of this.waiters) w();
  }

  /** Stops collecting (before handing the socket to TLS). */
  detach(): void {
    this.socket.off('data', this.onData);
  }

  /** Resolves true as soon as `pred()` holds, false when the socket closes first or `ms` pass. */
  until(pred: () => boolean, ms: number): Promise<boolean> {
    if (pred()) return Promise.resolve(true);
    return new Promise((resolve) => {
      const check = (): void => {
        if (pred()) done(true);
        else if (this.closed) done(false);
      };
      const timer = setTimeout(() => done(false), ms);
      const done = (v: boolean): void => {
        clearTimeout(timer);
        this.waiters.delete(check);
        resolve(v);
      };
      this.waiters.add(check);
    });
  }

  /** Waits for the proxy to close (at most `ms`), then destroys our side in any case. */
  async finish(ms = LIMIT_MS): Promise<Reply> {
    await this.until(() => this.closed, ms);
    const closed = this.closed;
    this.socket.destroy();
    return { data: this.data, closed, firstByteMs: this.firstByteMs, closeMs: this.closeMs, error: this.error };
  }
}

let proxyPort = 0;

function open(): Promise<Peer> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const s = connect({ host: '127.0.0.1', port: proxyPort });
    const peer = new Peer(s, t0);
    const timer = setTimeout(() => { s.destroy(); reject(new Error('connect timed out')); }, LIMIT_MS);
    s.once('connect', () => { clearTimeout(timer); resolve(peer); });
    s.once('error', (err) => { clearTimeout(timer); reject(err); });
  });
}

/**
 * Connects, writes `pieces` (with `gapMs` between them), optionally ends our side, and collects
 * everything until the proxy closes (or the limit).
 */
async function exchange(pieces: Buffer[], o: { gapMs?: number; end?: boolean; limitMs?: number } = {}): Promise<Reply> {
  const peer = await open();
  for (const [i, p] of pieces.entries()) {
    if (i > 0 && o.gapMs) await new Promise((r) => setTimeout(r, o.gapMs));
    if (peer.closed || peer.socket.writableEnded) break;
    peer.socket.write(p);
  }
  if (o.end) peer.socket.end();
  return peer.finish(o.limitMs);
}

// ---------------------------------------------------------------- assertions

type Assert = Pick<typeof t, 'ok' | 'equal' | 'same' | 'match' | 'fail' | 'not'>;

/**
 * The reply is: the messages of types `before`, then one FATAL ErrorResponse with `sqlstate`
 * (and a message matching `message`), nothing after it, and the proxy closed the connection.
 */
function expectFatal(
  t: Assert,
  reply: Reply,
  sqlstate: string,
  o: { message?: RegExp; before?: string[]; promptMs?: number; what?: string } = {},
): Record<string, string> | undefined {
  const what = o.what ? `${o.what}: ` : '';
  const { messages, rest } = parseBackend(reply.data);
  t.same(messages.map((m) => m.type), [...(o.before ?? []), 'E'], `${what}reply is ${[...(o.before ?? []), 'E'].join(', ')} (got ${JSON.stringify(reply.data.subarray(0, 80).toString('latin1'))})`);
  t.equal(rest.length, 0, `${what}no partial message after the ErrorResponse`);
  t.ok(reply.closed, `${what}the proxy closed the connection (after ${Math.round(reply.closeMs ?? -1)} ms)`);
  if (o.promptMs !== undefined) {
    t.ok(reply.firstByteMs !== undefined && reply.firstByteMs < o.promptMs, `${what}answered promptly (${Math.round(reply.firstByteMs ?? -1)} ms < ${o.promptMs} ms)`);
  }
  const err = messages.at(-1);
  if (err?.type !== 'E') return undefined;
  let fields: Record<string, string>;
  try {
    fields = parseErrorFields(err.body);
  } catch (e) {
    t.fail(`${what}ErrorResponse is well formed: ${(e as Error).message}`);
    return undefined;
  }
  t.equal(fields.S, 'FATAL', `${what}severity FATAL`);
  t.equal(fields.V, 'FATAL', `${what}non-localized severity FATAL`);
  t.equal(fields.C, sqlstate, `${what}SQLSTATE ${sqlstate} (message ${JSON.stringify(fields.M)})`);
  if (o.message) t.match(fields.M ?? '', o.message, `${what}message`);
  return fields;
}

/** Either the proxy closed without a word, or it sent exactly one FATAL ErrorResponse (with one of `codes`) and closed. */
function expectErrorOrClose(t: Assert, reply: Reply, codes: readonly string[], what: string): string {
  t.ok(reply.closed, `${what}: the proxy closed the connection within ${LIMIT_MS} ms`);
  if (reply.data.length === 0) return 'close';
  const { messages, rest } = parseBackend(reply.data);
  t.ok(messages.length === 1 && messages[0]!.type === 'E' && rest.length === 0, `${what}: one ErrorResponse (got ${JSON.stringify(reply.data.subarray(0, 40).toString('latin1'))})`);
  const m = messages[0];
  if (m?.type !== 'E') return 'other';
  let f: Record<string, string> = {};
  try { f = parseErrorFields(m.body); } catch (e) { t.fail(`${what}: ErrorResponse is well formed: ${(e as Error).message}`); }
  t.equal(f.S, 'FATAL', `${what}: FATAL`);
  t.ok(f.C !== undefined && codes.includes(f.C), `${what}: SQLSTATE ${String(f.C)} is one of ${codes.join(', ')}`);
  return f.C ?? 'other';
}

// ---------------------------------------------------------------- TLS

let tlsOpts: { ca: string; servername: string } = { ca: '', servername: '' };

/** SSLRequest → 'S' → TLS handshake with SNI `<endpoint>.localtest.me`; returns a peer over TLS. */
async function openTls(t: Assert): Promise<Peer | undefined> {
  const raw = await open();
  raw.socket.write(SSL_REQUEST);
  const gotS = await raw.until(() => raw.data.length >= 1, LIMIT_MS);
  t.ok(gotS && raw.data.length === 1 && raw.data[0] === 0x53, `the proxy answers the SSLRequest with a single 'S' (got ${JSON.stringify(raw.data.toString('latin1'))})`);
  if (!gotS || raw.data[0] !== 0x53) { raw.socket.destroy(); return undefined; }
  raw.detach();
  const tls: TLSSocket = tlsConnect({ socket: raw.socket, servername: tlsOpts.servername, ca: tlsOpts.ca });
  const peer = new Peer(tls, raw.t0);
  const ok = await new Promise<boolean>((resolve) => {
    const timer = setTimeout(() => resolve(false), LIMIT_MS);
    tls.once('secureConnect', () => { clearTimeout(timer); resolve(true); });
    tls.once('close', () => { clearTimeout(timer); resolve(false); });
  });
  t.ok(ok, `TLS handshake completed ${peer.error ?? ''}`);
  if (!ok) { tls.destroy(); raw.socket.destroy(); return undefined; }
  return peer;
}

/** Waits for the proxy's AuthenticationSASL offering SCRAM-SHA-256-PLUS and SCRAM-SHA-256 (over TLS, after a valid StartupMessage). */
async function awaitSasl(t: Assert, peer: Peer): Promise<boolean> {
  const got = await peer.until(() => parseBackend(peer.data).messages.length >= 1, LIMIT_MS);
  const m = parseBackend(peer.data).messages[0];
  const ok = got && m?.type === 'R' && m.body.readInt32BE(0) === 10 && m.body.subarray(4).toString('latin1') === 'SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0';
  t.ok(ok, `AuthenticationSASL [SCRAM-SHA-256-PLUS, SCRAM-SHA-256] (got ${JSON.stringify(peer.data.toString('latin1'))})`);
  return ok;
}

// ---------------------------------------------------------------- metrics

async function activeTcp(stack: TestStack): Promise<number | undefined> {
  const res = await fetch(`${stack.info.metrics_url}/metrics`);
  const text = await res.text();
  const m = /^xenon_proxy_connections_active\{protocol="tcp"\} (\S+)$/m.exec(text);
  return m ? Number(m[1]) : undefined;
}

/** The proxy process's external memory (where Buffers live), in bytes. */
async function proxyMemory(stack: TestStack): Promise<number> {
  const text = await (await fetch(`${stack.info.metrics_url}/metrics`)).text();
  const m = /^xenon_proxy_process_nodejs_external_memory_bytes (\S+)$/m.exec(text);
  return Number(m?.[1] ?? NaN);
}

// ---------------------------------------------------------------- the test

t.test('malformed input gets a clean error or close; the proxy keeps serving', async (t) => {
  const stack = await startTestStack(t, { XENON_PROXY_STARTUP_TIMEOUT_MS: String(STARTUP_TIMEOUT_MS) });
  proxyPort = stack.info.proxy_port;
  tlsOpts = { ca: readFileSync(stack.info.ca_cert, 'utf8'), servername: `${stack.info.endpoint_id}.localtest.me` };
  t.teardown(() => { for (const s of opened) s.destroy(); });

  // prom-client shows a labelled gauge only once it has been set: absent means 0.
  const baseline = (await activeTcp(stack)) ?? 0;
  t.equal(baseline, 0, 'no client connections before the test');

  // ---- a healthy client querying all the time
  const healthy = new pg.Client(stack.pgConfig());
  const healthyErrors: string[] = [];
  healthy.on('error', (err) => healthyErrors.push(`client error: ${err.message}`));
  await healthy.connect();
  let queries = 0;
  let slowest = 0;
  let stopLoop = false;
  t.teardown(() => { stopLoop = true; return healthy.end().catch(() => {}); });
  const loop = (async () => {
    while (!stopLoop) {
      const v = queries + 1;
      const t0 = performance.now();
      try {
        const { rows } = await healthy.query<{ v: number }>('SELECT $1::int AS v', [v]);
        if (rows[0]?.v !== v) healthyErrors.push(`wrong answer ${JSON.stringify(rows)} for ${v}`);
        queries = v;
      } catch (err) {
        healthyErrors.push((err as Error).message);
        await new Promise((r) => setTimeout(r, 100));
      }
      slowest = Math.max(slowest, performance.now() - t0);
      await new Promise((r) => setImmediate(r));
    }
  })();

  await t.test('1. oversized startup packet: 08P01 at once, without waiting for the body', async (t) => {
    const header = Buffer.concat([int32(MAX_STARTUP_PACKET + 1), PROTOCOL_3_0]);
    expectFatal(t, await exchange([header]), '08P01', { message: /startup packet too large/, promptMs: PROMPT_MS, what: 'length word 10,001, header only' });
    expectFatal(t, await exchange([int32(MAX_STARTUP_PACKET + 1)]), '08P01', { message: /startup packet too large/, promptMs: PROMPT_MS, what: 'the length word alone' });
    const big = startupOfSize(20_000);
    expectFatal(t, await exchange([big]), '08P01', { message: /startup packet too large/, promptMs: PROMPT_MS, what: 'a whole 20,000-byte startup packet' });
    // The cap is exactly 10,000 bytes: a packet of that size is read in full (and then refused for
    // being plaintext, which proves it was parsed).
    expectFatal(t, await exchange([startupOfSize(MAX_STARTUP_PACKET)]), '28000', { message: /sslmode=require/, promptMs: PROMPT_MS, what: 'exactly 10,000 bytes is accepted' });
  });

  await t.test('2. truncated packet', async (t) => {
    const full = serialize.startup({ user: 'x', database: 'y' });
    const half = full.subarray(0, Math.floor(full.length / 2));
    const hungUp = await exchange([half], { end: true });
    t.ok(hungUp.closed, `half a StartupMessage then FIN: the proxy closes (after ${Math.round(hungUp.closeMs ?? -1)} ms)`);
    t.equal(hungUp.data.length, 0, 'and says nothing (nobody is listening)');
    t.ok((hungUp.closeMs ?? Infinity) < PROMPT_MS, 'without waiting for its startup timeout');

    // Both wait out the startup timeout: played side by side.
    const [quiet, trickle] = await Promise.all([
      exchange([half]),
      exchange([...full].map((b) => Buffer.from([b])), { gapMs: 150 }),
    ]);
    expectFatal(t, quiet, '08006', { message: /timed out waiting for the startup packet/, what: 'half a StartupMessage, then silence' });
    t.ok(quiet.firstByteMs !== undefined && quiet.firstByteMs >= STARTUP_TIMEOUT_MS * 0.8 && quiet.firstByteMs < 5_000, `the timeout error came after ~1 s (${Math.round(quiet.firstByteMs ?? -1)} ms)`);

    // Trickling bytes does not extend the deadline: one byte every 150 ms (5 s for the packet)
    // still times out after ~1 s.
    expectFatal(t, trickle, '08006', { message: /timed out waiting for the startup packet/, what: 'one byte every 150 ms' });
    t.ok(trickle.firstByteMs !== undefined && trickle.firstByteMs >= STARTUP_TIMEOUT_MS * 0.8 && trickle.firstByteMs < 2_500, `the deadline is not extended by activity (${Math.round(trickle.firstByteMs ?? -1)} ms)`);

    // Sent one byte at a time, a complete packet still works (it is framed, not read per chunk).
    const bytes = [...full].map((b) => Buffer.from([b]));
    expectFatal(t, await exchange(bytes, { gapMs: 2 }), '28000', { message: /sslmode=require/, what: 'a StartupMessage one byte at a time' });
  });

  await t.test('3. garbage instead of an SSLRequest', async (t) => {
    // 'GET ' read as a length word is 1,195,725,856 bytes: far over the cap.
    expectFatal(t, await exchange([Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n')]), '08P01', { message: /startup packet too large/, promptMs: PROMPT_MS, what: 'an HTTP request' });
    const rand = prng(0x5eed);
    const junks = Array.from({ length: 5 }, () => garbage(rand, 64));
    // Side by side: some of them wait out the startup timeout.
    const [tlsHeader, ...replies] = await Promise.all([exchange([Buffer.from([0x16, 0x03, 0x01])]), ...junks.map((junk) => exchange([junk]))]);
    for (const [i, junk] of junks.entries()) {
      expectErrorOrClose(t, replies[i]!, ['08P01', '0A000', '08006'], `64 random bytes #${i} (${junk.subarray(0, 8).toString('hex')}…)`);
    }
    expectErrorOrClose(t, tlsHeader!, ['08006'], 'three bytes of a TLS record header');
  });

  await t.test('4. garbage before an SSLRequest', async (t) => {
    const rand = prng(42);
    const junk = garbage(rand, 13);
    junk[0] = junk[0]! | 0x80; // a negative length word, whatever the seed
    expectFatal(t, await exchange([Buffer.concat([junk, SSL_REQUEST])]), '08P01', { message: /invalid length of startup packet/, promptMs: PROMPT_MS, what: 'random bytes, then an SSLRequest' });
    expectFatal(t, await exchange([Buffer.from([0, 0, 0]), SSL_REQUEST]), '08P01', { message: /invalid length of startup packet/, promptMs: PROMPT_MS, what: 'three zero bytes, then an SSLRequest' });
    expectFatal(t, await exchange([Buffer.from('hello'), SSL_REQUEST], { gapMs: 20 }), '08P01', { promptMs: PROMPT_MS, what: '"hello", then (separately) an SSLRequest' });
    // A packet-shaped prefix: length 8 with version 0.0 is an unsupported protocol.
    expectFatal(t, await exchange([Buffer.concat([int32(8), int32(0), SSL_REQUEST])]), '0A000', { message: /unsupported frontend protocol 0\.0/, promptMs: PROMPT_MS, what: 'an 8-byte packet of version 0.0, then an SSLRequest' });
  });

  await t.test('5. plaintext StartupMessage when TLS is required: 28000', async (t) => {
    const f = expectFatal(t, await exchange([serialize.startup({ user: 'x', database: 'y' })]), '28000', { message: /sslmode=require/, promptMs: PROMPT_MS });
    t.equal(f?.M, 'connection is insecure (try using sslmode=require)');
    // GSSENCRequest is declined with 'N' and the client may go on in plaintext — which is then refused.
    const gss = Buffer.concat([int32(8), uint32(STARTUP_CODES.GSSENC_REQUEST)]);
    const peer = await open();
    peer.socket.write(gss);
    t.ok(await peer.until(() => peer.data.length >= 1, LIMIT_MS), 'GSSENCRequest answered');
    t.equal(peer.data.toString('latin1'), 'N', "with a single 'N'");
    peer.socket.write(serialize.startup({ user: 'x', database: 'y' }));
    const r = await peer.finish();
    expectFatal(t, { ...r, data: r.data.subarray(1) }, '28000', { message: /sslmode=require/, what: "after 'N', a plaintext StartupMessage" });
  });

  await t.test('6. a client that says nothing: 08006 after the startup timeout', async (t) => {
    const r = await exchange([]);
    expectFatal(t, r, '08006', { message: /timed out waiting for the startup packet/ });
    t.ok(r.firstByteMs !== undefined && r.firstByteMs >= 800 && r.firstByteMs <= 5_000, `the error came after ${Math.round(r.firstByteMs ?? -1)} ms (0.8–5 s)`);
  });

  await t.test('7. bytes after an SSLRequest, before the TLS handshake: 08P01, no \'S\'', async (t) => {
    const startup = serialize.startup({ user: 'x', database: 'y' });
    const r = await exchange([Buffer.concat([SSL_REQUEST, startup])]);
    t.not(r.data[0], 0x53, "the proxy did not answer 'S'");
    expectFatal(t, r, '08P01', { message: /data received before the TLS handshake/, promptMs: PROMPT_MS, what: 'SSLRequest + StartupMessage in one write' });
    const r2 = await exchange([Buffer.concat([SSL_REQUEST, Buffer.from([0x16])])]);
    t.not(r2.data[0], 0x53, "one byte is enough: no 'S'");
    expectFatal(t, r2, '08P01', { message: /data received before the TLS handshake/, promptMs: PROMPT_MS, what: 'SSLRequest + one byte' });
    const gss = Buffer.concat([int32(8), uint32(STARTUP_CODES.GSSENC_REQUEST)]);
    const r3 = await exchange([Buffer.concat([gss, startup])]);
    t.not(r3.data[0], 0x4e, "GSSENCRequest + bytes: no 'N'");
    expectFatal(t, r3, '08P01', { message: /data received before the TLS handshake/, promptMs: PROMPT_MS, what: 'GSSENCRequest + StartupMessage in one write' });
  });

  await t.test("8. 'S', then no TLS ClientHello", async (t) => {
    // 'S', then silence (checked last): it waits out the startup timeout while the others play.
    const silent = await open();
    silent.socket.write(SSL_REQUEST);
    const silentReply = silent.finish();
    for (const [what, bytes] of [
      ['a plaintext StartupMessage', serialize.startup({ user: 'x', database: 'y' })],
      ['an HTTP request', Buffer.from('GET / HTTP/1.1\r\n\r\n')],
      ['random bytes', garbage(prng(8), 300)],
    ] as const) {
      const peer = await open();
      peer.socket.write(SSL_REQUEST);
      t.ok(await peer.until(() => peer.data.length >= 1, LIMIT_MS), `${what}: 'S' received`);
      t.equal(peer.data[0], 0x53, `${what}: the answer is 'S'`);
      peer.socket.write(bytes);
      const r = await peer.finish();
      t.ok(r.closed, `${what}: the proxy closed the connection (${Math.round(r.closeMs ?? -1)} ms, ${r.data.length - 1} bytes after 'S')`);
      t.ok(r.data.length === 1 || r.data[1] === 0x15, `${what}: nothing after 'S' but perhaps a TLS alert record`);
    }
    // 'S', then silence: the handshake times out and the proxy closes.
    const r = await silentReply;
    t.equal(r.data[0], 0x53, "silent after 'S'");
    t.ok(r.closed, `the proxy closed the connection (${Math.round(r.closeMs ?? -1)} ms)`);
    t.ok((r.closeMs ?? Infinity) >= STARTUP_TIMEOUT_MS * 0.8, 'after the startup timeout');
  });

  await t.test('9. bad length words: 08P01', async (t) => {
    expectFatal(t, await exchange([Buffer.from([0xff, 0xff, 0xff, 0xff]), PROTOCOL_3_0]), '08P01', { message: /invalid length of startup packet/, promptMs: PROMPT_MS, what: 'length -1' });
    expectFatal(t, await exchange([int32(3)]), '08P01', { message: /invalid length of startup packet/, promptMs: PROMPT_MS, what: 'length 3' });
    expectFatal(t, await exchange([int32(-0x8000_0000)]), '08P01', { message: /invalid length of startup packet/, promptMs: PROMPT_MS, what: 'length -2^31' });
    expectFatal(t, await exchange([Buffer.concat([int32(12), uint32(STARTUP_CODES.SSL_REQUEST), int32(0)])]), '08P01', { message: /invalid length of SSLRequest/, promptMs: PROMPT_MS, what: 'a 12-byte SSLRequest' });
    expectFatal(t, await exchange([Buffer.concat([int32(12), uint32(STARTUP_CODES.CANCEL_REQUEST), int32(1)])]), '08P01', { message: /invalid length of CancelRequest/, promptMs: PROMPT_MS, what: 'a 12-byte CancelRequest' });
    // A length that claims fewer bytes than the parameters: the terminator is missing.
    const startup = serialize.startup({ user: 'x', database: 'y' });
    const short = Buffer.from(startup);
    short.writeInt32BE(startup.length - 3, 0);
    expectFatal(t, await exchange([short]), '08P01', { message: /invalid startup packet layout/, promptMs: PROMPT_MS, what: 'length shorter than the parameters' });
    const noUser = serialize.startup({ database: 'y' });
    expectFatal(t, await exchange([noUser]), '08P01', { message: /no PostgreSQL user name/, promptMs: PROMPT_MS, what: 'no user' });
  });

  await t.test('10. protocol versions other than 3: 0A000', async (t) => {
    // A v2 startup packet is 296 bytes: length, version 2.0, database[64], user[32], options[64], unused[64], tty[64].
    const v2 = Buffer.alloc(296);
    v2.writeInt32BE(296, 0);
    v2.writeUInt32BE(2 << 16, 4);
    v2.write('y', 8);
    v2.write('x', 72);
    expectFatal(t, await exchange([v2]), '0A000', { message: /unsupported frontend protocol 2\.0/, promptMs: PROMPT_MS, what: 'protocol 2.0' });
    expectFatal(t, await exchange([Buffer.concat([int32(8), uint32(4 << 16)])]), '0A000', { message: /unsupported frontend protocol 4\.0/, promptMs: PROMPT_MS, what: 'protocol 4.0' });
    expectFatal(t, await exchange([Buffer.concat([int32(8), uint32((1234 << 16) | 5681)])]), '0A000', { promptMs: PROMPT_MS, what: 'an unknown request code 1234.5681' });
  });

  await t.test('11. a burst of 200 concurrent garbage connections', async (t) => {
    const rand = prng(11);
    const payloads = Array.from({ length: 200 }, () => garbage(rand, 1 + Math.floor(rand() * 300)));
    const t0 = performance.now();
    const replies = await Promise.all(payloads.map((p) => exchange([p]).catch((err: Error) => err)));
    const failedToConnect = replies.filter((r): r is Error => r instanceof Error);
    t.same(failedToConnect.map((e) => e.message), [], 'every connection was accepted');
    const tally: Record<string, number> = {};
    let clean = 0;
    for (const [i, r] of replies.entries()) {
      if (r instanceof Error) continue;
      // Collect failures quietly and report them once.
      const problems: string[] = [];
      const probe: Assert = {
        ok: (v: unknown, m?: string) => { if (!v) problems.push(m ?? 'not ok'); return !!v; },
        equal: (a: unknown, b: unknown, m?: string) => { if (a !== b) problems.push(`${m ?? ''}: ${String(a)} !== ${String(b)}`); return a === b; },
        fail: (m?: string) => { problems.push(m ?? 'fail'); return false; },
      } as unknown as Assert;
      const code = expectErrorOrClose(probe, r, ['08P01', '0A000', '08006'], `#${i}`);
      tally[code] = (tally[code] ?? 0) + 1;
      if (problems.length) t.fail(`garbage #${i} (${payloads[i]!.subarray(0, 8).toString('hex')}…, ${payloads[i]!.length} B): ${problems.join('; ')}`);
      else clean++;
    }
    t.equal(clean, 200, `all 200 got an ErrorResponse or a close (${JSON.stringify(tally)}) in ${Math.round(performance.now() - t0)} ms`);
    const before = queries;
    t.ok(await waitFor(() => queries >= before + 5, 5_000), 'the healthy client keeps getting answers after the burst');
  });

  await t.test('12. bad packets inside TLS', async (t) => {
    const role = stack.info.role;
    const database = stack.info.database;

    let peer = await openTls(t);
    if (peer) {
      peer.socket.write(Buffer.concat([int32(MAX_STARTUP_PACKET + 1), PROTOCOL_3_0]));
      expectFatal(t, await peer.finish(), '08P01', { message: /startup packet too large/, what: 'oversized startup packet over TLS' });
    }

    peer = await openTls(t);
    if (peer) {
      peer.socket.write(SSL_REQUEST);
      expectFatal(t, await peer.finish(), '08P01', { message: /SSLRequest inside TLS/, what: 'SSLRequest over TLS' });
    }

    peer = await openTls(t);
    if (peer) {
      peer.socket.write(serialize.startup({ user: role, database }));
      if (await awaitSasl(t, peer)) peer.socket.write(serialize.sendSASLInitialResponseMessage('SCRAM-SHA-1', 'n,,n=,r=rOprNGfwEbeRWgbNEkqO'));
      expectFatal(t, await peer.finish(), '28000', { before: ['R'], message: /SASL authentication mechanism "SCRAM-SHA-1" is not supported here/, what: 'SASLInitialResponse with SCRAM-SHA-1' });
    }

    peer = await openTls(t);
    if (peer) {
      peer.socket.write(serialize.startup({ user: role, database }));
      if (await awaitSasl(t, peer)) peer.socket.write(Buffer.concat([Buffer.from('p'), int32(0x7fff_ffff)]));
      expectFatal(t, await peer.finish(), '08P01', { before: ['R'], message: /message too large/, what: 'a 2 GiB password message header' });
    }

    peer = await openTls(t);
    if (peer) {
      peer.socket.write(serialize.startup({ user: role, database }));
      if (await awaitSasl(t, peer)) peer.socket.write(serialize.query('SELECT 1'));
      expectFatal(t, await peer.finish(), '08P01', { before: ['R'], message: /expected a password message/, what: 'a Query instead of SASLInitialResponse' });
    }

    peer = await openTls(t);
    if (peer) {
      peer.socket.write(serialize.startup({ user: role, database }));
      if (await awaitSasl(t, peer)) peer.socket.write(Buffer.concat([Buffer.from('p'), int32(2)]));
      expectFatal(t, await peer.finish(), '08P01', { before: ['R'], message: /invalid message length/, what: 'a message length of 2' });
    }

    peer = await openTls(t);
    if (peer) {
      peer.socket.write(serialize.startup({ user: role, database }));
      if (await awaitSasl(t, peer)) {
        // A SASLInitialResponse whose inner length word lies.
        const body = Buffer.concat([Buffer.from('SCRAM-SHA-256\0'), int32(1000), Buffer.from('n,,n=,r=abc')]);
        peer.socket.write(Buffer.concat([Buffer.from('p'), int32(body.length + 4), body]));
      }
      expectFatal(t, await peer.finish(), '08P01', { before: ['R'], message: /invalid SASLInitialResponse/, what: 'SASLInitialResponse with a bad data length' });
    }

    // Silent inside TLS: the startup timeout still answers, encrypted. (Both wait it out, side by side.)
    const silent = await openTls(t);
    const halfSent = await openTls(t);
    halfSent?.socket.write(serialize.startup({ user: role, database }).subarray(0, 10));
    const [silentReply, halfReply] = await Promise.all([silent?.finish(), halfSent?.finish()]);
    if (silentReply) {
      expectFatal(t, silentReply, '08006', { message: /timed out waiting for the startup packet/, what: 'TLS, then silence' });
      t.ok((silentReply.firstByteMs ?? 0) >= STARTUP_TIMEOUT_MS * 0.8 && (silentReply.firstByteMs ?? Infinity) <= 5_000, `after ~1 s (${Math.round(silentReply.firstByteMs ?? -1)} ms)`);
    }
    if (halfReply) {
      expectFatal(t, halfReply, '08006', { message: /timed out waiting for the startup packet/, what: 'TLS, half a StartupMessage, then silence' });
    }

    peer = await openTls(t);
    if (peer) {
      // Half a StartupMessage, then close_notify + FIN: the proxy just closes.
      const full = serialize.startup({ user: role, database });
      peer.socket.end(full.subarray(0, 10));
      const r = await peer.finish();
      t.ok(r.closed, 'truncated startup over TLS, then hang-up: closed');
      t.equal(r.data.length, 0, 'nothing sent to a client that left');
    }
  });

  await t.test('13. a client that keeps sending after its ErrorResponse is not buffered', async (t) => {
    // After a protocol error the proxy has nothing more to read from the client: what it sends
    // must be dropped (or left unread), never accumulated. Four half-open clients send an
    // oversized startup header and then write as fast as they can until the proxy closes them.
    const chunk = Buffer.alloc(256 * 1024, 0x41);
    const before = await proxyMemory(stack);
    t.ok(Number.isFinite(before), `the proxy exports its external memory (${before} B)`);
    const floods = Array.from({ length: 4 }, () => new Promise<{ sent: number; error: boolean }>((resolve) => {
      const s = connect({ host: '127.0.0.1', port: proxyPort, allowHalfOpen: true });
      opened.add(s);
      let sent = 0;
      let reply = Buffer.alloc(0);
      let stop = false;
      const done = (): void => {
        if (stop) return;
        stop = true;
        clearTimeout(timer);
        const { messages } = parseBackend(reply);
        s.destroy();
        opened.delete(s);
        resolve({ sent, error: messages[0]?.type === 'E' });
      };
      const timer = setTimeout(done, 3_000);
      s.on('data', (d: Buffer) => { reply = Buffer.concat([reply, d]); });
      s.on('error', done);
      s.on('close', done);
      s.once('connect', () => {
        s.write(Buffer.concat([int32(MAX_STARTUP_PACKET + 1), PROTOCOL_3_0]));
        const pump = (): void => {
          while (!stop && !s.destroyed && s.write(chunk)) sent += chunk.length;
          if (!stop && !s.destroyed) s.once('drain', () => { sent += chunk.length; pump(); });
        };
        pump();
      });
    }));
    let peak = before;
    const sampler = (async () => {
      for (let i = 0; i < 8; i++) {
        await new Promise((r) => setTimeout(r, 100));
        const m = await proxyMemory(stack);
        if (m > peak) peak = m;
      }
    })();
    const results = await Promise.all(floods);
    await sampler;
    const sentMb = results.map((r) => Math.round(r.sent / 1e6));
    t.ok(results.every((r) => r.error), 'each flooding client got its ErrorResponse');
    const grownMb = Math.round((peak - before) / 1e6);
    t.ok(grownMb < 128, `the proxy's external (Buffer) memory grew by ${grownMb} MB while 4 clients pushed ${sentMb.join(' + ')} MB after their ErrorResponse (limit 128 MB)`);
  });

  // ---- everyone else is still served
  stopLoop = true;
  await loop;
  t.equal(healthyErrors.length, 0, `the healthy client saw no errors ${JSON.stringify(healthyErrors.slice(0, 3))}`);
  t.ok(queries > 20, `the healthy client kept querying throughout (${queries} queries, slowest ${Math.round(slowest)} ms)`);
  t.ok(slowest < 5_000, `no healthy query stalled (slowest ${Math.round(slowest)} ms)`);
  t.equal(stack.child.exitCode, null, 'the stack is still running');

  const fresh = new pg.Client(stack.pgConfig());
  await fresh.connect();
  const { rows } = await fresh.query<{ v: number }>('SELECT $1::int AS v', [7]);
  t.same(rows, [{ v: 7 }], 'a fresh connection works after all the abuse');
  await fresh.end();

  // No leaked connection slots: only the healthy client is left.
  let active: number | undefined;
  const settled = await waitFor(async () => (active = await activeTcp(stack)) === baseline + 1, 5_000, 100);
  t.ok(settled, `xenon_proxy_connections_active{protocol="tcp"} back to 1 (the healthy client), got ${String(active)}`);
  await healthy.end();
  const drained = await waitFor(async () => (active = await activeTcp(stack)) === baseline, 5_000, 100);
  t.ok(drained, `and to ${String(baseline)} once it has gone, got ${String(active)}`);

  t.equal(opened.size, 0, 'every socket this test opened is closed');

  // The proxy logged no internal error for any of this.
  const log = readFileSync(join(stack.info.state_dir, 'logs', 'proxy.log'), 'utf8').split('\n').filter(Boolean);
  const bad = log.filter((l) => /"level":"error"/.test(l) || /"code":"INTERNAL"/.test(l));
  t.same(bad.slice(0, 5), [], 'no error-level or INTERNAL entries in the proxy log');
});
