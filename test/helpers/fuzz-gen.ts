/**
 * A deterministic generator of hostile startup-phase inputs for the proxy (the fuzzer's half that
 * knows nothing about sockets; test/helpers/fuzz-run.ts plays the cases against a running proxy).
 *
 * A case is a short script: byte chunks to send, interleaved with the few steps that need an
 * answer first (an SSLRequest answered 'S' then a real TLS handshake, an AuthenticationSASL, a
 * SASLContinue whose nonce a client-final message must quote). Everything in a case follows from
 * its `family` and `seed` (see {@link generateCase}), so a failure is replayed from its id alone:
 * `FUZZ_REPLAY=sasl-final:1234 npm run fuzz`. Only the target's names (endpoint, role, database)
 * come from the stack the case runs against.
 *
 * Messages are encoded here by hand, independently of the proxy's own codec, from
 * https://www.postgresql.org/docs/current/protocol-message-formats.html.
 */
import { prng } from './prng.ts';

// ---------------------------------------------------------------- families

/** Every family of hostile input; a run cycles through them in this order. */
export const FAMILIES = [
  /** Random bytes (sometimes behind a plausible length word / request code), plaintext. */
  'random-bytes',
  /** Valid messages truncated at every offset (plaintext and inside TLS, SASL included), then silence or FIN. */
  'truncated',
  /** Valid messages with their length word changed: off by one, small, zero, negative, huge. */
  'wrong-length',
  /** StartupMessage keys or values that are not UTF-8. */
  'invalid-utf8',
  /** SSLRequest again: in one write, after 'S' in place of the ClientHello, inside TLS. */
  'repeated-ssl',
  /** After a valid StartupMessage: SASLInitialResponse garbage, out of order, unknown mechanisms, bad client-first. */
  'sasl-initial',
  /** After a valid client-first: client-final with a wrong nonce, bad proof, invalid base64, wrong type… */
  'sasl-final',
  /** CancelRequest with wrong lengths, unknown keys, trailing bytes, inside TLS. */
  'cancel',
  /** GSSENCRequest ('N') followed by garbage, plaintext startups, SSLRequests. */
  'gssenc',
  /** Protocol versions 2.0, 4.0, 3.9999, 0.0, unknown request codes. */
  'protocol-version',
  /** Startup packets over 10,000 bytes (whole, or just the length word), and the boundary. */
  'oversized-startup',
  /** No `user`, an empty one, a duplicated one. */
  'missing-user',
  /** Parameters without their terminators, keys without values, bytes after the terminator. */
  'unterminated-params',
  /** Other bad startup parameters: endpoint mismatches, replication, `_pq_.` options, many params. */
  'startup-params',
  /** A successful TLS upgrade, then random bytes inside TLS. */
  'tls-garbage',
  /** Broken TLS handshakes: garbage or a mangled ClientHello after 'S', direct TLS without SSLRequest. */
  'bad-tls-handshake',
  /**
   * Direct TLS (PostgreSQL 17 sslnegotiation=direct: a ClientHello first, ALPN "postgresql" or
   * not), then the usual garbage inside. A proxy without direct TLS refuses the handshake.
   */
  'direct-tls',
] as const;

export type Family = (typeof FAMILIES)[number];

export function isFamily(s: string): s is Family {
  return (FAMILIES as readonly string[]).includes(s);
}

// ---------------------------------------------------------------- cases

/** What the proxy may finally do: an ErrorResponse with this SQLSTATE, or close without one. */
export type Outcome = string; // a SQLSTATE, or 'close'

/**
 * How to build a client-final message (or whatever is sent in its place) once the server-first
 * message is known. See {@link buildFinal}.
 */
export const FINAL_MUTATIONS = [
  'bad-proof', 'wrong-nonce', 'client-nonce-only', 'nonce-extended', 'bad-base64-proof',
  'bad-base64-cbind', 'cbind-mismatch', 'short-proof', 'long-proof', 'missing-proof', 'proof-first',
  'attr-order', 'empty', 'invalid-utf8', 'huge-attr', 'extension-attr', 'second-initial', 'password',
  'query', 'terminate', 'sync', 'random-type', 'len-huge', 'len-negative', 'len-short', 'truncated',
  'pipelined-query', 'double-final',
] as const;
export type FinalMutation = (typeof FINAL_MUTATIONS)[number];

export type Step =
  /** Write these chunks, in order (over TLS once a handshake succeeded). */
  | { op: 'send'; chunks: Buffer[] }
  /**
   * Send an SSLRequest (as `chunks`) and wait for the one-byte answer. With `then: 'tls'` and an
   * 'S', run a real TLS handshake with SNI `servername` ('' = no SNI); with `then: 'raw'`, go on
   * in plaintext (what follows is then what the proxy's TLS server gets).
   */
  | { op: 'ssl'; then: 'tls' | 'raw'; servername?: string; chunks: Buffer[] }
  /** Send a GSSENCRequest and wait for its one-byte answer ('N'). */
  | { op: 'gssenc'; chunks: Buffer[] }
  /**
   * A TLS handshake at once, without an SSLRequest, offering `alpn`. A refused handshake ends
   * the case (a proxy may not accept direct TLS, or not without ALPN "postgresql").
   */
  | { op: 'direct'; servername: string; alpn?: string[] }
  /** Wait for an authentication request with this code (3 cleartext password, 10 AuthenticationSASL, 11 SASLContinue). */
  | { op: 'await'; auth: 3 | 10 | 11 }
  /**
   * Build a client-final message from the SASLContinue just received ({@link buildFinal}) and
   * send it. With `plus`, the c= attribute carries tls-server-end-point data of the proxy's
   * certificate (SCRAM-SHA-256-PLUS).
   */
  | { op: 'final'; mutation: FinalMutation; clientNonce: string; seed: number; truncateAt: number; plus?: boolean }
  /** Write these chunks to the TCP socket itself, under an established TLS session (forged records). */
  | { op: 'raw'; chunks: Buffer[] }
  /** Half-close our side (TLS: close_notify, then FIN). */
  | { op: 'end' }
  /** Abort the connection: a TCP RST (under TLS, a close without close_notify). */
  | { op: 'reset' };

export interface FuzzCase {
  /** `<family>:<seed>`: {@link generateCase} rebuilds the same case from it. */
  id: string;
  family: Family;
  seed: number;
  /** A short description of what the case sends. */
  what: string;
  steps: Step[];
  /** Between chunks: nothing (same tick), a setImmediate, 1–3 ms, or 150–350 ms (slow drip). */
  pace: 'none' | 'tick' | 'ms' | 'slow';
  /** When the generator knows the answer: the acceptable outcomes. */
  expect?: readonly Outcome[];
  /**
   * The acceptable outcomes instead of `expect` when the proxy did not offer SCRAM-SHA-256-PLUS
   * in its AuthenticationSASL (a proxy without channel binding refuses the mechanism: 28000).
   */
  expectWithoutPlus?: readonly Outcome[];
}

/** The names a case uses to get past the proxy's early checks. */
export interface Target {
  endpoint: string;
  role: string;
  database: string;
  domain: string;
}

export const DEFAULT_TARGET: Target = { endpoint: 'ep-fuzz-target-000000', role: 'fuzz_owner', database: 'neondb', domain: 'localtest.me' };

/** The proxy's cap on startup packets (Postgres' MAX_STARTUP_PACKET_LENGTH). */
export const MAX_STARTUP = 10_000;

// ---------------------------------------------------------------- bytes

export const CODES = {
  SSL: 80877103,
  GSSENC: 80877104,
  CANCEL: 80877102,
  V3: 196608,
} as const;

export function be32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0);
  return b;
}

function be16(n: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(n & 0xffff);
  return b;
}

function be24(n: number): Buffer {
  return Buffer.from([(n >>> 16) & 0xff, (n >>> 8) & 0xff, n & 0xff]);
}

const b = (s: string | Buffer): Buffer => (typeof s === 'string' ? Buffer.from(s, 'utf8') : s);
const cat = (...parts: (Buffer | string)[]): Buffer => Buffer.concat(parts.map(b));

export const SSL_REQUEST = cat(be32(8), be32(CODES.SSL));
export const GSSENC_REQUEST = cat(be32(8), be32(CODES.GSSENC));

/** A length-prefixed startup-phase packet: int32 length (default: the real one), int32 code, body. */
export function startupPacket(code: number, body: Buffer, len?: number): Buffer {
  return cat(be32(len ?? body.length + 8), be32(code), body);
}

type Param = [Buffer | string, Buffer | string];

/** StartupMessage body: key\0value\0 … and (unless `terminator: false`) a final \0. */
export function paramsBody(params: Param[], o: { terminator?: boolean; trailing?: Buffer } = {}): Buffer {
  const parts: Buffer[] = [];
  for (const [k, v] of params) parts.push(b(k), Buffer.from([0]), b(v), Buffer.from([0]));
  if (o.terminator !== false) parts.push(Buffer.from([0]));
  if (o.trailing) parts.push(o.trailing);
  return Buffer.concat(parts);
}

export function startupMessage(params: Param[], o: { version?: number; len?: number; terminator?: boolean; trailing?: Buffer } = {}): Buffer {
  return startupPacket(o.version ?? CODES.V3, paramsBody(params, o), o.len);
}

export function cancelRequest(pid: number, key: number, len = 16): Buffer {
  return cat(be32(len), be32(CODES.CANCEL), be32(pid), be32(key));
}

/** A typed message: type byte, int32 length (default: body + 4), body. */
export function typed(type: string | number, body: Buffer, len?: number): Buffer {
  const t = typeof type === 'number' ? Buffer.from([type]) : Buffer.from(type, 'latin1');
  return cat(t, be32(len ?? body.length + 4), body);
}

/** SASLInitialResponse body: mechanism\0, int32 data length (-1 = none), data. */
export function saslInitialBody(mech: Buffer | string, data: Buffer | null, dataLen?: number): Buffer {
  return cat(b(mech), Buffer.from([0]), be32(dataLen ?? (data ? data.length : -1)), data ?? Buffer.alloc(0));
}

export const saslInitial = (mech: Buffer | string, data: Buffer | null, dataLen?: number): Buffer => typed('p', saslInitialBody(mech, data, dataLen));

export const clientFirst = (nonce: string): Buffer => b(`n,,n=,r=${nonce}`);

/**
 * A hand-built TLS 1.2 ClientHello record (ECDHE-ECDSA/RSA AES-GCM, P-256/X25519, SNI): enough for
 * the proxy's TLS server to answer with its first flight. Deterministic given `random`.
 */
export function clientHello(random: Buffer, servername: string | undefined): Buffer {
  const exts: Buffer[] = [];
  if (servername) {
    const name = b(servername);
    const entry = cat(Buffer.from([0]), be16(name.length), name);
    const list = cat(be16(entry.length), entry);
    exts.push(cat(be16(0), be16(list.length), list));
  }
  const groups = cat(be16(4), be16(0x0017), be16(0x001d));
  exts.push(cat(be16(10), be16(groups.length), groups));
  exts.push(cat(be16(11), be16(2), Buffer.from([1, 0])));
  const sigs = cat(be16(6), be16(0x0403), be16(0x0804), be16(0x0401));
  exts.push(cat(be16(13), be16(sigs.length), sigs));
  const extBytes = Buffer.concat(exts);
  const ciphers = [0xc02b, 0xc02f, 0xc02c, 0xc030, 0x009c];
  const body = cat(
    Buffer.from([3, 3]), random.subarray(0, 32), Buffer.from([0]),
    be16(ciphers.length * 2), ...ciphers.map(be16), Buffer.from([1, 0]),
    be16(extBytes.length), extBytes,
  );
  const hs = cat(Buffer.from([1]), be24(body.length), body);
  return cat(Buffer.from([0x16, 3, 1]), be16(hs.length), hs);
}

// ---------------------------------------------------------------- randomness

/** FNV-1a, to give each family its own stream for the same seed. */
function hash(s: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) {
    h ^= s.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  return h >>> 0;
}

export class Rng {
  private readonly next: () => number;
  constructor(seed: number) {
    this.next = prng(seed);
  }
  float(): number {
    return this.next();
  }
  /** An integer in [lo, hi]. */
  int(lo: number, hi: number): number {
    return lo + Math.floor(this.next() * (hi - lo + 1));
  }
  chance(p: number): boolean {
    return this.next() < p;
  }
  pick<T>(xs: readonly T[]): T {
    return xs[Math.floor(this.next() * xs.length)]!;
  }
  bytes(n: number): Buffer {
    const out = Buffer.alloc(n);
    for (let i = 0; i < n; i++) out[i] = Math.floor(this.next() * 256);
    return out;
  }
  /** Printable ASCII without ',' (a valid SCRAM nonce). */
  nonce(n: number): string {
    let s = '';
    while (s.length < n) {
      const c = 0x21 + Math.floor(this.next() * 94);
      if (c !== 0x2c) s += String.fromCharCode(c);
    }
    return s;
  }
  /** Lowercase letters and digits. */
  word(n: number): string {
    const abc = 'abcdefghijklmnopqrstuvwxyz0123456789';
    let s = '';
    for (let i = 0; i < n; i++) s += abc[Math.floor(this.next() * abc.length)];
    return s;
  }
}

/**
 * Splits `buf` at random boundaries: whole (40%), one byte at a time (20%, short inputs), or at
 * 1–8 random cut points.
 */
export function split(r: Rng, buf: Buffer): Buffer[] {
  if (buf.length <= 1) return [buf];
  const mode = r.int(0, 9);
  if (mode < 4) return [buf];
  if (mode < 6 && buf.length <= 64) return [...buf].map((x) => Buffer.from([x]));
  const k = r.int(1, Math.min(8, buf.length - 1));
  const cuts = new Set<number>();
  while (cuts.size < k) cuts.add(r.int(1, buf.length - 1));
  const sorted = [...cuts].sort((x, y) => x - y);
  const out: Buffer[] = [];
  let prev = 0;
  for (const c of sorted) { out.push(buf.subarray(prev, c)); prev = c; }
  out.push(buf.subarray(prev));
  return out;
}

/** Invalid UTF-8 sequences (lone continuation, overlong, surrogate, > U+10FFFF, truncated, 0xFF). */
const BAD_UTF8: readonly Buffer[] = [
  Buffer.from([0x80]),
  Buffer.from([0xc0, 0xaf]),
  Buffer.from([0xe0, 0x80, 0xaf]),
  Buffer.from([0xed, 0xa0, 0x80]),
  Buffer.from([0xf4, 0x90, 0x80, 0x80]),
  Buffer.from([0xf5, 0x80, 0x80, 0x80]),
  Buffer.from([0xe2, 0x82]),
  Buffer.from([0xff]),
  Buffer.from([0xfe, 0xff]),
  Buffer.from([0xc3]),
  Buffer.from([0xf0, 0x9f, 0x98]),
];

function withBadUtf8(r: Rng, s: string): Buffer {
  const at = r.int(0, s.length);
  return cat(s.slice(0, at), r.pick(BAD_UTF8), s.slice(at));
}

// ---------------------------------------------------------------- building blocks

interface Ctx {
  r: Rng;
  t: Target;
  family: Family;
  seed: number;
}

const sniReal = (t: Target): string => `${t.endpoint}.${t.domain}`;

/** SNI for a TLS case: mostly the target endpoint, sometimes an unknown one, none, or a foreign domain. */
function sni(c: Ctx, realBias = 0.7): { name: string; kind: string } {
  const x = c.r.float();
  if (x < realBias) return { name: sniReal(c.t), kind: 'sni=endpoint' };
  if (x < realBias + (1 - realBias) * 0.4) return { name: `ep-unknown-${c.r.int(0, 3)}.${c.t.domain}`, kind: 'sni=unknown-endpoint' };
  if (x < realBias + (1 - realBias) * 0.6) return { name: sniReal(c.t).toUpperCase(), kind: 'sni=UPPERCASE' };
  if (x < realBias + (1 - realBias) * 0.8) return { name: '', kind: 'no-sni' };
  return { name: `${c.t.endpoint}.example.com`, kind: 'sni=foreign-domain' };
}

function tlsStep(c: Ctx, realBias = 0.7): { step: Step; kind: string } {
  const s = sni(c, realBias);
  return { step: { op: 'ssl', then: 'tls', servername: s.name, chunks: split(c.r, SSL_REQUEST) }, kind: `tls(${s.kind})` };
}

/** A valid StartupMessage for the target role (plus a few harmless parameters). */
function goodStartup(c: Ctx, user = c.t.role): Buffer {
  const params: Param[] = [['user', user], ['database', c.t.database]];
  if (c.r.chance(0.5)) params.push(['application_name', `fuzz-${c.family}`]);
  if (c.r.chance(0.3)) params.push(['client_encoding', 'UTF8']);
  if (c.r.chance(0.2)) params.push(['DateStyle', 'ISO, MDY']);
  return startupMessage(params);
}

/** Roles a SASL case authenticates as: the real one (real secret) or a few unknown ones (mock secret). */
function saslUser(c: Ctx): string {
  return c.r.chance(0.75) ? c.t.role : c.r.pick(['nobody', 'x', 'fuzz_unknown_role']);
}

/** After the bytes: silence (the proxy's timeout answers), our FIN, or a RST; `fin`: we hang up. */
function tail(c: Ctx): { steps: Step[]; kind: string; fin: boolean } {
  const x = c.r.float();
  if (x < 0.45) return { steps: [], kind: 'then silence', fin: false };
  if (x < 0.9) return { steps: [{ op: 'end' }], kind: 'then FIN', fin: true };
  return { steps: [{ op: 'reset' }], kind: 'then RST', fin: true };
}

function send(c: Ctx, buf: Buffer): Step {
  return { op: 'send', chunks: split(c.r, buf) };
}

function pace(c: Ctx): FuzzCase['pace'] {
  const x = c.r.float();
  return x < 0.25 ? 'none' : x < 0.82 ? 'tick' : x < 0.97 ? 'ms' : 'slow';
}

/**
 * A case. When it ends with our FIN or RST, a plain close is always acceptable: the proxy does
 * not keep half-open connections, so an answer it had not written before our FIN arrived may
 * never be sent. When it drips its bytes slowly, the proxy's startup timeout (08006) may come
 * first.
 */
function mk(c: Ctx, what: string, steps: Step[], expect?: readonly Outcome[], expectWithoutPlus?: readonly Outcome[]): FuzzCase {
  const hangUp = steps.at(-1)?.op === 'end' || steps.at(-1)?.op === 'reset';
  const p = pace(c);
  const widen = (e: readonly Outcome[] | undefined): readonly Outcome[] | undefined => {
    if (!e) return e;
    const out = [...e];
    if (hangUp && !out.includes('close')) out.push('close');
    if (p === 'slow' && !out.includes('08006')) out.push('08006');
    return out;
  };
  const e = widen(expect);
  const w = widen(expectWithoutPlus);
  return { id: `${c.family}:${c.seed}`, family: c.family, seed: c.seed, what: p === 'slow' ? `${what} (slow drip)` : what, steps, pace: p, ...(e ? { expect: e } : {}), ...(w ? { expectWithoutPlus: w } : {}) };
}

/** The TLS + StartupMessage prelude of the SASL cases, up to the AuthenticationSASL. */
function saslPrelude(c: Ctx): { steps: Step[]; what: string } {
  const tls = tlsStep(c, 1);
  const user = saslUser(c);
  return {
    steps: [tls.step, send(c, goodStartup(c, user)), { op: 'await', auth: 10 }],
    what: `${tls.kind} startup(user=${user === c.t.role ? 'role' : user})`,
  };
}

/** An outcome when the case stops mid-way: the proxy's timeout error, or a close after our FIN. */
const stall = (fin: boolean): readonly Outcome[] => (fin ? ['close'] : ['08006']);

// ---------------------------------------------------------------- families

function randomBytes(c: Ctx): FuzzCase {
  const { r } = c;
  const x = r.float();
  let bytes: Buffer;
  let what: string;
  if (x < 0.4) {
    bytes = r.bytes(r.int(1, 300));
    what = `${bytes.length} random bytes`;
  } else if (x < 0.75) {
    // Behind a plausible header: a small length word and a known request code.
    const code = r.pick([CODES.SSL, CODES.GSSENC, CODES.CANCEL, CODES.V3, CODES.V3, (3 << 16) | r.int(1, 5), r.int(0, 0xffffffff)]);
    const len = r.int(8, 400);
    const body = r.bytes(r.chance(0.5) ? len - 8 : r.int(0, 400));
    bytes = cat(be32(len), be32(code), body);
    what = `header(len=${len}, code=${code}) + ${body.length} random bytes`;
  } else if (x < 0.9) {
    // Printable junk: HTTP, SMTP, JSON…
    bytes = b(r.pick(['GET / HTTP/1.1\r\nHost: x\r\n\r\n', 'EHLO x\r\n', '{"hello":"world"}\n', 'SELECT 1;\n', '\r\n\r\n', 'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n']) + r.word(r.int(0, 40)));
    what = `text ${JSON.stringify(bytes.subarray(0, 12).toString('latin1'))}…`;
  } else {
    bytes = r.bytes(r.int(1_000, 30_000));
    what = `${bytes.length} random bytes`;
  }
  const t = tail(c);
  return mk(c, `${what}, ${t.kind}`, [send(c, bytes), ...t.steps]);
}

/** The valid messages `truncated` cuts; some are sent after a TLS/SASL prelude. */
const TRUNCATION_BASES = ['ssl', 'gssenc', 'cancel', 'startup-minimal', 'startup-typical', 'tls-startup', 'tls-sasl-initial', 'tls-sasl-final'] as const;

/** The bytes of a plaintext truncation base (the TLS ones are built per case). */
function truncationBase(base: (typeof TRUNCATION_BASES)[number], t: Target): Buffer | undefined {
  switch (base) {
    case 'ssl': return SSL_REQUEST;
    case 'gssenc': return GSSENC_REQUEST;
    case 'cancel': return cancelRequest(0x1234, 0x5678);
    case 'startup-minimal': return startupMessage([['user', 'x']]);
    case 'startup-typical': return startupMessage([['user', t.role], ['database', t.database], ['application_name', 'psql'], ['client_encoding', 'UTF8'], ['options', `endpoint=${t.endpoint} -c search_path=public`]]);
    case 'tls-startup': return startupMessage([['user', t.role], ['database', t.database], ['application_name', 'fuzz-truncated']]);
    case 'tls-sasl-initial': return saslInitial('SCRAM-SHA-256', clientFirst('fuzzTruncatedNonce0123456'));
    default: return undefined;
  }
}

/**
 * Seed → (base, offset): seed mod the number of (base, offset) pairs, walked base by base, so
 * any run of that many consecutive seeds cuts every base at every offset.
 */
export function truncationPlan(seed: number, t: Target = DEFAULT_TARGET): { base: (typeof TRUNCATION_BASES)[number]; k: number } {
  const space = truncationSpace(t);
  let i = seed % space.reduce((n, s) => n + s.len, 0);
  for (const s of space) {
    if (i < s.len) return { base: s.base, k: i };
    i -= s.len;
  }
  throw new Error('unreachable');
}

/** Length of the client-final message `buildFinal` makes for 'truncated' (fixed: nonces have fixed lengths). */
export const FINAL_MESSAGE_LEN = 1 + 4 + `c=biws,r=${'x'.repeat(24 + 24)},p=${'x'.repeat(44)}`.length;

/** (base, offset) pairs a full sweep of truncations covers. */
export function truncationSpace(t: Target = DEFAULT_TARGET): { base: (typeof TRUNCATION_BASES)[number]; len: number }[] {
  return TRUNCATION_BASES.map((base) => ({ base, len: truncationBase(base, t)?.length ?? FINAL_MESSAGE_LEN }));
}

function truncated(c: Ctx): FuzzCase {
  const { base, k } = truncationPlan(c.seed, c.t);
  const t = tail(c);
  if (base === 'tls-sasl-final') {
    const nonce = c.r.nonce(24);
    const tls = tlsStep(c, 1);
    const steps: Step[] = [tls.step, send(c, goodStartup(c)), { op: 'await', auth: 10 }, send(c, saslInitial('SCRAM-SHA-256', clientFirst(nonce))), { op: 'await', auth: 11 },
      { op: 'final', mutation: 'truncated', clientNonce: nonce, seed: c.r.int(0, 2 ** 31), truncateAt: k }, ...t.steps];
    return mk(c, `${tls.kind} startup SASLInitial, client-final cut at ${k}/${FINAL_MESSAGE_LEN}, ${t.kind}`, steps, stall(t.fin));
  }
  const full = truncationBase(base, c.t)!;
  const off = k % full.length;
  const cut = full.subarray(0, off);
  const steps: Step[] = [];
  let what = '';
  if (base.startsWith('tls-')) {
    const tls = tlsStep(c, base === 'tls-startup' ? 0.7 : 1);
    steps.push(tls.step);
    what = `${tls.kind} `;
    if (base === 'tls-sasl-initial') {
      steps.push(send(c, goodStartup(c)), { op: 'await', auth: 10 });
      what += 'startup ';
    }
  }
  if (cut.length) steps.push(send(c, cut));
  steps.push(...t.steps);
  return mk(c, `${what}${base} cut at ${off}/${full.length}, ${t.kind}`, steps, stall(t.fin));
}

function wrongLength(c: Ctx): FuzzCase {
  const { r } = c;
  const weird = (): number => r.pick([0, 1, 3, 4, 7, -1, -8, -0x8000_0000, 0x7fff_ffff, MAX_STARTUP + 1, MAX_STARTUP + r.int(2, 1e6), 0xffff_fff8]);
  const kind = r.pick(['ssl', 'gssenc', 'cancel', 'startup', 'startup-tls', 'sasl'] as const);
  if (kind === 'ssl' || kind === 'gssenc') {
    const code = kind === 'ssl' ? CODES.SSL : CODES.GSSENC;
    const len = r.chance(0.5) ? r.pick([9, 12, 16, 100, MAX_STARTUP]) : weird();
    const pkt = cat(be32(len), be32(code), r.bytes(r.int(0, 8)));
    const t = tail(c);
    return mk(c, `${kind} request with length ${len | 0}, ${t.kind}`, [send(c, pkt), ...t.steps], ['08P01']);
  }
  if (kind === 'cancel') {
    const len = r.chance(0.6) ? r.pick([8, 12, 15, 17, 20, 24, 1000]) : weird();
    const pkt = cat(be32(len), be32(CODES.CANCEL), r.bytes(r.int(0, 16)));
    const t = tail(c);
    return mk(c, `CancelRequest with length ${len | 0}, ${t.kind}`, [send(c, pkt), ...t.steps], ['08P01']);
  }
  if (kind === 'sasl') {
    const p = saslPrelude(c);
    const len = r.pick([0, 1, 2, 3, -1, -0x8000_0000, 0x7fff_ffff, 1024 * 1024 + 5, 0x10_0000_0]);
    return mk(c, `${p.what}, 'p' with length ${len | 0}`, [...p.steps, send(c, cat('p', be32(len), r.bytes(r.int(0, 16))))], ['08P01']);
  }
  // A StartupMessage whose length word lies: shorter (cuts off the terminator), longer (waits), or absurd.
  const pkt = kind === 'startup-tls' ? goodStartup(c) : startupMessage([['user', r.word(4)], ['database', 'd']]);
  const x = r.float();
  let len: number;
  let expect: readonly Outcome[] | undefined;
  const t = tail(c);
  if (x < 0.4) {
    len = pkt.length - r.int(1, pkt.length - 1);
    expect = ['08P01'];
  } else if (x < 0.7) {
    len = pkt.length + r.int(1, 64);
    expect = stall(t.fin);
  } else {
    len = weird();
    expect = len >= 8 && len <= MAX_STARTUP ? stall(t.fin) : ['08P01'];
  }
  const bad = Buffer.from(pkt);
  bad.writeUInt32BE(len >>> 0, 0);
  const steps: Step[] = [];
  let what = '';
  if (kind === 'startup-tls') {
    const tls = tlsStep(c);
    steps.push(tls.step);
    what = `${tls.kind} `;
  }
  steps.push(send(c, bad), ...t.steps);
  return mk(c, `${what}StartupMessage of ${pkt.length} B with length word ${len | 0}, ${t.kind}`, steps, expect);
}

function invalidUtf8(c: Ctx): FuzzCase {
  const { r } = c;
  const params: Param[] = [['user', c.t.role], ['database', c.t.database], ['application_name', 'fuzz']];
  const i = r.int(0, params.length - 1);
  const inKey = r.chance(0.4);
  const [k, v] = params[i]!;
  params[i] = inKey ? [withBadUtf8(r, String(k)), v] : [k, withBadUtf8(r, String(v))];
  const pkt = startupMessage(params);
  const t = tail(c);
  const where = `${inKey ? 'key' : 'value'} of ${String(k)}`;
  if (r.chance(0.5)) {
    const tls = tlsStep(c);
    return mk(c, `${tls.kind} startup with invalid UTF-8 in the ${where}`, [tls.step, send(c, pkt), ...t.steps], ['08P01']);
  }
  return mk(c, `startup with invalid UTF-8 in the ${where}`, [send(c, pkt), ...t.steps], ['08P01']);
}

function repeatedSsl(c: Ctx): FuzzCase {
  const { r } = c;
  const v = r.int(0, 5);
  const t = tail(c);
  if (v === 0) {
    // N SSLRequests in one write: bytes after the request, before the handshake.
    const n = r.int(2, 200);
    return mk(c, `${n} SSLRequests in one write`, [{ op: 'send', chunks: [Buffer.concat(Array(n).fill(SSL_REQUEST) as Buffer[])] }, ...t.steps], ['08P01']);
  }
  if (v === 1) {
    // The same, split at random points: the proxy may answer 'S' to the first and see the rest as a ClientHello.
    const n = r.int(2, 20);
    return mk(c, `${n} SSLRequests split at random`, [send(c, Buffer.concat(Array(n).fill(SSL_REQUEST) as Buffer[])), ...t.steps], ['08P01', 'close', '08006']);
  }
  if (v === 2) {
    // 'S', then SSLRequests where the ClientHello should be.
    const n = r.int(1, 5);
    return mk(c, `SSLRequest → 'S' → ${n} more SSLRequests in place of a ClientHello`, [{ op: 'ssl', then: 'raw', chunks: split(r, SSL_REQUEST) }, send(c, Buffer.concat(Array(n).fill(SSL_REQUEST) as Buffer[])), ...t.steps]);
  }
  const tls = tlsStep(c);
  if (v === 3) {
    return mk(c, `${tls.kind} → SSLRequest inside TLS`, [tls.step, send(c, SSL_REQUEST), ...t.steps], ['08P01']);
  }
  if (v === 4) {
    return mk(c, `${tls.kind} → GSSENCRequest inside TLS`, [tls.step, send(c, GSSENC_REQUEST), ...t.steps], ['08P01']);
  }
  // Inside TLS, after a valid startup: SSLRequest bytes as a typed message (type 0x00, length 8).
  const p = saslPrelude(c);
  return mk(c, `${p.what} → SSLRequest in place of SASLInitialResponse`, [...p.steps, send(c, SSL_REQUEST), ...t.steps]);
}

function saslInitialCase(c: Ctx): FuzzCase {
  const { r } = c;
  const p = saslPrelude(c);
  // 30% of the time the garbage is pipelined right behind the StartupMessage (before R10).
  const steps = r.chance(0.3) ? p.steps.filter((s) => s.op !== 'await') : p.steps;
  const nonce = r.nonce(r.int(1, 40));
  const t = tail(c);
  const v = r.int(0, 30);
  let msg: Buffer;
  let what: string;
  let expect: readonly Outcome[] | undefined = ['08P01'];
  let expectWithoutPlus: readonly Outcome[] | undefined;
  switch (v) {
    case 0: msg = typed('p', b(`c=biws,r=${nonce},p=${r.bytes(32).toString('base64')}`)); what = 'SASLResponse (client-final) before SASLInitialResponse'; break;
    case 1: {
      const mech = r.pick(['SCRAM-SHA-1', 'SCRAM-SHA-512', 'PLAIN', 'OAUTHBEARER', 'scram-sha-256', 'SCRAM-SHA-256 ', 'GSSAPI', r.word(r.int(1, 30))]);
      msg = saslInitial(mech, clientFirst(nonce));
      what = `unknown mechanism ${JSON.stringify(mech)}`;
      expect = ['28000'];
      break;
    }
    case 2: msg = saslInitial('', clientFirst(nonce)); what = 'empty mechanism name'; break;
    case 3: msg = saslInitial(withBadUtf8(r, 'SCRAM-SHA-256'), clientFirst(nonce)); what = 'mechanism name not UTF-8'; break;
    case 4: msg = typed('p', b('SCRAM-SHA-256')); what = 'mechanism name without NUL'; break;
    case 5: msg = saslInitial('S'.repeat(r.int(1_000, 60_000)), clientFirst(nonce)); what = 'huge mechanism name'; expect = ['28000']; break;
    case 6: msg = saslInitial('SCRAM-SHA-256', null); what = 'no initial response (length -1)'; break;
    case 7: msg = typed('p', cat(saslInitialBody('SCRAM-SHA-256', null), r.bytes(r.int(1, 8)))); what = 'length -1 with trailing bytes'; break;
    case 8: {
      const data = clientFirst(nonce);
      const len = r.pick([data.length + r.int(1, 100), data.length - r.int(1, data.length), -2, -0x8000_0000, 0x7fff_ffff]);
      msg = saslInitial('SCRAM-SHA-256', data, len);
      what = `data length word ${len} for ${data.length} bytes`;
      break;
    }
    case 9: msg = typed('p', cat('SCRAM-SHA-256', Buffer.from([0]), r.bytes(r.int(0, 3)))); what = 'truncated before the data length'; break;
    case 10: msg = saslInitial('SCRAM-SHA-256', Buffer.alloc(0)); what = 'empty client-first'; break;
    case 11: msg = saslInitial('SCRAM-SHA-256', b(`p=tls-server-end-point,,n=,r=${nonce}`)); what = 'client-first asking for channel binding'; break;
    case 12: msg = saslInitial('SCRAM-SHA-256', b(`n,a=${r.word(5)},n=,r=${nonce}`)); what = 'client-first with an authzid'; break;
    case 13: msg = saslInitial('SCRAM-SHA-256', r.bytes(r.int(1, 200))); what = 'random client-first'; expect = undefined; break;
    case 14:
      // 'y': the client supports channel binding but thinks we do not. Accepted by a proxy that
      // does not offer SCRAM-SHA-256-PLUS; refused (a downgrade, RFC 5802 §6) by one that does.
      msg = saslInitial('SCRAM-SHA-256', b(`y,,n=,r=${nonce}`));
      what = "client-first 'y', then nothing";
      expect = ['08P01'];
      expectWithoutPlus = stall(t.fin);
      break;
    case 15: msg = saslInitial('SCRAM-SHA-256', b(`n,,m=${r.word(4)},n=,r=${nonce}`)); what = 'mandatory extension'; break;
    case 16: msg = saslInitial('SCRAM-SHA-256', b(r.pick(['n,,n=', 'n,,n=,r=', 'n,,r=abc', 'n,,', 'n,,n=,s=abc']))); what = 'missing or empty nonce'; break;
    case 17: {
      const badNonce = `${nonce}${r.pick([' ', '\x7f', '\x01', 'é', '\u2028'])}x`;
      msg = saslInitial('SCRAM-SHA-256', b(`n,,n=,r=${badNonce}`));
      what = 'nonce with an invalid character';
      break;
    }
    case 18: {
      const long = r.chance(0.5);
      msg = saslInitial('SCRAM-SHA-256', clientFirst(r.nonce(long ? r.int(513, 5000) : 512)));
      what = long ? 'nonce over 512 characters' : 'nonce of exactly 512 characters (accepted), then nothing';
      expect = long ? ['08P01'] : stall(t.fin);
      break;
    }
    case 19: msg = saslInitial('SCRAM-SHA-256', b(`n,,n=,r=${nonce},=5`)); what = 'bad attribute after the nonce'; break;
    case 20: msg = saslInitial('SCRAM-SHA-256', withBadUtf8(r, `n,,n=,r=${nonce}`)); what = 'client-first not UTF-8'; expect = undefined; break;
    case 21: msg = cat('p', be32(r.pick([2 * 1024 * 1024, 0x7fff_ffff, 1024 * 1024 + 5]))); what = 'oversized SASLInitialResponse header'; break;
    case 22: msg = typed('Q', b('SELECT 1\0')); what = 'Query instead of SASLInitialResponse'; break;
    case 23: msg = typed('X', Buffer.alloc(0)); what = 'Terminate instead of SASLInitialResponse'; expect = ['close']; break;
    case 24: {
      const type = r.pick([0x00, 0x01, 0x45, 0x52, 0x53, 0x63, 0x66, 0x70 ^ 0x20, 0xff]);
      msg = typed(type, r.bytes(r.int(0, 32)));
      what = `message type 0x${type.toString(16)} instead of SASLInitialResponse`;
      break;
    }
    case 25: msg = typed('p', b('secret\0')); what = 'cleartext PasswordMessage'; break;
    case 26: {
      // SCRAM-SHA-256-PLUS with a channel-binding type other than tls-server-end-point, or none.
      const gs2 = r.pick(['p=tls-unique', 'p=tls-exporter', 'p=', 'n', 'y', `p=${r.word(8)}`]);
      msg = saslInitial('SCRAM-SHA-256-PLUS', b(`${gs2},,n=,r=${nonce}`));
      what = `SCRAM-SHA-256-PLUS with gs2 header ${JSON.stringify(gs2)}`;
      expect = ['08P01'];
      expectWithoutPlus = ['28000'];
      break;
    }
    case 27: {
      // A proper SCRAM-SHA-256-PLUS client-first: accepted where offered, then nothing.
      msg = saslInitial('SCRAM-SHA-256-PLUS', b(`p=tls-server-end-point,,n=,r=${nonce}`));
      what = 'SCRAM-SHA-256-PLUS client-first (accepted where offered), then nothing';
      expect = stall(t.fin);
      expectWithoutPlus = ['28000'];
      break;
    }
    case 28: {
      const mech = r.pick(['SCRAM-SHA-256-PLUS\0SCRAM-SHA-256', 'SCRAM-SHA-256-PLUS ', 'scram-sha-256-plus', 'SCRAM-SHA-256-PLUS-PLUS']);
      msg = saslInitial(mech, b(`p=tls-server-end-point,,n=,r=${nonce}`));
      what = `mechanism ${JSON.stringify(mech)}`;
      expect = mech.includes('\0') ? ['08P01'] : ['28000'];
      break;
    }
    case 29: {
      // Over a megabyte of pipelined messages behind the first: the proxy must bound what it
      // buffers for a client it has not authenticated, and still answer and close.
      const n = r.int(1_100, 1_400);
      const one = typed('p', r.bytes(1_000));
      msg = Buffer.concat(Array(n).fill(one) as Buffer[]);
      what = `${n} pipelined 1 kB 'p' messages (${Math.round(msg.length / 1024)} kB)`;
      expect = undefined;
      break;
    }
    default: {
      const first = saslInitial('SCRAM-SHA-256', clientFirst(nonce));
      msg = Buffer.concat([first, first]);
      what = 'two SASLInitialResponses (the second is read as client-final)';
      break;
    }
  }
  return mk(c, `${p.what} → ${what}, ${t.kind}`, [...steps, send(c, msg), ...t.steps], expect, expectWithoutPlus);
}

/** Expected outcome of each client-final mutation. */
const FINAL_EXPECT: Partial<Record<FinalMutation, readonly Outcome[]>> = {
  'bad-proof': ['28P01'],
  'extension-attr': ['28P01'],
  'huge-attr': ['28P01'],
  'pipelined-query': ['28P01'],
  'double-final': ['28P01'],
  terminate: ['close'],
  'invalid-utf8': ['08P01'],
};

function saslFinalCase(c: Ctx): FuzzCase {
  const { r } = c;
  const p = saslPrelude(c);
  const nonce = r.nonce(24);
  const mutation = r.pick(FINAL_MUTATIONS.filter((m) => m !== 'truncated'));
  const t = tail(c);
  // One in four goes through SCRAM-SHA-256-PLUS with the right channel-binding data.
  const plus = r.chance(0.25);
  const initial = plus ? saslInitial('SCRAM-SHA-256-PLUS', b(`p=tls-server-end-point,,n=,r=${nonce}`)) : saslInitial('SCRAM-SHA-256', clientFirst(nonce));
  const steps: Step[] = [...p.steps, send(c, initial), { op: 'await', auth: 11 },
    { op: 'final', mutation, clientNonce: nonce, seed: r.int(0, 2 ** 31), truncateAt: 0, ...(plus ? { plus } : {}) }, ...t.steps];
  const expect = FINAL_EXPECT[mutation] ?? ['08P01'];
  return mk(c, `${p.what} → SASLInitial${plus ? ' SCRAM-SHA-256-PLUS' : ''} → client-final '${mutation}', ${t.kind}`, steps, expect, plus ? ['28000'] : undefined);
}

/**
 * The client-final message (or what is sent in its place) for `mutation`, given the server-first
 * message of the SASLContinue. Never a valid proof: fuzz cases must never authenticate.
 */
export function buildFinal(mutation: FinalMutation, serverFirst: string, clientNonce: string, seed: number, truncateAt = 0, cbind?: Buffer): Buffer {
  const r = new Rng(seed);
  // c=: base64 of the gs2 header ('n,,' → biws), plus the binding data with SCRAM-SHA-256-PLUS.
  const cb = cbind ? cbind.toString('base64') : 'biws';
  const nonce = /(?:^|,)r=([^,]*)/.exec(serverFirst)?.[1] ?? '';
  const proof = (n = 32): string => r.bytes(n).toString('base64');
  const fin = (s: string | Buffer): Buffer => typed('p', b(s));
  switch (mutation) {
    case 'bad-proof': return fin(`c=${cb},r=${nonce},p=${proof()}`);
    case 'wrong-nonce': return fin(`c=${cb},r=${r.nonce(nonce.length || 48)},p=${proof()}`);
    case 'client-nonce-only': return fin(`c=${cb},r=${clientNonce},p=${proof()}`);
    case 'nonce-extended': return fin(`c=${cb},r=${nonce}${r.nonce(r.int(1, 8))},p=${proof()}`);
    case 'bad-base64-proof': return fin(`c=${cb},r=${nonce},p=${r.pick(['@@@@', '****', 'ab=c', 'a', '=====', '!!'])}${proof(8)}`);
    case 'bad-base64-cbind': return fin(`c=${r.pick(['b!ws', 'bi ws', '%%%'])},r=${nonce},p=${proof()}`);
    case 'cbind-mismatch': {
      const wrong = cbind ? Buffer.concat([cbind.subarray(0, cbind.length - 32), r.bytes(32)]).toString('base64') : 'eSws';
      return fin(`c=${r.pick([wrong, cbind ? 'biws' : 'eSws', 'cD10bHMtdW5pcXVlLCw=', 'bixhPXgs', ''])},r=${nonce},p=${proof()}`);
    }
    case 'short-proof': return fin(`c=${cb},r=${nonce},p=${proof(r.int(0, 31))}`);
    case 'long-proof': return fin(`c=${cb},r=${nonce},p=${proof(r.int(33, 200))}`);
    case 'missing-proof': return fin(`c=${cb},r=${nonce}`);
    case 'proof-first': return fin(`p=${proof()},c=${cb},r=${nonce}`);
    case 'attr-order': return fin(`r=${nonce},c=${cb},p=${proof()}`);
    case 'empty': return fin('');
    case 'invalid-utf8': return fin(cat(`c=${cb},r=${nonce}`, r.pick(BAD_UTF8), `,p=${proof()}`));
    case 'huge-attr': return fin(`c=${cb},r=${nonce},x=${'A'.repeat(r.int(10_000, 200_000))},p=${proof()}`);
    case 'extension-attr': return fin(`c=${cb},r=${nonce},e=${r.word(6)},p=${proof()}`);
    case 'second-initial': return saslInitial('SCRAM-SHA-256', clientFirst(clientNonce));
    case 'password': return fin('secret\0');
    case 'query': return typed('Q', b('SELECT 1\0'));
    case 'terminate': return typed('X', Buffer.alloc(0));
    case 'sync': return typed('S', Buffer.alloc(0));
    case 'random-type': return typed(r.pick([0x00, 0x42, 0x45, 0x50, 0x64, 0xff]), r.bytes(r.int(0, 40)));
    case 'len-huge': return cat('p', be32(r.pick([0x7fff_ffff, 1024 * 1024 + 5, 64 * 1024 * 1024])));
    case 'len-negative': return cat('p', be32(r.pick([-1, -4, -0x8000_0000])), r.bytes(8));
    case 'len-short': return cat('p', be32(r.int(0, 3)), r.bytes(8));
    case 'truncated': {
      const full = fin(`c=${cb},r=${nonce},p=${proof()}`);
      return full.subarray(0, truncateAt % full.length);
    }
    case 'pipelined-query': return Buffer.concat([fin(`c=${cb},r=${nonce},p=${proof()}`), typed('Q', b('SELECT 1\0'))]);
    case 'double-final': {
      const one = fin(`c=${cb},r=${nonce},p=${proof()}`);
      return Buffer.concat([one, one]);
    }
  }
}

function cancel(c: Ctx): FuzzCase {
  const { r } = c;
  const v = r.int(0, 6);
  const t = tail(c);
  const pid = r.int(0, 0xffffffff);
  const key = r.int(0, 0xffffffff);
  switch (v) {
    case 0: {
      const len = r.pick([8, 9, 12, 15, 17, 20, 64, MAX_STARTUP]);
      return mk(c, `CancelRequest with length ${len}, ${t.kind}`, [send(c, cat(be32(len), be32(CODES.CANCEL), r.bytes(r.int(0, 24)))), ...t.steps], ['08P01']);
    }
    case 1: return mk(c, 'CancelRequest for an unknown key', [send(c, cancelRequest(pid, key))], ['close']);
    case 2: return mk(c, 'CancelRequest + trailing garbage', [send(c, cat(cancelRequest(pid, key), r.bytes(r.int(1, 200))))], ['close']);
    case 3: return mk(c, `CancelRequest, 12 of 16 bytes, ${t.kind}`, [send(c, cancelRequest(pid, key).subarray(0, 12)), ...t.steps], stall(t.fin));
    case 4: {
      const tls = tlsStep(c);
      return mk(c, `${tls.kind} → CancelRequest inside TLS`, [tls.step, send(c, cancelRequest(pid, key))], ['close']);
    }
    case 5: return mk(c, "GSSENCRequest → 'N' → CancelRequest", [{ op: 'gssenc', chunks: split(r, GSSENC_REQUEST) }, send(c, cancelRequest(pid, key))], ['close']);
    default: return mk(c, 'two CancelRequests in one write', [{ op: 'send', chunks: [cat(cancelRequest(pid, key), cancelRequest(key, pid))] }], ['close']);
  }
}

function gssenc(c: Ctx): FuzzCase {
  const { r } = c;
  const v = r.int(0, 5);
  const t = tail(c);
  const gss: Step = { op: 'gssenc', chunks: split(r, GSSENC_REQUEST) };
  switch (v) {
    case 0: return mk(c, 'GSSENCRequest + garbage in one write', [{ op: 'send', chunks: [cat(GSSENC_REQUEST, r.bytes(r.int(1, 100)))] }, ...t.steps], ['08P01']);
    case 1: return mk(c, `GSSENCRequest → 'N' → random bytes, ${t.kind}`, [gss, send(c, r.bytes(r.int(1, 300))), ...t.steps]);
    case 2: return mk(c, "GSSENCRequest → 'N' → plaintext startup", [gss, send(c, goodStartup(c))], ['28000']);
    case 3: {
      const n = r.int(2, 6);
      const steps: Step[] = Array.from({ length: n }, () => ({ op: 'gssenc', chunks: split(r, GSSENC_REQUEST) }) as Step);
      return mk(c, `${n} × (GSSENCRequest → 'N'), then silence`, steps, ['08006']);
    }
    case 4: {
      const tls = tlsStep(c);
      return mk(c, `GSSENCRequest → 'N' → ${tls.kind} → random bytes, ${t.kind}`, [gss, tls.step, send(c, r.bytes(r.int(1, 200))), ...t.steps]);
    }
    default: return mk(c, 'GSSENCRequest with length 12', [send(c, cat(be32(12), be32(CODES.GSSENC), r.bytes(4)))], ['08P01']);
  }
}

function protocolVersion(c: Ctx): FuzzCase {
  const { r } = c;
  const t = tail(c);
  const v = r.int(0, 7);
  if (v === 0) {
    // A real protocol 2.0 startup packet (296 bytes: database[64] user[32] options[64] unused[64] tty[64]).
    const pkt = Buffer.alloc(296);
    pkt.writeInt32BE(296, 0);
    pkt.writeUInt32BE(2 << 16, 4);
    pkt.write(c.t.database, 8);
    pkt.write('x', 72);
    return mk(c, 'protocol 2.0 startup packet', [send(c, pkt), ...t.steps], ['0A000']);
  }
  if (v <= 3) {
    const [major, minor] = r.pick([[4, 0], [2, 0], [1, 0], [0, 0], [0xffff, 0xffff], [1234, 5681], [1234, 5677], [1234, 5680 + r.int(0, 100)], [2, 9999]] as const);
    const pkt = startupMessage([['user', 'x']], { version: (major << 16) | minor });
    const send8 = r.chance(0.3) ? pkt.subarray(0, 8) : pkt;
    const expect: readonly Outcome[] = major === 1234 && minor >= 5678 && minor <= 5680 ? ['08P01', '08006', 'close'] : ['0A000'];
    return mk(c, `protocol ${major}.${minor}${send8.length === 8 ? ' (header only)' : ''}`, [send(c, send8), ...t.steps], expect);
  }
  // 3.x with x > 0: NegotiateProtocolVersion, then the usual; plaintext is refused first.
  const minor = r.pick([1, 2, 9999, 0xffff]);
  const params: Param[] = [['user', v === 7 ? c.t.role : c.t.role], ['database', c.t.database]];
  const pq = r.chance(0.5) ? r.int(1, 4) : 0;
  for (let i = 0; i < pq; i++) params.push([`_pq_.${r.word(5)}`, r.word(3)]);
  const pkt = startupMessage(params, { version: (3 << 16) | minor });
  if (v === 4) return mk(c, `plaintext protocol 3.${minor} with ${pq} _pq_ options`, [send(c, pkt), ...t.steps], ['28000']);
  const tls = tlsStep(c, 1);
  return mk(c, `${tls.kind} protocol 3.${minor} with ${pq} _pq_ options, ${t.kind}`, [tls.step, send(c, pkt), ...t.steps], stall(t.fin));
}

function oversized(c: Ctx): FuzzCase {
  const { r } = c;
  const v = r.int(0, 5);
  const t = tail(c);
  const big = (size: number, version: number = CODES.V3): Buffer => {
    const base = startupMessage([['user', 'x'], ['application_name', '']], { version });
    return startupMessage([['user', 'x'], ['application_name', 'a'.repeat(size - base.length)]], { version });
  };
  switch (v) {
    case 0: {
      const size = r.int(MAX_STARTUP + 1, 40_000);
      return mk(c, `whole startup packet of ${size} B`, [send(c, big(size)), ...t.steps], ['08P01']);
    }
    case 1: {
      const len = r.int(MAX_STARTUP + 1, 0x7fff_ffff);
      const withCode = r.chance(0.5);
      // A first byte 0x16 is a TLS handshake record to a proxy that accepts direct TLS: it may
      // then fail the handshake and close instead.
      const expect = len >>> 24 === 0x16 ? ['08P01', 'close'] : ['08P01'];
      return mk(c, `length word ${len} with ${withCode ? 'the code' : 'nothing'} after it, ${t.kind}`, [send(c, withCode ? cat(be32(len), be32(CODES.V3)) : be32(len)), ...t.steps], expect);
    }
    case 2: {
      const tls = tlsStep(c);
      const size = r.int(MAX_STARTUP + 1, 30_000);
      return mk(c, `${tls.kind} → startup packet of ${size} B`, [tls.step, send(c, big(size)), ...t.steps], ['08P01']);
    }
    case 3: return mk(c, 'exactly 10,000 bytes, plaintext (parsed, then refused: no TLS)', [send(c, big(MAX_STARTUP))], ['28000']);
    case 4: {
      const size = r.pick([MAX_STARTUP - 1, MAX_STARTUP, MAX_STARTUP + 1]);
      const tls = tlsStep(c, 0);
      return mk(c, `${tls.kind} → startup packet of ${size} B, ${t.kind}`, [tls.step, send(c, big(size)), ...t.steps], size > MAX_STARTUP ? ['08P01'] : undefined);
    }
    default: {
      // Oversized with an unsupported version: either check may come first, both are 08P01/0A000.
      const size = r.int(MAX_STARTUP + 1, 20_000);
      return mk(c, `startup packet of ${size} B with version 2.0`, [send(c, big(size, 2 << 16))], ['08P01', '0A000']);
    }
  }
}

function missingUser(c: Ctx): FuzzCase {
  const { r } = c;
  const t = tail(c);
  const v = r.int(0, 5);
  const [params, what] = ([
    [[['database', c.t.database]], 'no user'],
    [[['user', ''], ['database', c.t.database]], 'empty user'],
    [[], 'no parameters at all'],
    [[['USER', c.t.role], ['database', c.t.database]], "'USER' instead of 'user'"],
    [[['user', c.t.role], ['user', 'other']], 'user twice'],
    [[['database', c.t.database], ['application_name', 'x'.repeat(r.int(0, 5000))]], 'no user, a long application_name'],
  ] as [Param[], string][])[v]!;
  const pkt = startupMessage(params);
  if (r.chance(0.5)) {
    const tls = tlsStep(c);
    return mk(c, `${tls.kind} → startup with ${what}`, [tls.step, send(c, pkt), ...t.steps], ['08P01']);
  }
  return mk(c, `startup with ${what}`, [send(c, pkt), ...t.steps], ['08P01']);
}

function unterminated(c: Ctx): FuzzCase {
  const { r } = c;
  const t = tail(c);
  const user = c.t.role;
  const v = r.int(0, 5);
  let body: Buffer;
  let what: string;
  switch (v) {
    case 0: body = paramsBody([['user', user], ['database', 'd']], { terminator: false }); what = 'no final terminator'; break;
    case 1: body = cat('user\0', user, '\0database\0d'); what = 'last value without NUL'; break;
    case 2: body = cat('user\0', user, '\0database'); what = 'key without value'; break;
    case 3: body = paramsBody([['user', user]], { trailing: r.bytes(r.int(1, 50)) }); what = 'bytes after the terminator'; break;
    case 4: body = cat('user\0', user, '\0\0database\0d\0\0'); what = 'a terminator in the middle'; break;
    default: body = cat('user'); what = "just 'user'"; break;
  }
  const pkt = startupPacket(CODES.V3, body);
  if (r.chance(0.5)) {
    const tls = tlsStep(c);
    return mk(c, `${tls.kind} → startup with ${what}`, [tls.step, send(c, pkt), ...t.steps], ['08P01']);
  }
  return mk(c, `startup with ${what}`, [send(c, pkt), ...t.steps], ['08P01']);
}

function startupParams(c: Ctx): FuzzCase {
  const { r } = c;
  const t = tail(c);
  const v = r.int(0, 6);
  const base: Param[] = [['user', c.t.role], ['database', c.t.database]];
  switch (v) {
    case 0: {
      const tls = tlsStep(c, 1);
      return mk(c, `${tls.kind} → options endpoint=<another endpoint>`, [tls.step, send(c, startupMessage([...base, ['options', `endpoint=ep-other-${r.word(6)}`]]))], ['08004']);
    }
    case 1: {
      const tls = tlsStep(c, 0);
      const opt = r.pick(['endpoint=', 'endpoint=-bad-', `endpoint=${'a'.repeat(80)}`, 'endpoint=UP_PER', '--endpoint', '']);
      return mk(c, `${tls.kind} → options ${JSON.stringify(opt)}`, [tls.step, send(c, startupMessage([...base, ['options', opt]])), ...t.steps]);
    }
    case 2: {
      const tls = tlsStep(c, 1);
      const val = r.pick(['true', 'database', 'on', '1', 'yes']);
      return mk(c, `${tls.kind} → replication=${val}`, [tls.step, send(c, startupMessage([...base, ['replication', val]]))], ['0A000']);
    }
    case 3: {
      const tls = tlsStep(c, 1);
      const n = r.int(100, 600);
      const params: Param[] = [...base];
      for (let i = 0; i < n; i++) params.push([`k${i}`, r.word(r.int(0, 8))]);
      const pkt = startupMessage(params);
      return mk(c, `${tls.kind} → ${n} parameters (${pkt.length} B), ${t.kind}`, [tls.step, send(c, pkt), ...t.steps], pkt.length > MAX_STARTUP ? ['08P01'] : stall(t.fin));
    }
    case 4: {
      const tls = tlsStep(c, 1);
      return mk(c, `${tls.kind} → a parameter with an empty key`, [tls.step, send(c, startupMessage([...base, ['', 'x']]))], ['08P01']);
    }
    case 5: {
      // No SNI and no options: nothing names an endpoint — unless the proxy asks for a cleartext
      // password (R3, the "password hack": endpoint=<id>;<password>), which gets a hostile one.
      const tls: Step = { op: 'ssl', then: 'tls', servername: '', chunks: split(r, SSL_REQUEST) };
      const pw = r.pick([
        ['a wrong password for the endpoint', typed('p', b(`endpoint=${c.t.endpoint};wrong-${r.word(8)}\0`))],
        ['an unknown endpoint', typed('p', b(`endpoint=ep-unknown-${r.int(0, 3)}$${r.word(8)}\0`))],
        ['no endpoint prefix', typed('p', b(`${r.word(12)}\0`))],
        ['an empty endpoint', typed('p', b(`endpoint=;${r.word(4)}\0`))],
        ['a bad endpoint label', typed('p', b(`endpoint=-${'X'.repeat(r.int(1, 300))};pw\0`))],
        ['no NUL terminator', typed('p', b(`endpoint=${c.t.endpoint};pw`))],
        ['two NULs', typed('p', b(`endpoint=${c.t.endpoint};p\0w\0`))],
        ['invalid UTF-8', typed('p', cat(`endpoint=${c.t.endpoint};`, r.pick(BAD_UTF8), '\0'))],
        ['a SASLInitialResponse', saslInitial('SCRAM-SHA-256', clientFirst(r.nonce(20)))],
        ['an empty message', typed('p', Buffer.alloc(0))],
        ['a huge password', typed('p', b(`endpoint=${c.t.endpoint};${'p'.repeat(r.int(10_000, 500_000))}\0`))],
      ] as const);
      return mk(c, `tls(no-sni) → startup without options → (if asked for a password) ${pw[0]}, ${t.kind}`, [tls, send(c, startupMessage(base)), { op: 'await', auth: 3 }, send(c, pw[1]), ...t.steps]);
    }
    default: {
      const tls = tlsStep(c, 1);
      const user = r.pick(['a'.repeat(r.int(64, 9000)), '"; DROP ROLE x; --', '\u{1F600}', 'user with spaces', '%s%n']);
      return mk(c, `${tls.kind} → startup with an odd user (${user.length} chars), ${t.kind}`, [tls.step, send(c, startupMessage([['user', user], ['database', c.t.database]])), ...t.steps], stall(t.fin));
    }
  }
}

function tlsGarbage(c: Ctx): FuzzCase {
  const { r } = c;
  const t = tail(c);
  const tls = tlsStep(c);
  const x = r.float();
  if (x < 0.25) {
    // Forged TLS records on the wire, under the session: bad MAC, plaintext alerts, a
    // ChangeCipherSpec, an oversized record header, random bytes.
    const [what, rec] = r.pick([
      ['an application-data record with a bad MAC', cat(Buffer.from([0x17, 3, 3]), be16(48), r.bytes(48))],
      ['a plaintext close_notify alert', Buffer.from([0x15, 3, 3, 0, 2, 1, 0])],
      ['a plaintext fatal alert', Buffer.from([0x15, 3, 3, 0, 2, 2, r.int(0, 255)])],
      ['a ChangeCipherSpec record', Buffer.from([0x14, 3, 3, 0, 1, 1])],
      ['a record header claiming 65535 bytes', cat(Buffer.from([0x17, 3, 3, 0xff, 0xff]), r.bytes(r.int(0, 64)))],
      ['a handshake record (renegotiation attempt)', cat(Buffer.from([0x16, 3, 3]), be16(40), r.bytes(40))],
      ['random bytes', r.bytes(r.int(1, 200))],
    ] as const);
    const before = r.chance(0.5) ? [send(c, goodStartup(c))] : [];
    return mk(c, `${tls.kind}${before.length ? ' → startup' : ''} → ${what} under the TLS session, ${t.kind}`, [tls.step, ...before, { op: 'raw', chunks: split(r, rec) }, ...t.steps]);
  }
  const bytes = x < 0.7 ? r.bytes(r.int(1, 400)) : x < 0.9 ? cat(be32(r.int(8, 300)), be32(r.pick([CODES.V3, CODES.CANCEL, r.int(0, 0xffffffff)])), r.bytes(r.int(0, 300))) : r.bytes(r.int(1_000, 40_000));
  return mk(c, `${tls.kind} → ${bytes.length} random bytes inside TLS, ${t.kind}`, [tls.step, send(c, bytes), ...t.steps]);
}

function badTlsHandshake(c: Ctx): FuzzCase {
  const { r } = c;
  const t = tail(c);
  const ssl: Step = { op: 'ssl', then: 'raw', chunks: split(r, SSL_REQUEST) };
  const hello = clientHello(r.bytes(32), r.chance(0.8) ? sniReal(c.t) : undefined);
  const v = r.int(0, 7);
  switch (v) {
    case 0: return mk(c, `'S' → ${'random bytes'}, ${t.kind}`, [ssl, send(c, r.bytes(r.int(1, 500))), ...t.steps]);
    case 1: return mk(c, "'S' → a plaintext StartupMessage", [ssl, send(c, goodStartup(c)), ...t.steps]);
    case 2: return mk(c, "'S' → an HTTP request", [ssl, send(c, b('GET / HTTP/1.1\r\nHost: x\r\n\r\n')), ...t.steps]);
    case 3: {
      const k = r.int(0, hello.length - 1);
      return mk(c, `'S' → ClientHello cut at ${k}/${hello.length}, ${t.kind}`, [ssl, ...(k ? [send(c, hello.subarray(0, k))] : []), ...t.steps]);
    }
    case 4: {
      const m = Buffer.from(hello);
      const n = r.int(1, 6);
      for (let i = 0; i < n; i++) m[r.int(0, m.length - 1)] = r.int(0, 255);
      return mk(c, `'S' → ClientHello with ${n} random bytes changed, ${t.kind}`, [ssl, send(c, m), ...t.steps]);
    }
    case 5: return mk(c, `'S' → a complete ClientHello, then nothing more, ${t.kind}`, [ssl, send(c, hello), ...t.steps]);
    case 6: return mk(c, `direct TLS: a ClientHello without SSLRequest, ${t.kind}`, [send(c, hello), ...t.steps]);
    default: {
      const m = Buffer.from(hello);
      m.writeUInt16BE(r.pick([0, 1, 0x4000 + r.int(1, 0xbfff), m.length]), 3);
      return mk(c, `'S' → ClientHello with record length ${m.readUInt16BE(3)}, ${t.kind}`, [ssl, send(c, m), ...t.steps]);
    }
  }
}

function directTls(c: Ctx): FuzzCase {
  const { r } = c;
  const t = tail(c);
  const s = sni(c, 0.8);
  const alpn = r.pick([['postgresql'], ['postgresql'], ['postgresql'], undefined, ['h2'], ['http/1.1', 'postgresql'], ['postgresql2']]);
  const steps: Step[] = [];
  let what = '';
  if (r.chance(0.15)) {
    steps.push({ op: 'gssenc', chunks: split(r, GSSENC_REQUEST) });
    what = "GSSENCRequest → 'N' → ";
  }
  steps.push({ op: 'direct', servername: s.name, ...(alpn ? { alpn } : {}) });
  what += `direct TLS (${s.kind}, ALPN ${alpn ? alpn.join(',') : 'none'}) → `;
  const v = r.int(0, 6);
  switch (v) {
    case 0: steps.push(send(c, goodStartup(c, saslUser(c)))); what += 'startup'; break;
    case 1: steps.push(send(c, r.bytes(r.int(1, 400)))); what += 'random bytes'; break;
    case 2: steps.push(send(c, SSL_REQUEST)); what += 'SSLRequest inside'; break;
    case 3: steps.push(send(c, startupMessage([['user', withBadUtf8(r, c.t.role)]]))); what += 'startup with invalid UTF-8'; break;
    case 4: steps.push(send(c, cat(be32(r.int(MAX_STARTUP + 1, 0x7fff_ffff)), be32(CODES.V3)))); what += 'oversized startup header'; break;
    case 5: {
      const nonce = r.nonce(24);
      steps.push(send(c, goodStartup(c, saslUser(c))), { op: 'await', auth: 10 }, send(c, saslInitial('SCRAM-SHA-256', clientFirst(nonce))), { op: 'await', auth: 11 },
        { op: 'final', mutation: r.pick(FINAL_MUTATIONS.filter((m) => m !== 'truncated')), clientNonce: nonce, seed: r.int(0, 2 ** 31), truncateAt: 0 });
      what += 'startup → SASLInitial → a bad client-final';
      break;
    }
    default: steps.push(send(c, cancelRequest(r.int(0, 0xffffffff), r.int(0, 0xffffffff)))); what += 'CancelRequest'; break;
  }
  steps.push(...t.steps);
  return mk(c, `${what}, ${t.kind}`, steps);
}

const BUILDERS: Record<Family, (c: Ctx) => FuzzCase> = {
  'random-bytes': randomBytes,
  truncated,
  'wrong-length': wrongLength,
  'invalid-utf8': invalidUtf8,
  'repeated-ssl': repeatedSsl,
  'sasl-initial': saslInitialCase,
  'sasl-final': saslFinalCase,
  cancel,
  gssenc,
  'protocol-version': protocolVersion,
  'oversized-startup': oversized,
  'missing-user': missingUser,
  'unterminated-params': unterminated,
  'startup-params': startupParams,
  'tls-garbage': tlsGarbage,
  'bad-tls-handshake': badTlsHandshake,
  'direct-tls': directTls,
};

// ---------------------------------------------------------------- entry points

/** A 32-bit PRNG seed from a family and a case seed (all 53 bits of it). */
function mixSeed(family: Family, seed: number): number {
  const lo = seed >>> 0;
  const hi = Math.floor(seed / 2 ** 32) >>> 0;
  return (hash(family) ^ Math.imul(lo, 0x9e3779b1) ^ Math.imul(hi + 1, 0x85ebca6b) ^ (lo >>> 16)) >>> 0;
}

/** The one case of `family` with `seed` (a pure function of its arguments). */
export function generateCase(family: Family, seed: number, target: Target = DEFAULT_TARGET): FuzzCase {
  if (!Number.isSafeInteger(seed) || seed < 0) throw new RangeError(`seed must be a non-negative integer, got ${seed}`);
  return BUILDERS[family]({ r: new Rng(mixSeed(family, seed)), t: target, family, seed });
}

/** Parses `<family>:<seed>`. */
export function parseCaseId(id: string): { family: Family; seed: number } {
  const m = /^([a-z0-9-]+):(\d+)$/.exec(id.trim());
  if (!m || !isFamily(m[1]!)) throw new Error(`not a fuzz case id: ${JSON.stringify(id)} (expected <family>:<seed>, families: ${FAMILIES.join(', ')})`);
  return { family: m[1], seed: Number(m[2]) };
}

export function caseFromId(id: string, target: Target = DEFAULT_TARGET): FuzzCase {
  const { family, seed } = parseCaseId(id);
  return generateCase(family, seed, target);
}

/** Case seeds of a run: run seed s gives s × 1,000,000 + k, so runs with nearby seeds do not overlap. */
export const RUN_SEED_STRIDE = 1_000_000;

/**
 * `n` cases for a run seeded with `seed`: the families in turn, the k-th case of a family with
 * seed `seed × 1,000,000 + k` (so consecutive truncation cases sweep every offset).
 */
export function generateCases(n: number, seed: number, target: Target = DEFAULT_TARGET): FuzzCase[] {
  if (!Number.isSafeInteger(seed * RUN_SEED_STRIDE + n) || seed < 0) throw new RangeError(`run seed must be a non-negative integer below ${Math.floor(Number.MAX_SAFE_INTEGER / RUN_SEED_STRIDE)}, got ${seed}`);
  const out: FuzzCase[] = [];
  for (let i = 0; i < n; i++) {
    const family = FAMILIES[i % FAMILIES.length]!;
    out.push(generateCase(family, seed * RUN_SEED_STRIDE + Math.floor(i / FAMILIES.length), target));
  }
  return out;
}

/** All the bytes a case sends up front (excluding what depends on the proxy's answers), for digests. */
export function caseBytes(c: FuzzCase): Buffer {
  const parts: Buffer[] = [];
  for (const s of c.steps) {
    if (s.op === 'send' || s.op === 'ssl' || s.op === 'gssenc' || s.op === 'raw') parts.push(...s.chunks);
    else parts.push(Buffer.from(`<${s.op}${s.op === 'final' ? `:${s.mutation}:${s.seed}:${s.truncateAt}` : s.op === 'await' ? `:${s.auth}` : s.op === 'direct' ? `:${s.servername}:${String(s.alpn)}` : ''}>`));
  }
  return Buffer.concat(parts);
}
