/**
 * After authentication the proxy only moves bytes: `pipe()` both ways (backpressure included,
 * no per-chunk parsing or allocation of ours), Nagle off, and whichever side closes first
 * closes the other.
 */
import type { Socket } from 'node:net';

export interface PipeResult {
  /** Bytes client → compute and compute → client. */
  toCompute: number;
  toClient: number;
}

export function pipeBoth(client: Socket, compute: Socket, onClose: (r: PipeResult) => void): void {
  client.setNoDelay(true);
  compute.setNoDelay(true);
  let closed = false;
  const close = (): void => {
    if (closed) return;
    closed = true;
    client.destroy();
    compute.destroy();
    onClose({ toCompute: compute.bytesWritten, toClient: compute.bytesRead });
  };
  client.on('error', close);
  compute.on('error', close);
  client.on('close', close);
  compute.on('close', close);
  // A side that closed before we got here emits no more events.
  if (client.destroyed || compute.destroyed) return close();
  client.pipe(compute);
  compute.pipe(client);
}
