// safekeeper/config.ts: defaults, env and flags, validation.
import t from 'tap';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { loadSafekeeperConfig } from '../../safekeeper/config.ts';

t.test('defaults', async (t) => {
  const c = loadSafekeeperConfig({}, []);
  t.equal(c.id, 'sk1');
  t.equal(c.port, 7676);
  t.equal(c.host, '127.0.0.1');
  t.equal(c.dataDir, join(homedir(), '.xenon', 'safekeepers', 'sk1'));
  t.equal(c.syncMethod, 'open_datasync_inline');
  t.equal(c.logLevel, 'info');
  t.ok(Object.isFrozen(c));
});

t.test('env and flags', async (t) => {
  const c = loadSafekeeperConfig({ XENON_SAFEKEEPER_ID: 'sk2', XENON_STATE_DIR: '/tmp/st', XENON_SAFEKEEPER_PORT: '0', XENON_SAFEKEEPER_SYNC_METHOD: 'open_datasync' }, []);
  t.equal(c.dataDir, '/tmp/st/safekeepers/sk2', 'data dir under the state dir, by id');
  t.equal(c.port, 0);
  t.equal(c.syncMethod, 'open_datasync');
  const f = loadSafekeeperConfig({ XENON_SAFEKEEPER_ID: 'sk2' }, ['--id', 'sk3', '--port=7678', '--data-dir', '/tmp/x']);
  t.same([f.id, f.port, f.dataDir], ['sk3', 7678, '/tmp/x'], 'flags win');
});

t.test('validation', async (t) => {
  for (const id of ['SK1', 'sk-1', '', 'a'.repeat(64), 'sk 1', 'sk1;drop']) {
    if (id === '') continue; // empty env means unset → default
    t.throws(() => loadSafekeeperConfig({ XENON_SAFEKEEPER_ID: id }, []), /XENON_SAFEKEEPER_ID must match/, `id ${JSON.stringify(id)}`);
  }
  t.throws(() => loadSafekeeperConfig({ XENON_SAFEKEEPER_PORT: '70000' }, []), /<= 65535/);
  t.throws(() => loadSafekeeperConfig({ XENON_SAFEKEEPER_PORT: 'x' }, []), /integer/);
  t.throws(() => loadSafekeeperConfig({ XENON_SAFEKEEPER_SYNC_METHOD: 'fsync' }, []), /SYNC_METHOD/);
});
