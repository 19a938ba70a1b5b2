/** `node proxy/main.ts`: the proxy as a process. */
import { createLogger } from '../lib/logger.ts';
import { runMain } from '../lib/main.ts';
import { loadProxyConfig, startProxy } from './index.ts';

await runMain('proxy', async () => {
  const config = loadProxyConfig();
  const logger = createLogger({ level: config.logLevel, service: 'proxy' });
  const proxy = await startProxy(config, { logger });
  return { logger, close: () => proxy.close(), ready: { port: proxy.address.port, http_port: proxy.httpAddress.port, metrics: proxy.metricsUrl }, exitWithParent: config.exitWithParent };
});
