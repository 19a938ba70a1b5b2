/**
 * SCRAM-SHA-256 (RFC 5802, RFC 7677) as Postgres speaks it
 * (https://www.postgresql.org/docs/current/sasl-authentication.html), both sides:
 *
 * - {@link ScramServerSession}: the proxy authenticates the client against the role's secret and,
 *   from the client's proof, recovers its ClientKey (ClientProof XOR HMAC(StoredKey, AuthMessage)).
 *   The proxy never sees the password.
 * - {@link ScramKeyClient}: the proxy authenticates to the compute with that ClientKey — the
 *   compute holds the same secret (same salt and iterations), so the key is all it takes.
 */
import { createHmac, randomBytes } from 'node:crypto';
import { XenonError } from '../../lib/errors.ts';
import { hmac, safeEqual, sha256, SCRAM_KEY_LEN, DEFAULT_ITERATIONS, xor, type ScramSecret } from '../../lib/scram.ts';

export const SCRAM_SHA_256 = 'SCRAM-SHA-256';
/** SCRAM with channel binding (RFC 5802 §6), type tls-server-end-point (RFC 5929): offered over TLS. */
export const SCRAM_SHA_256_PLUS = 'SCRAM-SHA-256-PLUS';
export const TLS_SERVER_END_POINT = 'tls-server-end-point';

function violation(msg: string): XenonError {
  return new XenonError('PROXY_PROTOCOL_VIOLATION', `malformed SCRAM message: ${msg}`, { userMessage: `malformed SCRAM message: ${msg}` });
}

/** Splits `a=1,b=2` into ordered [name, value] pairs (values may contain '='). */
function attributes(msg: string): [string, string][] {
  return msg.split(',').map((part) => {
    if (part.length < 2 || part[1] !== '=' || !/[a-zA-Z]/.test(part[0]!)) throw violation(`bad attribute ${JSON.stringify(part.slice(0, 20))}`);
    return [part[0]!, part.slice(2)];
  });
}

const PRINTABLE_NONCE = /^[\x21-\x2b\x2d-\x7e]+$/; // printable ASCII except ','
const B64 = /^[A-Za-z0-9+/]*={0,2}$/;

/** A deterministic-per-(endpoint, role) secret that matches no password: unknown endpoints and roles look like wrong passwords. */
export function mockSecret(key: Buffer, endpoint: string, role: string): ScramSecret {
  const salt = createHmac('sha256', key).update(`${endpoint}\0${role}`).digest().subarray(0, 16);
  return { iterations: DEFAULT_ITERATIONS, salt, storedKey: randomBytes(SCRAM_KEY_LEN), serverKey: randomBytes(SCRAM_KEY_LEN) };
}

export type ScramResult = { ok: true; clientKey: Buffer; serverFinal: string } | { ok: false };

export interface ScramServerOptions {
  /**
   * The tls-server-end-point channel-binding data of this connection (a hash of our certificate),
   * when the client is on TLS: SCRAM-SHA-256-PLUS is then offered and a client that supports
   * channel binding must use it.
   */
  channelBinding?: Buffer;
}

export class ScramServerSession {
  private clientFirstBare = '';
  private serverFirst = '';
  private nonce = '';
  /** What the client's c= attribute must carry: gs2 header, plus the binding data with 'p='. */
  private expectedCbind = Buffer.alloc(0);
  private state: 'first' | 'final' | 'done' = 'first';
  /** True when the exchange used channel binding (for logs and metrics). */
  bound = false;

  constructor(
    private readonly secret: ScramSecret,
    private readonly opts: ScramServerOptions = {},
  ) {}

  /** The mechanisms to offer in AuthenticationSASL, preferred first. */
  get mechanisms(): string[] {
    return this.opts.channelBinding ? [SCRAM_SHA_256_PLUS, SCRAM_SHA_256] : [SCRAM_SHA_256];
  }

  /** Handles client-first-message for the mechanism the client chose; returns server-first-message. */
  clientFirst(data: Buffer | null, mechanism: string = SCRAM_SHA_256): string {
    if (this.state !== 'first') throw violation('unexpected client-first-message');
    if (!this.mechanisms.includes(mechanism)) {
      throw new XenonError('AUTH_METHOD_UNSUPPORTED', `client chose ${mechanism}`, {
        userMessage: `SASL authentication mechanism ${JSON.stringify(mechanism.slice(0, 40))} is not supported here: use ${this.mechanisms.join(' or ')}`,
      });
    }
    if (!data || data.length === 0) throw violation('empty client-first-message');
    const msg = data.toString('utf8');
    // gs2-header: cbind-flag "," [authzid] ","
    const m = /^(n|y|p=[^,]*),([^,]*),(.*)$/s.exec(msg);
    if (!m) throw violation('bad gs2 header');
    const flag = m[1]!;
    if (mechanism === SCRAM_SHA_256_PLUS) {
      if (!flag.startsWith('p=')) throw violation('SCRAM-SHA-256-PLUS was chosen but the client did not ask for channel binding');
      if (flag !== `p=${TLS_SERVER_END_POINT}`) throw violation(`unsupported channel-binding type ${JSON.stringify(flag.slice(2, 40))}: only tls-server-end-point`);
    } else if (flag.startsWith('p=')) {
      throw violation('channel binding requested without choosing SCRAM-SHA-256-PLUS');
    } else if (flag === 'y' && this.opts.channelBinding) {
      // RFC 5802 §6: the client supports binding but believes we do not — we offered it, so
      // something between us removed it from the list.
      throw violation('channel-binding negotiation failed: the client supports channel binding and thinks the server does not, but this server offered SCRAM-SHA-256-PLUS');
    }
    if (m[2] !== '') throw violation('authorization identities are not supported');
    const gs2Header = Buffer.from(`${flag},${m[2]},`, 'latin1');
    this.bound = mechanism === SCRAM_SHA_256_PLUS;
    this.expectedCbind = this.bound ? Buffer.concat([gs2Header, this.opts.channelBinding!]) : gs2Header;
    this.clientFirstBare = m[3]!;
    const attrs = attributes(this.clientFirstBare);
    if (attrs[0]?.[0] === 'm') throw violation('mandatory extensions are not supported');
    if (attrs[0]?.[0] !== 'n' || attrs[1]?.[0] !== 'r') throw violation('expected n= and r=');
    const clientNonce = attrs[1][1];
    if (!PRINTABLE_NONCE.test(clientNonce) || clientNonce.length > 512) throw violation('bad client nonce');
    this.nonce = clientNonce + randomBytes(18).toString('base64');
    this.serverFirst = `r=${this.nonce},s=${this.secret.salt.toString('base64')},i=${this.secret.iterations}`;
    this.state = 'final';
    return this.serverFirst;
  }

  /** Handles client-final-message: verifies the binding and the proof, and recovers the ClientKey. */
  clientFinal(data: Buffer): ScramResult {
    if (this.state !== 'final') throw violation('unexpected client-final-message');
    this.state = 'done';
    const msg = data.toString('utf8');
    const proofAt = msg.lastIndexOf(',p=');
    if (proofAt < 0) throw violation('missing proof');
    const withoutProof = msg.slice(0, proofAt);
    const attrs = attributes(withoutProof);
    if (attrs[0]?.[0] !== 'c' || attrs[1]?.[0] !== 'r') throw violation('expected c= and r=');
    const proofB64 = msg.slice(proofAt + 3);
    if (!B64.test(proofB64) || !B64.test(attrs[0][1])) throw violation('bad base64');
    if (!safeEqual(Buffer.from(attrs[0][1], 'base64'), this.expectedCbind)) {
      throw violation(this.bound ? 'channel-binding data does not match this TLS connection' : 'channel binding data mismatch');
    }
    if (attrs[1][1] !== this.nonce) throw violation('nonce mismatch');
    const proof = Buffer.from(proofB64, 'base64');
    if (proof.length !== SCRAM_KEY_LEN) throw violation('bad proof length');
    const authMessage = `${this.clientFirstBare},${this.serverFirst},${withoutProof}`;
    const clientKey = xor(proof, hmac(this.secret.storedKey, authMessage));
    if (!safeEqual(sha256(clientKey), this.secret.storedKey)) return { ok: false };
    return { ok: true, clientKey, serverFinal: `v=${hmac(this.secret.serverKey, authMessage).toString('base64')}` };
  }
}

/** The client side of SCRAM, holding a ClientKey instead of a password. */
export class ScramKeyClient {
  private readonly clientNonce = randomBytes(18).toString('base64');
  private clientFirstBare = '';
  private authMessage = '';

  constructor(
    private readonly clientKey: Buffer,
    private readonly secret: ScramSecret,
  ) {}

  first(): string {
    this.clientFirstBare = `n=,r=${this.clientNonce}`;
    return `n,,${this.clientFirstBare}`;
  }

  /** server-first-message → client-final-message. Throws when the compute holds a different secret. */
  final(serverFirst: string): string {
    const attrs = new Map(attributes(serverFirst));
    const nonce = attrs.get('r');
    const salt = attrs.get('s');
    const iterations = Number(attrs.get('i'));
    if (!nonce?.startsWith(this.clientNonce) || nonce.length === this.clientNonce.length) throw violation('compute sent a bad nonce');
    if (salt !== this.secret.salt.toString('base64') || iterations !== this.secret.iterations) {
      throw new XenonError('PROXY_COMPUTE_AUTH_FAILED', 'the compute holds a different SCRAM secret for this role (salt/iterations differ)');
    }
    const withoutProof = `c=biws,r=${nonce}`;
    this.authMessage = `${this.clientFirstBare},${serverFirst},${withoutProof}`;
    const proof = xor(this.clientKey, hmac(this.secret.storedKey, this.authMessage));
    return `${withoutProof},p=${proof.toString('base64')}`;
  }

  /** Checks the compute's server signature (it proves the compute knows the ServerKey). */
  verify(serverFinal: string): void {
    const v = new Map(attributes(serverFinal)).get('v');
    if (!v || !safeEqual(Buffer.from(v, 'base64'), hmac(this.secret.serverKey, this.authMessage))) {
      throw new XenonError('PROXY_COMPUTE_AUTH_FAILED', 'the compute sent a bad SCRAM server signature');
    }
  }
}
