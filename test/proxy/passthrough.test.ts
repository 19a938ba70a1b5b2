/**
 * proxy/passthrough.ts on real sockets: a client peer ↔ (client side of the proxy, plain or TLS as
 * connection.ts makes it) ↔ pipeBoth ↔ (compute socket, from connectForPipe or plain net) ↔ a
 * compute peer. Bytes arrive intact and counted; a paused reader bounds what the proxy holds;
 * an end or a close of either side reaches the other.
 */
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { connect, createServer, type Server, type Socket } from 'node:net';
import { connect as tlsConnect, createSecureContext, TLSSocket } from 'node:tls';
import t, { type Test } from 'tap';
import { createCa, createServerCert } from '../../certs/generate.ts';
import { connectForPipe, PIPE_READ_BUFFER, pipeBoth, type PipeResult } from '../../proxy/passthrough.ts';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

const ca = createCa();
const cert = createServerCert(ca, '*.localtest.me', [{ dns: '*.localtest.me' }]);
const secureContext = createSecureContext({ cert: cert.certPem, key: cert.keyPem });

interface Rig {
  /** The application's end of the client connection, and of the compute connection. */
  clientPeer: Socket;
  computePeer: Socket;
  /** The proxy's two sockets. */
  clientSide: Socket;
  compute: Socket;
  /** What the compute peer sent before the pipe started, as connectForPipe handed it over. */
  handshake: Buffer[];
  closed: Promise<PipeResult>;
  closedAt: () => number | undefined;
}

async function listen(t: Test): Promise<{ server: Server; port: number; next: () => Promise<Socket> }> {
  const server = createServer();
  const queue: Socket[] = [];
  const waiters: ((s: Socket) => void)[] = [];
  server.on('connection', (s) => {
    const w = waiters.shift();
    if (w) w(s);
    else queue.push(s);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  t.teardown(() => new Promise<void>((r) => server.close(() => r())));
  return {
    server,
    port: (server.address() as { port: number }).port,
    next: () => new Promise((r) => (queue.length ? r(queue.shift()!) : waiters.push(r))),
  };
}

async function rig(t: Test, o: { tls?: boolean; onread?: boolean; beforePipe?: (r: Omit<Rig, 'closed' | 'closedAt'>) => Promise<void> } = {}): Promise<Rig> {
  const front = await listen(t);
  const back = await listen(t);
  let clientPeer: Socket;
  let clientSide: Socket;
  if (o.tls) {
    const accepted = front.next();
    clientPeer = tlsConnect({ host: '127.0.0.1', port: front.port, ca: ca.certPem, servername: 'ep-x.localtest.me' });
    const raw = await accepted;
    // As connection.ts does it: a server TLSSocket over the accepted net socket.
    clientSide = new TLSSocket(raw, { isServer: true, secureContext });
    await Promise.all([once(clientSide, 'secure'), once(clientPeer, 'secureConnect')]);
    clientSide.pause();
  } else {
    const accepted = front.next();
    clientPeer = connect({ host: '127.0.0.1', port: front.port });
    clientSide = await accepted;
    clientSide.pause();
  }
  const handshake: Buffer[] = [];
  const acceptedCompute = back.next();
  const compute = o.onread === false
    ? connect({ host: '127.0.0.1', port: back.port, noDelay: true })
    : connectForPipe({ host: '127.0.0.1', port: back.port, noDelay: true }, (chunk) => handshake.push(chunk));
  const computePeer = await acceptedCompute;
  if (compute.connecting) await once(compute, 'connect');
  for (const s of [clientPeer, computePeer]) s.on('error', () => {});
  t.teardown(() => {
    for (const s of [clientPeer, computePeer, clientSide, compute]) s.destroy();
  });
  await o.beforePipe?.({ clientPeer, computePeer, clientSide, compute, handshake });
  let at: number | undefined;
  const closed = new Promise<PipeResult>((resolve) => pipeBoth(clientSide, compute, (r) => { at = Date.now(); resolve(r); }));
  return { clientPeer, computePeer, clientSide, compute, handshake, closed, closedAt: () => at };
}

/** Reads `n` bytes from `s` (resolves with them, or with what came before the end). */
function readBytes(s: Socket, n: number): Promise<Buffer> {
  return new Promise((resolve) => {
    const parts: Buffer[] = [];
    let got = 0;
    const done = (): void => {
      s.off('data', onData);
      s.off('end', done);
      s.off('close', done);
      resolve(Buffer.concat(parts));
    };
    const onData = (b: Buffer): void => {
      parts.push(b);
      got += b.length;
      if (got >= n) done();
    };
    s.on('data', onData);
    s.on('end', done);
    s.on('close', done);
    s.resume();
  });
}

/** Resolves on 'drain', or when `s` closes or fails (listeners removed either way). */
function drainOrEnd(s: Socket): Promise<void> {
  return new Promise((resolve) => {
    const done = (): void => {
      s.off('drain', done);
      s.off('close', done);
      s.off('error', done);
      resolve();
    };
    s.on('drain', done);
    s.on('close', done);
    s.on('error', done);
  });
}

/** Writes `payload` in 16 KiB pieces honouring `write() === false`; `progress()` is the count so far. */
function writeAll(s: Socket, payload: Buffer): { done: Promise<void>; progress: () => number } {
  let off = 0;
  const done = (async () => {
    while (off < payload.length && !s.destroyed) {
      const piece = payload.subarray(off, off + 16 * 1024);
      off += piece.length;
      if (!s.write(piece)) await drainOrEnd(s);
    }
  })();
  return { done, progress: () => off };
}

/** Waits until `f()` stops changing for `quietMs`. */
async function settle(f: () => number, quietMs = 300, maxMs = 10_000): Promise<number> {
  const until = Date.now() + maxMs;
  let last = f();
  let since = Date.now();
  while (Date.now() < until) {
    await sleep(25);
    const v = f();
    if (v !== last) { last = v; since = Date.now(); } else if (Date.now() - since >= quietMs) return v;
  }
  return last;
}

/** Resolves when `s` has closed (at once if it already has). */
const closedP = (s: Socket): Promise<unknown> => (s.closed ? Promise.resolve() : once(s, 'close'));

function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  return Promise.race([p, sleep(ms).then(() => { throw new Error(`${what}: not within ${ms} ms`); })]);
}

for (const mode of [{ tls: false, onread: true }, { tls: true, onread: true }, { tls: true, onread: false }, { tls: false, onread: false }]) {
  const name = `${mode.tls ? 'TLS' : 'plain'} client, ${mode.onread ? 'onread' : 'net'} compute`;

  t.test(`${name}: bytes both ways, intact and counted`, async (t) => {
    const r = await rig(t, mode);
    const up = randomBytes(300_000);
    const down = randomBytes(1_000_000);
    const gotUp = readBytes(r.computePeer, up.length);
    const gotDown = readBytes(r.clientPeer, down.length);
    // Many small writes too: each becomes its own read on the proxy (the query round-trip case).
    for (let i = 0; i < 200; i++) r.computePeer.write(down.subarray(i * 10, i * 10 + 10));
    r.computePeer.write(down.subarray(2000));
    r.clientPeer.write(up);
    t.ok((await gotUp).equals(up), 'client → compute intact');
    t.ok((await gotDown).equals(down), 'compute → client intact');
    r.clientPeer.end();
    const res = await within(r.closed, 2_000, 'close after the client ends');
    t.same(res, { toCompute: up.length, toClient: down.length }, 'byte counts');
  });

  t.test(`${name}: a paused client bounds what the proxy holds (compute → client)`, async (t) => {
    const r = await rig(t, mode);
    r.clientPeer.pause(); // the slow client: reads nothing
    const payload = randomBytes(64 * 1024 * 1024);
    const w = writeAll(r.computePeer, payload);
    const stalledAt = await settle(w.progress);
    t.ok(stalledAt < payload.length / 2, `the compute is held back (${stalledAt} of ${payload.length} bytes written)`);
    const held = r.clientSide.writableLength;
    t.ok(held <= r.clientSide.writableHighWaterMark + PIPE_READ_BUFFER, `the proxy queues at most one read over the high-water mark (${held} B)`);
    const got = readBytes(r.clientPeer, payload.length);
    await w.done;
    t.ok((await got).equals(payload), 'everything arrives, in order, once the client reads');
    r.computePeer.end();
    const res = await within(r.closed, 5_000, 'close after the compute ends');
    t.equal(res.toClient, payload.length);
  });

  t.test(`${name}: a paused compute bounds what the proxy holds (client → compute)`, async (t) => {
    const r = await rig(t, mode);
    r.computePeer.pause();
    const payload = randomBytes(64 * 1024 * 1024);
    const w = writeAll(r.clientPeer, payload);
    const stalledAt = await settle(w.progress);
    t.ok(stalledAt < payload.length / 2, `the client is held back (${stalledAt} of ${payload.length} bytes written)`);
    const held = r.compute.writableLength;
    t.ok(held <= r.compute.writableHighWaterMark + PIPE_READ_BUFFER, `the proxy queues at most one read over the high-water mark (${held} B)`);
    const got = readBytes(r.computePeer, payload.length);
    await w.done;
    t.ok((await got).equals(payload), 'everything arrives once the compute reads');
    r.clientPeer.end();
    t.equal((await within(r.closed, 5_000, 'close')).toCompute, payload.length);
  });

  t.test(`${name}: the client ending closes the compute side`, async (t) => {
    const r = await rig(t, mode);
    r.clientPeer.write('X\0\0\0\x04'); // Terminate
    const got = readBytes(r.computePeer, 5);
    r.clientPeer.end();
    t.equal((await got).toString('latin1'), 'X\0\0\0\x04', 'bytes before the FIN are delivered');
    await within(once(r.computePeer, 'end'), 1_000, 'compute sees the end');
    await within(r.closed, 1_000, 'pipe closed');
    await within(closedP(r.clientPeer), 1_000, 'client closed');
    t.ok(r.compute.destroyed && r.clientSide.destroyed);
  });

  t.test(`${name}: the compute closing closes the client, last bytes first`, async (t) => {
    const r = await rig(t, mode);
    const fatal = Buffer.from('E\0\0\0\x10SFATAL\0C57P01\0\0');
    const got = readBytes(r.clientPeer, fatal.length + 1);
    r.computePeer.end(fatal);
    t.ok((await within(got, 1_000, 'client sees the end')).equals(fatal), 'the last message arrives before the end');
    await within(r.closed, 1_000, 'pipe closed');
    t.ok(r.compute.destroyed);
  });

  t.test(`${name}: a reset from the compute closes the client, no throw`, async (t) => {
    const r = await rig(t, mode);
    r.computePeer.resetAndDestroy();
    await within(r.closed, 1_000, 'pipe closed');
    await within(closedP(r.clientPeer), 1_000, 'client closed');
    t.ok(r.clientSide.destroyed && r.compute.destroyed);
  });

  t.test(`${name}: a client that vanished closes the compute`, async (t) => {
    const r = await rig(t, mode);
    r.clientPeer.destroy();
    await within(r.closed, 1_000, 'pipe closed');
    await within(closedP(r.computePeer), 1_000, 'compute peer closed');
  });
}

t.test('closing with bytes still queued for a slow client: they flush, then the socket closes', async (t) => {
  const r = await rig(t, { tls: false, onread: true });
  r.clientPeer.pause();
  const payload = randomBytes(64 * 1024 * 1024);
  const w = writeAll(r.computePeer, payload);
  await settle(w.progress);
  t.ok(r.clientSide.writableLength > 0, 'bytes are queued at the proxy');
  r.compute.destroy(); // the compute side fails with the client behind
  const res = await within(r.closed, 1_000, 'onClose runs at once');
  t.notOk(r.clientSide.destroyed, 'the client side stays open while its queue flushes');
  const data = await within(readBytes(r.clientPeer, Infinity), 5_000, 'client drains and sees the end');
  t.equal(data.length, res.toClient, 'the client gets every byte the proxy read');
  t.ok(data.equals(payload.subarray(0, data.length)), 'in order');
  await within(closedP(r.clientSide), 1_000, 'then the client side closes');
});

t.test('a side closed before the pipe starts closes the other at once', async (t) => {
  const r = await rig(t, { beforePipe: async (s) => { s.clientSide.destroy(); await sleep(10); } });
  const res = await within(r.closed, 500, 'onClose');
  t.same(res, { toCompute: 0, toClient: 0 });
  t.ok(r.compute.destroyed);
});

t.test('connectForPipe: reads before the pipe are handed over as copies; pause holds the rest until the pipe', async (t) => {
  const r = await rig(t, {
    beforePipe: async (s) => {
      s.computePeer.write('hello');
      while (Buffer.concat(s.handshake).length < 5) await sleep(5);
      s.compute.pause(); // as connect-compute does after ReadyForQuery
      s.computePeer.write('world');
      await sleep(50);
    },
  });
  t.equal(Buffer.concat(r.handshake).toString(), 'hello');
  t.equal((await readBytes(r.clientPeer, 5)).toString(), 'world', 'bytes sent while paused reach the client through the pipe');
  t.equal(Buffer.concat(r.handshake).toString(), 'hello', 'and not the handshake reader');
  r.clientPeer.end();
  t.same(await r.closed, { toCompute: 0, toClient: 5 });
});
