/**
 * proxy/control-plane.ts CachedControlPlane against a small in-memory ControlPlaneApi double
 * (DESIGN §5) that counts calls and can delay or fail. Real timers, small TTLs.
 */
import t from 'tap';
import { XenonError } from '../../lib/errors.ts';
import { CachedControlPlane, type CachedControlPlaneOptions } from '../../proxy/control-plane.ts';
import type { ComputeInfo, ConnectionReport, ConnectionReportResponse, ControlPlaneApi, EndpointAccess } from '../../wake-compute/api.ts';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

class FakeControlPlane implements ControlPlaneApi {
  wakeCalls: string[] = [];
  accessCalls: string[] = [];
  wakeDelayMs = 0;
  accessDelayMs = 0;
  cacheTtlMs = 60_000;
  /** Fail the next N wakes / access lookups. */
  failWakes = 0;
  failAccess = 0;
  endpoints = new Map<string, EndpointAccess>();
  private port = 50_000;

  async getEndpointAccess(endpoint: string, role: string): Promise<EndpointAccess | null> {
    this.accessCalls.push(`${endpoint}/${role}`);
    if (this.accessDelayMs) await sleep(this.accessDelayMs);
    if (this.failAccess > 0) {
      this.failAccess--;
      throw new XenonError('CP_UNAVAILABLE', 'control plane down (test)');
    }
    const e = this.endpoints.get(endpoint);
    return e ? { ...e, role_secret: role === 'alice' ? 'SCRAM-SHA-256$…' : null } : null;
  }

  async wakeCompute(endpoint: string): Promise<ComputeInfo> {
    this.wakeCalls.push(endpoint);
    if (this.wakeDelayMs) await sleep(this.wakeDelayMs);
    if (this.failWakes > 0) {
      this.failWakes--;
      throw new XenonError('CP_COMPUTE_START_FAILED', 'start failed (test)');
    }
    return { endpoint_id: endpoint, host: '127.0.0.1', port: this.port++, cold: true, cache_ttl_ms: this.cacheTtlMs };
  }

  async reportConnections(_r: ConnectionReport): Promise<ConnectionReportResponse> {
    return { ok: true, invalidate: [], invalidate_access: [] };
  }
}

function setup(opts: Partial<CachedControlPlaneOptions> = {}): { api: FakeControlPlane; cp: CachedControlPlane } {
  const api = new FakeControlPlane();
  api.endpoints.set('ep-a', { endpoint_id: 'ep-a', project_id: 'p1', branch_id: 'b1', role_secret: null, allowed_ips: [], connection_rate_limit: null });
  api.endpoints.set('ep-b', { endpoint_id: 'ep-b', project_id: 'p1', branch_id: 'b2', role_secret: null, allowed_ips: ['10.0.0.0/8'], connection_rate_limit: null });
  const cp = new CachedControlPlane(api, { accessTtlMs: 60_000, negativeTtlMs: 60_000, maxWakeCacheMs: 60_000, ...opts });
  return { api, cp };
}

// ---------------------------------------------------------------- wakeCompute

t.test('concurrent wakes of one endpoint share one control-plane call', async (t) => {
  const { api, cp } = setup();
  api.wakeDelayMs = 50;
  const results = await Promise.all(Array.from({ length: 20 }, () => cp.wakeCompute('ep-a')));
  t.same(api.wakeCalls, ['ep-a'], 'one API call');
  for (const r of results) {
    t.equal(r.port, results[0]!.port);
    t.equal(r.cached, false);
    t.equal(r.cold, true, 'everyone waiting on the start sees a cold wake');
  }
});

t.test('different endpoints wake separately', async (t) => {
  const { api, cp } = setup();
  api.wakeDelayMs = 20;
  const [a, b] = await Promise.all([cp.wakeCompute('ep-a'), cp.wakeCompute('ep-b')]);
  t.same([...api.wakeCalls].sort(), ['ep-a', 'ep-b']);
  t.not(a.port, b.port);
  t.equal(a.endpoint_id, 'ep-a');
  t.equal(b.endpoint_id, 'ep-b');
});

t.test('a second wake within the TTL is cached and warm', async (t) => {
  const { api, cp } = setup();
  const first = await cp.wakeCompute('ep-a');
  t.same({ cached: first.cached, cold: first.cold }, { cached: false, cold: true });
  const second = await cp.wakeCompute('ep-a');
  t.same({ cached: second.cached, cold: second.cold }, { cached: true, cold: false });
  t.equal(second.port, first.port);
  t.equal(second.host, first.host);
  t.equal(api.wakeCalls.length, 1);
});

t.test('the wake TTL comes from cache_ttl_ms', async (t) => {
  const { api, cp } = setup();
  api.cacheTtlMs = 150;
  const first = await cp.wakeCompute('ep-a');
  await sleep(30);
  t.equal((await cp.wakeCompute('ep-a')).cached, true, 'within cache_ttl_ms');
  await sleep(250);
  const later = await cp.wakeCompute('ep-a');
  t.equal(later.cached, false, 'after cache_ttl_ms the control plane is asked again');
  t.not(later.port, first.port);
  t.equal(api.wakeCalls.length, 2);
});

t.test('maxWakeCacheMs caps a longer cache_ttl_ms', async (t) => {
  const { api, cp } = setup({ maxWakeCacheMs: 100 });
  api.cacheTtlMs = 60_000;
  await cp.wakeCompute('ep-a');
  t.equal((await cp.wakeCompute('ep-a')).cached, true);
  await sleep(200);
  t.equal((await cp.wakeCompute('ep-a')).cached, false);
  t.equal(api.wakeCalls.length, 2);
});

t.test('cache_ttl_ms = 0 → never cached', async (t) => {
  const { api, cp } = setup();
  api.cacheTtlMs = 0;
  t.equal((await cp.wakeCompute('ep-a')).cached, false);
  t.equal((await cp.wakeCompute('ep-a')).cached, false);
  t.equal(api.wakeCalls.length, 2);
});

t.test('invalidateWake: the next wake asks again', async (t) => {
  const { api, cp } = setup();
  await cp.wakeCompute('ep-a');
  cp.invalidateWake('ep-a');
  const again = await cp.wakeCompute('ep-a');
  t.equal(again.cached, false);
  t.equal(api.wakeCalls.length, 2);
  cp.invalidateWake('ep-unknown'); // no-op
  t.equal((await cp.wakeCompute('ep-a')).cached, true, 'cached again afterwards');
});

t.test('invalidateWake during a wake in flight does not make it reject', async (t) => {
  const { api, cp } = setup();
  api.wakeDelayMs = 80;
  const p1 = cp.wakeCompute('ep-a');
  const p2 = cp.wakeCompute('ep-a');
  await sleep(10);
  cp.invalidateWake('ep-a');
  const [r1, r2] = await Promise.all([p1, p2]);
  t.equal(r1.endpoint_id, 'ep-a');
  t.equal(r1.port, r2.port);
  t.equal(api.wakeCalls.length, 1, 'the in-flight wake was shared, not restarted');
});

t.test('wake errors are not cached; waiters all see the error', async (t) => {
  const { api, cp } = setup();
  api.wakeDelayMs = 30;
  api.failWakes = 1;
  const results = await Promise.allSettled([cp.wakeCompute('ep-a'), cp.wakeCompute('ep-a'), cp.wakeCompute('ep-a')]);
  t.equal(api.wakeCalls.length, 1, 'one call for the failing wake');
  for (const r of results) {
    t.equal(r.status, 'rejected');
    if (r.status === 'rejected') t.match(r.reason, { code: 'CP_COMPUTE_START_FAILED' });
  }
  const ok = await cp.wakeCompute('ep-a');
  t.equal(ok.cached, false, 'the next call retries');
  t.equal(api.wakeCalls.length, 2);
  t.equal((await cp.wakeCompute('ep-a')).cached, true);
});

// ---------------------------------------------------------------- getEndpointAccess

t.test('getEndpointAccess caches positive answers per (endpoint, role)', async (t) => {
  const { api, cp } = setup();
  const a1 = await cp.getEndpointAccess('ep-a', 'alice');
  t.equal(a1?.endpoint_id, 'ep-a');
  t.equal(a1?.role_secret, 'SCRAM-SHA-256$…');
  const a2 = await cp.getEndpointAccess('ep-a', 'alice');
  t.same(a2, a1);
  t.same(api.accessCalls, ['ep-a/alice'], 'second lookup served from cache');
  const bob = await cp.getEndpointAccess('ep-a', 'bob');
  t.equal(bob?.role_secret, null, 'unknown role: access with a null secret');
  t.same(api.accessCalls, ['ep-a/alice', 'ep-a/bob'], 'roles are separate keys');
  await cp.getEndpointAccess('ep-a', 'bob');
  t.equal(api.accessCalls.length, 2);
});

t.test('getEndpointAccess: keys do not collide across the (endpoint, role) boundary', async (t) => {
  const { api, cp } = setup();
  api.endpoints.set('ep', { endpoint_id: 'ep', project_id: 'p', branch_id: 'b', role_secret: null, allowed_ips: [], connection_rate_limit: null });
  await cp.getEndpointAccess('ep-a', 'alice');
  await cp.getEndpointAccess('ep', 'a-alice');
  t.equal(api.accessCalls.length, 2);
});

t.test('concurrent access lookups share one call', async (t) => {
  const { api, cp } = setup();
  api.accessDelayMs = 40;
  const all = await Promise.all(Array.from({ length: 10 }, () => cp.getEndpointAccess('ep-b', 'alice')));
  t.equal(api.accessCalls.length, 1);
  for (const a of all) t.same(a?.allowed_ips, ['10.0.0.0/8']);
});

t.test('unknown endpoint: null is cached for negativeTtlMs', async (t) => {
  const { api, cp } = setup({ accessTtlMs: 60_000, negativeTtlMs: 120 });
  t.equal(await cp.getEndpointAccess('ep-nope', 'alice'), null);
  t.equal(await cp.getEndpointAccess('ep-nope', 'alice'), null);
  t.equal(api.accessCalls.length, 1, 'null cached');
  await sleep(220);
  // The endpoint now exists: after the negative TTL the proxy sees it.
  api.endpoints.set('ep-nope', { endpoint_id: 'ep-nope', project_id: 'p', branch_id: 'b', role_secret: null, allowed_ips: [], connection_rate_limit: null });
  const now = await cp.getEndpointAccess('ep-nope', 'alice');
  t.equal(now?.endpoint_id, 'ep-nope', 'negative entry expired');
  t.equal(api.accessCalls.length, 2);
  // and the positive answer keeps the (long) positive TTL
  await sleep(220);
  await cp.getEndpointAccess('ep-nope', 'alice');
  t.equal(api.accessCalls.length, 2, 'positive entry still cached after the negative TTL');
});

t.test('positive access answers expire after accessTtlMs', async (t) => {
  const { api, cp } = setup({ accessTtlMs: 120, negativeTtlMs: 60_000 });
  await cp.getEndpointAccess('ep-a', 'alice');
  await sleep(20);
  await cp.getEndpointAccess('ep-a', 'alice');
  t.equal(api.accessCalls.length, 1);
  await sleep(220);
  await cp.getEndpointAccess('ep-a', 'alice');
  t.equal(api.accessCalls.length, 2);
});

t.test('access errors are not cached (the next call retries)', async (t) => {
  const { api, cp } = setup();
  api.failAccess = 1;
  await t.rejects(cp.getEndpointAccess('ep-a', 'alice'), { code: 'CP_UNAVAILABLE' });
  const a = await cp.getEndpointAccess('ep-a', 'alice');
  t.equal(a?.endpoint_id, 'ep-a');
  t.equal(api.accessCalls.length, 2);
  await cp.getEndpointAccess('ep-a', 'alice');
  t.equal(api.accessCalls.length, 2, 'then cached');
});

t.test('invalidateAccess drops one (endpoint, role)', async (t) => {
  const { api, cp } = setup();
  await cp.getEndpointAccess('ep-a', 'alice');
  await cp.getEndpointAccess('ep-a', 'bob');
  cp.invalidateAccess('ep-a', 'alice');
  await cp.getEndpointAccess('ep-a', 'alice');
  await cp.getEndpointAccess('ep-a', 'bob');
  t.same(api.accessCalls, ['ep-a/alice', 'ep-a/bob', 'ep-a/alice']);
});

t.test('invalidateEndpointAccess drops every role of one endpoint, not of others', async (t) => {
  const { api, cp } = setup();
  for (const [e, r] of [['ep-a', 'alice'], ['ep-a', 'bob'], ['ep-b', 'alice']] as const) await cp.getEndpointAccess(e, r);
  cp.invalidateEndpointAccess('ep-a');
  for (const [e, r] of [['ep-a', 'alice'], ['ep-a', 'bob'], ['ep-b', 'alice']] as const) await cp.getEndpointAccess(e, r);
  t.same(api.accessCalls, ['ep-a/alice', 'ep-a/bob', 'ep-b/alice', 'ep-a/alice', 'ep-a/bob']);
});

t.test('an answer in flight when an invalidation arrives is returned but not cached', async (t) => {
  const { api, cp } = setup();
  api.accessDelayMs = 50;
  const pending = cp.getEndpointAccess('ep-a', 'alice');
  await sleep(10);
  cp.invalidateEndpointAccess('ep-a'); // e.g. the password changed meanwhile
  t.equal((await pending)?.endpoint_id, 'ep-a', 'the caller still gets its answer');
  await cp.getEndpointAccess('ep-a', 'alice');
  t.equal(api.accessCalls.length, 2, 'the possibly stale answer was not cached');
});
