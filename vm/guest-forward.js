#!/usr/bin/env node
/**
 * One connection of a compute VM's guest-side forward (QEMU `guestfwd=…-cmd:`): QEMU starts this
 * per connection the guest opens to the forwarded address, with the connection on stdin/stdout.
 *
 *   node guest-forward.js <host> <port>
 *
 * Plain JavaScript with `node:` imports only (QEMU runs it outside any loader).
 */
import { connect } from 'node:net';

const [host, port] = process.argv.slice(2);
if (!host || !port) {
  process.stderr.write('usage: guest-forward.js <host> <port>\n');
  process.exit(2);
}
const sock = connect({ host, port: Number(port) });
sock.on('error', (err) => {
  process.stderr.write(`xenon guest-forward: ${host}:${port}: ${err.message}\n`);
  process.exit(1);
});
process.stdin.pipe(sock);
sock.pipe(process.stdout);
sock.on('close', () => process.exit(0));
process.stdin.on('end', () => sock.end());
