/** `node pageserver/main.ts`: the pageserver as a process. */
import { createLogger } from '../lib/logger.ts';
import { runMain } from '../lib/main.ts';
import { loadPageserverConfig, startPageserver } from './index.ts';

await runMain('pageserver', async () => {
  const config = loadPageserverConfig();
  const logger = createLogger({ level: config.logLevel, service: 'pageserver' });
  const ps = await startPageserver(config, { logger });
  return {
    logger,
    close: () => ps.close(),
    ready: { url: ps.url, port: ps.address.port, storage: config.storage, safekeepers: config.safekeepers.length },
    exitWithParent: config.exitWithParent,
  };
});
