/**
 * Cancel keys. Each client gets a proxy-owned BackendKeyData (so compute pids and keys never
 * leak and a key cannot be aimed at another tenant's compute); a CancelRequest carrying it is
 * forwarded to the compute that runs the session. The map sits behind an interface so a Redis
 * implementation can share it between proxies.
 */
import { randomBytes } from 'node:crypto';
import { connect } from 'node:net';
import { serialize } from './pgwire/index.ts';

export interface CancelTarget {
  host: string;
  port: number;
  processId: number;
  secretKey: number;
}

export interface CancelMap {
  set(key: bigint, target: CancelTarget): Promise<void> | void;
  get(key: bigint): Promise<CancelTarget | undefined> | CancelTarget | undefined;
  delete(key: bigint): Promise<void> | void;
}

export const cancelKey = (processId: number, secretKey: number): bigint =>
  (BigInt(processId >>> 0) << 32n) | BigInt(secretKey >>> 0);

export class MemoryCancelMap implements CancelMap {
  private readonly map = new Map<bigint, CancelTarget>();
  set(key: bigint, target: CancelTarget): void { this.map.set(key, target); }
  get(key: bigint): CancelTarget | undefined { return this.map.get(key); }
  delete(key: bigint): void { this.map.delete(key); }
  get size(): number { return this.map.size; }
}

/** A fresh random (processId, secretKey) pair not in use (signed 32-bit, as on the wire). */
export async function allocateCancelKey(map: CancelMap): Promise<{ processId: number; secretKey: number; key: bigint }> {
  for (;;) {
    const b = randomBytes(8);
    const processId = b.readInt32BE(0);
    const secretKey = b.readInt32BE(4);
    const key = cancelKey(processId, secretKey);
    if ((await map.get(key)) === undefined) return { processId, secretKey, key };
  }
}

/** Sends a CancelRequest to a compute; resolves when it has been written (Postgres answers by closing). */
export function sendCancel(target: CancelTarget, timeoutMs = 5_000): Promise<void> {
  return new Promise((resolve, reject) => {
    const s = connect(target.port, target.host);
    const timer = setTimeout(() => { s.destroy(); reject(new Error('cancel request timed out')); }, timeoutMs);
    s.on('connect', () => s.end(serialize.cancel(target.processId, target.secretKey)));
    s.on('error', (err) => { clearTimeout(timer); reject(err); });
    s.on('close', () => { clearTimeout(timer); resolve(); });
  });
}
