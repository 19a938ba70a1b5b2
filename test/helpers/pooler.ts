/**
 * Test harness for the transaction pooler: a control-plane double that points every wake at one
 * real Postgres, a raw TLS wire session (startup + SCRAM through pg's implementation, then bytes
 * as the test writes them), and frontend message builders / backend message readers.
 */
import { connect as tlsConnect, createSecureContext, type TLSSocket } from 'node:tls';
import pg from 'pg';
import { createLogger } from '../../lib/logger.ts';
import { loadProxyConfig, startProxy } from '../../proxy/index.ts';
import type { Pool } from '../../proxy/pooler/pool.ts';
import type { ComputeInfo, ControlPlaneApi, EndpointAccess } from '../../wake-compute/api.ts';
import { pgSasl } from './pg-sasl.ts';
import { startTestPostgres, type TestPostgres } from './postgres.ts';

/**
 * A real Postgres with role `app` (password `app-password`) owning database `app`: the role's
 * SCRAM secret (what the control plane would hand the proxy) and a superuser client, closed at
 * teardown.
 */
export async function startAppPostgres(t: { teardown(fn: () => unknown): void }, prefix: string): Promise<{ db: TestPostgres; admin: pg.Client; secret: string }> {
  const db = await startTestPostgres(t, prefix, { max_connections: 60 });
  const admin = new pg.Client(db.admin());
  await admin.connect();
  t.teardown(() => admin.end());
  await admin.query(`CREATE ROLE app LOGIN PASSWORD 'app-password'`);
  await admin.query(`CREATE DATABASE app OWNER app`);
  const { rows } = await admin.query<{ s: string }>(`SELECT rolpassword AS s FROM pg_authid WHERE rolname = 'app'`);
  return { db, admin, secret: rows[0]!.s };
}

/** Every endpoint of `access` wakes to the Postgres on 127.0.0.1:`port`. */
export class PoolerControlPlane implements ControlPlaneApi {
  wakes = 0;
  constructor(
    public access: EndpointAccess,
    public port: number,
  ) {}
  async getEndpointAccess(endpoint: string): Promise<EndpointAccess | null> {
    return endpoint === this.access.endpoint_id ? this.access : null;
  }
  async wakeCompute(): Promise<ComputeInfo> {
    this.wakes++;
    return { endpoint_id: this.access.endpoint_id, host: '127.0.0.1', port: this.port, cold: false, cache_ttl_ms: 60_000 };
  }
  async reportConnections() {
    return { ok: true as const, invalidate: [], invalidate_access: [] };
  }
}

export interface Msg {
  type: string;
  body: Buffer;
}

export interface RawSession {
  socket: TLSSocket;
  /** Messages received and not yet taken by `until`. */
  msgs: Msg[];
  /** The proxy-owned cancel key from BackendKeyData. */
  key: { pid: number; secret: number };
  send(...m: Buffer[]): void;
  /** Waits for the `n`th message of `type` and returns (and removes) everything up to it. */
  until(type: string, n?: number, ms?: number): Promise<Msg[]>;
  untilClosed(): Promise<Msg[]>;
  readonly closed: boolean;
}

/**
 * A direct-TLS session (ALPN `postgresql`, so no SSLRequest) as `user`/`password` to `database`,
 * authenticated with SCRAM-SHA-256; resolves after the first ReadyForQuery.
 */
export async function rawPoolerSession(o: { port: number; ca: string; servername: string; user?: string; password?: string; database?: string }): Promise<RawSession> {
  const socket = await new Promise<TLSSocket>((resolve, reject) => {
    const s = tlsConnect({ host: '127.0.0.1', port: o.port, ca: o.ca, servername: o.servername, ALPNProtocols: ['postgresql'] });
    s.once('secureConnect', () => resolve(s));
    s.once('error', reject);
  });
  socket.on('error', () => {});
  let buf = Buffer.alloc(0);
  const msgs: Msg[] = [];
  let closed = false;
  let wake: (() => void) | undefined;
  socket.on('data', (d: Buffer) => {
    buf = Buffer.concat([buf, d]);
    while (buf.length >= 5 && buf.length >= 1 + buf.readInt32BE(1)) {
      const len = buf.readInt32BE(1);
      msgs.push({ type: String.fromCharCode(buf[0]!), body: buf.subarray(5, 1 + len) });
      buf = buf.subarray(1 + len);
    }
    wake?.();
  });
  socket.on('close', () => { closed = true; wake?.(); });
  const wait = async (done: () => boolean, ms = 10_000): Promise<void> => {
    const until = Date.now() + ms;
    while (!done()) {
      if (Date.now() > until) throw new Error(`timed out; got ${msgs.map((m) => m.type).join('')}`);
      await new Promise<void>((r) => { wake = r; setTimeout(r, 100); });
    }
  };
  const params = Buffer.from(`user\0${o.user ?? 'app'}\0database\0${o.database ?? 'app'}\0\0`);
  const head = Buffer.alloc(8);
  head.writeInt32BE(8 + params.length, 0);
  head.writeInt32BE(196608, 4);
  socket.write(Buffer.concat([head, params]));
  await wait(() => msgs.length > 0);
  const sasl = msgs.shift()!;
  if (sasl.type !== 'R') throw new Error(`expected R, got ${sasl.type}`);
  const session = pgSasl.startSession(['SCRAM-SHA-256']);
  const resp = Buffer.from(session.response);
  socket.write(msg(0x70, cstr('SCRAM-SHA-256'), i32(resp.length), resp));
  await wait(() => msgs.length > 0);
  const cont = msgs.shift()!;
  await pgSasl.continueSession(session, o.password ?? 'app-password', cont.body.subarray(4).toString());
  socket.write(msg(0x70, Buffer.from(session.response)));
  await wait(() => msgs.some((m) => m.type === 'Z'));
  const bk = msgs.find((m) => m.type === 'K')!;
  msgs.length = 0;
  return {
    socket,
    msgs,
    key: { pid: bk.body.readInt32BE(0), secret: bk.body.readInt32BE(4) },
    send: (...m: Buffer[]) => socket.write(Buffer.concat(m)),
    async until(type: string, n = 1, ms = 10_000) {
      await wait(() => msgs.filter((m) => m.type === type).length >= n, ms);
      let seen = 0;
      const idx = msgs.findIndex((m) => m.type === type && ++seen === n);
      return msgs.splice(0, idx + 1);
    },
    async untilClosed() {
      await wait(() => closed);
      return msgs.splice(0);
    },
    get closed() {
      return closed;
    },
  };
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Polls `cond` every 10 ms; false when it did not hold within `ms`. */
export async function until(cond: () => boolean, ms = 10_000): Promise<boolean> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) return false;
    await sleep(10);
  }
  return true;
}

export type PoolerHarness = Awaited<ReturnType<typeof startPoolerProxy>>;

/**
 * A real proxy whose endpoint `endpoint` (and `<endpoint>-pooler`) wakes to `o.db`, with a pool of
 * `poolSize` server connections; closed (with every client opened through it) when `t` ends.
 */
export async function startPoolerProxy(
  t: { teardown(fn: () => unknown): void },
  o: { db: TestPostgres; secret: string; ca: string; cert: { certPem: string; keyPem: string }; endpoint: string },
  env: Record<string, string> = {},
  poolSize = 1,
) {
  const cp = new PoolerControlPlane({ endpoint_id: o.endpoint, project_id: 'p', branch_id: 'b', role_secret: o.secret, allowed_ips: [], connection_rate_limit: null, pool_size: poolSize }, o.db.port);
  const config = loadProxyConfig({
    XENON_PROXY_PORT: '0',
    XENON_PROXY_METRICS_PORT: '0',
    XENON_PROXY_HTTP_PORT: '0',
    XENON_PROXY_REPORT_INTERVAL_MS: '60000',
    XENON_POOLER_QUERY_WAIT_TIMEOUT_MS: '5000',
    XENON_POOLER_ORPHAN_DRAIN_MS: '1000',
    XENON_PROXY_CONNECT_RATE_BURST: '5000',
    ...env,
  }, []);
  const proxy = await startProxy(config, {
    logger: createLogger({ level: 'error', service: 'pooler-test', stream: { write: () => {} } }),
    controlPlane: cp,
    secureContext: () => createSecureContext({ cert: o.cert.certPem, key: o.cert.keyPem }),
  });
  const opened: { end: () => void }[] = [];
  t.teardown(async () => {
    for (const x of opened) x.end();
    await proxy.close();
  });
  const servername = `${o.endpoint}-pooler.localtest.me`;
  const cfg = (x: Partial<pg.ClientConfig> = {}): pg.ClientConfig => ({
    host: '127.0.0.1',
    port: proxy.address.port,
    user: 'app',
    password: 'app-password',
    database: 'app',
    ssl: { ca: o.ca, servername },
    ...x,
  });
  const client = async (x: Partial<pg.ClientConfig> = {}): Promise<pg.Client> => {
    const c = new pg.Client(cfg(x));
    c.on('error', () => {});
    await c.connect();
    opened.push({ end: () => void c.end().catch(() => {}) });
    return c;
  };
  const raw = async (): Promise<RawSession> => {
    const s = await rawPoolerSession({ port: proxy.address.port, ca: o.ca, servername });
    opened.push({ end: () => s.socket.destroy() });
    return s;
  };
  const pool = (): Pool => [...(proxy.pooler as unknown as { pools: Map<string, Pool> }).pools.values()][0]!;
  const stats = () => proxy.pooler.stats().pools[0]!;
  return { proxy, cp, cfg, client, raw, pool, stats };
}

// ---- frontend messages
export function msg(type: number, ...parts: Buffer[]): Buffer {
  const body = Buffer.concat(parts);
  const h = Buffer.alloc(5);
  h[0] = type;
  h.writeInt32BE(body.length + 4, 1);
  return Buffer.concat([h, body]);
}
export const cstr = (s: string): Buffer => Buffer.from(s + '\0');
export const i16 = (n: number): Buffer => { const b = Buffer.alloc(2); b.writeInt16BE(n); return b; };
export const i32 = (n: number): Buffer => { const b = Buffer.alloc(4); b.writeInt32BE(n); return b; };
export const query = (sql: string): Buffer => msg(0x51, cstr(sql));
export const parse = (name: string, sql: string): Buffer => msg(0x50, cstr(name), cstr(sql), i16(0));
export const bind = (portal: string, stmt: string, values: string[]): Buffer =>
  msg(0x42, cstr(portal), cstr(stmt), i16(0), i16(values.length), ...values.flatMap((v) => [i32(Buffer.byteLength(v)), Buffer.from(v)]), i16(0));
export const describe = (kind: 'S' | 'P', name: string): Buffer => msg(0x44, Buffer.from(kind), cstr(name));
export const close = (kind: 'S' | 'P', name: string): Buffer => msg(0x43, Buffer.from(kind), cstr(name));
export const execute = (): Buffer => msg(0x45, cstr(''), i32(0));
export const sync = (): Buffer => msg(0x53);
export const flush = (): Buffer => msg(0x48);
export const copyData = (s: string): Buffer => msg(0x64, Buffer.from(s));
export const copyDone = (): Buffer => msg(0x63);

// ---- backend messages
/** Message types, without notices and parameter statuses. */
export const typesOf = (m: Msg[]): string[] => m.filter((x) => x.type !== 'N' && x.type !== 'S').map((x) => x.type);
/** The fields of the first ErrorResponse (`C` → SQLSTATE, `M` → message, …), or {}. */
export function errorOf(m: Msg[]): Record<string, string> {
  const e = m.find((x) => x.type === 'E');
  if (!e) return {};
  const out: Record<string, string> = {};
  let off = 0;
  while (e.body[off]) {
    const end = e.body.indexOf(0, off + 1);
    out[String.fromCharCode(e.body[off]!)] = e.body.toString('utf8', off + 1, end);
    off = end + 1;
  }
  return out;
}
export const tagOf = (m: Msg[]): string => m.find((x) => x.type === 'C')!.body.toString('utf8').replace(/\0$/, '');
/** The first column of every DataRow, as text. */
export function dataRows(m: Msg[]): string[] {
  return m.filter((x) => x.type === 'D').map((x) => x.body.toString('utf8', 6, 6 + x.body.readInt32BE(2)));
}
