/**
 * After authentication the proxy only moves bytes (DESIGN §4: no per-chunk parsing after auth,
 * large socket reads, no per-chunk allocation of ours).
 *
 * Each direction forwards what it reads with one `write()` to the other side. Backpressure: when
 * that write returns false the source stops reading until the destination emits 'drain', so a slow
 * reader makes the proxy hold at most about one read (64 KiB) plus the destination's high-water
 * mark. An 'end' (FIN) from one side ends the other after what is queued for it is flushed; a
 * 'close' or an error on either side closes both.
 *
 * The compute side is opened by {@link connectForPipe}: a net socket with `onread`, which reads into
 * one reused 64 KiB buffer instead of a new allocation per read and skips the Readable stream
 * machinery (no push, no 'data' event, no read-more tick). Toward a plain socket the buffer is
 * written as is and reused only when that write completed synchronously (nothing queued);
 * otherwise the next read gets a fresh one. Toward a TLS socket each read is copied (TLSWrap
 * reports every write as pending until its records are flushed). Sockets not opened that way (the
 * client side: a TLSSocket) are read through ordinary 'data' events.
 *
 * Measured (docs/BENCHMARKS.md): ~15 % fewer user-space instructions per query than `stream.pipe()`;
 * most of the CPU per query is the kernel's (loopback send, wake-ups), which no pipe code changes.
 */
import { connect, type Socket, type TcpNetConnectOpts } from 'node:net';
import { TLSSocket } from 'node:tls';

export interface PipeResult {
  /** Bytes forwarded by the pipe client → compute and compute → client. */
  toCompute: number;
  toClient: number;
}

/** Size of the reused read buffer of sockets opened by {@link connectForPipe}. */
export const PIPE_READ_BUFFER = 64 * 1024;

/** When a side closes while the other still has bytes queued for it: how long they may take to flush. */
const FLUSH_GRACE_MS = 2_000;

/** Receives what an onread socket read: `n` bytes of `buf`, valid only during the call. false = stop reading. */
type ReadSink = (n: number, buf: Buffer) => boolean;
const kSink = Symbol('xenon.pipeSink');
const kLend = Symbol('xenon.pipeLend');
interface OnreadSocket extends Socket {
  [kSink]: ReadSink;
  /** The current buffer is still referenced (by a queued write): the next read must use another. */
  [kLend]: () => void;
}

const isOnread = (s: Socket): s is OnreadSocket => kSink in s;

/**
 * Opens a TCP connection that {@link pipeBoth} reads through `onread` with a reused buffer. Until a
 * pipe takes it over, each read is copied and handed to `onData` (the compute handshake).
 * `pause()`/`resume()` work as usual.
 */
export function connectForPipe(opts: TcpNetConnectOpts, onData: (chunk: Buffer) => void): Socket {
  let buf = Buffer.allocUnsafeSlow(PIPE_READ_BUFFER);
  let lent = false;
  const socket = connect({
    ...opts,
    onread: {
      buffer: () => {
        if (lent) {
          lent = false;
          buf = Buffer.allocUnsafeSlow(PIPE_READ_BUFFER);
        }
        return buf;
      },
      callback: (n: number, b: Uint8Array) => socket[kSink](n, b as Buffer),
    },
  }) as OnreadSocket;
  socket[kSink] = (n, b) => {
    onData(Buffer.from(b.subarray(0, n)));
    return true;
  };
  socket[kLend] = () => { lent = true; };
  return socket;
}

/**
 * Takes over the reads of a socket opened by {@link connectForPipe}: `sink(n, buf)` gets each read
 * in the reused buffer (valid during the call only: copy what must outlive it); returning false
 * stops reading until `resume()`. False when the socket was not opened that way.
 */
export function readReused(socket: Socket, sink: (n: number, buf: Buffer) => boolean): boolean {
  if (!isOnread(socket)) return false;
  socket[kSink] = sink;
  return true;
}

/**
 * Pipes `client` and `compute` both ways until either closes; `onClose` runs once, after both
 * are closed or closing, with the bytes each direction forwarded. Errors on either side close both
 * and are not rethrown.
 */
export function pipeBoth(client: Socket, compute: Socket, onClose: (r: PipeResult) => void): void {
  client.setNoDelay(true);
  compute.setNoDelay(true);
  const result: PipeResult = { toCompute: 0, toClient: 0 };
  let closed = false;
  const close = (): void => {
    if (closed) return;
    closed = true;
    settle(client);
    settle(compute);
    onClose(result);
  };
  for (const s of [client, compute]) {
    s.on('error', close);
    s.on('close', close);
  }
  // A side that closed before we got here emits no more events.
  if (client.destroyed || compute.destroyed) return close();
  forward(client, compute, (n) => (result.toCompute += n));
  forward(compute, client, (n) => (result.toClient += n));
}

/** One direction: reads of `src` written to `dst`, with backpressure and end propagation. */
function forward(src: Socket, dst: Socket, count: (n: number) => void): void {
  src.on('end', () => {
    if (!dst.destroyed) dst.end();
  });
  dst.on('drain', () => {
    if (!src.destroyed) src.resume();
  });
  if (isOnread(src)) {
    const lend = src[kLend];
    // A TLS socket reports every write as pending until its encrypted bytes are flushed, so the
    // reused buffer would be lent on every read: give it a copy (small ones come from Buffer's pool).
    const copy = dst instanceof TLSSocket;
    src[kSink] = (n, buf) => {
      count(n);
      if (copy) return dst.write(Buffer.from(buf.subarray(0, n)));
      const ok = dst.write(buf.subarray(0, n));
      // Queued (not handed to the kernel yet): the buffer is not ours to reuse.
      if (dst.writableLength !== 0) lend();
      return ok; // false: readStop until 'drain'
    };
  } else {
    src.on('data', (chunk: Buffer) => {
      count(chunk.length);
      if (!dst.write(chunk)) src.pause();
    });
  }
  src.resume();
}

/**
 * The pipe is over: a socket with nothing queued is destroyed now; one with queued bytes (the
 * compute's last ErrorResponse to a slow client, say) is ended so they flush, and destroyed when
 * that is done or after {@link FLUSH_GRACE_MS}.
 */
function settle(s: Socket): void {
  if (s.destroyed) return;
  s.pause();
  if (s.writableLength === 0) {
    s.destroy();
    return;
  }
  const timer = setTimeout(() => s.destroy(), FLUSH_GRACE_MS);
  timer.unref();
  s.once('close', () => clearTimeout(timer));
  s.once('finish', () => s.destroy());
  if (!s.writableEnded) s.end();
}
