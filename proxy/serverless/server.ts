/**
 * The proxy's HTTP port (4444) for edge runtimes: WebSocket upgrades on any path (the
 * `@neondatabase/serverless` driver's default is `/v2`) carry the Postgres protocol in binary
 * frames, and `POST /sql` runs SQL over HTTP. TLS and plain HTTP share the port: a connection
 * starting with a TLS record gets TLS (SNI and certificate as on the Postgres port); plain HTTP
 * is served to loopback peers only (local development), everyone else gets a 400 saying to use TLS.
 */
import { createServer as createHttpServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { createServer as createNetServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { TLSSocket, type SecureContext } from 'node:tls';
import { WebSocketServer, type WebSocket } from 'ws';
import { XenonError } from '../../lib/errors.ts';
import { listen } from '../../lib/http.ts';
import type { Logger } from '../../lib/logger.ts';
import { endpointFromSni } from '../auth/credentials.ts';
import { handleClient, type SessionDeps } from '../connection.ts';
import { RequestContext } from '../context.ts';
import { TLS_HANDSHAKE_RECORD } from '../pgwire/index.ts';
import { plainAddress } from '../rate-limit.ts';
import type { SqlOverHttp } from './sql-over-http.ts';
import { WebSocketStream } from './websocket.ts';

export interface ServerlessDeps extends SessionDeps {
  logger: Logger;
  sql: SqlOverHttp;
  /** Client connections open on the Postgres port, for the shared per-proxy cap. */
  tcpConnections: () => number;
}

export interface ServerlessHandle {
  address: AddressInfo;
  /** WebSocket sessions open now. */
  readonly openSessions: number;
  close(): Promise<void>;
}

/** Headers the driver sends (and browsers preflight). */
const CORS = {
  'access-control-allow-origin': '*',
  'access-control-allow-methods': 'POST, OPTIONS',
  'access-control-allow-headers':
    'Authorization, Content-Type, Neon-Connection-String, Neon-Raw-Text-Output, Neon-Array-Mode, Neon-Batch-Isolation-Level, Neon-Batch-Read-Only, Neon-Batch-Deferrable, Neon-Pool-Opt-In',
  'access-control-max-age': '86400',
} as const;

const isLoopback = (ip: string): boolean => ip === '::1' || ip.startsWith('127.');

function jsonReply(res: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { ...CORS, 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

/** The host part of `Host` or `?address=` (`host:port`, `[v6]:port`). */
function hostOnly(v: string | null | undefined): string | undefined {
  if (!v) return undefined;
  const m = /^\[([^\]]*)\]|^([^:]*)/.exec(v);
  return (m?.[1] ?? m?.[2]) || undefined;
}

export async function startServerless(
  config: SessionDeps['config'],
  deps: ServerlessDeps,
  secureContext: () => SecureContext,
): Promise<ServerlessHandle> {
  const { logger, metrics } = deps;
  const sessions = new Set<WebSocketStream>();
  const sockets = new Set<Socket>();
  // ws buffers a whole message before handing it over, even before the client has logged in:
  // bound it (a larger single write from the driver — a query over 16 MiB — is refused with 1009).
  const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false, maxPayload: 16 * 1024 * 1024 });

  // requestTimeout bounds receiving a request (headers and body), not running its query.
  const http = createHttpServer({ requestTimeout: 30_000, headersTimeout: 10_000, keepAliveTimeout: 60_000 }, (req, res) => {
    const path = (req.url ?? '/').split('?')[0];
    if (req.method === 'OPTIONS') {
      res.writeHead(204, CORS);
      res.end();
      return;
    }
    if (path === '/sql') {
      if (req.method !== 'POST') return jsonReply(res, 405, { message: 'use POST /sql', code: '42501' });
      deps.sql.handle(req, res, plainAddress(req.socket.remoteAddress)).catch((err: Error) => {
        logger.error('SQL over HTTP failed unexpectedly', { err });
        if (!res.headersSent) jsonReply(res, 500, { message: 'internal error', code: 'XX000' });
        else res.destroy();
      });
      return;
    }
    jsonReply(res, 404, { message: `no such route: ${req.method} ${path}; WebSocket upgrades are accepted on any path, SQL over HTTP is POST /sql`, code: '42704' });
  });
  http.on('clientError', (_err, socket) => {
    if (socket.writable) socket.end('HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n');
    else socket.destroy();
  });

  http.on('upgrade', (req: IncomingMessage, socket: Socket, head: Buffer) => {
    const peerIp = plainAddress(req.socket.remoteAddress);
    if (sessions.size + deps.tcpConnections() >= 2 * config.maxClientConnections) {
      metrics.rateLimited.inc({ limit: 'max_connections' });
      socket.end('HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 0\r\n\r\n');
      return;
    }
    wss.handleUpgrade(req, socket, head, (ws: WebSocket) => {
      const stream = new WebSocketStream(ws, peerIp);
      sessions.add(stream);
      metrics.connectionsOpened.inc({ protocol: 'ws' });
      metrics.connectionsActive.inc({ protocol: 'ws' });
      stream.once('close', () => {
        sessions.delete(stream);
        metrics.connectionsClosed.inc({ protocol: 'ws' });
        metrics.connectionsActive.dec({ protocol: 'ws' });
      });
      // The endpoint: the Host header when it is <endpoint>.<domain> (the driver's default
      // wsProxy `<host>/v2`), else the `?address=<host>:<port>` the driver adds when wsProxy is a
      // fixed string; else options or the password hack, as on TCP.
      // Not `new URL()`: a path such as `//` or `//[` makes it throw.
      const query = (req.url ?? '').split('?')[1] ?? '';
      const address = new URLSearchParams(query).get('address');
      const hostName = [hostOnly(req.headers.host), hostOnly(address)].find((h) => h && endpointFromSni(h, config.domain));
      const ctx = new RequestContext(`${peerIp}:${req.socket.remotePort}`, 'ws', logger);
      const over = sessions.size + deps.tcpConnections() > config.maxClientConnections;
      if (over) metrics.rateLimited.inc({ limit: 'max_connections' });
      handleClient(stream, deps, ctx, {
        peerIp,
        hostName,
        secure: req.socket instanceof TLSSocket || isLoopback(peerIp),
        reject: over ? new XenonError('PROXY_TOO_MANY_CONNECTIONS') : undefined,
      }).catch((err: Error) => {
        logger.error('unhandled WebSocket session error', { err });
        stream.destroy();
      });
    });
  });

  // One port, two ways in: a TLS record first → TLS; else plain HTTP, for loopback peers only.
  const server: Server = createNetServer({ noDelay: true }, (socket) => {
    sockets.add(socket);
    socket.once('close', () => sockets.delete(socket));
    socket.on('error', () => {});
    const peerIp = plainAddress(socket.remoteAddress);
    const timer = setTimeout(() => socket.destroy(), config.startupTimeoutMs);
    socket.once('data', (first: Buffer) => {
      clearTimeout(timer);
      socket.pause();
      socket.unshift(first);
      if (first[0] === TLS_HANDSHAKE_RECORD) {
        const tls = new TLSSocket(socket, {
          isServer: true,
          secureContext: secureContext(),
          SNICallback: (_name, cb) => cb(null, secureContext()),
          ALPNProtocols: ['http/1.1'],
        });
        const hs = setTimeout(() => tls.destroy(), config.tlsHandshakeTimeoutMs);
        tls.once('secure', () => clearTimeout(hs));
        tls.on('error', () => {
          clearTimeout(hs);
          metrics.tlsFailures.inc();
          tls.destroy();
        });
        http.emit('connection', tls);
        return;
      }
      if (!(config.httpAllowPlainLocal && isLoopback(peerIp))) {
        socket.end('HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-type: text/plain\r\n\r\nTLS is required: use https:// or wss://\n');
        return;
      }
      http.emit('connection', socket);
      socket.resume();
    });
  });
  server.on('error', (err) => logger.error('HTTP listener error', { err }));
  const address = await listen(server, config.httpPort, config.httpHost);
  logger.info('serverless HTTP/WebSocket listening', { address: `${address.address}:${address.port}` });
  return {
    address,
    get openSessions() { return sessions.size; },
    async close() {
      await new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const s of sessions) s.destroy();
        for (const s of sockets) s.destroy();
        wss.close();
      });
      await deps.sql.close();
    },
  };
}
