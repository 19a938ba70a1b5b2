// docs/errors.md and the error catalogue in lib/errors.ts must list the same codes with the same
// SQLSTATE, HTTP status, kind and retryability; every code the source throws must be catalogued.
import t from 'tap';
import { readFileSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { ERROR_CATALOGUE, XenonError, asXenonError, isErrorCode } from '../../lib/errors.ts';

const ROOT = join(import.meta.dirname, '..', '..');

function docRows(): Map<string, string[]> {
  const rows = new Map<string, string[]>();
  for (const line of readFileSync(join(ROOT, 'docs', 'errors.md'), 'utf8').split('\n')) {
    const m = /^\| `([A-Z_]+)` \|(.*)\|$/.exec(line);
    if (m) rows.set(m[1]!, m[2]!.split(' | ').map((c) => c.trim()));
  }
  return rows;
}

t.test('docs/errors.md lists exactly the catalogue', async (t) => {
  const rows = docRows();
  t.same([...rows.keys()].sort(), Object.keys(ERROR_CATALOGUE).sort(), 'same codes');
  for (const [code, def] of Object.entries(ERROR_CATALOGUE)) {
    const row = rows.get(code);
    if (!row) continue;
    t.same(row.slice(0, 4), [def.sqlstate, String(def.httpStatus), def.kind, def.retryable ? 'yes' : 'no'], `${code} columns`);
    t.ok(row[5] && row[5] !== 'TODO', `${code} says when it happens`);
  }
});

t.test('every SQLSTATE is a real 5-character class code', async (t) => {
  for (const [code, def] of Object.entries(ERROR_CATALOGUE)) t.match(def.sqlstate, /^[0-9A-Z]{5}$/, code);
});

t.test('every XenonError code used in the source is catalogued', async (t) => {
  const used = new Set<string>();
  const walk = (dir: string): void => {
    for (const name of readdirSync(dir)) {
      if (name === 'node_modules' || name.startsWith('.')) continue;
      const p = join(dir, name);
      if (statSync(p).isDirectory()) walk(p);
      else if (p.endsWith('.ts')) {
        for (const m of readFileSync(p, 'utf8').matchAll(/new XenonError\(\s*'([A-Z_]+)'/g)) used.add(m[1]!);
      }
    }
  };
  for (const dir of ['lib', 'proxy', 'wake-compute', 'vm', 'certs', 'pageserver', 'safekeeper']) {
    try { walk(join(ROOT, dir)); } catch { /* folder not there yet */ }
  }
  t.ok(used.size > 10, `found ${used.size} codes in use`);
  for (const code of used) t.ok(isErrorCode(code), `${code} is in the catalogue`);
});

t.test('XenonError carries the catalogue fields; unknown errors become INTERNAL with generic text', async (t) => {
  const e = new XenonError('AUTH_FAILED', 'detail for logs', { userMessage: 'password authentication failed for user "x"' });
  t.equal(e.sqlstate, '28P01');
  t.equal(e.httpStatus, 401);
  t.equal(e.message, 'detail for logs');
  t.same(e.toJSON(), { error: { code: 'AUTH_FAILED', message: 'password authentication failed for user "x"', retryable: false } });
  const internal = asXenonError(new Error('secret stack detail'));
  t.equal(internal.code, 'INTERNAL');
  t.equal(internal.sqlstate, 'XX000');
  t.equal(internal.userMessage, 'internal error', 'no internal detail for clients');
});
