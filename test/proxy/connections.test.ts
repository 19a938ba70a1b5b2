/**
 * proxy/connections.ts ConnectionTracker: live connection counts reported to the control plane
 * (scale to zero, DESIGN §4), with a test double of `reportConnections` that records reports.
 */
import t from 'tap';
import type { LogFields, Logger } from '../../lib/logger.ts';
import { ConnectionTracker } from '../../proxy/connections.ts';
import type { ConnectionReport, ConnectionReportResponse } from '../../wake-compute/api.ts';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

class RecordingApi {
  reports: (ConnectionReport & { at: number })[] = [];
  delayMs = 0;
  fail = false;
  invalidate: string[] = [];
  invalidateAccess: string[] = [];
  inFlight = 0;
  maxInFlight = 0;
  async reportConnections(report: ConnectionReport): Promise<ConnectionReportResponse> {
    this.reports.push({ ...report, counts: { ...report.counts }, at: Date.now() });
    this.maxInFlight = Math.max(this.maxInFlight, ++this.inFlight);
    try {
      if (this.delayMs) await sleep(this.delayMs);
    } finally {
      this.inFlight--;
    }
    if (this.fail) throw new Error('connection refused (test)');
    const invalidate = this.invalidate;
    const invalidateAccess = this.invalidateAccess;
    this.invalidate = [];
    this.invalidateAccess = [];
    return { ok: true, invalidate, invalidate_access: invalidateAccess };
  }
}

class RecordingLogger implements Logger {
  records: { level: string; msg: string; fields?: LogFields }[] = [];
  debug(msg: string, fields?: LogFields): void { this.records.push({ level: 'debug', msg, fields }); }
  info(msg: string, fields?: LogFields): void { this.records.push({ level: 'info', msg, fields }); }
  warn(msg: string, fields?: LogFields): void { this.records.push({ level: 'warn', msg, fields }); }
  error(msg: string, fields?: LogFields): void { this.records.push({ level: 'error', msg, fields }); }
  child(): Logger { return this; }
}

/** Waits until `cond` holds (polling), or fails after `ms`. */
async function until(cond: () => boolean, ms = 1000): Promise<boolean> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (cond()) return true;
    await sleep(5);
  }
  return cond();
}

type Invalidation = { wake: string[]; access: string[] };

function setup(opts: { intervalMs?: number; changeDelayMs?: number } = {}): { api: RecordingApi; tracker: ConnectionTracker; logger: RecordingLogger; invalidated: Invalidation[] } {
  const api = new RecordingApi();
  const logger = new RecordingLogger();
  const invalidated: Invalidation[] = [];
  const tracker = new ConnectionTracker(api, {
    proxyId: 'proxy-1',
    intervalMs: opts.intervalMs ?? 60_000,
    changeDelayMs: opts.changeDelayMs ?? 10,
    logger,
    onInvalidate: (inv) => invalidated.push(inv),
  });
  return { api, tracker, logger, invalidated };
}

t.test('inc/dec counts', async (t) => {
  const { tracker } = setup();
  t.teardown(() => tracker.stop());
  t.equal(tracker.get('ep-a'), 0);
  tracker.inc('ep-a');
  tracker.inc('ep-a');
  tracker.inc('ep-b');
  t.equal(tracker.get('ep-a'), 2);
  t.equal(tracker.get('ep-b'), 1);
  t.same(tracker.snapshot(), { 'ep-a': 2, 'ep-b': 1 });
  tracker.dec('ep-a');
  t.equal(tracker.get('ep-a'), 1);
  tracker.dec('ep-a');
  t.equal(tracker.get('ep-a'), 0);
  t.same(tracker.snapshot(), { 'ep-b': 1 }, 'an endpoint at zero leaves the snapshot');
});

t.test('a report is sent soon after 0→1 and after 1→0', async (t) => {
  const { api, tracker } = setup({ changeDelayMs: 10 });
  t.teardown(() => tracker.stop());
  const t0 = Date.now();
  tracker.inc('ep-a');
  t.ok(await until(() => api.reports.length === 1, 500), 'report after 0→1');
  t.ok(api.reports[0]!.at - t0 < 300, 'soon');
  t.same(api.reports[0]!.counts, { 'ep-a': 1 });
  t.equal(api.reports[0]!.proxy_id, 'proxy-1');
  t.ok(api.reports[0]!.ttl_seconds >= 1, 'ttl_seconds is at least 1');

  tracker.inc('ep-a'); // 1→2: not a change worth an early report
  await sleep(80);
  t.equal(api.reports.length, 1, 'no early report for 1→2');

  tracker.dec('ep-a'); // 2→1
  await sleep(80);
  t.equal(api.reports.length, 1, 'no early report for 2→1');

  const t1 = Date.now();
  tracker.dec('ep-a'); // 1→0
  t.ok(await until(() => api.reports.length === 2, 500), 'report after 1→0');
  t.ok(api.reports[1]!.at - t1 < 300, 'soon');
  t.same(api.reports[1]!.counts, { 'ep-a': 0 }, 'the endpoint is reported as 0');
});

t.test('changes within the change delay are coalesced into one report', async (t) => {
  const { api, tracker } = setup({ changeDelayMs: 40 });
  t.teardown(() => tracker.stop());
  tracker.inc('ep-a');
  tracker.inc('ep-b');
  tracker.inc('ep-c');
  tracker.dec('ep-c');
  await until(() => api.reports.length >= 1, 500);
  await sleep(80);
  t.equal(api.reports.length, 1);
  t.same(api.reports[0]!.counts, { 'ep-a': 1, 'ep-b': 1, 'ep-c': 0 });
});

t.test('an endpoint that went to zero is reported once as 0, then omitted', async (t) => {
  const { api, tracker } = setup();
  t.teardown(() => tracker.stop());
  tracker.inc('ep-a');
  tracker.inc('ep-b');
  await until(() => api.reports.length === 1);
  tracker.dec('ep-a');
  await until(() => api.reports.length === 2);
  t.same(api.reports[1]!.counts, { 'ep-a': 0, 'ep-b': 1 });
  await tracker.report();
  t.same(api.reports[2]!.counts, { 'ep-b': 1 }, 'ep-a omitted from the next report');
  await tracker.report();
  t.same(api.reports[3]!.counts, { 'ep-b': 1 });
});

t.test('an endpoint that went to zero and back before the report is reported with its count', async (t) => {
  const { api, tracker } = setup({ changeDelayMs: 30 });
  t.teardown(() => tracker.stop());
  tracker.inc('ep-a');
  await until(() => api.reports.length === 1);
  tracker.dec('ep-a');
  tracker.inc('ep-a');
  await until(() => api.reports.length === 2);
  t.same(api.reports[1]!.counts, { 'ep-a': 1 });
});

t.test('onInvalidate is called with the invalidate lists from the response', async (t) => {
  const { api, tracker, invalidated } = setup();
  t.teardown(() => tracker.stop());
  api.invalidate = ['ep-x', 'ep-y'];
  await tracker.report();
  t.same(invalidated, [{ wake: ['ep-x', 'ep-y'], access: [] }]);
  await tracker.report(); // empty lists: not called
  t.same(invalidated, [{ wake: ['ep-x', 'ep-y'], access: [] }]);
  api.invalidateAccess = ['ep-z'];
  await tracker.report();
  t.same(invalidated[1], { wake: [], access: ['ep-z'] }, 'access invalidations too');
});

t.test('a failing API does not throw out of report(); logged once, recovery logged', async (t) => {
  const { api, tracker, logger, invalidated } = setup();
  t.teardown(() => tracker.stop());
  api.fail = true;
  tracker.inc('ep-a');
  await t.resolves(tracker.report(), 'report() resolves when the API rejects');
  await t.resolves(tracker.report());
  t.equal(logger.records.filter((r) => r.level === 'warn').length, 1, 'one warning for a run of failures');
  api.fail = false;
  api.invalidate = ['ep-z'];
  await tracker.report();
  t.same(invalidated, [{ wake: ['ep-z'], access: [] }]);
  t.ok(logger.records.some((r) => r.level === 'info' && /again/.test(r.msg)), 'recovery logged');
  t.same(api.reports.at(-1)!.counts, { 'ep-a': 1 });
  // a failing early report (timer path) does not produce an unhandled rejection either
  api.fail = true;
  tracker.inc('ep-b');
  await until(() => api.reports.at(-1)!.counts['ep-b'] === 1);
  await sleep(20);
  t.pass('no unhandled rejection from the timer-driven report');
});

t.test('one report in flight at a time', async (t) => {
  const { api, tracker } = setup();
  t.teardown(() => tracker.stop());
  api.delayMs = 50;
  tracker.inc('ep-a');
  await Promise.all([tracker.report(), tracker.report(), tracker.report()]);
  t.ok(api.reports.length >= 1);
  t.equal(api.maxInFlight, 1, 'never two reports in flight');
});

t.test('a change while a report is in flight is still reported soon', async (t) => {
  // 0→1 triggers report #1 (slow API). While it is in flight the last connection closes (1→0).
  // The control plane must learn about the zero soon (it starts the idle timer), not only at
  // the next heartbeat (intervalMs, 60 s here).
  const { api, tracker } = setup({ changeDelayMs: 10, intervalMs: 60_000 });
  t.teardown(() => tracker.stop());
  api.delayMs = 100;
  tracker.inc('ep-a');
  await until(() => api.reports.length === 1, 500);
  t.same(api.reports[0]!.counts, { 'ep-a': 1 });
  tracker.dec('ep-a'); // report #1 is still in flight
  const seenZero = await until(() => api.reports.some((r) => r.counts['ep-a'] === 0), 1000);
  t.ok(seenZero, 'the 1→0 change is reported after the in-flight report settles');
});

t.test('start(): heartbeat with the full snapshot every intervalMs; stop() ends it', async (t) => {
  const { api, tracker } = setup({ intervalMs: 40 });
  tracker.inc('ep-a');
  tracker.inc('ep-a');
  tracker.start();
  await sleep(230);
  tracker.stop();
  const n = api.reports.length;
  t.ok(n >= 3, `several heartbeats (${n})`);
  t.same(api.reports.at(-1)!.counts, { 'ep-a': 2 });
  t.equal(api.reports.at(-1)!.ttl_seconds, 1, 'ttl covers three intervals, rounded up to a second');
  await sleep(120);
  t.equal(api.reports.length, n, 'no reports after stop()');
});
