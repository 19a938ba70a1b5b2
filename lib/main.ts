/**
 * The shared shape of every service's `main.ts`: start, print one `ready` JSON line on stdout
 * (what `xenon up` and e2e tests wait for), stop cleanly on SIGTERM/SIGINT, exit non-zero on a
 * startup failure with the reason on stderr.
 */
import type { Logger } from './logger.ts';

export interface Running {
  logger: Logger;
  close(): Promise<void>;
  ready: Record<string, unknown>;
  exitWithParent: boolean;
}

/**
 * `exitWithParent`: stop when stdin closes — set by `xenon up` (XENON_EXIT_WITH_PARENT=1) so that
 * its children stop rather than orphan computes when it dies.
 */
export async function runMain(service: string, start: () => Promise<Running>): Promise<void> {
  let running: Running;
  try {
    running = await start();
  } catch (err) {
    process.stderr.write(`${service}: failed to start: ${(err as Error).message}\n`);
    process.exit(1);
  }
  process.stdout.write(JSON.stringify({ ready: service, ...running.ready }) + '\n');
  let stopping = false;
  const stop = (signal: string): void => {
    if (stopping) return;
    stopping = true;
    running.logger.info('shutting down', { signal });
    const force = setTimeout(() => {
      running.logger.error('shutdown took too long; exiting');
      process.exit(1);
    }, 60_000);
    force.unref();
    running.close().then(
      () => process.exit(0),
      (err: Error) => {
        running.logger.error('shutdown failed', { err });
        process.exit(1);
      },
    );
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
  if (running.exitWithParent) {
    process.stdin.on('end', () => stop('parent exited'));
    process.stdin.on('error', () => stop('parent exited'));
    process.stdin.resume();
  }
}
