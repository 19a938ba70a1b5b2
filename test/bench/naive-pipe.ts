/**
 * The pipe the proxy used before the pipe-mode work (kept as the baseline of `test/bench/pipe-ab.ts`):
 * `stream.pipe()` both ways, the compute socket read through ordinary 'data' events.
 */
import type { Socket } from 'node:net';
import type { PipeResult } from '../../proxy/passthrough.ts';

export function naivePipeBoth(client: Socket, compute: Socket, onClose: (r: PipeResult) => void): void {
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
  if (client.destroyed || compute.destroyed) return close();
  client.pipe(compute);
  compute.pipe(client);
}
