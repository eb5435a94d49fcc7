import cluster from 'node:cluster';
import type { Command } from 'commander';
import { addOptions, ConfigError } from '../config/options.js';
import { resolveServeConfig, serveOptionSpecs } from '../config/serve-config.js';
import { CONNECTION_REPORT_MS, ConnectionBalancer, isConnectionShareMessage } from '../processes/connection-balance.js';
import { isShutdownMessage, replicaIdOf, runSupervisor } from '../processes/supervisor.js';
import { createLogger, Gateway } from '../server/gateway.js';

export function registerServeCommand(program: Command): void {
  const cmd = program
    .command('serve')
    .description('Run the gateway in front of vLLM / SGLang workers')
    .addHelpText(
      'after',
      '\nEvery flag can also be set in the --config file (same name) or as KVGATE_<FLAG_IN_UPPER_SNAKE>.' +
        '\nWith --processes N above 1, a supervisor forks N serving processes that share the port (node:cluster, one' +
        '\nlistening socket; not SO_REUSEPORT), keeps their shares of client connections even (a process over its' +
        '\nshare answers Connection: close; --disable-connection-balance) and restarts any that dies; without' +
        '\n--replica-sync it starts a nats-server on 127.0.0.1 for them. See docs/operations.md.',
    );
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
    // The supervisor forks; its children (cluster workers) serve and never fork themselves.
    if (config.processes > 1 && cluster.isPrimary) {
      await runSupervisor(config, createLogger(config).child({ role: 'supervisor' }));
      return;
    }
    let stopping = false;
    let started = false;
    const replicaId = cluster.isWorker ? replicaIdOf(config) : undefined;
    // A terminal's Ctrl-C reaches the supervisor and this process both; the supervisor then also
    // asks for a drain over IPC. Whichever comes second is the same request, not a second signal.
    let echoOf: string | undefined;
    if (cluster.isWorker) {
      process.on('message', (m) => {
        if (!isShutdownMessage(m)) return;
        if (m.now) process.exit(0);
        if (stopping) return;
        if (!started) process.exit(0);
        echoOf = m.signal;
        setTimeout(() => (echoOf = undefined), 2000).unref();
        stop(m.signal);
      });
    }
    const g = new Gateway(config, replicaId ? { logger: createLogger(config).child({ replicaId }) } : {});
    try {
      await g.start();
      started = true;
    } catch (e) {
      process.stderr.write(`kvgate serve: cannot start: ${(e as Error).message}\n`);
      process.exit(1);
    }
    if (cluster.isWorker && g.httpServer && !config.disableConnectionBalance) {
      // --processes N: report this process's connections; shed its excess when the supervisor says it holds more than its share.
      const balancer = new ConnectionBalancer();
      balancer.attach(g.httpServer);
      setInterval(() => {
        if (process.connected) process.send?.(balancer.report());
      }, CONNECTION_REPORT_MS).unref();
      process.on('message', (m) => {
        if (isConnectionShareMessage(m)) balancer.onShare(m);
      });
    }
    g.log.info(
      {
        url: g.url,
        ...(g.metricsPort ? { metricsPort: g.metricsPort } : {}),
        policy: config.policy,
        workers: g.registry.all().map((w) => ({ id: w.id, model: w.modelId, healthy: w.healthy })),
        ...(cluster.isWorker ? { processIndex: Number(process.env.KVGATE_PROCESS_INDEX ?? cluster.worker!.id - 1) } : {}),
      },
      'kvgate listening',
    );
    function stop(signal: string) {
      if (stopping) {
        g.log.warn({ signal }, 'second signal: exiting now');
        process.exit(0);
      }
      stopping = true;
      g.log.info({ signal, inFlight: g.activeRequests, graceSecs: config!.shutdownGracePeriodSecs }, 'draining: refusing new requests, letting in-flight ones finish');
      void g.shutdown(config!.shutdownGracePeriodSecs * 1000).then((cut) => {
        g.log.info({ cut }, cut > 0 ? 'grace period over: cut the remaining requests' : 'all requests finished');
        process.exit(0);
      });
    }
    const onSignal = (signal: string) => {
      if (echoOf === signal) {
        echoOf = undefined;
        return;
      }
      stop(signal);
    };
    process.on('SIGINT', () => onSignal('SIGINT'));
    process.on('SIGTERM', () => onSignal('SIGTERM'));
  });
}
