/** Data directories as tar streams (images for the pageserver), with the system `tar`. */
import { spawn } from 'node:child_process';
import { PassThrough, type Readable } from 'node:stream';

/**
 * `tar -c` of `dir` (entries relative to it), without the files of a running postmaster. The
 * returned stream fails ('error') when tar exits non-zero, with tar's own words.
 */
export function tarDirectory(dir: string): Readable {
  const out = new PassThrough();
  const child = spawn('tar', ['-c', '-C', dir, '--exclude=./postmaster.pid', '--exclude=./postmaster.opts', '.'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => { stderr = (stderr + d.toString()).slice(-2000); });
  child.stdout.pipe(out, { end: false });
  child.on('error', (err) => out.destroy(err));
  child.on('close', (code) => {
    if (code === 0) out.end();
    else out.destroy(new Error(`tar -c ${dir} exited with ${code}: ${stderr.trim()}`));
  });
  return out;
}
