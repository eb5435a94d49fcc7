import type { Command } from 'commander';
import { addOptions, ConfigError } from '../config/options.js';
import { resolveServeConfig, serveOptionSpecs } from '../config/serve-config.js';
import { Gateway } from '../server/gateway.js';

export function registerServeCommand(program: Command): void {
  const cmd = program
    .command('serve')
    .description('Run the gateway in front of vLLM / SGLang workers')
    .addHelpText('after', '\nEvery flag can also be set in the --config file (same name) or as KVGATE_<FLAG_IN_UPPER_SNAKE>.');
  addOptions(cmd, serveOptionSpecs);
  cmd.action(async (opts: Record<string, unknown>) => {
    let config;
    try {
      config = resolveServeConfig(opts);
    } catch (e) {
      if (e instanceof ConfigError) {
        process.stderr.write(`kvgate serve: ${e.message}\n`);
        process.exit(2);
      }
      throw e;
    }
    const gateway = new Gateway(config);
    try {
      await gateway.start();
    } catch (e) {
      process.stderr.write(`kvgate serve: cannot start: ${(e as Error).message}\n`);
      process.exit(1);
    }
    gateway.log.info(
      { url: gateway.url, ...(gateway.metricsPort ? { metricsPort: gateway.metricsPort } : {}), policy: config.policy, workers: gateway.registry.all().map((w) => ({ id: w.id, model: w.modelId, healthy: w.healthy })) },
      'kvgate listening',
    );
    let stopping = false;
    const stop = (signal: string) => {
      if (stopping) {
        gateway.log.warn({ signal }, 'second signal: exiting now');
        process.exit(0);
      }
      stopping = true;
      gateway.log.info({ signal, inFlight: gateway.activeRequests, graceSecs: config.shutdownGracePeriodSecs }, 'draining: refusing new requests, letting in-flight ones finish');
      void gateway.shutdown(config.shutdownGracePeriodSecs * 1000).then((cut) => {
        gateway.log.info({ cut }, cut > 0 ? 'grace period over: cut the remaining requests' : 'all requests finished');
        process.exit(0);
      });
    };
    process.on('SIGINT', () => stop('SIGINT'));
    process.on('SIGTERM', () => stop('SIGTERM'));
  });
}
