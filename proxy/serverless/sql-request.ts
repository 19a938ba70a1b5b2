/**
 * SQL over HTTP, the request side: the `Neon-Connection-String` header (parsed leniently, as the
 * `@neondatabase/serverless` driver writes it), the `Neon-*` option headers, the bounded body
 * read, the JSON body (`{query, params}` or `{queries: [...]}`) and parameter values as text.
 */
import type { IncomingMessage } from 'node:http';
import { XenonError } from '../../lib/errors.ts';

/** An answer that is not in the error catalogue: an HTTP status with a SQLSTATE and a message. */
export class SqlHttpError extends Error {
  constructor(
    readonly status: number,
    readonly sqlstate: string,
    message: string,
  ) {
    super(message);
    this.name = 'SqlHttpError';
  }
}

const badRequest = (msg: string): XenonError => new XenonError('PROXY_PROTOCOL_VIOLATION', msg, { userMessage: msg });
const badValue = (msg: string): SqlHttpError => new SqlHttpError(400, '22023', msg);

export interface ConnectionTarget {
  endpoint: string;
  user: string;
  database: string;
  /**
   * Password candidates, best guess first: the driver percent-encodes the password but leaves a
   * raw `%` alone, so the decoded text and (when it differs) the text as sent are both tried.
   */
  passwords: string[];
}

const LABEL = /^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$/;

/**
 * Percent-decoding that never throws: valid `%XX` runs become bytes (UTF-8 decoded), a `%` that
 * does not start one stays as it is.
 */
export function lenientDecode(s: string): string {
  if (!s.includes('%')) return s;
  try {
    return decodeURIComponent(s);
  } catch {
    // e.g. `p%40ss%%20` (a raw % the driver did not escape): decode what can be decoded.
  }
  const bytes: number[] = [];
  for (let i = 0; i < s.length; i++) {
    const ch = s[i]!;
    if (ch === '%' && /^[0-9a-fA-F]{2}$/.test(s.slice(i + 1, i + 3))) {
      bytes.push(parseInt(s.slice(i + 1, i + 3), 16));
      i += 2;
    } else {
      const cp = s.codePointAt(i)!;
      if (cp > 0xffff) i++;
      bytes.push(...Buffer.from(String.fromCodePoint(cp), 'utf8'));
    }
  }
  return Buffer.from(bytes).toString('utf8');
}

/**
 * `postgres[ql]://user[:password]@<endpoint>.<domain>[:port]/database[?…]`. The endpoint is the
 * first label of the host (a `-pooler` suffix is dropped: SQL over HTTP always pools).
 */
export function parseConnectionString(raw: string | string[] | undefined): ConnectionTarget {
  if (raw === undefined || raw === '') throw badRequest('missing Neon-Connection-String header: send postgresql://user:password@<endpoint>.<domain>/<database>');
  if (Array.isArray(raw)) throw badRequest('more than one Neon-Connection-String header');
  const invalid = (why: string): XenonError =>
    badRequest(`invalid Neon-Connection-String header: ${why} (expected postgresql://user:password@<endpoint>.<domain>/<database>)`);
  const m = /^postgres(?:ql)?:\/\/(.*)$/is.exec(raw.trim());
  if (!m) throw invalid('the scheme must be postgresql://');
  const rest = m[1]!;
  // The driver's URL serialisation escapes / ? # @ in the user info, so the authority ends at the
  // first of them after the last @ before the path.
  const pathAt = rest.search(/[/?#]/);
  const authority = pathAt < 0 ? rest : rest.slice(0, pathAt);
  const tail = pathAt < 0 ? '' : rest.slice(pathAt);
  const at = authority.lastIndexOf('@');
  if (at < 0) throw invalid('no user');
  const userInfo = authority.slice(0, at);
  const hostPort = authority.slice(at + 1);
  const colon = userInfo.indexOf(':');
  const user = lenientDecode(colon < 0 ? userInfo : userInfo.slice(0, colon));
  const rawPassword = colon < 0 ? '' : userInfo.slice(colon + 1);
  if (!user) throw invalid('no user');
  const host = hostPort.startsWith('[') ? hostPort.slice(0, hostPort.indexOf(']') + 1) : hostPort.replace(/:\d*$/, '');
  if (!host) throw invalid('no host');
  let label = host.toLowerCase().split('.')[0]!;
  if (label.endsWith('-pooler') && label.length > '-pooler'.length) label = label.slice(0, -'-pooler'.length);
  if (!LABEL.test(label)) throw invalid('the host must be <endpoint>.<domain>');
  const pathMatch = /^\/([^?#]*)/.exec(tail);
  const database = lenientDecode(pathMatch?.[1] ?? '');
  if (!database) throw invalid('no database');
  // A NUL would end the name inside the StartupMessage and smuggle in parameters of the
  // client's choosing (even replication=database): no control characters in names.
  if (/[\x00-\x1f\x7f]/.test(user) || /[\x00-\x1f\x7f]/.test(database)) throw invalid('the user and database names may not contain control characters');
  const decoded = lenientDecode(rawPassword);
  return { endpoint: label, user, database, passwords: decoded === rawPassword ? [decoded] : [decoded, rawPassword] };
}

export interface SqlOptions {
  rawText: boolean;
  arrayMode: boolean;
  /** For batches: `BEGIN ISOLATION LEVEL … READ ONLY …` (just `BEGIN` without headers). */
  begin: string;
}

const ISOLATION: Record<string, string> = {
  readuncommitted: 'READ UNCOMMITTED',
  readcommitted: 'READ COMMITTED',
  repeatableread: 'REPEATABLE READ',
  serializable: 'SERIALIZABLE',
};

function header(req: IncomingMessage, name: string): string | undefined {
  const v = req.headers[name];
  return Array.isArray(v) ? v[0] : v;
}

function boolHeader(req: IncomingMessage, name: string, display: string): boolean | undefined {
  const v = header(req, name)?.trim().toLowerCase();
  if (v === undefined || v === '') return undefined;
  if (v === 'true') return true;
  if (v === 'false') return false;
  throw badValue(`invalid ${display} header: ${JSON.stringify(v.slice(0, 40))} (expected true or false)`);
}

export function parseOptions(req: IncomingMessage): SqlOptions {
  const rawText = boolHeader(req, 'neon-raw-text-output', 'Neon-Raw-Text-Output') ?? false;
  const arrayMode = boolHeader(req, 'neon-array-mode', 'Neon-Array-Mode') ?? false;
  const parts = ['BEGIN'];
  const iso = header(req, 'neon-batch-isolation-level')?.trim();
  if (iso) {
    const level = ISOLATION[iso.toLowerCase().replace(/[\s_-]/g, '')];
    if (!level) throw badValue(`invalid Neon-Batch-Isolation-Level header: ${JSON.stringify(iso.slice(0, 40))} (expected ReadUncommitted, ReadCommitted, RepeatableRead or Serializable)`);
    parts.push('ISOLATION LEVEL', level);
  }
  const readOnly = boolHeader(req, 'neon-batch-read-only', 'Neon-Batch-Read-Only');
  if (readOnly !== undefined) parts.push(readOnly ? 'READ ONLY' : 'READ WRITE');
  const deferrable = boolHeader(req, 'neon-batch-deferrable', 'Neon-Batch-Deferrable');
  if (deferrable !== undefined) parts.push(deferrable ? 'DEFERRABLE' : 'NOT DEFERRABLE');
  return { rawText, arrayMode, begin: parts.join(' ') };
}

/** Reads the body, refusing (413) as soon as it grows past `max` without reading the rest. */
export function readBody(req: IncomingMessage, max: number): Promise<Buffer> {
  const tooLarge = (): SqlHttpError => new SqlHttpError(413, '54000', `request body too large: the limit is ${max} bytes`);
  const declared = Number(header(req, 'content-length'));
  if (Number.isFinite(declared) && declared > max) return Promise.reject(tooLarge());
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const done = (err?: Error): void => {
      req.off('data', onData);
      req.off('end', onEnd);
      req.off('error', onError);
      req.off('close', onClose);
      if (err) reject(err);
      else resolve(Buffer.concat(chunks, size));
    };
    const onData = (chunk: Buffer): void => {
      size += chunk.length;
      if (size > max) {
        req.pause();
        chunks.length = 0;
        done(tooLarge());
        return;
      }
      chunks.push(chunk);
    };
    const onEnd = (): void => done();
    const onError = (err: Error): void => done(err);
    const onClose = (): void => { if (!req.complete) done(new Error('the client closed the connection while sending the body')); };
    req.on('data', onData);
    req.on('end', onEnd);
    req.on('error', onError);
    req.on('close', onClose);
  });
}

export interface SqlQuery {
  text: string;
  params: (string | null)[];
  /** Per-query override of the Neon-Array-Mode header (Neon's server accepts it; the driver does not send it). */
  arrayMode?: boolean;
}

/** Queries in one `{queries: [...]}` transaction. */
export const MAX_BATCH_QUERIES = 1000;

export type SqlPayload = { kind: 'single'; query: SqlQuery } | { kind: 'batch'; queries: SqlQuery[] };

/** A Postgres array literal: every element quoted (backslash and double quote escaped), NULL for null. */
export function arrayLiteral(values: readonly unknown[]): string {
  return '{' + values.map(arrayElement).join(',') + '}';
}

function arrayElement(v: unknown): string {
  if (v === null || v === undefined) return 'NULL';
  if (Array.isArray(v)) return arrayLiteral(v);
  const s = typeof v === 'string' ? v : typeof v === 'object' ? JSON.stringify(v) : String(v);
  return '"' + s.replace(/\\/g, '\\\\').replace(/"/g, '\\"') + '"';
}

/** One parameter as Postgres text input (null → NULL). The driver sends strings; raw JSON values work too. */
export function paramText(v: unknown): string | null {
  if (v === null || v === undefined) return null;
  if (typeof v === 'string') return v;
  if (Array.isArray(v)) return arrayLiteral(v);
  if (typeof v === 'object') return JSON.stringify(v);
  return String(v);
}

function parseQuery(q: unknown, where: string): SqlQuery {
  if (typeof q !== 'object' || q === null || Array.isArray(q)) throw badRequest(`${where} must be an object {"query": "...", "params": [...]}`);
  const o = q as Record<string, unknown>;
  if (typeof o.query !== 'string') throw badRequest(`${where}: "query" must be a string`);
  if (o.params !== undefined && o.params !== null && !Array.isArray(o.params)) throw badRequest(`${where}: "params" must be an array`);
  if (o.arrayMode !== undefined && typeof o.arrayMode !== 'boolean') throw badRequest(`${where}: "arrayMode" must be a boolean`);
  const params = ((o.params as unknown[] | undefined) ?? []).map(paramText);
  return { text: o.query, params, arrayMode: o.arrayMode as boolean | undefined };
}

export function parsePayload(body: Buffer): SqlPayload {
  let json: unknown;
  try {
    json = JSON.parse(body.toString('utf8'));
  } catch (err) {
    throw badRequest(`the request body is not valid JSON (${(err as Error).message}); send {"query": "...", "params": [...]} or {"queries": [...]}`);
  }
  if (typeof json !== 'object' || json === null || Array.isArray(json)) {
    throw badRequest('the request body must be a JSON object: {"query": "...", "params": [...]} or {"queries": [...]}');
  }
  const o = json as Record<string, unknown>;
  if (o.queries !== undefined) {
    if (!Array.isArray(o.queries)) throw badRequest('"queries" must be an array of {"query": "...", "params": [...]}');
    if (o.queries.length > MAX_BATCH_QUERIES) throw new SqlHttpError(400, '54000', `a transaction may hold at most ${MAX_BATCH_QUERIES} queries, got ${o.queries.length}`);
    return { kind: 'batch', queries: o.queries.map((q, i) => parseQuery(q, `queries[${i}]`)) };
  }
  return { kind: 'single', query: parseQuery(o, 'the request body') };
}
