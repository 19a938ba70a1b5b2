/**
 * A process that only pipes (for `pipe-ab.ts`): for each pipe variant named in argv[2] it listens on
 * a port; a client's SSLRequest is answered 'S' and TLS is terminated as connection.ts does (a server
 * TLSSocket over the accepted socket), anything else is plaintext; then it connects to the compute
 * (argv[3]) and pipes. Startup and SCRAM pass through end to end, so the process's CPU is the pipe's.
 * Prints `{"ports": {variant: port}}` when listening.
 */
import { readFileSync } from 'node:fs';
import { connect, createServer, type Socket } from 'node:net';
import { createSecureContext, TLSSocket } from 'node:tls';
import { connectForPipe, pipeBoth, type PipeResult } from '../../proxy/passthrough.ts';
import { naivePipeBoth } from './naive-pipe.ts';

interface Variant {
  connect(port: number): Socket;
  pipe(client: Socket, compute: Socket, onClose: (r: PipeResult) => void): void;
}

export const VARIANTS: Record<string, Variant> = {
  /** Before: net socket + stream.pipe(). */
  pipe: { connect: (port) => connect({ host: '127.0.0.1', port, noDelay: true }), pipe: naivePipeBoth },
  /** Now: connect-compute's socket (onread, reused buffer) + passthrough.ts. */
  current: { connect: (port) => connectForPipe({ host: '127.0.0.1', port, noDelay: true }, () => {}), pipe: pipeBoth },
  /** passthrough.ts on a plain net socket ('data' events both ways). */
  'current-data': { connect: (port) => connect({ host: '127.0.0.1', port, noDelay: true }), pipe: pipeBoth },
};

const [, , names = 'pipe,current', computePort, certDir] = process.argv;
const secureContext = createSecureContext({ cert: readFileSync(`${certDir}/server.pem`), key: readFileSync(`${certDir}/server-key.pem`) });
const ports: Record<string, number> = {};

function serve(v: Variant): Promise<number> {
  const server = createServer((raw) => {
    raw.setNoDelay(true);
    raw.on('error', () => raw.destroy());
    raw.once('readable', () => {
      const first = raw.read(8) as Buffer | null;
      if (!first) return raw.destroy();
      raw.pause();
      const start = (client: Socket, early?: Buffer): void => {
        const compute = v.connect(Number(computePort));
        compute.on('error', () => client.destroy());
        compute.once('connect', () => {
          if (early) compute.write(early);
          v.pipe(client, compute, () => {});
        });
      };
      if (first.length === 8 && first.readUInt32BE(4) === 80877103) {
        raw.write('S');
        const tls = new TLSSocket(raw, { isServer: true, secureContext });
        tls.on('error', () => tls.destroy());
        tls.once('secure', () => { tls.pause(); start(tls); });
      } else {
        start(raw, first);
      }
    });
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve((server.address() as { port: number }).port)));
}

for (const name of names.split(',')) {
  const v = VARIANTS[name];
  if (!v) throw new Error(`unknown variant ${name}; known: ${Object.keys(VARIANTS).join(', ')}`);
  ports[name] = await serve(v);
}
process.stdout.write(JSON.stringify({ ports }) + '\n');
process.on('SIGTERM', () => process.exit(0));
process.on('SIGINT', () => process.exit(0));
