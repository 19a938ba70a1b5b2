/**
 * proxy/auth/credentials.ts: which endpoint a client asked for, from SNI or startup `options`.
 */
import t from 'tap';
import { XenonError } from '../../lib/errors.ts';
import { endpointFromOptions, endpointFromSni, endpointRef, parsePasswordHack, resolveEndpoint, splitOptions } from '../../proxy/auth/credentials.ts';

const DOMAIN = 'localtest.me';

t.test('endpointFromSni: under the domain', async (t) => {
  t.equal(endpointFromSni('ep-cool-moon-123456.localtest.me', DOMAIN), 'ep-cool-moon-123456');
  t.equal(endpointFromSni('ep-cool-moon-123456-pooler.localtest.me', DOMAIN), 'ep-cool-moon-123456-pooler', 'the -pooler suffix is kept here');
  t.equal(endpointFromSni('a.localtest.me', DOMAIN), 'a', 'one-character label');
  t.equal(endpointFromSni('ep-a.db.example.com', 'db.example.com'), 'ep-a', 'multi-label domain');
});

t.test('endpointFromSni: case-insensitive, trailing dot', async (t) => {
  t.equal(endpointFromSni('EP-Cool-Moon-123456.LocalTest.ME', DOMAIN), 'ep-cool-moon-123456', 'host lower-cased');
  t.equal(endpointFromSni('ep-a.localtest.me', 'LOCALTEST.ME'), 'ep-a', 'domain compared case-insensitively');
  t.equal(endpointFromSni('ep-a.localtest.me.', DOMAIN), 'ep-a', 'fully-qualified name with a trailing dot');
});

t.test('endpointFromSni: not ours → undefined', async (t) => {
  const notOurs: (string | undefined | false | null)[] = [
    undefined,
    null,
    false,
    '',
    'localtest.me', // the domain itself
    '.localtest.me', // empty label
    'ep-a.example.com',
    'ep-a.notlocaltest.me', // suffix without the dot boundary
    'ep-a.localtest.me.evil.com',
    'ep-a.localtest.mex',
    'x.ep-a.localtest.me', // nested labels
    'a.b.c.localtest.me',
    '-ep.localtest.me', // invalid label: leading hyphen
    'ep-.localtest.me', // trailing hyphen
    'ep_a.localtest.me', // underscore
    'ep a.localtest.me',
    `${'a'.repeat(64)}.localtest.me`, // label longer than 63
    '127.0.0.1',
  ];
  for (const sni of notOurs) t.equal(endpointFromSni(sni, DOMAIN), undefined, JSON.stringify(sni));
  t.equal(endpointFromSni(`${'a'.repeat(63)}.localtest.me`, DOMAIN), 'a'.repeat(63), '63 characters is still a label');
});

t.test('splitOptions: whitespace and backslash escapes', async (t) => {
  t.same(splitOptions(''), []);
  t.same(splitOptions('   '), []);
  t.same(splitOptions('a'), ['a']);
  t.same(splitOptions('a b'), ['a', 'b']);
  t.same(splitOptions('  a    b  '), ['a', 'b'], 'multiple and leading/trailing spaces');
  t.same(splitOptions('a\tb\nc'), ['a', 'b', 'c'], 'tabs and newlines separate too');
  t.same(splitOptions('-c search_path=a\\ b'), ['-c', 'search_path=a b'], 'escaped space stays in the option');
  t.same(splitOptions('a\\\\b'), ['a\\b'], 'escaped backslash');
  t.same(splitOptions('a\\\\ b'), ['a\\', 'b'], 'escaped backslash then a separator');
  t.same(splitOptions('\\x\\y'), ['xy'], 'escaping an ordinary character yields the character');
  t.same(splitOptions('a\\  b'), ['a ', 'b'], 'escaped space then a separator');
  t.same(splitOptions('\\ '), [' '], 'an option made of one escaped space');
});

t.test('splitOptions matches Postgres pg_split_opts on edge cases', async (t) => {
  // Checked against PostgreSQL 15 (options → current_setting):
  //   '-c application_name=abc\\'             → application_name 'abc'
  //   '-c search_path=\\'                      → search_path ''
  //   '-c application_name=a<U+00A0>b'        → one option (isspace() is ASCII-only)
  // postinit.c pg_split_opts: a backslash sets last_was_escape and is never appended itself.
  t.same(splitOptions('abc\\'), ['abc'], 'trailing backslash is dropped');
  t.same(splitOptions('-c search_path=\\'), ['-c', 'search_path='], 'a lone trailing escape');
  t.same(splitOptions('-c application_name=a\u00A0b'), ['-c', 'application_name=a\u00A0b'], 'non-ASCII space does not separate');
  const fwd = endpointFromOptions('endpoint=ep-a -c application_name=a\u00A0b');
  t.equal(fwd.endpoint, 'ep-a');
  t.same(splitOptions(fwd.rest), ['-c', 'application_name=a\u00A0b'], 'and is forwarded as one option');
});

t.test('endpointFromOptions', async (t) => {
  t.same(endpointFromOptions(undefined), { rest: '' });
  t.same(endpointFromOptions(''), { rest: '' });
  t.same(endpointFromOptions('endpoint=ep-a-b-123456'), { endpoint: 'ep-a-b-123456', rest: '' });
  t.same(endpointFromOptions('--endpoint=ep-a-b-123456'), { endpoint: 'ep-a-b-123456', rest: '' });
  t.same(endpointFromOptions('endpoint=EP-A-B-123456'), { endpoint: 'ep-a-b-123456', rest: '' }, 'lower-cased');
  t.same(endpointFromOptions('  endpoint=ep-a   '), { endpoint: 'ep-a', rest: '' });
  t.same(endpointFromOptions('-c statement_timeout=5s'), { endpoint: undefined, rest: '-c statement_timeout=5s' }, 'no endpoint: options kept');
  t.same(endpointFromOptions('endpoint'), { endpoint: undefined, rest: 'endpoint' }, 'no "=": not an endpoint option');
  t.same(endpointFromOptions('xendpoint=ep-a'), { endpoint: undefined, rest: 'xendpoint=ep-a' });
});

t.test('endpointFromOptions: other options are kept and re-escaped', async (t) => {
  const r = endpointFromOptions('-c search_path=a\\ b   endpoint=ep-a-pooler --application_name=x\\\\y');
  t.equal(r.endpoint, 'ep-a-pooler');
  t.equal(r.rest, '-c search_path=a\\ b --application_name=x\\\\y');
  t.same(splitOptions(r.rest), ['-c', 'search_path=a b', '--application_name=x\\y'], 'the forwarded string splits back to the same options');

  const tab = endpointFromOptions('--endpoint=ep-a -c x=a\\\tb');
  t.equal(tab.endpoint, 'ep-a');
  t.same(splitOptions(tab.rest), ['-c', 'x=a\tb'], 'escaped tab survives the round trip');

  const only = endpointFromOptions('-c\\ x=1 endpoint=ep-a');
  t.same(splitOptions(only.rest), ['-c x=1']);
  t.equal(only.rest, '-c\\ x=1');
});

t.test('resolveEndpoint', async (t) => {
  t.same(resolveEndpoint('ep-a-b-123456', undefined), { endpoint: 'ep-a-b-123456', pooled: false, source: 'sni' });
  t.same(resolveEndpoint(undefined, 'ep-a-b-123456'), { endpoint: 'ep-a-b-123456', pooled: false, source: 'options' });
  t.same(resolveEndpoint('ep-a-b-123456', 'ep-a-b-123456'), { endpoint: 'ep-a-b-123456', pooled: false, source: 'sni' }, 'both agree: SNI wins');
  t.same(resolveEndpoint('ep-a-b-123456-pooler', undefined), { endpoint: 'ep-a-b-123456', pooled: true, source: 'sni' }, '-pooler stripped');
  t.same(resolveEndpoint(undefined, 'ep-a-b-123456-pooler'), { endpoint: 'ep-a-b-123456', pooled: true, source: 'options' });
  t.same(resolveEndpoint('ep-pooler-x', undefined), { endpoint: 'ep-pooler-x', pooled: false, source: 'sni' }, '"pooler" elsewhere in the id is not the suffix');
});

t.test('resolveEndpoint: errors', async (t) => {
  // mismatch: both names in the (user-visible) message
  try {
    resolveEndpoint('ep-one', 'ep-two');
    t.fail('did not throw');
  } catch (err) {
    t.ok(err instanceof XenonError);
    const e = err as XenonError;
    t.equal(e.code, 'PROXY_ENDPOINT_MISMATCH');
    t.equal(e.sqlstate, '08004');
    t.match(e.userMessage, /ep-one/);
    t.match(e.userMessage, /ep-two/);
    t.match(e.message, /ep-one/);
    t.match(e.message, /ep-two/);
  }
  t.equal(resolveEndpoint(undefined, undefined), undefined, 'neither: the caller may try the password hack');
  t.throws(() => resolveEndpoint('', ''), { code: 'PROXY_ENDPOINT_MISSING' }, 'both empty');
  t.throws(() => resolveEndpoint(undefined, ''), { code: 'PROXY_ENDPOINT_MISSING' }, 'endpoint= with no value');
  t.throws(() => resolveEndpoint(undefined, 'ep_bad'), { code: 'PROXY_ENDPOINT_MISSING' }, 'invalid id in options');
  t.throws(() => resolveEndpoint(undefined, 'x.y'), { code: 'PROXY_ENDPOINT_MISSING' }, 'dots in options');
  t.throws(() => resolveEndpoint('ep-a', 'ep-a-pooler'), { code: 'PROXY_ENDPOINT_MISMATCH' }, 'pooled in one place, not the other');
  t.throws(() => endpointRef('ep_bad', 'password'), { code: 'PROXY_ENDPOINT_MISSING', userMessage: /invalid endpoint ID "ep_bad"/ }, 'a malformed id is named');
});

t.test('parsePasswordHack', async (t) => {
  t.same(parsePasswordHack('endpoint=ep-a-1;s3cret'), { endpoint: 'ep-a-1', password: 's3cret' }, '; separator');
  t.same(parsePasswordHack('endpoint=ep-a-1$s3cret'), { endpoint: 'ep-a-1', password: 's3cret' }, '$ separator');
  t.same(parsePasswordHack('endpoint=EP-A;pw;with;semis$and$dollars'), { endpoint: 'ep-a', password: 'pw;with;semis$and$dollars' }, 'only the first separator splits; id lower-cased');
  t.same(parsePasswordHack('endpoint=ep-a;'), { endpoint: 'ep-a', password: '' }, 'empty password is still parsed (and then fails auth)');
  t.same(parsePasswordHack('endpoint=ep-a-pooler;x'), { endpoint: 'ep-a-pooler', password: 'x' }, 'pooler suffix kept for endpointRef');
  t.equal(parsePasswordHack('s3cret'), undefined, 'a plain password');
  t.equal(parsePasswordHack('endpoint=ep-a'), undefined, 'no separator');
  t.equal(parsePasswordHack('Endpoint=ep-a;x'), undefined, 'the key is case-sensitive');
  t.equal(parsePasswordHack(' endpoint=ep-a;x'), undefined, 'no leading space');
  t.same(endpointRef('ep-a-pooler', 'password'), { endpoint: 'ep-a', pooled: true, source: 'password' });
});

t.test('SNI + options end to end', async (t) => {
  const sni = endpointFromSni('EP-A-B-123456-POOLER.localtest.me.', DOMAIN);
  const opts = endpointFromOptions('endpoint=ep-a-b-123456-pooler -c x=1');
  t.same(resolveEndpoint(sni, opts.endpoint), { endpoint: 'ep-a-b-123456', pooled: true, source: 'sni' });
  t.equal(opts.rest, '-c x=1');
  // A non-matching SNI (another domain) falls back to options.
  t.same(resolveEndpoint(endpointFromSni('db.example.com', DOMAIN), opts.endpoint), { endpoint: 'ep-a-b-123456', pooled: true, source: 'options' });
});
