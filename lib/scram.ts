/**
 * SCRAM-SHA-256 secret primitives (RFC 5802 / RFC 7677), shared by the control plane (which
 * turns passwords into secrets) and the proxy (which authenticates against them).
 * The secret string format is Postgres' own: `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`.
 */
import { createHash, createHmac, pbkdf2, pbkdf2Sync, randomBytes, timingSafeEqual } from 'node:crypto';
import saslprep from '@mongodb-js/saslprep';

export interface ScramSecret {
  iterations: number;
  salt: Buffer;
  storedKey: Buffer;
  serverKey: Buffer;
}

export const SCRAM_KEY_LEN = 32;
export const DEFAULT_ITERATIONS = 4096;

export const sha256 = (b: Buffer): Buffer => createHash('sha256').update(b).digest();
export const hmac = (key: Buffer, data: Buffer | string): Buffer => createHmac('sha256', key).update(data).digest();

export function xor(a: Buffer, b: Buffer): Buffer {
  if (a.length !== b.length) throw new RangeError('xor: length mismatch');
  const out = Buffer.allocUnsafe(a.length);
  for (let i = 0; i < a.length; i++) out[i] = a[i]! ^ b[i]!;
  return out;
}

export function safeEqual(a: Buffer, b: Buffer): boolean {
  return a.length === b.length && timingSafeEqual(a, b);
}

/**
 * SASLprep (RFC 4013) the way Postgres applies it to SCRAM passwords (src/common/saslprep.c):
 * the prepared string when the password is valid UTF-8 without prohibited characters, else the
 * password exactly as given. libpq does the same on the client side, so secrets match.
 */
export function saslPrep(password: string): string {
  try {
    return saslprep(password, { allowUnassigned: false });
  } catch {
    return password;
  }
}

export function makeScramSecret(password: string, opts: { iterations?: number; salt?: Buffer } = {}): ScramSecret {
  const iterations = opts.iterations ?? DEFAULT_ITERATIONS;
  const salt = opts.salt ?? randomBytes(16);
  const salted = pbkdf2Sync(Buffer.from(saslPrep(password), 'utf8'), salt, iterations, SCRAM_KEY_LEN, 'sha256');
  const clientKey = hmac(salted, 'Client Key');
  return { iterations, salt, storedKey: sha256(clientKey), serverKey: hmac(salted, 'Server Key') };
}

export function formatScramSecret(s: ScramSecret): string {
  return `SCRAM-SHA-256$${s.iterations}:${s.salt.toString('base64')}$${s.storedKey.toString('base64')}:${s.serverKey.toString('base64')}`;
}

const B64 = '[A-Za-z0-9+/]+={0,2}';
const SECRET_RE = new RegExp(`^SCRAM-SHA-256\\$(\\d{1,9}):(${B64})\\$(${B64}):(${B64})$`);

export function parseScramSecret(text: string): ScramSecret | null {
  const m = SECRET_RE.exec(text);
  if (!m) return null;
  const iterations = Number(m[1]);
  const salt = Buffer.from(m[2]!, 'base64');
  const storedKey = Buffer.from(m[3]!, 'base64');
  const serverKey = Buffer.from(m[4]!, 'base64');
  if (iterations < 1 || salt.length === 0 || storedKey.length !== SCRAM_KEY_LEN || serverKey.length !== SCRAM_KEY_LEN) return null;
  return { iterations, salt, storedKey, serverKey };
}

/** True when `password` matches the secret (used for cleartext-password paths). */
export function verifyPassword(secret: ScramSecret, password: string): boolean {
  const s = makeScramSecret(password, { iterations: secret.iterations, salt: secret.salt });
  return safeEqual(s.storedKey, secret.storedKey);
}

/**
 * The SCRAM ClientKey of `password` under `secret`'s salt and iterations when the password
 * matches the secret, else null. PBKDF2 runs on libuv's thread pool, off the event loop (it is
 * ~4096 HMACs). Used where a client sends a cleartext password (the password hack, WebSocket
 * pipelining): the key then authenticates the proxy to the compute, as SCRAM passthrough does.
 */
export async function clientKeyFromPassword(secret: ScramSecret, password: string): Promise<Buffer | null> {
  const salted = await new Promise<Buffer>((resolve, reject) =>
    pbkdf2(Buffer.from(saslPrep(password), 'utf8'), secret.salt, secret.iterations, SCRAM_KEY_LEN, 'sha256', (err, key) => (err ? reject(err) : resolve(key))),
  );
  const clientKey = hmac(salted, 'Client Key');
  return safeEqual(sha256(clientKey), secret.storedKey) ? clientKey : null;
}
