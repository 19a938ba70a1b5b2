/**
 * SQL over HTTP, running queries: one statement per query (extended protocol, text parameters
 * of unspecified type), rows counted against the response budget as they arrive, results in
 * the shape the `@neondatabase/serverless` driver reads.
 */
import pg from 'pg';
import type { SqlQuery } from './sql-request.ts';
import { SqlHttpError } from './sql-request.ts';

export interface SqlField {
  name: string;
  dataTypeID: number;
  tableID: number;
  columnID: number;
  dataTypeSize: number;
  dataTypeModifier: number;
  format: string;
}

export interface SqlResult {
  fields: SqlField[];
  rows: unknown[];
  command: string;
  rowCount: number | null;
  rowAsArray: boolean;
}

/** Bytes of JSON the results may take; shared by every query of a request. */
export class ResponseBudget {
  used = 0;
  constructor(readonly max: number) {}

  get exceeded(): boolean {
    return this.used > this.max;
  }

  error(): SqlHttpError {
    return new SqlHttpError(507, '54000', `response too large: the results exceed the limit of ${this.max} bytes; select fewer rows or columns, or use LIMIT`);
  }
}

const OID = { bool: 16, int2: 21, int4: 23, oid: 26, float4: 700, float8: 701, json: 114, jsonb: 3802 } as const;
const NUMERIC_OIDS: ReadonlySet<number> = new Set([OID.int2, OID.int4, OID.oid, OID.float4, OID.float8]);

/** Without raw text output: JSON-native values where that is lossless, Postgres text otherwise. */
function jsonValue(oid: number, text: string): unknown {
  if (oid === OID.bool) return text === 't';
  if (NUMERIC_OIDS.has(oid)) {
    const n = Number(text);
    return Number.isFinite(n) ? n : text;
  }
  if (oid === OID.json || oid === OID.jsonb) {
    try {
      return JSON.parse(text);
    } catch {
      return text;
    }
  }
  return text;
}

export interface RunOptions {
  rawText: boolean;
  arrayMode: boolean;
  budget: ResponseBudget;
  signal: AbortSignal;
  /** Called once when the budget is exceeded or the client went away, while the query runs. */
  onAbandon: () => void;
}

interface PgResult {
  command: string | null;
  rowCount: number | null;
  fields: SqlField[];
}

/** Runs one query; rejects with the pg error, the budget's 507, or the abort reason. */
export function runQuery(client: pg.Client, q: SqlQuery, o: RunOptions): Promise<SqlResult> {
  return new Promise((resolve, reject) => {
    if (o.signal.aborted) return reject(o.signal.reason);
    const query = new pg.Query({ text: q.text, values: q.params, rowMode: 'array', queryMode: 'extended' } as pg.QueryConfig & { rowMode: 'array'; queryMode: 'extended' });
    const rows: unknown[] = [];
    const arrayMode = q.arrayMode ?? o.arrayMode;
    let settled = false;
    let names: string[] | undefined;
    let oids: number[] | undefined;
    const finish = (err: unknown, value?: SqlResult): void => {
      if (settled) return;
      settled = true;
      o.signal.removeEventListener('abort', onAbort);
      if (err !== undefined) reject(err);
      else resolve(value!);
    };
    const abandon = (err: unknown): void => {
      if (settled) return;
      rows.length = 0;
      o.onAbandon();
      finish(err);
    };
    const onAbort = (): void => abandon(o.signal.reason);
    o.signal.addEventListener('abort', onAbort, { once: true });
    query.on('row', (row: (string | null)[], result?: unknown) => {
      if (settled) return;
      if (!names) {
        const fields = (result as PgResult).fields;
        names = fields.map((f) => f.name);
        oids = fields.map((f) => f.dataTypeID);
      }
      // Roughly the JSON (and memory) the row will take: quotes, commas, keys in object mode; at
      // least 32 bytes, so rows of no columns count too.
      let size = 32;
      for (let i = 0; i < row.length; i++) {
        const v = row[i];
        size += v === null || v === undefined ? 5 : v.length + 3;
        if (!arrayMode) size += names[i]!.length + 3;
      }
      o.budget.used += size;
      if (o.budget.exceeded) return abandon(o.budget.error());
      const values = o.rawText ? row : row.map((v, i) => (v === null ? null : jsonValue(oids![i]!, v)));
      if (arrayMode) {
        rows.push(values);
      } else {
        // Later columns with the same name win, as in pg.
        const obj: Record<string, unknown> = Object.create(null) as Record<string, unknown>;
        for (let i = 0; i < values.length; i++) obj[names[i]!] = values[i];
        rows.push(obj);
      }
    });
    query.on('error', (err: Error) => finish(err));
    query.on('end', (res: unknown) => {
      const r = (Array.isArray(res) ? res[res.length - 1] : res) as PgResult;
      // The result's own weight: its field descriptions and wrapper, rows or not.
      o.budget.used += 80 + r.fields.reduce((n, f) => n + 120 + f.name.length, 0);
      if (o.budget.exceeded) return abandon(o.budget.error());
      finish(undefined, {
        fields: r.fields.map((f) => ({
          name: f.name,
          dataTypeID: f.dataTypeID,
          tableID: f.tableID,
          columnID: f.columnID,
          dataTypeSize: f.dataTypeSize,
          dataTypeModifier: f.dataTypeModifier,
          format: f.format,
        })),
        rows,
        command: r.command ?? '',
        rowCount: r.rowCount ?? null,
        rowAsArray: arrayMode,
      });
    });
    client.query(query);
  });
}

/** A statement of the proxy's own (BEGIN, COMMIT, ROLLBACK). */
export async function runControl(client: pg.Client, text: string, signal: AbortSignal): Promise<void> {
  if (signal.aborted) throw signal.reason;
  await client.query(text);
}
