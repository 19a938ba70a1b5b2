/**
 * lib/config.ts: flag parsing and typed, validated values from flags and env (flags win).
 */
import { homedir } from 'node:os';
import { join, resolve } from 'node:path';
import t from 'tap';
import { ConfigError, ConfigSource, parseFlags, stateDirFrom } from '../../lib/config.ts';

const flags = (...argv: string[]): Map<string, string> => parseFlags(argv);

t.test('parseFlags forms', async (t) => {
  t.same([...flags('--port', '5432')], [['port', '5432']], '--name value');
  t.same([...flags('--port=5432')], [['port', '5432']], '--name=value');
  t.same([...flags('--verbose')], [['verbose', 'true']], 'bare flag at the end');
  t.same([...flags('--verbose', '--port', '1')], [['verbose', 'true'], ['port', '1']], 'bare flag followed by another flag');
  t.same([...flags('--url=postgres://a:b@h/db?x=1')], [['url', 'postgres://a:b@h/db?x=1']], 'only the first "=" splits');
  t.same([...flags('--name=')], [['name', '']], 'empty value with "="');
  t.same([...flags('--offset', '-5')], [['offset', '-5']], 'a value starting with a single dash');
  t.same([...flags('up', '--json', 'extra')], [['json', 'extra']], 'positionals before flags are skipped');
  t.same([...flags('positional', 'other')], [], 'no flags');
  t.same([...flags('--a', '1', '--a', '2')], [['a', '2']], 'the last occurrence wins');
  t.same([...flags('--a', '1', 'pos', '--b=2')], [['a', '1'], ['b', '2']], 'a positional between flags is skipped');
  t.same([...flags()], []);
});

t.test('string / optionalString: flag beats env beats default', async (t) => {
  const env = { XENON_HOST: 'from-env', XENON_EMPTY: '' };
  const c = new ConfigSource(env, flags('--host', 'from-flag'));
  t.equal(c.string('XENON_HOST', 'def', 'host'), 'from-flag', 'flag wins');
  t.equal(c.string('XENON_HOST', 'def'), 'from-env', 'no flag name: env');
  t.equal(c.string('XENON_HOST', 'def', 'other-flag'), 'from-env', 'flag name given but flag absent: env');
  t.equal(c.string('XENON_MISSING', 'def'), 'def', 'default');
  t.equal(c.string('XENON_EMPTY', 'def'), 'def', 'empty env counts as unset');
  t.equal(c.optionalString('XENON_MISSING'), undefined);
  t.equal(c.optionalString('XENON_EMPTY'), undefined);
  t.equal(c.optionalString('XENON_HOST', 'host'), 'from-flag');
  t.equal(new ConfigSource({}, flags('--host')).string('XENON_HOST', 'def', 'host'), 'true', 'a bare flag is "true"');
});

t.test('int', async (t) => {
  const c = new ConfigSource({ A: '42', NEG: '-7', ZERO: '0', LEAD: '007' });
  t.equal(c.int('A', 1), 42);
  t.equal(c.int('NEG', 1), -7);
  t.equal(c.int('ZERO', 1), 0);
  t.equal(c.int('LEAD', 1), 7);
  t.equal(c.int('UNSET', 13), 13, 'default');
  t.equal(c.int('A', 1, { min: 42, max: 42 }), 42, 'bounds are inclusive');
  t.equal(new ConfigSource({ A: '1' }, flags('--a', '99')).int('A', 0, { flag: 'a' }), 99, 'flag beats env');
});

t.test('int validation errors name the variable', async (t) => {
  const bad = ['abc', '1.5', '1e3', '0x10', ' 5', '5 ', '+5', '--5', '12abc', 'NaN', 'Infinity'];
  for (const v of bad) {
    t.throws(() => new ConfigSource({ XENON_PORT: v }).int('XENON_PORT', 1), { name: 'ConfigError', message: /XENON_PORT must be an integer/ }, JSON.stringify(v));
  }
  const c = new ConfigSource({ XENON_PORT: '70000', XENON_LOW: '-1' });
  t.throws(() => c.int('XENON_PORT', 1, { max: 65535 }), { name: 'ConfigError', message: /XENON_PORT must be <= 65535, got 70000/ });
  t.throws(() => c.int('XENON_LOW', 1, { min: 0 }), { name: 'ConfigError', message: /XENON_LOW must be >= 0, got -1/ });
  // With a flag the message still names the env variable (the documented name)
  t.throws(() => new ConfigSource({}, flags('--port', 'x')).int('XENON_PORT', 1, { flag: 'port' }), { message: /XENON_PORT/ });
  t.throws(() => new ConfigSource({}, flags('--port=')).int('XENON_PORT', 1, { flag: 'port' }), ConfigError, 'empty flag value');
  const err = (() => { try { new ConfigSource({ X: 'y' }).int('X', 1); } catch (e) { return e; } return undefined; })();
  t.ok(err instanceof ConfigError);
  t.ok(err instanceof Error);
});

t.test('number', async (t) => {
  const c = new ConfigSource({ R: '0.25', I: '3', E: '1e3', N: '-2.5' });
  t.equal(c.number('R', 1), 0.25);
  t.equal(c.number('I', 1), 3);
  t.equal(c.number('E', 1), 1000);
  t.equal(c.number('N', 1), -2.5);
  t.equal(c.number('UNSET', 1.5), 1.5);
  t.equal(new ConfigSource({ R: '1' }, flags('--ratio=2.5')).number('R', 0, { flag: 'ratio' }), 2.5, 'flag beats env');
  for (const v of ['abc', 'NaN', 'Infinity', '-Infinity', '1.2.3', '5%']) {
    t.throws(() => new ConfigSource({ XENON_RATIO: v }).number('XENON_RATIO', 1), { name: 'ConfigError', message: /XENON_RATIO must be a number/ }, JSON.stringify(v));
  }
  t.throws(() => new ConfigSource({ XENON_RATIO: '-1' }).number('XENON_RATIO', 1, { min: 0 }), { name: 'ConfigError', message: /XENON_RATIO must be >= 0/ });
});

t.test('number: blank values are not silently 0', async (t) => {
  // Number('  ') and Number('') are 0 in JavaScript; a blank setting must be an error, not zero.
  t.throws(() => new ConfigSource({ XENON_RATIO: '   ' }).number('XENON_RATIO', 1), { name: 'ConfigError', message: /XENON_RATIO/ }, 'whitespace-only env');
  t.throws(() => new ConfigSource({}, flags('--ratio=')).number('XENON_RATIO', 1, { flag: 'ratio' }), { name: 'ConfigError', message: /XENON_RATIO/ }, 'empty flag value');
});

t.test('bool', async (t) => {
  for (const v of ['1', 'true', 'TRUE', 'yes', 'Yes', 'on', 'ON']) t.equal(new ConfigSource({ B: v }).bool('B', false), true, v);
  for (const v of ['0', 'false', 'False', 'no', 'NO', 'off', 'Off']) t.equal(new ConfigSource({ B: v }).bool('B', true), false, v);
  t.equal(new ConfigSource({}).bool('B', true), true, 'default');
  t.equal(new ConfigSource({ B: '' }).bool('B', true), true, 'empty = default');
  t.equal(new ConfigSource({ B: 'false' }, flags('--b')).bool('B', false, 'b'), true, 'bare flag is true and beats env');
  t.equal(new ConfigSource({ B: 'true' }, flags('--b=off')).bool('B', true, 'b'), false, 'flag=off beats env');
  for (const v of ['2', 'y', 'n', 'enabled', 'true1', ' true']) {
    t.throws(() => new ConfigSource({ XENON_TLS: v }).bool('XENON_TLS', false), { name: 'ConfigError', message: /XENON_TLS must be a boolean/ }, JSON.stringify(v));
  }
});

t.test('logLevel', async (t) => {
  t.equal(new ConfigSource({}).logLevel(), 'info', 'default');
  t.equal(new ConfigSource({ XENON_LOG_LEVEL: 'debug' }).logLevel(), 'debug');
  t.equal(new ConfigSource({ XENON_LOG_LEVEL: 'debug' }, flags('--log-level', 'warn')).logLevel(), 'warn', 'flag beats env');
  t.equal(new ConfigSource({ MY_LEVEL: 'error' }).logLevel('MY_LEVEL', 'warn'), 'error');
  t.throws(() => new ConfigSource({ XENON_LOG_LEVEL: 'verbose' }).logLevel(), { name: 'ConfigError', message: /XENON_LOG_LEVEL must be one of/ });
  t.throws(() => new ConfigSource({ XENON_LOG_LEVEL: 'toString' }).logLevel(), ConfigError, 'prototype keys are not levels');
});

t.test('stateDirFrom', async (t) => {
  t.equal(stateDirFrom({}), join(homedir(), '.xenon'));
  t.equal(stateDirFrom({ XENON_STATE_DIR: '' }), join(homedir(), '.xenon'));
  t.equal(stateDirFrom({ XENON_STATE_DIR: '/tmp/x/../y' }), '/tmp/y');
  t.equal(stateDirFrom({ XENON_STATE_DIR: 'rel' }), resolve('rel'), 'relative paths are resolved');
});
