import type { Command } from 'commander';
import { eppOptionSpecs, resolveEppConfig } from '../config/epp-config.js';
import { addOptions, ConfigError } from '../config/options.js';

export function registerEppCommand(program: Command): void {
  const cmd = program
    .command('epp')
    .description('Run as a Gateway API Inference Extension endpoint picker (Envoy ext_proc gRPC) with kvgate\'s policies')
    .addHelpText(
      'after',
      '\nEndpoints come from --worker-urls (and POST /workers) or, on Kubernetes, from --pool-name/--pool-namespace.' +
        '\nThe policy flags, KV events, engine metrics and tokenizers are those of `kvgate serve`.' +
        '\nEvery flag can also be set in the --config file (same name) or as KVGATE_<FLAG_IN_UPPER_SNAKE>. See docs/kubernetes.md.',
    );
  addOptions(cmd, eppOptionSpecs);
  cmd.action(async (opts: Record<string, unknown>) => {
    let config;
    try {
      config = resolveEppConfig(opts);
    } catch (e) {
      if (e instanceof ConfigError) {
        process.stderr.write(`kvgate epp: ${e.message}\n`);
        process.exit(2);
      }
      throw e;
    }
    // Loaded here, not at the top: the picker brings gRPC and the Kubernetes client, which every
    // other command (serve above all: each of its processes) would otherwise load and keep.
    const { EndpointPicker } = await import('../epp/endpoint-picker.js');
    const epp = new EndpointPicker(config);
    try {
      await epp.start();
    } catch (e) {
      process.stderr.write(`kvgate epp: cannot start: ${(e as Error).message}\n`);
      process.exit(1);
    }
    epp.log.info(
      {
        extProc: epp.address(epp.grpcPort),
        grpcHealth: epp.address(epp.healthPort),
        http: `http://${epp.address(epp.httpPort)}`,
        tls: !!config.tlsCertPath,
        policy: config.policy,
        pool: config.poolName ? `${config.poolNamespace}/${config.poolName}` : undefined,
        workers: epp.core.registry.all().map((w) => ({ id: w.id, model: w.modelId, healthy: w.healthy })),
      },
      'kvgate endpoint picker listening',
    );
    let stopping = false;
    const stop = (signal: string) => {
      if (stopping) process.exit(0);
      stopping = true;
      epp.log.info({ signal, streams: epp.activeStreams }, 'draining: readiness NOT_SERVING, letting open streams finish');
      void epp.shutdown(config.shutdownGracePeriodSecs * 1000).then((cut) => {
        epp.log.info({ cut }, 'stopped');
        process.exit(0);
      });
    };
    process.on('SIGINT', () => stop('SIGINT'));
    process.on('SIGTERM', () => stop('SIGTERM'));
  });
}
