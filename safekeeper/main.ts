/** `node safekeeper/main.ts`: a safekeeper as a process. */
import { createLogger } from '../lib/logger.ts';
import { runMain } from '../lib/main.ts';
import { loadSafekeeperConfig, startSafekeeper } from './index.ts';

await runMain('safekeeper', async () => {
  const config = loadSafekeeperConfig();
  const logger = createLogger({ level: config.logLevel, service: 'safekeeper' }).child({ safekeeperId: config.id });
  const sk = await startSafekeeper(config, { logger });
  return { logger, close: () => sk.close(), ready: { url: sk.url, id: config.id, port: sk.address.port, data_dir: config.dataDir }, exitWithParent: config.exitWithParent };
});
