// Acceptance: psql and node-postgres reach an endpoint by hostname over verified TLS through the
// proxy; a restart of the whole stack keeps projects, roles and data.
import t from 'tap';
import pg from 'pg';
import { spawn } from 'node:child_process';
import { connect } from 'node:net';
import { psql, startTestStack, waitFor } from '../helpers/stack.ts';

t.test('psql and pg by hostname, and a restart keeps everything', async (t) => {
  const stack = await startTestStack(t);
  t.match(stack.info.connection_string, /^postgresql:\/\/neondb_owner:[^@]+@ep-[a-z]+-[a-z]+-\d{6}\.localtest\.me:\d+\/neondb\?sslmode=verify-full&sslrootcert=/);

  const r1 = await psql(stack.psqlConn(), 'CREATE TABLE items (id int PRIMARY KEY, name text); INSERT INTO items VALUES (1, $$one$$), (2, $$two$$); SELECT count(*) FROM items;');
  t.equal(r1.code, 0, `psql succeeded: ${r1.stderr}`);
  t.equal(r1.stdout.split('\n').pop(), '2');

  // The client's connection is TLS (verify-full passed, so the certificate covers the endpoint's name).
  const ssl = await psql(stack.psqlConn(), '\\conninfo');
  t.equal(ssl.code, 0, ssl.stderr);
  t.match(ssl.stdout, /SSL connection \(protocol: TLSv1\.[23]/);

  const c = new pg.Client(stack.pgConfig());
  await c.connect();
  await c.query('INSERT INTO items VALUES ($1, $2)', [3, 'three']);
  const { rows } = await c.query<{ n: string }>('SELECT count(*) AS n FROM items');
  t.equal(rows[0]!.n, '3', 'pg sees psql\'s rows and its own');
  const who = await c.query<{ u: string; d: string }>('SELECT current_user AS u, current_database() AS d');
  t.same(who.rows[0], { u: stack.info.role, d: 'neondb' });
  await c.end();

  // sslmode=verify-full with the wrong name fails certificate verification (no endpoint leaks).
  const wrong = await psql(stack.psqlConn({ extra: '' }).replace(/host=\S+/, 'host=localhost.example.com'), 'SELECT 1');
  t.not(wrong.code, 0, 'a host the certificate does not cover is refused by libpq');
  t.match(wrong.stderr, /does not match host name/);

  // Restart everything on the same state dir.
  const before = stack.info;
  t.equal(await stack.stop(), 0, 'xenon up exits 0 on Ctrl-C');
  await stack.restart();
  t.equal(stack.info.endpoint_id, before.endpoint_id, 'same endpoint after restart');
  t.equal(stack.info.password, before.password, 'same role password after restart');
  const projects = await stack.api.listProjects();
  t.same(projects.projects.map((p) => p.id), [before.project_id], 'projects kept');
  const r2 = await psql(stack.psqlConn(), 'SELECT string_agg(name, $$,$$ ORDER BY id) FROM items');
  t.equal(r2.code, 0, r2.stderr);
  t.equal(r2.stdout, 'one,two,three', 'rows kept across a restart of the stack');
});

t.test('cancel: psql interrupted during pg_sleep(30) is cancelled through the proxy', async (t) => {
  const stack = await startTestStack(t);
  const t0 = Date.now();
  const child = spawn('psql', [stack.psqlConn(), '-X', '-c', 'SELECT pg_sleep(30)'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  // Wait until the query runs on the compute, then Ctrl-C (libpq sends a CancelRequest to the proxy).
  const running = async (): Promise<boolean> => {
    const c = new pg.Client(stack.pgConfig());
    await c.connect();
    try {
      const { rows } = await c.query<{ n: number }>(`SELECT count(*)::int AS n FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'`);
      return rows[0]!.n === 1;
    } finally { await c.end(); }
  };
  t.ok(await waitFor(running, 10_000, 100), 'the sleep is running');
  const sentAt = Date.now();
  child.kill('SIGINT');
  const code = await new Promise<number | null>((r) => child.once('exit', r));
  t.not(code, 0);
  t.match(stderr, /canceling statement due to user request/);
  t.ok(Date.now() - sentAt < 1_000, `cancelled ${Date.now() - sentAt} ms after Ctrl-C`);
  t.ok(Date.now() - t0 < 15_000);
  const metrics = await (await fetch(`${stack.info.metrics_url}/metrics`)).text();
  t.match(metrics, /xenon_proxy_cancel_requests_total\{outcome="forwarded"\} 1/);

  // A cancel key nobody owns is ignored (and does not crash anything).
  await new Promise<void>((res) => {
    const s = connect(stack.info.proxy_port, '127.0.0.1', () => {
      const b = Buffer.alloc(16);
      b.writeInt32BE(16, 0); b.writeInt32BE(80877102, 4); b.writeInt32BE(12345, 8); b.writeInt32BE(67890, 12);
      s.write(b);
    });
    s.on('close', () => res());
    s.on('error', () => res());
  });
  const after = await (await fetch(`${stack.info.metrics_url}/metrics`)).text();
  t.match(after, /xenon_proxy_cancel_requests_total\{outcome="unknown_key"\} 1/);
});
