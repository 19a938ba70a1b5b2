// LocalObjectStore: atomic puts (a reader sees old or new, never part), streamed puts, ranges,
// recursive prefix listing, deletes, key validation; createObjectStore's URL forms.
import t from 'tap';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { pathToFileURL } from 'node:url';
import { ConfigError } from '../../lib/config.ts';
import { createObjectStore, isObjectNotFound, LocalObjectStore, validateKey } from '../../pageserver/objectstore.ts';
import { rejectsCode } from './core-helpers.ts';

function tmp(t: { teardown(fn: () => unknown): void }): string {
  const dir = mkdtempSync(join(tmpdir(), 'ps-os-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

async function text(s: Readable): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const c of s) chunks.push(c as Buffer);
  return Buffer.concat(chunks).toString();
}

t.test('put, get, getBuffer, head, ranges', async (t) => {
  const s = new LocalObjectStore(tmp(t));
  t.same(await s.put('a/b/c.txt', Buffer.from('hello world')), { size: 11 });
  t.equal((await s.getBuffer('a/b/c.txt')).toString(), 'hello world');
  t.equal((await s.getBuffer('a/b/c.txt', { start: 6, end: 11 })).toString(), 'world');
  t.equal((await s.getBuffer('a/b/c.txt', { start: 0, end: 5 })).toString(), 'hello');
  t.equal((await s.getBuffer('a/b/c.txt', { start: 6, end: 100 })).toString(), 'world', 'end clamped');
  t.equal(await text(await s.get('a/b/c.txt', { start: 1, end: 4 })), 'ell');
  t.equal(await text(await s.get('a/b/c.txt', { start: 3, end: 3 })), '', 'empty range');
  t.equal(await text(await s.get('a/b/c.txt')), 'hello world');
  t.equal((await s.head('a/b/c.txt'))?.size, 11);
  t.equal(await s.head('a/b/none'), undefined);
  t.equal(await s.head('a/b'), undefined, 'a folder is not an object');
  await t.rejects(s.getBuffer('a/b/c.txt', { start: 5, end: 2 }), { code: 'CP_BAD_REQUEST' });
  await s.getBuffer('nope').then(() => t.fail('resolved'), (e: unknown) => t.ok(isObjectNotFound(e), 'getBuffer: not found'));
  await s.get('nope').then(() => t.fail('resolved'), (e: unknown) => t.ok(isObjectNotFound(e), 'get: not found'));
});

t.test('a streamed put is not buffered whole and replaces atomically', async (t) => {
  const dir = tmp(t);
  const s = new LocalObjectStore(dir);
  await s.put('k', Buffer.alloc(1024 * 1024, 1));
  const chunk = Buffer.alloc(64 * 1024, 2);
  let sent = 0;
  let release!: () => void;
  const gate = new Promise<void>((r) => (release = r));
  const body = Readable.from((async function* () {
    for (let i = 0; i < 32; i++) {
      if (i === 8) await gate; // half-way: readers must still see the old object
      sent++;
      yield chunk;
    }
  })());
  const put = s.put('k', body);
  while (sent < 8) await new Promise((r) => setTimeout(r, 5));
  for (let i = 0; i < 5; i++) {
    const b = await s.getBuffer('k');
    t.equal(b.length, 1024 * 1024, 'old size while the put runs');
    t.ok(b.every((x) => x === 1), 'old bytes');
  }
  t.same((await s.list('')).map((o) => o.key), ['k'], 'the temporary file is not listed');
  release();
  t.same(await put, { size: 32 * 64 * 1024 });
  const b = await s.getBuffer('k');
  t.equal(b.length, 32 * 64 * 1024);
  t.ok(b.every((x) => x === 2), 'new bytes');
  t.same(readdirSync(dir), ['k'], 'no temporary file left behind');
});

t.test('a failing body leaves the old object and no temporary file', async (t) => {
  const dir = tmp(t);
  const s = new LocalObjectStore(dir);
  await s.put('x/y', Buffer.from('old'));
  const body = Readable.from((async function* () {
    yield Buffer.from('new-part');
    throw new Error('client went away');
  })());
  await t.rejects(s.put('x/y', body), /client went away/);
  t.equal((await s.getBuffer('x/y')).toString(), 'old');
  t.same(readdirSync(join(dir, 'x')), ['y']);
});

t.test('list by prefix (recursive, sorted), delete, deletePrefix', async (t) => {
  const s = new LocalObjectStore(tmp(t));
  for (const k of ['t/a/1', 't/a/2', 't/ab/3', 't/b/c/4', 'u/5']) await s.put(k, Buffer.from(k));
  t.same((await s.list('t/')).map((o) => o.key), ['t/a/1', 't/a/2', 't/ab/3', 't/b/c/4']);
  t.same((await s.list('t/a/')).map((o) => o.key), ['t/a/1', 't/a/2']);
  t.same((await s.list('t/a')).map((o) => o.key), ['t/a/1', 't/a/2', 't/ab/3'], 'a prefix may end mid-segment');
  t.same((await s.list('nothing/')).map((o) => o.key), []);
  t.same((await s.list('')).length, 5);
  await s.delete('t/a/1');
  await s.delete('t/a/1'); // absent: no error
  t.same((await s.list('t/a/')).map((o) => o.key), ['t/a/2']);
  await s.deletePrefix('t/');
  t.same((await s.list('')).map((o) => o.key), ['u/5']);
  await s.deletePrefix('u/5');
  t.same(await s.list(''), []);
  await t.rejects(s.deletePrefix(''), { code: 'CP_BAD_REQUEST' });
});

t.test('bad keys are refused with CP_BAD_REQUEST', async (t) => {
  const s = new LocalObjectStore(tmp(t));
  for (const k of ['', '/abs', 'a/../b', '..', 'a/./b', 'a//b', 'a/b/', 'sp ace', 'a\0b', 'ü', 'a/b~c', 'x'.repeat(2000)]) {
    await rejectsCode(t, s.put(k, Buffer.from('x')), 'CP_BAD_REQUEST', JSON.stringify(k.slice(0, 20)));
  }
  await t.rejects(s.list('../'), { code: 'CP_BAD_REQUEST' });
  t.doesNotThrow(() => validateKey('tenants/a/timelines/b/wal/000000010000000000000001'));
  t.doesNotThrow(() => validateKey('tenants/', { prefix: true }));
});

t.test('createObjectStore: path, file URL, s3 not supported yet', async (t) => {
  const dir = tmp(t);
  t.equal(createObjectStore(dir).kind, 'local');
  const viaUrl = createObjectStore(pathToFileURL(dir).href) as LocalObjectStore;
  t.equal(viaUrl.root, dir);
  t.throws(() => createObjectStore('s3://bucket/prefix'), new ConfigError('XENON_PAGESERVER_STORAGE=s3://bucket/prefix: S3 object storage is not supported yet; use a local directory (a path or file:///…)'));
  t.throws(() => createObjectStore('gs://bucket'), ConfigError);
});
