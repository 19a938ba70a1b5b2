/**
 * A WebSocket as a byte stream (a Duplex), for the Postgres protocol inside binary frames as
 * `@neondatabase/serverless` sends it: the proxy then runs the very same session code as for TCP.
 * Text frames are a protocol error (the connection is closed with 1003 and a reason). Frames are
 * not message boundaries — the driver coalesces writes — so bytes are just concatenated.
 * Backpressure: the WebSocket stops reading while the stream's buffer is full; writes complete
 * when the frame is handed to the socket.
 */
import { Duplex } from 'node:stream';
import type { WebSocket } from 'ws';

export class WebSocketStream extends Duplex {
  /** Why the stream was closed by us, for logs. */
  closeReason?: string;

  constructor(
    private readonly ws: WebSocket,
    readonly remoteAddress: string | undefined,
  ) {
    super({ allowHalfOpen: false });
    ws.on('message', (data: Buffer | ArrayBuffer | Buffer[], isBinary: boolean) => {
      if (!isBinary) {
        this.closeReason = 'text frame';
        ws.close(1003, 'text frames are not supported: send the Postgres protocol in binary frames');
        this.destroy();
        return;
      }
      const chunk = Buffer.isBuffer(data) ? data : Array.isArray(data) ? Buffer.concat(data) : Buffer.from(data);
      if (!this.push(chunk)) ws.pause();
    });
    ws.once('close', () => {
      this.push(null);
      this.destroy();
    });
    ws.on('error', (err) => this.destroy(err));
  }

  override _read(): void {
    if (this.ws.isPaused) this.ws.resume();
  }

  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (err?: Error | null) => void): void {
    if (this.ws.readyState !== this.ws.OPEN) return cb(new Error('WebSocket is closed'));
    this.ws.send(chunk, { binary: true }, (err) => cb(err ?? null));
  }

  override _final(cb: (err?: Error | null) => void): void {
    this.ws.close(1000);
    cb();
  }

  override _destroy(err: Error | null, cb: (err: Error | null) => void): void {
    if (this.ws.readyState === this.ws.OPEN || this.ws.readyState === this.ws.CONNECTING) this.ws.close(1000);
    // A peer that never answers the close handshake is cut off (ws waits 30 s by default).
    const ws = this.ws;
    setTimeout(() => ws.terminate(), 2_000).unref();
    cb(err);
  }

  /** Socket compatibility for the pipe (frames are sent as written: nothing to tune). */
  setNoDelay(): this {
    return this;
  }
}
