import t, { type Test } from 'tap';
import { X509Certificate, createPrivateKey } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { once } from 'node:events';
import tls from 'node:tls';
import type { AddressInfo } from 'node:net';
import { CertStore, certPaths, ensureCerts, type CertPaths } from '../certs/index.ts';
import type { CertStoreInternalOptions } from '../certs/store.ts';

const DOMAIN = 'localtest.me';

/** A fresh state dir, removed after the test (t.testdir() would give one dir per test, wiped on each call). */
async function stateDir(t: Test): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'xenon-certs-'));
  t.teardown(() => rm(dir, { recursive: true, force: true }));
  return dir;
}
const read = (f: string): Promise<string> => readFile(f, 'utf8');
const fingerprint = async (certFile: string): Promise<string> => new X509Certificate(await read(certFile)).fingerprint256;

/** A TLS server answering every SNI name with the store's current context. */
async function startServer(t: Test, store: CertStore): Promise<number> {
  const server = tls.createServer({ SNICallback: (_name, cb) => cb(null, store.context) }, (s) => s.end());
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  t.teardown(() => new Promise<void>((r) => server.close(() => r())));
  return (server.address() as AddressInfo).port;
}

/** Handshake verifying against `ca`; resolves to the server certificate's SHA-256 fingerprint. */
function handshake(port: number, servername: string, ca: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const sock = tls.connect({ host: '127.0.0.1', port, servername, ca, rejectUnauthorized: true }, () => {
      const fp = sock.getPeerCertificate().fingerprint256;
      sock.destroy();
      resolve(fp);
    });
    sock.on('error', reject);
  });
}

/** A CertStore whose onReload results can be awaited one by one. */
async function watchedStore(t: Test, paths: CertPaths, extra: CertStoreInternalOptions = {}) {
  const results: Array<{ ok: boolean; err?: Error }> = [];
  const waiters: Array<() => void> = [];
  const store = await CertStore.load(paths, {
    ...extra,
    onReload: (ok, err) => {
      results.push({ ok, err });
      waiters.shift()?.();
    },
  } as CertStoreInternalOptions);
  t.teardown(() => store.close());
  /** Resolves with the first report after now whose `ok` is `want` (a pair written file by file may fail once first). */
  const nextReload = async (want: boolean): Promise<{ ok: boolean; err?: Error }> => {
    let seen = results.length;
    for (;;) {
      while (results.length === seen) {
        await new Promise<void>((resolve, reject) => {
          const timer = setTimeout(() => reject(new Error('no reload within 10 s')), 10_000);
          waiters.push(() => (clearTimeout(timer), resolve()));
        });
      }
      const found = results.slice(seen).find((r) => r.ok === want);
      if (found) return found;
      seen = results.length;
    }
  };
  return { store, results, nextReload };
}

t.test('certPaths layout', async (t) => {
  const p = certPaths('/state');
  t.same(p, {
    dir: '/state/certs',
    caCert: '/state/certs/ca.pem',
    caKey: '/state/certs/ca-key.pem',
    cert: '/state/certs/server.pem',
    key: '/state/certs/server-key.pem',
  });
});

t.test('generated chain verifies', async (t) => {
  const dir = await stateDir(t);
  const res = await ensureCerts({ stateDir: dir, domain: DOMAIN, extraNames: ['proxy.internal', '10.1.2.3'] });
  t.same(res.created, { ca: true, server: true });
  const ca = new X509Certificate(await read(res.caCert));
  const server = new X509Certificate(await read(res.cert));

  t.ok(ca.ca, 'CA has CA:TRUE');
  t.match(ca.subject, /CN=Xenon local CA/);
  t.ok(ca.verify(ca.publicKey), 'CA is self-signed');
  t.notOk(server.ca, 'leaf has CA:FALSE');
  t.match(server.subject, /CN=\*\.localtest\.me/);
  t.ok(server.verify(ca.publicKey), 'server cert is signed by the CA');
  t.ok(server.checkIssued(ca), 'issuer name and key identifiers chain');
  t.equal(server.publicKey.asymmetricKeyType, 'ec');
  t.equal(ca.publicKey.asymmetricKeyType, 'ec');
  t.equal(server.publicKey.asymmetricKeyDetails?.namedCurve, 'prime256v1');
  t.equal(server.checkHost('ep-cool-lake-123456.localtest.me'), '*.localtest.me');
  t.equal(server.checkHost('a.b.localtest.me'), undefined, 'a wildcard covers one label');
  t.ok(server.checkHost('localtest.me'));
  t.ok(server.checkHost('api.localtest.me'));
  t.ok(server.checkHost('localhost'));
  t.ok(server.checkHost('proxy.internal'), 'extra DNS name');
  t.equal(server.checkIP('127.0.0.1'), '127.0.0.1');
  t.ok(server.checkIP('::1'));
  t.ok(server.checkIP('10.1.2.3'), 'extra IP');
  t.equal(server.checkIP('127.0.0.2'), undefined);
  t.ok(server.keyUsage?.includes('1.3.6.1.5.5.7.3.1'), 'extKeyUsage serverAuth');

  const days = (x: X509Certificate): number => (Date.parse(x.validTo) - Date.parse(x.validFrom)) / 86_400_000;
  t.equal(days(server), 397);
  t.equal(days(ca), 3650);

  // The private keys are PKCS#8 and belong to the certificates.
  const caKey = await read(res.caKey);
  const serverKey = await read(res.key);
  t.match(caKey, /^-----BEGIN PRIVATE KEY-----/);
  t.match(serverKey, /^-----BEGIN PRIVATE KEY-----/);
  t.ok(server.checkPrivateKey(createPrivateKey(serverKey)));
  // server.pem = leaf + CA.
  t.equal((await read(res.cert)).match(/BEGIN CERTIFICATE/g)?.length, 2);

  if (spawnSync('openssl', ['version']).error !== undefined) {
    t.pass('openssl verify', { skip: 'openssl binary not found' });
  } else {
    const v = spawnSync('openssl', ['verify', '-x509_strict', '-purpose', 'sslserver', '-CAfile', res.caCert, res.cert], {
      encoding: 'utf8',
    });
    t.equal(v.status, 0, `openssl verify: ${v.stdout}${v.stderr}`);
    t.match(v.stdout, /: OK/);
  }
});

t.test('key files are 0600, dir 0700', async (t) => {
  const res = await ensureCerts({ stateDir: await stateDir(t), domain: DOMAIN });
  t.equal((await stat(res.caKey)).mode & 0o777, 0o600);
  t.equal((await stat(res.key)).mode & 0o777, 0o600);
  t.equal((await stat(res.dir)).mode & 0o777, 0o700);
});

t.test('real TLS handshake through a CertStore', async (t) => {
  const res = await ensureCerts({ stateDir: await stateDir(t), domain: DOMAIN });
  const caPem = await read(res.caCert);
  const store = await CertStore.load(res, { watch: false });
  const port = await startServer(t, store);

  t.equal(await handshake(port, 'ep-x-123.localtest.me', caPem), await fingerprint(res.cert));
  await t.rejects(handshake(port, 'evil.example.com', caPem), { code: 'ERR_TLS_CERT_ALTNAME_INVALID' });
  // Another CA does not trust it.
  const other = await ensureCerts({ stateDir: await stateDir(t), domain: DOMAIN });
  await t.rejects(handshake(port, 'ep-x-123.localtest.me', await read(other.caCert)), {
    code: /^(SELF_SIGNED_CERT_IN_CHAIN|UNABLE_TO_VERIFY_LEAF_SIGNATURE)$/,
  });
});

t.test('reuse and regeneration', async (t) => {
  const dir = await stateDir(t);
  const first = await ensureCerts({ stateDir: dir, domain: DOMAIN });
  const snapshot = async (p: CertPaths) => Promise.all([p.caCert, p.caKey, p.cert, p.key].map(read));
  const before = await snapshot(first);

  const again = await ensureCerts({ stateDir: dir, domain: DOMAIN });
  t.same(again.created, { ca: false, server: false });
  t.same(await snapshot(again), before, 'second call reuses every file byte for byte');
  t.same((await ensureCerts({ stateDir: dir, domain: 'LOCALTEST.ME.' })).created.server, false, 'domain is normalised');

  const moved = await ensureCerts({ stateDir: dir, domain: 'example.test' });
  t.same(moved.created, { ca: false, server: true });
  const after = await snapshot(moved);
  t.equal(after[0], before[0], 'CA cert identical');
  t.equal(after[1], before[1], 'CA key identical');
  t.not(after[2], before[2], 'server cert replaced');
  t.not(after[3], before[3], 'server key replaced');
  const cert = new X509Certificate(after[2]!);
  t.ok(cert.checkHost('ep-x.example.test'));
  t.notOk(cert.checkHost('ep-x.localtest.me'));

  t.same((await ensureCerts({ stateDir: dir, domain: 'example.test', extraNames: ['db.corp'] })).created.server, true, 'new extra name');

  await writeFile(moved.cert, 'garbage');
  const repaired = await ensureCerts({ stateDir: dir, domain: 'example.test' });
  t.same(repaired.created, { ca: false, server: true }, 'corrupted server.pem regenerated');
  t.ok(new X509Certificate(await read(repaired.cert)).verify(new X509Certificate(before[0]!).publicKey));
  t.equal(await read(repaired.caCert), before[0]);

  await writeFile(moved.key, (await ensureCerts({ stateDir: await stateDir(t), domain: DOMAIN }).then((o) => read(o.key))));
  t.same((await ensureCerts({ stateDir: dir, domain: 'example.test' })).created.server, true, 'mismatched key regenerated');

  // Concurrent first calls in one process share one CA.
  const fresh = await stateDir(t);
  const [a, b] = await Promise.all([ensureCerts({ stateDir: fresh, domain: DOMAIN }), ensureCerts({ stateDir: fresh, domain: DOMAIN })]);
  t.same([a.created.ca, b.created.ca], [true, false]);
});

t.test('an expiring server certificate is regenerated', async (t) => {
  const dir = await stateDir(t);
  const first = await ensureCerts({ stateDir: dir, domain: DOMAIN });
  const realNow = Date.now;
  Date.now = () => realNow() + 370 * 86_400_000; // 27 days left
  t.teardown(() => void (Date.now = realNow));
  const res = await ensureCerts({ stateDir: dir, domain: DOMAIN });
  Date.now = realNow;
  t.same(res.created, { ca: false, server: true });
  t.equal(await read(res.caCert), await read(first.caCert));
});

t.test('a broken CA is never replaced', async (t) => {
  const dir = await stateDir(t);
  const res = await ensureCerts({ stateDir: dir, domain: DOMAIN });
  const caPem = await read(res.caCert);
  await writeFile(res.caKey, 'garbage');
  await t.rejects(ensureCerts({ stateDir: dir, domain: DOMAIN }), /CA .* is unusable/);
  t.equal(await read(res.caCert), caPem);
  await t.rejects(ensureCerts({ stateDir: dir, domain: 'bad!domain' }), /invalid domain/);
});

for (const mode of ['fs.watch', 'fs.watchFile fallback'] as const) {
  t.test(`hot reload (${mode})`, async (t) => {
    const dir = await stateDir(t);
    const res = await ensureCerts({ stateDir: dir, domain: DOMAIN });
    const caPem = await read(res.caCert);
    const extra: CertStoreInternalOptions = mode === 'fs.watch' ? {} : { forcePoll: true, pollIntervalMs: 50 };
    const { store, nextReload } = await watchedStore(t, res, extra);
    const port = await startServer(t, store);
    const oldFp = await fingerprint(res.cert);
    t.equal(await handshake(port, 'ep-x-123.localtest.me', caPem), oldFp);

    // A new certificate (new domain) is picked up by the watcher.
    const reloaded = nextReload(true);
    await ensureCerts({ stateDir: dir, domain: 'example.test' });
    t.same(await reloaded, { ok: true, err: undefined });
    const newFp = await fingerprint(res.cert);
    t.not(newFp, oldFp);
    t.equal(await handshake(port, 'ep-x-123.example.test', caPem), newFp, 'new handshake presents the new certificate');

    // Garbage keeps the previous context.
    const failed = nextReload(false);
    await writeFile(res.cert, 'garbage');
    const r = await failed;
    t.equal(r.ok, false);
    t.type(r.err, Error);
    t.equal(await handshake(port, 'ep-x-123.example.test', caPem), newFp, 'old context still served');

    // And it recovers once the files are good again.
    const healed = nextReload(true);
    await ensureCerts({ stateDir: dir, domain: DOMAIN });
    t.equal((await healed).ok, true);
    t.equal(await handshake(port, 'ep-x-123.localtest.me', caPem), await fingerprint(res.cert));
  });
}

t.test('reload() rejects a key that does not match the certificate', async (t) => {
  const res = await ensureCerts({ stateDir: await stateDir(t), domain: DOMAIN });
  const other = await ensureCerts({ stateDir: await stateDir(t), domain: DOMAIN });
  const reports: Array<[boolean, Error | undefined]> = [];
  const store = await CertStore.load(res, { watch: false, onReload: (ok, err) => reports.push([ok, err]) });
  t.teardown(() => store.close());
  const ctx = store.context;

  t.equal(await store.reload(), true);
  t.not(store.context, ctx, 'a successful reload swaps the context');
  const good = store.context;

  await writeFile(res.key, await read(other.key));
  t.equal(await store.reload(), false);
  t.equal(store.context, good, 'context kept');
  t.match(reports[1]?.[1]?.message ?? '', /does not match/);

  await t.rejects(CertStore.load({ cert: res.cert, key: other.caCert }), 'load fails on unusable files');
});
