/**
 * proxy/auth/scram.ts: the proxy's SCRAM server (with node-postgres' client implementation as the
 * real client) and the ClientKey passthrough client.
 */
import t from 'tap';
import { XenonError } from '../../lib/errors.ts';
import { hmac, makeScramSecret, sha256, type ScramSecret } from '../../lib/scram.ts';
import { mockSecret, ScramKeyClient, ScramServerSession, type ScramResult } from '../../proxy/auth/scram.ts';
import { pgSasl, type PgSaslSession } from '../helpers/pg-sasl.ts';


const b = (s: string): Buffer => Buffer.from(s, 'utf8');

/** A full exchange: pg's client with `password` against our server holding `secret`. */
async function exchange(secret: ScramSecret, password: string): Promise<{ result: ScramResult; session: PgSaslSession; server: ScramServerSession }> {
  const server = new ScramServerSession(secret);
  const session = pgSasl.startSession(['SCRAM-SHA-256']);
  const serverFirst = server.clientFirst(b(session.response));
  await pgSasl.continueSession(session, password, serverFirst);
  const result = server.clientFinal(b(session.response));
  return { result, session, server };
}

const VIOLATION = { name: 'XenonError', code: 'PROXY_PROTOCOL_VIOLATION', sqlstate: '08P01' };

function isViolation(err: unknown): boolean {
  return err instanceof XenonError && err.code === 'PROXY_PROTOCOL_VIOLATION' && err.sqlstate === '08P01';
}

// ---------------------------------------------------------------- ScramServerSession with pg's client

t.test('correct password: ok, ClientKey matches StoredKey, pg accepts the server signature', async (t) => {
  const secret = makeScramSecret('open sesame');
  const { result, session } = await exchange(secret, 'open sesame');
  t.equal(result.ok, true);
  if (!result.ok) return;
  t.equal(result.clientKey.length, 32);
  t.same(sha256(result.clientKey), secret.storedKey, 'sha256(ClientKey) = StoredKey');
  t.match(result.serverFinal, /^v=[A-Za-z0-9+/]{43}=$/);
  t.doesNotThrow(() => pgSasl.finalizeSession(session, result.serverFinal), 'pg verifies our server signature');
  t.equal(session.serverSignature, result.serverFinal.slice(2));
});

t.test('the ClientKey is the same for every exchange (it is what the passthrough replays)', async (t) => {
  const secret = makeScramSecret('same key');
  const a = await exchange(secret, 'same key');
  const c = await exchange(secret, 'same key');
  t.ok(a.result.ok && c.result.ok);
  if (a.result.ok && c.result.ok) {
    t.same(a.result.clientKey, c.result.clientKey);
    t.not(a.result.serverFinal, c.result.serverFinal, 'server signatures differ (fresh nonces)');
  }
});

t.test('server nonce extends the client nonce and is fresh', async (t) => {
  const secret = makeScramSecret('pw');
  const s1 = new ScramServerSession(secret);
  const s2 = new ScramServerSession(secret);
  const f1 = s1.clientFirst(b('n,,n=*,r=abc'));
  const f2 = s2.clientFirst(b('n,,n=*,r=abc'));
  t.match(f1, new RegExp(`^r=abc[^,]+,s=${secret.salt.toString('base64').replace(/[+/]/g, '\\$&')},i=4096$`));
  t.not(f1, f2);
});

t.test('wrong password → ok:false', async (t) => {
  const secret = makeScramSecret('right');
  const { result } = await exchange(secret, 'wrong');
  t.same(result, { ok: false });
});

t.test('y,, gs2 flag (client supports channel binding, server offered none) is accepted', async (t) => {
  const secret = makeScramSecret('pw');
  const server = new ScramServerSession(secret);
  // pg sends "y" when it has a TLS stream but the server does not offer SCRAM-SHA-256-PLUS.
  const fakeStream = {};
  const session = pgSasl.startSession(['SCRAM-SHA-256'], fakeStream);
  t.match(session.response, /^y,,/);
  const serverFirst = server.clientFirst(b(session.response));
  await pgSasl.continueSession(session, 'pw', serverFirst, fakeStream);
  const result = server.clientFinal(b(session.response));
  t.equal(result.ok, true);
});

// ---------------------------------------------------------------- mockSecret

t.test('mockSecret: never succeeds, deterministic salt per (key, endpoint, role)', async (t) => {
  const key = Buffer.from('k'.repeat(32));
  const m1 = mockSecret(key, 'ep-a-b-123456', 'alice');
  const m2 = mockSecret(key, 'ep-a-b-123456', 'alice');
  t.same(m1.salt, m2.salt, 'same salt for the same (key, endpoint, role): unknown roles look stable');
  t.equal(m1.iterations, 4096, 'same iteration count as a real secret');
  t.equal(m1.salt.length, 16, 'same salt length as a real secret');
  t.notSame(mockSecret(key, 'ep-a-b-123456', 'bob').salt, m1.salt, 'differs across roles');
  t.notSame(mockSecret(key, 'ep-a-b-654321', 'alice').salt, m1.salt, 'differs across endpoints');
  t.notSame(mockSecret(Buffer.from('j'.repeat(32)), 'ep-a-b-123456', 'alice').salt, m1.salt, 'differs across keys');
  // (endpoint, role) are separated: "ab"+"c" is not "a"+"bc"
  t.notSame(mockSecret(key, 'ab', 'c').salt, mockSecret(key, 'a', 'bc').salt);
  for (const pw of ['alice', 'password', 'ep-a-b-123456']) {
    const { result } = await exchange(mockSecret(key, 'ep-a-b-123456', 'alice'), pw);
    t.same(result, { ok: false }, `mock secret rejects ${JSON.stringify(pw)}`);
  }
});

// ---------------------------------------------------------------- malformed messages

t.test('malformed client-first-message → PROXY_PROTOCOL_VIOLATION', async (t) => {
  const secret = makeScramSecret('pw');
  const bad: Record<string, Buffer | null> = {
    null: null,
    empty: b(''),
    'no gs2 header': b('n=*,r=abc'),
    'gs2 header without authzid separator': b('n,n=*,r=abc'),
    'unknown cbind flag': b('x,,n=*,r=abc'),
    'channel binding p=': b('p=tls-server-end-point,,n=*,r=abc'),
    'authzid set': b('n,a=admin,n=*,r=abc'),
    'missing r=': b('n,,n=*'),
    'missing n=': b('n,,r=abc'),
    'r before n': b('n,,r=abc,n=*'),
    'empty nonce': b('n,,n=*,r='),
    'nonce with a non-printable': b('n,,n=*,r=ab\x01c'),
    'mandatory extension': b('n,,m=ext,n=*,r=abc'),
    'attribute without =': b('n,,n=*,rabc'),
    'nonce too long': b(`n,,n=*,r=${'a'.repeat(513)}`),
  };
  for (const [name, data] of Object.entries(bad)) {
    const s = new ScramServerSession(secret);
    let caught: unknown;
    try {
      s.clientFirst(data);
    } catch (err) {
      caught = err;
    }
    t.ok(isViolation(caught), `${name}: ${caught instanceof Error ? caught.message : 'did not throw'}`);
  }
});

/** A server session after a valid client-first, with the pieces needed to build client-finals. */
async function afterFirst(password = 'pw'): Promise<{ server: ScramServerSession; session: PgSaslSession; serverFirst: string; nonce: string; valid: string }> {
  const secret = makeScramSecret(password);
  const server = new ScramServerSession(secret);
  const session = pgSasl.startSession(['SCRAM-SHA-256']);
  const serverFirst = server.clientFirst(b(session.response));
  await pgSasl.continueSession(session, password, serverFirst);
  const nonce = /^r=([^,]+)/.exec(serverFirst)![1]!;
  return { server, session, serverFirst, nonce, valid: session.response };
}

t.test('malformed client-final-message → PROXY_PROTOCOL_VIOLATION', async (t) => {
  const ctl = await afterFirst();
  t.equal(ctl.server.clientFinal(b(ctl.valid)).ok, true, 'control: the untouched message succeeds');

  const proof = (valid: string): string => valid.slice(valid.lastIndexOf(',p=') + 3);
  const cases: Record<string, (x: { nonce: string; valid: string }) => string> = {
    'missing proof': ({ nonce }) => `c=biws,r=${nonce}`,
    'nonce mismatch': ({ nonce, valid }) => `c=biws,r=${nonce}x,p=${proof(valid)}`,
    'client nonce only': ({ nonce, valid }) => `c=biws,r=${nonce.slice(0, 24)},p=${proof(valid)}`,
    'missing r=': ({ valid }) => `c=biws,p=${proof(valid)}`,
    'missing c=': ({ nonce, valid }) => `r=${nonce},p=${proof(valid)}`,
    'wrong channel binding data': ({ nonce, valid }) => `c=eSws,r=${nonce},p=${proof(valid)}`, // "y,," but client sent "n,,"
    'bad base64 in c=': ({ nonce, valid }) => `c=bi*s,r=${nonce},p=${proof(valid)}`,
    'proof of wrong length (31 bytes)': ({ nonce }) => `c=biws,r=${nonce},p=${Buffer.alloc(31, 1).toString('base64')}`,
    'proof of wrong length (33 bytes)': ({ nonce }) => `c=biws,r=${nonce},p=${Buffer.alloc(33, 1).toString('base64')}`,
    'empty proof': ({ nonce }) => `c=biws,r=${nonce},p=`,
    'bad base64 in proof': ({ nonce, valid }) => `c=biws,r=${nonce},p=${proof(valid).slice(0, 10)}!${proof(valid).slice(11)}`,
    'empty message': () => '',
  };
  for (const [name, make] of Object.entries(cases)) {
    const x = await afterFirst();
    let caught: unknown;
    try {
      x.server.clientFinal(b(make(x)));
    } catch (err) {
      caught = err;
    }
    t.ok(isViolation(caught), `${name}: ${caught instanceof Error ? caught.message : 'did not throw'}`);
  }
});

t.test('out-of-order messages → PROXY_PROTOCOL_VIOLATION', async (t) => {
  const secret = makeScramSecret('pw');
  const fresh = new ScramServerSession(secret);
  t.throws(() => fresh.clientFinal(b('c=biws,r=abc,p=' + Buffer.alloc(32).toString('base64'))), VIOLATION, 'clientFinal before clientFirst');

  const twice = new ScramServerSession(secret);
  twice.clientFirst(b('n,,n=*,r=abc'));
  t.throws(() => twice.clientFirst(b('n,,n=*,r=abc')), VIOLATION, 'clientFirst twice');

  const x = await afterFirst();
  t.equal(x.server.clientFinal(b(x.valid)).ok, true);
  t.throws(() => x.server.clientFinal(b(x.valid)), VIOLATION, 'clientFinal replayed on the same session');
});

t.test('the error carries the SQLSTATE and a user-safe message', async (t) => {
  try {
    new ScramServerSession(makeScramSecret('pw')).clientFirst(b('p=tls-server-end-point,,n=*,r=abc'));
    t.fail('did not throw');
  } catch (err) {
    t.ok(err instanceof XenonError);
    const e = err as XenonError;
    t.equal(e.code, 'PROXY_PROTOCOL_VIOLATION');
    t.equal(e.sqlstate, '08P01');
    t.match(e.userMessage, /SCRAM/);
  }
});

// ---------------------------------------------------------------- ScramKeyClient (passthrough)

/** Runs a ScramKeyClient against a server session (the "compute"); returns the server result. */
function keyClientExchange(client: ScramKeyClient, compute: ScramServerSession): ScramResult {
  const serverFirst = compute.clientFirst(b(client.first()));
  const result = compute.clientFinal(b(client.final(serverFirst)));
  if (result.ok) client.verify(result.serverFinal);
  return result;
}

t.test('ScramKeyClient: the ClientKey from a first exchange authenticates to the compute', async (t) => {
  const password = 'passthrough pw';
  const secret = makeScramSecret(password);
  // 1. client ↔ proxy: recover the ClientKey
  const { result } = await exchange(secret, password);
  t.equal(result.ok, true);
  if (!result.ok) return;
  // 2. proxy ↔ compute holding the same secret (a separate server session)
  const client = new ScramKeyClient(result.clientKey, secret);
  const first = client.first();
  t.match(first, /^n,,n=,r=[A-Za-z0-9+/=]+$/);
  const compute = new ScramServerSession(secret);
  const computeResult = keyClientExchange(client, compute);
  t.equal(computeResult.ok, true, 'the compute accepts the proof');
  if (computeResult.ok) t.same(computeResult.clientKey, result.clientKey, 'the compute recovers the same ClientKey');
});

t.test('ScramKeyClient: compute with a different salt → PROXY_COMPUTE_AUTH_FAILED', async (t) => {
  const password = 'pw';
  const secret = makeScramSecret(password);
  const { result } = await exchange(secret, password);
  if (!result.ok) return t.fail('first exchange failed');
  const otherSalt = makeScramSecret(password); // same password, new random salt
  const client = new ScramKeyClient(result.clientKey, secret);
  const compute = new ScramServerSession(otherSalt);
  const serverFirst = compute.clientFirst(b(client.first()));
  t.throws(() => client.final(serverFirst), { code: 'PROXY_COMPUTE_AUTH_FAILED' });

  const otherIters = makeScramSecret(password, { salt: secret.salt, iterations: 4097 });
  const c2 = new ScramKeyClient(result.clientKey, secret);
  const sf2 = new ScramServerSession(otherIters).clientFirst(b(c2.first()));
  t.throws(() => c2.final(sf2), { code: 'PROXY_COMPUTE_AUTH_FAILED' }, 'different iteration count');
});

t.test('ScramKeyClient: bad server-first nonce → throws', async (t) => {
  const secret = makeScramSecret('pw');
  const c = new ScramKeyClient(Buffer.alloc(32), secret);
  const first = c.first();
  const nonce = /r=(.*)$/.exec(first)![1]!;
  const salt = secret.salt.toString('base64');
  t.throws(() => c.final(`r=${nonce},s=${salt},i=4096`), XenonError, 'server did not extend the nonce');
  t.throws(() => c.final(`r=zzz${nonce}x,s=${salt},i=4096`), XenonError, 'nonce does not start with ours');
});

t.test('ScramKeyClient: bad server signature → PROXY_COMPUTE_AUTH_FAILED', async (t) => {
  const password = 'pw';
  const secret = makeScramSecret(password);
  const { result } = await exchange(secret, password);
  if (!result.ok) return t.fail('first exchange failed');
  const client = new ScramKeyClient(result.clientKey, secret);
  const compute = new ScramServerSession(secret);
  const sf = compute.clientFirst(b(client.first()));
  const computeResult = compute.clientFinal(b(client.final(sf)));
  t.equal(computeResult.ok, true);
  if (!computeResult.ok) return;
  t.throws(() => client.verify(`v=${Buffer.alloc(32, 9).toString('base64')}`), { code: 'PROXY_COMPUTE_AUTH_FAILED' }, 'random signature');
  t.throws(() => client.verify('e=invalid-proof'), { code: 'PROXY_COMPUTE_AUTH_FAILED' }, 'server error instead of a signature');
  // A signature from a compute that knows a different ServerKey
  const wrongKeySig = computeResult.serverFinal.replace(/^v=.*/, `v=${hmac(makeScramSecret('x').serverKey, 'y').toString('base64')}`);
  t.throws(() => client.verify(wrongKeySig), { code: 'PROXY_COMPUTE_AUTH_FAILED' }, 'signature with a wrong ServerKey');
  t.doesNotThrow(() => client.verify(computeResult.serverFinal), 'the real signature verifies');
});

t.test('ScramKeyClient: a wrong ClientKey is rejected by the compute', async (t) => {
  const secret = makeScramSecret('pw');
  const client = new ScramKeyClient(Buffer.alloc(32, 3), secret);
  const compute = new ScramServerSession(secret);
  const sf = compute.clientFirst(b(client.first()));
  t.same(compute.clientFinal(b(client.final(sf))), { ok: false });
});

// ---------------------------------------------------------------- channel binding (SCRAM-SHA-256-PLUS)

t.test('channel binding: offered only with binding data; the client must bind to this connection', async (t) => {
  const secret = makeScramSecret('bound');
  const cb = sha256(b('our certificate'));
  t.same(new ScramServerSession(secret).mechanisms, ['SCRAM-SHA-256'], 'no TLS: plain SCRAM only');
  const server = new ScramServerSession(secret, { channelBinding: cb });
  t.same(server.mechanisms, ['SCRAM-SHA-256-PLUS', 'SCRAM-SHA-256'], 'over TLS: PLUS first');

  // A full PLUS exchange, computed by hand (pg's client needs a TLS socket for the binding data).
  const nonce = 'rOprNGfwEbeRWgbNEkqO';
  const first = `p=tls-server-end-point,,n=,r=${nonce}`;
  const serverFirst = server.clientFirst(b(first), 'SCRAM-SHA-256-PLUS');
  const attrs = new Map(serverFirst.split(',').map((kv) => [kv[0]!, kv.slice(2)] as const));
  const salted = (await import('node:crypto')).pbkdf2Sync('bound', Buffer.from(attrs.get('s')!, 'base64'), Number(attrs.get('i')), 32, 'sha256');
  const clientKey = hmac(salted, 'Client Key');
  const cbind = Buffer.concat([b('p=tls-server-end-point,,'), cb]).toString('base64');
  const withoutProof = `c=${cbind},r=${attrs.get('r')}`;
  const authMessage = `n=,r=${nonce},${serverFirst},${withoutProof}`;
  const sig = hmac(sha256(clientKey), authMessage);
  const proof = Buffer.from(clientKey.map((x, i) => x ^ sig[i]!)).toString('base64');
  const result = server.clientFinal(b(`${withoutProof},p=${proof}`));
  t.equal(result.ok, true, 'bound exchange succeeds');
  t.equal(server.bound, true);
  if (result.ok) t.same(result.clientKey, clientKey, 'the ClientKey is recovered as without binding');

  // The same proof with another connection's binding data fails.
  const other = new ScramServerSession(secret, { channelBinding: sha256(b('a different certificate')) });
  other.clientFirst(b(first), 'SCRAM-SHA-256-PLUS');
  t.throws(() => other.clientFinal(b(`c=${cbind},r=x,p=${proof}`)), { code: 'PROXY_PROTOCOL_VIOLATION', message: /channel-binding data does not match/ }, 'binding data of another connection');
});

t.test('channel binding: negotiation errors', async (t) => {
  const secret = makeScramSecret('x');
  const cb = sha256(b('cert'));
  const fresh = () => new ScramServerSession(secret, { channelBinding: cb });
  t.throws(() => fresh().clientFirst(b('y,,n=,r=abc'), 'SCRAM-SHA-256'), { code: 'PROXY_PROTOCOL_VIOLATION', message: /thinks the server does not/ }, "'y' while we offered PLUS: a downgrade");
  t.doesNotThrow(() => new ScramServerSession(secret).clientFirst(b('y,,n=,r=abc'), 'SCRAM-SHA-256'), "'y' is fine when PLUS was not offered");
  t.doesNotThrow(() => fresh().clientFirst(b('n,,n=,r=abc'), 'SCRAM-SHA-256'), "'n' (client without binding) is fine");
  t.throws(() => fresh().clientFirst(b('n,,n=,r=abc'), 'SCRAM-SHA-256-PLUS'), { message: /did not ask for channel binding/ }, 'PLUS chosen without p=');
  t.throws(() => fresh().clientFirst(b('p=tls-unique,,n=,r=abc'), 'SCRAM-SHA-256-PLUS'), { message: /unsupported channel-binding type "tls-unique"/ });
  t.throws(() => fresh().clientFirst(b('p=tls-server-end-point,,n=,r=abc'), 'SCRAM-SHA-256'), { message: /without choosing SCRAM-SHA-256-PLUS/ });
  t.throws(() => new ScramServerSession(secret).clientFirst(b('p=tls-server-end-point,,n=,r=abc'), 'SCRAM-SHA-256-PLUS'), { code: 'AUTH_METHOD_UNSUPPORTED', sqlstate: '28000' }, 'PLUS without TLS was never offered');
  t.throws(() => fresh().clientFirst(b('n,,n=,r=abc'), 'SCRAM-SHA-1'), { code: 'AUTH_METHOD_UNSUPPORTED', userMessage: /"SCRAM-SHA-1" is not supported here: use SCRAM-SHA-256-PLUS or SCRAM-SHA-256/ });
});
