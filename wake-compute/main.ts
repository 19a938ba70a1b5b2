/** `node wake-compute/main.ts`: the control plane as a process. SIGTERM/SIGINT stop every compute cleanly. */
import { createLogger } from '../lib/logger.ts';
import { loadControlPlaneConfig, startControlPlane } from './index.ts';
import { runMain } from '../lib/main.ts';

await runMain('wake-compute', async () => {
  const config = loadControlPlaneConfig();
  const logger = createLogger({ level: config.logLevel, service: 'wake-compute' });
  const cp = await startControlPlane(config, { logger });
  return { logger, close: () => cp.close(), ready: { url: cp.url }, exitWithParent: config.exitWithParent };
});
