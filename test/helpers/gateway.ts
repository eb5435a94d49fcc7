import { defaultServeConfig, type ServeConfig } from '../../src/config/serve-config.js';
import { SeededRng } from '../../src/core/rng.js';
import { Gateway } from '../../src/server/gateway.js';
import pino from 'pino';

/** Starts a gateway on an ephemeral loopback port with quiet logs and fast health checks. */
export async function startGateway(overrides: Partial<ServeConfig>): Promise<Gateway> {
  const config = defaultServeConfig({
    host: '127.0.0.1',
    port: 0,
    logLevel: 'silent',
    healthCheckIntervalSecs: 0.1,
    healthCheckTimeoutSecs: 1,
    ...overrides,
  });
  const gw = new Gateway(config, { rng: new SeededRng(7), logger: pino({ level: 'silent' }) });
  await gw.start();
  return gw;
}

export async function waitFor(cond: () => boolean, timeoutMs = 3000, what = 'condition'): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}
