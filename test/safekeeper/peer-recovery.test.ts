// Peer recovery: a safekeeper that was down while the compute wrote so much WAL that it removed
// the segments the safekeeper needs (its slot invalidated by max_slot_wal_keep_size) fetches the
// gap from a peer safekeeper of the same generation, then streams from the compute again — and is
// a full quorum member afterwards.
import t from 'tap';
import pg from 'pg';
import { join } from 'node:path';
import { formatLsn, parseLsn } from '../../lib/lsn.ts';
import { SafekeeperClient } from '../../safekeeper/client.ts';
import { startTestPostgres } from '../helpers/postgres.ts';
import { compareSegments, computeOf, currentLsn, REPL_SETTINGS, replicationFlush, startTestSafekeeper, tempDir, waitFor, waitReplicated, withClient } from './helpers.ts';

const TL = 'br-peers';

async function slotStatus(pgc: { admin(): import('pg').ClientConfig }, slot: string): Promise<{ wal_status: string | null; restart_lsn: string | null } | undefined> {
  return withClient(pgc.admin(), async (c) =>
    (await c.query<{ wal_status: string | null; restart_lsn: string | null }>('SELECT wal_status, restart_lsn::text FROM pg_replication_slots WHERE slot_name = $1', [slot])).rows[0]);
}

async function recoveredBytes(sk: { metrics: { registry: { getSingleMetricAsString(n: string): Promise<string> } } }): Promise<number> {
  const m = await sk.metrics.registry.getSingleMetricAsString('xenon_safekeeper_peer_recovered_bytes_total');
  return Number(/_total\{[^}]*\} (\d+)/.exec(m)?.[1] ?? 0);
}

t.test('a safekeeper whose WAL the compute removed catches up from a peer', async (t) => {
  const pgc = await startTestPostgres(t, 'xenon-sk-peer-', {
    ...REPL_SETTINGS,
    synchronous_commit: 'on',
    synchronous_standby_names: 'ANY 2 (sk1, sk2, sk3)',
    max_slot_wal_keep_size: '32MB',
    wal_keep_size: 0,
    'xenon.generation': 1,
  });
  const root = tempDir(t, 'xenon-sk-peer-');
  const dirs = { sk1: join(root, 'sk1'), sk2: join(root, 'sk2'), sk3: join(root, 'sk3') };
  const sk1 = await startTestSafekeeper(t, 'sk1', dirs.sk1);
  const sk2 = await startTestSafekeeper(t, 'sk2', dirs.sk2);
  let sk3 = await startTestSafekeeper(t, 'sk3', dirs.sk3);
  const all = [sk1, sk2, sk3];
  for (const sk of all) {
    await new SafekeeperClient(sk.url).follow(TL, { generation: 1, compute: computeOf(pgc), peers: all.filter((p) => p !== sk).map((p) => p.url) });
  }
  await withClient(pgc.admin(), async (c) => {
    await c.query('CREATE TABLE t (id serial, pad text)');
    await c.query("INSERT INTO t (pad) SELECT repeat('a', 200) FROM generate_series(1, 2000)");
  });
  await waitReplicated(pgc, ['sk1', 'sk2', 'sk3'], await currentLsn(pgc));
  const sk3Before = parseLsn((await new SafekeeperClient(sk3.url).status(TL))!.flush_lsn);

  // sk3 goes away; the compute writes WAL (commits keep working on sk1 + sk2) until it has
  // given up sk3's slot and removed the WAL sk3 would need.
  await sk3.close();
  let switches = 0;
  await withClient(pgc.admin(), async (c) => {
    for (;;) {
      await c.query("INSERT INTO t (pad) SELECT repeat('b', 200) FROM generate_series(1, 3000)");
      await c.query('SELECT pg_switch_wal()');
      switches++;
      if (switches % 3 === 0) await c.query('CHECKPOINT');
      const st = await slotStatus(pgc, 'sk3');
      if (st?.wal_status === 'lost' && switches >= 6) break;
      if (switches > 40) throw new Error(`slot sk3 never invalidated: ${JSON.stringify(st)}`);
    }
    await c.query('CHECKPOINT');
  });
  const lost = await slotStatus(pgc, 'sk3');
  t.equal(lost?.wal_status, 'lost', `slot sk3 invalidated after ${switches} segment switches`);
  const oldest = await withClient(pgc.admin(), async (c) => (await c.query<{ name: string }>("SELECT min(name) AS name FROM pg_ls_waldir() WHERE name ~ '^[0-9A-F]{24}$'")).rows[0]!.name);
  const sk3Segment = (await new SafekeeperClient(sk1.url).listWal(TL)).files.find((f) => f.kind === 'segment' && parseLsn(f.start_lsn!) <= sk3Before && sk3Before < parseLsn(f.end_lsn!) + 1n)!;
  t.ok(oldest > sk3Segment.name, `the compute no longer has sk3's segment (oldest in pg_wal ${oldest}, sk3 needs ${sk3Segment.name} at ${formatLsn(sk3Before)})`);
  const target = await currentLsn(pgc);
  t.ok(target - sk3Before > 5n * 16n * 1024n * 1024n, `sk3 is ${Number(target - sk3Before) >> 20} MiB behind`);

  // sk3 comes back (new port, same data dir, peers from its control file): it recovers the gap
  // from sk1 or sk2, then streams from the compute.
  const t0 = Date.now();
  sk3 = await startTestSafekeeper(t, 'sk3', dirs.sk3);
  const api3 = new SafekeeperClient(sk3.url);
  const st = await waitFor('sk3 streaming at the compute\'s WAL end', async () => {
    const s = await api3.status(TL);
    return s && s.streaming && parseLsn(s.flush_lsn) >= target ? s : undefined;
  }, 60_000, 100);
  const ms = Date.now() - t0;
  const recovered = await recoveredBytes(sk3);
  t.comment(`sk3 caught up ${Number(target - sk3Before) >> 20} MiB in ${ms} ms; ${recovered} bytes (${(recovered / 1048576).toFixed(1)} MiB) from peers`);
  t.equal(st.last_error, null, 'no error left');
  t.ok(recovered > 4 * 16 * 1024 * 1024, 'several segments were recovered from a peer');
  const slotNow = await slotStatus(pgc, 'sk3');
  t.not(slotNow?.wal_status, 'lost', `slot sk3 recreated (wal_status ${slotNow?.wal_status}, restart_lsn ${slotNow?.restart_lsn})`);

  // Byte-identical to a peer's copy.
  await withClient(pgc.admin(), (c) => c.query("INSERT INTO t (pad) SELECT repeat('c', 200) FROM generate_series(1, 100)"));
  const end = await currentLsn(pgc);
  await waitReplicated(pgc, ['sk1', 'sk2', 'sk3'], end);
  const wal = (sk: string): string => join(dirs[sk as keyof typeof dirs], 'timelines', TL, 'wal');
  const cmp = compareSegments(wal('sk3'), wal('sk1'), end);
  t.comment(`compared with sk1: ${cmp.compared.join(' ')}`);
  t.ok(cmp.compared.length >= switches, `every segment compared (${cmp.compared.length})`);
  t.same(cmp.diffs, [], 'sk3 holds exactly sk1\'s WAL');
  const cmp2 = compareSegments(wal('sk3'), wal('sk2'), end);
  t.same(cmp2.diffs, [], 'and sk2\'s');

  // A quorum member: with sk1 gone, commits need sk2 and the recovered sk3.
  await sk1.close();
  await waitFor('sk1 gone from pg_stat_replication', async () => !(await replicationFlush(pgc)).has('sk1'));
  const commitWithin = async (c: pg.Client, sql: string, ms: number): Promise<boolean> => {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<false>((r) => (timer = setTimeout(() => r(false), ms)));
    const ok = await Promise.race([c.query(sql).then(() => true), timeout]);
    clearTimeout(timer);
    return ok;
  };
  await withClient(pgc.admin(), async (c) => {
    let done = 0;
    for (let i = 0; i < 20; i++) if (await commitWithin(c, `INSERT INTO t (pad) VALUES ('after-${i}')`, 15_000)) done++;
    t.equal(done, 20, 'with sk1 down, 20 commits completed: sk2 + the recovered sk3 are the quorum');
  });
  const m = await replicationFlush(pgc);
  t.ok((m.get('sk3') ?? 0n) > end, `sk3 acknowledged the new commits (${formatLsn(m.get('sk3') ?? 0n)})`);
  // And it is needed: with sk2 gone as well, a commit waits.
  await sk2.close();
  await waitFor('sk2 gone from pg_stat_replication', async () => !(await replicationFlush(pgc)).has('sk2'));
  const c = new pg.Client(pgc.admin());
  await c.connect();
  c.on('error', () => {});
  t.notOk(await commitWithin(c, "INSERT INTO t (pad) VALUES ('waits')", 2_000), 'with only sk3 left, a commit waits for a quorum');
  await c.end().catch(() => {});
});

t.test('no usable peer: last_error says why', async (t) => {
  const pgc = await startTestPostgres(t, 'xenon-sk-peer0-', {
    ...REPL_SETTINGS,
    max_slot_wal_keep_size: '16MB',
    wal_keep_size: 0,
  });
  const root = tempDir(t, 'xenon-sk-peer0-');
  const sk1 = await startTestSafekeeper(t, 'sk1', join(root, 'sk1'));
  const sk2 = await startTestSafekeeper(t, 'sk2', join(root, 'sk2'));
  const api1 = new SafekeeperClient(sk1.url);
  const api2 = new SafekeeperClient(sk2.url);
  await api1.follow(TL, { generation: 1, compute: computeOf(pgc), peers: [sk2.url] });
  await api2.follow(TL, { generation: 1, compute: computeOf(pgc), peers: [sk1.url] });
  await waitReplicated(pgc, ['sk1', 'sk2'], await currentLsn(pgc));
  // Both stop following; the compute moves far ahead and removes the WAL both would need.
  await api1.unfollow(TL, 1);
  await api2.unfollow(TL, 2); // sk2 is fenced to generation 2: not a usable peer for generation 1
  await withClient(pgc.admin(), async (c) => {
    for (let i = 0; i < 6; i++) {
      await c.query('CREATE TABLE IF NOT EXISTS t AS SELECT 1 AS x');
      await c.query('INSERT INTO t SELECT generate_series(1, 1000)');
      await c.query('SELECT pg_switch_wal()');
    }
    await c.query('CHECKPOINT');
  });
  await api1.follow(TL, { generation: 1, compute: computeOf(pgc) });
  const s = await waitFor('an error naming the peers', async () => {
    const st = await api1.status(TL);
    return st?.last_error && /peer/.test(st.last_error) ? st : undefined;
  }, 30_000, 100);
  t.comment(`last_error: ${s.last_error}`);
  t.match(s.last_error, /no longer has the WAL/);
  t.match(s.last_error, /follows generation 2, this one 1/, 'the peer of another generation is named');
  t.equal(s.streaming, false);
  t.equal(await recoveredBytes(sk1), 0, 'nothing recovered');
});

t.test('peers in control files and follow requests', async (t) => {
  const { parseControl, serializeControl } = await import('../../safekeeper/control.ts');
  const { parseFollowRequest } = await import('../../safekeeper/index.ts');
  const old = '{"version":1,"timeline_id":"br-x","generation":2,"compute":null,"system_id":null,"pg_timeline":0,"flush_lsn":"0/0","history":[]}';
  const s = parseControl(old, 'c');
  t.equal(s.peers, undefined, 'a control file without peers is valid');
  t.notMatch(serializeControl(s), /peers/, 'and is written without them');
  const withPeers = parseControl(serializeControl({ ...s, peers: ['http://a:1', 'http://b:2'] }), 'c');
  t.same(withPeers.peers, ['http://a:1', 'http://b:2'], 'peers round-trip');
  t.throws(() => parseControl(old.replace('"history":[]', '"history":[],"peers":"x"'), 'c'), { code: 'SK_CONTROL_FILE_CORRUPT' });
  const compute = { host: 'h', port: 5432, user: 'u', password: 'p' };
  t.same(parseFollowRequest({ generation: 1, compute, peers: ['http://127.0.0.1:7677/'] }).peers, ['http://127.0.0.1:7677']);
  t.equal(parseFollowRequest({ generation: 1, compute }).peers, undefined);
  t.throws(() => parseFollowRequest({ generation: 1, compute, peers: ['ftp://x'] }), { code: 'CP_BAD_REQUEST' });
  t.throws(() => parseFollowRequest({ generation: 1, compute, peers: 'http://x' }), { code: 'CP_BAD_REQUEST' });
});
