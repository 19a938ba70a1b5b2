// Acceptance: psql and node-postgres reach an endpoint by hostname over verified TLS through the
// proxy; a restart of the whole stack keeps projects, roles and data.
import t from 'tap';
import pg from 'pg';
import { psql, startTestStack } from '../helpers/stack.ts';

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
