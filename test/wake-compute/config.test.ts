import t from 'tap';
import { ConfigError } from '../../lib/config.ts';
import { parseSafekeepers, parseSettings } from '../../wake-compute/config.ts';

t.test('XENON_SAFEKEEPERS: id=url pairs', async (t) => {
  t.same(parseSafekeepers(undefined), []);
  t.same(parseSafekeepers(''), []);
  t.same(parseSafekeepers('sk1=http://127.0.0.1:7676, sk2=http://127.0.0.1:7677/ ,sk3=https://sk3.example:7678'), [
    { id: 'sk1', url: 'http://127.0.0.1:7676' },
    { id: 'sk2', url: 'http://127.0.0.1:7677' },
    { id: 'sk3', url: 'https://sk3.example:7678' },
  ]);
  for (const bad of ['http://127.0.0.1:7676', 'sk1=', 'SK1=http://x', 'sk1=ftp://x', 'sk 1=http://x', '=http://x', "sk1=http://x,sk1=http://y", "sk'1=http://x"]) {
    t.throws(() => parseSafekeepers(bad), ConfigError, `refused: ${bad}`);
  }
});

t.test('XENON_COMPUTE_SETTINGS', async (t) => {
  t.same(parseSettings('work_mem=8MB, log_min_messages=debug1'), { work_mem: '8MB', log_min_messages: 'debug1' });
  t.throws(() => parseSettings('work_mem'), ConfigError);
});
