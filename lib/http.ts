/**
 * HTTP helpers shared by the services: a tiny JSON router for `/v1` APIs, `/healthz` and
 * `/metrics`, the uniform error body, and a typed JSON client for service-to-service calls.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo, Server as NetServer } from 'node:net';
import type { Registry } from 'prom-client';
import { asXenonError, isErrorCode, XenonError, type ErrorBody } from './errors.ts';
import type { Logger } from './logger.ts';

export interface RouteContext {
  req: IncomingMessage;
  res: ServerResponse;
  params: Record<string, string>;
  query: URLSearchParams;
  /** Parsed JSON body (`undefined` when empty). Bodies over the router's limit get 413. */
  body: unknown;
}
/** A handler returns the JSON to send (200), or `{ status, body }`, or undefined after writing `res` itself. */
export type RouteHandler = (ctx: RouteContext) => Promise<unknown> | unknown;

export class HttpReply {
  constructor(
    readonly status: number,
    readonly body: unknown,
  ) {}
}

interface Route {
  method: string;
  parts: string[];
  handler: RouteHandler;
  rawBody: boolean;
}

/** Per-route options. */
export interface RouteOptions {
  /**
   * The handler consumes the request body itself (a stream: `ctx.req`), e.g. a large upload;
   * the router neither reads it nor applies its JSON size cap, and `ctx.body` is undefined.
   */
  rawBody?: boolean;
}

export class Router {
  private readonly routes: Route[] = [];
  constructor(private readonly opts: { maxBody?: number } = {}) {}

  add(method: string, pattern: string, handler: RouteHandler, opts: RouteOptions = {}): this {
    this.routes.push({ method, parts: pattern.split('/').filter(Boolean), handler, rawBody: opts.rawBody === true });
    return this;
  }
  get(p: string, h: RouteHandler): this { return this.add('GET', p, h); }
  post(p: string, h: RouteHandler, o?: RouteOptions): this { return this.add('POST', p, h, o); }
  patch(p: string, h: RouteHandler): this { return this.add('PATCH', p, h); }
  put(p: string, h: RouteHandler, o?: RouteOptions): this { return this.add('PUT', p, h, o); }
  delete(p: string, h: RouteHandler): this { return this.add('DELETE', p, h); }

  private match(method: string, path: string): { route: Route; params: Record<string, string> } | 'method' | null {
    const segs = path.split('/').filter(Boolean);
    let methodMismatch = false;
    for (const route of this.routes) {
      if (route.parts.length !== segs.length) continue;
      const params: Record<string, string> = {};
      let ok = true;
      for (let i = 0; i < segs.length; i++) {
        const p = route.parts[i]!;
        let s: string;
        try { s = decodeURIComponent(segs[i]!); } catch { ok = false; break; }
        if (p.startsWith(':')) params[p.slice(1)] = s;
        else if (p !== s) { ok = false; break; }
      }
      if (!ok) continue;
      if (route.method !== method) { methodMismatch = true; continue; }
      return { route, params };
    }
    return methodMismatch ? 'method' : null;
  }

  /** Handles a request; never throws. */
  async handle(req: IncomingMessage, res: ServerResponse, logger?: Logger): Promise<void> {
    try {
      const url = new URL(req.url ?? '/', 'http://x');
      const m = this.match(req.method ?? 'GET', url.pathname);
      if (m === null) throw new XenonError('HTTP_NOT_FOUND', `no route ${req.method} ${url.pathname}`);
      if (m === 'method') throw new XenonError('HTTP_METHOD_NOT_ALLOWED');
      const body = req.method === 'GET' || req.method === 'HEAD' || m.route.rawBody ? undefined : await readJson(req, this.opts.maxBody);
      const out = await m.route.handler({ req, res, params: m.params, query: url.searchParams, body });
      if (res.headersSent || res.writableEnded) return;
      if (out instanceof HttpReply) sendJson(res, out.status, out.body);
      else sendJson(res, 200, out ?? {});
    } catch (err) {
      const xe = asXenonError(err);
      if (xe.kind === 'service') logger?.error('request failed', { err: xe, cause: xe.cause, path: req.url });
      else logger?.debug('request rejected', { code: xe.code, path: req.url });
      // A body we stopped reading (too large) would jam a keep-alive connection: close it.
      if (!req.complete) res.setHeader('connection', 'close');
      if (!res.headersSent) sendJson(res, xe.httpStatus, xe.toJSON());
      else res.destroy();
    }
  }
}

export async function readJson(req: IncomingMessage, limit = 1 << 20): Promise<unknown> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > limit) throw new XenonError('CP_PAYLOAD_TOO_LARGE');
    chunks.push(chunk);
  }
  if (size === 0) return undefined;
  try {
    return JSON.parse(Buffer.concat(chunks).toString('utf8'));
  } catch {
    throw new XenonError('CP_BAD_REQUEST', 'body is not valid JSON', { userMessage: 'request body is not valid JSON' });
  }
}

export function sendJson(res: ServerResponse, status: number, body: unknown): void {
  const data = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(data) });
  res.end(data);
}

export interface HttpServerHandle {
  server: Server;
  address: AddressInfo;
  url: string;
  close(): Promise<void>;
}

/** Starts an HTTP server for a router, adding `/healthz` (and `/metrics` when a registry is given). */
export async function startHttpServer(opts: {
  host: string;
  port: number;
  router: Router;
  logger?: Logger;
  registry?: Registry;
  health?: () => boolean;
}): Promise<HttpServerHandle> {
  const { router, registry } = opts;
  router.get('/healthz', () => {
    const ok = opts.health ? opts.health() : true;
    return new HttpReply(ok ? 200 : 503, { status: ok ? 'ok' : 'unhealthy' });
  });
  if (registry) {
    router.get('/metrics', async ({ res }) => {
      const text = await registry.metrics();
      res.writeHead(200, { 'content-type': registry.contentType });
      res.end(text);
    });
  }
  const server = createServer((req, res) => void router.handle(req, res, opts.logger));
  server.keepAliveTimeout = 65_000;
  const address = await listen(server, opts.port, opts.host);
  const host = address.family === 'IPv6' ? `[${address.address}]` : address.address;
  return {
    server,
    address,
    url: `http://${host}:${address.port}`,
    close: () => new Promise<void>((resolve) => {
      server.close(() => resolve());
      server.closeAllConnections();
    }),
  };
}

/**
 * A JSON call to another service's `/v1` API. Error bodies become the XenonError they name;
 * network failures and timeouts become CP_UNAVAILABLE (retryable).
 */
export async function callJson<T>(
  baseUrl: string,
  method: string,
  path: string,
  body?: unknown,
  opts: { timeoutMs?: number; unavailableCode?: 'CP_UNAVAILABLE' } = {},
): Promise<T> {
  let res: Response;
  try {
    res = await fetch(baseUrl + path, {
      method,
      headers: body === undefined ? {} : { 'content-type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: AbortSignal.timeout(opts.timeoutMs ?? 30_000),
    });
  } catch (err) {
    throw new XenonError(opts.unavailableCode ?? 'CP_UNAVAILABLE', `${method} ${path}: ${(err as Error).message}`, { cause: err });
  }
  const text = await res.text();
  let json: unknown;
  try {
    json = text ? JSON.parse(text) : undefined;
  } catch {
    throw new XenonError('CP_UNAVAILABLE', `${method} ${path}: HTTP ${res.status} with a non-JSON body`);
  }
  if (res.ok) return json as T;
  const e = (json as Partial<ErrorBody> | undefined)?.error;
  if (e && typeof e.code === 'string' && isErrorCode(e.code)) {
    throw new XenonError(e.code, `${method} ${path}: ${e.message}`, { userMessage: e.message, retryable: e.retryable });
  }
  throw new XenonError('CP_UNAVAILABLE', `${method} ${path}: HTTP ${res.status}`, { retryable: res.status >= 500 });
}

/** Listens on `host:port` (0: any free port); rejects when the bind fails (port in use, say). */
export function listen(server: NetServer, port: number, host: string): Promise<AddressInfo> {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      resolve(server.address() as AddressInfo);
    });
  });
}
