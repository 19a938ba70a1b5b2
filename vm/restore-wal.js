#!/usr/bin/env node
/**
 * Postgres' `restore_command` for a compute in archive recovery (pageserver/api.ts `StartPlan`,
 * mode `archive`): fetches one WAL or history file from the pageserver's WAL resolver.
 *
 *   node restore-wal.js <restore_url> <file> <dest> <upto>
 *
 * GETs `<restore_url><file>?upto=<upto>`:
 * - 200: the body goes to `<dest>.tmp`, is fsynced and renamed to `<dest>`; exit 0.
 * - 404 with code `PS_WAL_NOT_FOUND`: exit 1 — for Postgres "not in the archive", the normal end
 *   of WAL (or a history file that does not exist). Any other 404 is fatal, as below.
 * - anything else (a 500 `PS_WAL_MISSING`, connection refused, a 60 s timeout, a short body):
 *   the reason on stderr (Postgres' log) and exit 200. An exit status above 125 makes Postgres
 *   abort recovery with FATAL instead of ending it early and promoting a database that lacks
 *   WAL it should have had.
 *
 * Plain JavaScript with `node:` imports only: it is copied next to the data directory and run by
 * the compute's OS user, outside this checkout.
 */
import { open, rename, rm } from 'node:fs/promises';

const FATAL = 200;
const TIMEOUT_MS = 60_000;
const SEGMENT_SIZE = 16 * 1024 * 1024;
const SEGMENT_NAME = /^[0-9A-F]{24}$/;

function fail(reason) {
  process.stderr.write(`xenon restore-wal: ${reason}\n`);
  process.exit(FATAL);
}

async function main() {
  const [restoreUrl, file, dest, upto] = process.argv.slice(2);
  if (!restoreUrl || !file || !dest || !upto) fail('usage: restore-wal.js <restore_url> <file> <dest> <upto>');
  const url = `${restoreUrl}${encodeURIComponent(file)}?upto=${encodeURIComponent(upto)}`;
  let res;
  let body;
  try {
    res = await fetch(url, { signal: AbortSignal.timeout(TIMEOUT_MS) });
    if (res.status === 404) {
      // Only the resolver's own "no such file" ends recovery normally; a 404 for an unknown
      // timeline or route means something is misconfigured: stop rather than promote early.
      const text = await res.text().catch(() => '');
      if (/"PS_WAL_NOT_FOUND"/.test(text)) process.exit(1);
      fail(`GET ${url}: HTTP 404 ${text.slice(0, 500)}`);
    }
    body = Buffer.from(await res.arrayBuffer());
  } catch (err) {
    const cause = err && err.cause ? `: ${err.cause.code ?? err.cause.message ?? err.cause}` : '';
    fail(`GET ${url} failed: ${err && err.name === 'TimeoutError' ? `no answer in ${TIMEOUT_MS / 1000} s` : `${err && err.message}${cause}`}`);
  }
  if (res.status !== 200) {
    fail(`GET ${url}: HTTP ${res.status} ${body.toString('utf8').slice(0, 500)}`);
  }
  const length = res.headers.get('content-length');
  if (length !== null && Number(length) !== body.length) fail(`GET ${url}: short body (${body.length} of ${length} bytes)`);
  if (SEGMENT_NAME.test(file) && body.length !== SEGMENT_SIZE) fail(`GET ${url}: a WAL segment of ${body.length} bytes, expected ${SEGMENT_SIZE}`);
  const tmp = `${dest}.tmp`;
  try {
    const fh = await open(tmp, 'w', 0o600);
    try {
      await fh.writeFile(body);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, dest);
  } catch (err) {
    await rm(tmp, { force: true }).catch(() => {});
    fail(`writing ${dest}: ${err && err.message}`);
  }
  process.exit(0);
}

main().catch((err) => fail(`unexpected: ${err && err.stack ? err.stack : err}`));
