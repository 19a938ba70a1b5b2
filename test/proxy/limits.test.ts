/** proxy/rate-limit.ts (leaky buckets, source networks), lib/ip-allowlist.ts and proxy/auth/channel-binding.ts. */
import t from 'tap';
import { execFileSync } from 'node:child_process';
import { createHash, X509Certificate } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { IpAllowlist, parseAllowlistEntry, validateAllowlist } from '../../lib/ip-allowlist.ts';
import { KeyedLeakyBucket, plainAddress, sourceNetwork } from '../../proxy/rate-limit.ts';
import { signatureHash, tlsServerEndPoint } from '../../proxy/auth/channel-binding.ts';
import { createCa, createServerCert } from '../../certs/generate.ts';

t.test('leaky bucket: burst, drain, per key, refusals cost nothing', async (t) => {
  let now = 0;
  const b = new KeyedLeakyBucket({ perSecond: 2, burst: 3 }, { now: () => now });
  t.same([b.take('a'), b.take('a'), b.take('a'), b.take('a')], [true, true, true, false], 'a burst of 3, then refused');
  t.equal(b.full('a'), true);
  t.equal(b.retryAfterSeconds('a'), 1, 'one unit drains in 0.5 s: retry after 1 s (rounded up)');
  t.equal(b.take('b'), true, 'another key has its own bucket');
  now += 499;
  t.equal(b.take('a'), false, 'not drained yet');
  now += 2;
  t.equal(b.take('a'), true, 'one unit drained after 0.5 s');
  t.equal(b.take('a'), false, 'the refused attempts before added nothing');
  now += 10_000;
  t.same([b.take('a'), b.take('a'), b.take('a'), b.take('a')], [true, true, true, false], 'fully drained after a long pause, never below empty');
  t.equal(b.take('a', { perSecond: 1000, burst: 10 }), true, 'a per-call override (the control plane\'s per-endpoint limit)');
  t.equal(b.retryAfterSeconds('zzz'), 0);
});

t.test('leaky bucket: bounded number of keys', async (t) => {
  const b = new KeyedLeakyBucket({ perSecond: 1, burst: 1 }, { maxKeys: 100 });
  for (let i = 0; i < 1000; i++) b.take(`k${i}`);
  t.equal(b.size, 100, 'old keys are evicted');
});

t.test('source addresses and networks', async (t) => {
  t.equal(plainAddress('::ffff:10.1.2.3'), '10.1.2.3');
  t.equal(plainAddress(undefined), 'unknown');
  t.equal(plainAddress('2001:db8::1'), '2001:db8::1');
  t.equal(sourceNetwork('10.1.2.3'), '10.1.2.0/24');
  t.equal(sourceNetwork('::ffff:10.1.2.3'), '10.1.2.0/24', 'IPv4-mapped');
  t.equal(sourceNetwork('2001:db8:1:2:3:4:5:6'), '2001:db8:1:2::/64');
  t.equal(sourceNetwork('2001:db8::1'), '2001:db8:0:0::/64', ':: expanded');
  t.equal(sourceNetwork('2001:DB8:0001:2::9'), '2001:db8:1:2::/64', 'case and leading zeros normalised');
  t.equal(sourceNetwork('::1'), '0:0:0:0::/64');
  t.equal(sourceNetwork(sourceNetwork('fe80::1')), sourceNetwork('fe80::2'), 'stable for one /64');
});

t.test('IP allowlist entries', async (t) => {
  t.same(parseAllowlistEntry(' 203.0.113.7 '), { kind: 'address', family: 'ipv4', address: '203.0.113.7' });
  t.same(parseAllowlistEntry('2001:db8::/32'), { kind: 'subnet', family: 'ipv6', network: '2001:db8::', prefix: 32 });
  t.same(parseAllowlistEntry('10.0.0.1-10.0.0.9'), { kind: 'range', family: 'ipv4', start: '10.0.0.1', end: '10.0.0.9' });
  for (const bad of ['', 'x', '10.0.0.0/33', '10.0.0.0/', '10.0.0.0/a', '::/129', '10.0.0.9-10.0.0.1', '10.0.0.1-::1', '1.2.3.4.5', 'a'.repeat(200)]) {
    t.ok(parseAllowlistEntry(bad) instanceof Error, `invalid: ${JSON.stringify(bad.slice(0, 20))}`);
  }
  t.same(validateAllowlist([' 10.0.0.1 ', '::1']), ['10.0.0.1', '::1']);
  t.throws(() => validateAllowlist(['10.0.0.1', 'nope']), /invalid IP address "nope"/);
});

t.test('IP allowlist matching: IPv4, IPv6, ranges, CIDR, mapped addresses', async (t) => {
  t.equal(new IpAllowlist([]).allows('1.2.3.4'), true, 'empty: everyone');
  const l = new IpAllowlist(['203.0.113.7', '10.0.0.0/8', '192.168.1.10-192.168.1.20', '2001:db8::/32', '::1']);
  const cases: [string | undefined, boolean][] = [
    ['203.0.113.7', true], ['203.0.113.8', false], ['10.255.0.1', true], ['11.0.0.1', false],
    ['192.168.1.10', true], ['192.168.1.20', true], ['192.168.1.21', false], ['192.168.1.9', false],
    ['2001:db8:ffff::1', true], ['2001:db9::1', false], ['::1', true], ['::2', false],
    ['::ffff:10.1.1.1', true], ['::ffff:11.1.1.1', false], [undefined, false], ['garbage', false],
  ];
  for (const [ip, want] of cases) t.equal(l.allows(ip), want, `${ip} → ${want}`);
  const broken = new IpAllowlist(['not-an-ip']);
  t.same(broken.invalid, ['not-an-ip']);
  t.equal(broken.allows('1.2.3.4'), false, 'a list of only invalid entries allows nobody (fail closed)');
});

t.test('tls-server-end-point: the hash of the certificate, by its signature algorithm', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'xenon-cb-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  // Our own certificates: ECDSA with SHA-256.
  const ours = createServerCert(createCa(), '*.localtest.me', [{ dns: '*.localtest.me' }]);
  const der = new X509Certificate(ours.certPem).raw;
  t.equal(signatureHash(der), 'sha256');
  t.same(tlsServerEndPoint(der), createHash('sha256').update(der).digest(), 'SHA-256 of the DER certificate');
  t.same(tlsServerEndPoint(der), createHash('sha256').update(der).digest(), 'cached answer is the same');
  const openssl = (args: string[]): Buffer => {
    execFileSync('openssl', args, { cwd: dir, stdio: 'ignore' });
    return new X509Certificate(readFileSync(join(dir, 'c.pem'))).raw;
  };
  const rsa384 = openssl(['req', '-x509', '-newkey', 'rsa:2048', '-sha384', '-nodes', '-keyout', 'k.pem', '-out', 'c.pem', '-subj', '/CN=x', '-days', '1']);
  t.equal(signatureHash(rsa384), 'sha384');
  t.same(tlsServerEndPoint(rsa384), createHash('sha384').update(rsa384).digest(), 'RSA with SHA-384 → SHA-384');
  const ec512 = openssl(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-384', '-sha512', '-nodes', '-keyout', 'k.pem', '-out', 'c.pem', '-subj', '/CN=x', '-days', '1']);
  t.equal(signatureHash(ec512), 'sha512');
  const ed = openssl(['req', '-x509', '-newkey', 'ed25519', '-nodes', '-keyout', 'k.pem', '-out', 'c.pem', '-subj', '/CN=x', '-days', '1']);
  t.equal(tlsServerEndPoint(ed), undefined, 'Ed25519 has no single hash: no binding (PLUS not offered)');
  t.equal(tlsServerEndPoint(Buffer.from('not a certificate')), undefined);
  t.equal(tlsServerEndPoint(undefined), undefined);
});

t.test('authentication sources: IPv6 by /64; authentications under way are bounded per source', async (t) => {
  const { authSource, beginAuth, MAX_PENDING_AUTH_PER_SOURCE } = await import('../../proxy/auth/access.ts');
  t.equal(authSource('10.1.2.3'), '10.1.2.3', 'IPv4: the address');
  t.equal(authSource('2001:db8:1:2::7'), authSource('2001:db8:1:2:ffff::9'), 'IPv6: one key per /64');
  t.not(authSource('2001:db8:1:2::7'), authSource('2001:db8:1:3::7'));
  const rejected: string[] = [];
  const deps = {
    config: { connectRate: { perSecond: 1, burst: 1 }, mockSecretKey: Buffer.alloc(32) },
    cp: {} as never,
    limits: { connect: new KeyedLeakyBucket({ perSecond: 1, burst: 1 }), failedAuth: new KeyedLeakyBucket({ perSecond: 1, burst: 5 }), cancel: new KeyedLeakyBucket({ perSecond: 1, burst: 1 }), pendingAuth: new Map<string, number>() },
    metrics: { rateLimited: { inc: (l: { limit: string }) => rejected.push(l.limit) } } as never,
  };
  const ends = Array.from({ length: MAX_PENDING_AUTH_PER_SOURCE }, () => beginAuth(deps, '192.0.2.1'));
  t.throws(() => beginAuth(deps, '192.0.2.1'), { code: 'PROXY_AUTH_RATE_LIMITED', sqlstate: '53300', userMessage: /too many authentications at once from 192\.0\.2\.1/ }, 'one more than the bound is refused');
  t.doesNotThrow(() => beginAuth(deps, '192.0.2.2')(), 'another source is not affected');
  ends[0]!();
  ends[0]!();
  const again = beginAuth(deps, '192.0.2.1');
  t.throws(() => beginAuth(deps, '192.0.2.1'), { code: 'PROXY_AUTH_RATE_LIMITED' }, 'ending twice frees one slot only');
  again();
  for (const end of ends.slice(1)) end();
  t.equal(deps.limits.pendingAuth.size, 0, 'nothing left behind');
  t.same(rejected, ['failed_auth', 'failed_auth']);
});
