import type { Command } from 'commander';
import { engineConfigFrom, engineOptionSpecs } from '../config/engine-options.js';
import { addOptions, ConfigError, resolveOptions, type OptionSpec } from '../config/options.js';
import { DEFAULT_COST_MODEL, type CostModelConfig } from '../engine/cost-model.js';
import {
  DEFAULT_BOOTSTRAP_PORT,
  DEFAULT_KV_SIDE_CHANNEL_PORT,
  DEFAULT_PD_TRANSFER_TIMEOUT_SECS,
  type PdOptions,
  type PdProtocol,
  type PdRole,
} from '../sim/pd.js';
import { DEFAULT_FAULTS, startSimServer, type FaultOptions, type SimServerOptions } from '../sim/server.js';
import { publisherShouldBind } from '../sim/kv-publisher.js';

/**
 * `kvgate sim`: run simulated vLLM engines behind an OpenAI/vLLM/SGLang-compatible HTTP API.
 * See docs/simulator.md. Every flag is validated here; a bad value is reported with its name. Flags may also come from
 * a --config file or KVGATE_SIM_<FLAG> environment variables.
 */

const ENV_PREFIX = 'KVGATE_SIM_';

export const SIM_FLAGS: readonly OptionSpec[] = [
  { flag: 'config', kind: 'string', description: 'YAML or JSON file with any of these options', argName: 'path' },
  { flag: 'host', kind: 'string', default: '0.0.0.0', description: 'Address to listen on' },
  { flag: 'port', kind: 'int', default: 8000, min: 0, max: 65535, description: 'Port to listen on (0 = ephemeral)' },
  { flag: 'model', kind: 'string', default: 'kvgate-sim', description: 'Served model name' },
  ...engineOptionSpecs,
  { flag: 'default-max-tokens', kind: 'int', default: 256, min: 1, description: 'max_tokens when a request gives none' },
  { flag: 'speed', kind: 'number', default: 1, min: 0, exclusiveMin: true, description: 'Run simulated time this many times faster than real time' },
  { flag: 'tokenizer', kind: 'string', description: 'Hugging Face tokenizer.json (or its directory, with tokenizer_config.json for the chat template)' },
  { flag: 'data-parallel-size', kind: 'int', default: 1, min: 1, max: 1024, description: 'Independent engines (DP ranks) behind the port' },
  { flag: 'seed', kind: 'int', min: 0, description: 'Seed for generated tokens and fault dice (default: random)' },
  { flag: 'kv-events-endpoint', kind: 'string', description: 'ZMQ PUB endpoint of rank 0 for KV events, e.g. tcp://*:5557 (rank r: port + r)' },
  { flag: 'kv-events-replay-endpoint', kind: 'string', description: 'ZMQ ROUTER endpoint of rank 0 for KV event replay (rank r: port + r)' },
  { flag: 'kv-events-format', kind: 'enum', default: 'array', choices: ['array', 'map'], description: 'KV event encoding: array (vLLM <= 0.23) or map (vLLM >= 0.24)' },
  { flag: 'kv-events-topic', kind: 'string', default: '', description: 'ZMQ topic frame of KV event messages' },
  { flag: 'pd-role', kind: 'enum', default: 'none', choices: ['none', 'prefill', 'decode'], description: 'Prefill/decode disaggregation role (none = regular engine)' },
  { flag: 'pd-protocol', kind: 'enum', default: 'sglang', choices: ['sglang', 'vllm'], description: 'PD hand-off protocol: sglang (bootstrap_room) or vllm (kv_transfer_params)' },
  { flag: 'bootstrap-port', kind: 'int', default: DEFAULT_BOOTSTRAP_PORT, min: 0, max: 65535, description: 'SGLang PD prefill: bootstrap (KV side-channel) server port (0 = ephemeral)' },
  { flag: 'kv-side-channel-port', kind: 'int', default: DEFAULT_KV_SIDE_CHANNEL_PORT, min: 0, max: 65535, description: 'vLLM PD prefill: KV side-channel server port (0 = ephemeral)' },
  { flag: 'kv-side-channel-host', kind: 'string', description: 'vLLM PD prefill: host announced as kv_transfer_params.remote_host (default: --host, or 127.0.0.1 when --host is a wildcard)' },
  {
    flag: 'kv-transfer-ms-per-block',
    kind: 'number',
    min: 0,
    description: 'PD decode: simulated KV transfer time per block in ms (default: block-size x 128 KiB over 25 GB/s = 0.0839 ms for 16-token blocks)',
  },
  { flag: 'pd-transfer-timeout-secs', kind: 'number', default: DEFAULT_PD_TRANSFER_TIMEOUT_SECS, min: 0, exclusiveMin: true, description: 'PD decode: give up on a KV hand-off after this many (simulated) seconds' },
  { flag: 'fail-rate', kind: 'number', default: DEFAULT_FAULTS.failRate, min: 0, max: 1, description: 'Fault: probability a generation request fails with --fail-status' },
  { flag: 'fail-first-n', kind: 'int', default: DEFAULT_FAULTS.failFirstN, min: 0, description: 'Fault: the first N generation requests fail with --fail-status' },
  { flag: 'fail-status', kind: 'int', default: DEFAULT_FAULTS.failStatus, min: 400, max: 599, description: 'Fault: HTTP status of injected failures' },
  { flag: 'hang-rate', kind: 'number', default: DEFAULT_FAULTS.hangRate, min: 0, max: 1, description: 'Fault: probability a generation request is never answered' },
  { flag: 'crash-after-requests', kind: 'int', default: DEFAULT_FAULTS.crashAfterRequests, min: 0, description: 'Fault: exit after N generation requests (0 = never)' },
  { flag: 'slow-factor', kind: 'number', default: DEFAULT_COST_MODEL.slowFactor, min: 0, exclusiveMin: true, description: 'Fault: multiply every step duration (engine appears slower)' },
  { flag: 'startup-delay-secs', kind: 'number', default: DEFAULT_FAULTS.startupDelaySecs, min: 0, description: 'Fault: /health is 503 and generation refused for this long after start' },
];

/**
 * Turn parsed commander options (camelCase keys, string values) into server options.
 * Throws SimFlagError naming the flag on any invalid value.
 */
export function resolveSimOptions(raw: Record<string, unknown>, env: NodeJS.ProcessEnv = {}): SimServerOptions {
  const v = resolveOptions(SIM_FLAGS, raw, env, ENV_PREFIX);
  const num = (k: string) => v[k] as number;
  const str = (k: string) => v[k] as string | undefined;
  if (!str('kvEventsEndpoint') && str('kvEventsReplayEndpoint')) {
    throw new ConfigError('invalid value for --kv-events-replay-endpoint: requires --kv-events-endpoint');
  }
  for (const k of ['kvEventsEndpoint', 'kvEventsReplayEndpoint'] as const) {
    const ep = str(k);
    if (ep !== undefined && !/^(tcp|ipc|inproc):\/\/.+/.test(ep)) {
      throw new ConfigError(`invalid value for --${k === 'kvEventsEndpoint' ? 'kv-events-endpoint' : 'kv-events-replay-endpoint'}: expected tcp://host:port, ipc://path or inproc://name (got ${JSON.stringify(ep)})`);
    }
  }
  if (num('dataParallelSize') > 1) {
    for (const k of ['kvEventsEndpoint', 'kvEventsReplayEndpoint'] as const) {
      const ep = str(k);
      if (ep !== undefined && !/^(tcp:\/\/.+:\d+|inproc:\/\/.+)$/.test(ep)) {
        throw new ConfigError(
          `invalid value for --${k === 'kvEventsEndpoint' ? 'kv-events-endpoint' : 'kv-events-replay-endpoint'}: with --data-parallel-size > 1 it must be tcp://host:port or inproc://name (got ${JSON.stringify(ep)})`,
        );
      }
    }
  }
  if (num('blockSize') > num('maxModelLen')) throw new ConfigError('invalid value for --block-size: larger than --max-model-len');
  const engine = engineConfigFrom(v);
  const costOpts: CostModelConfig = { ...DEFAULT_COST_MODEL, ...engine.cost, slowFactor: num('slowFactor') };
  const faults: FaultOptions = {
    failRate: num('failRate'),
    failFirstN: num('failFirstN'),
    failStatus: num('failStatus'),
    hangRate: num('hangRate'),
    crashAfterRequests: num('crashAfterRequests'),
    startupDelaySecs: num('startupDelaySecs'),
  };
  const kvEndpoint = str('kvEventsEndpoint');
  const role = str('pdRole');
  const pd: PdOptions | undefined =
    role === 'prefill' || role === 'decode'
      ? {
          role: role as PdRole,
          protocol: str('pdProtocol') as PdProtocol,
          bootstrapPort: num('bootstrapPort'),
          kvSideChannelPort: num('kvSideChannelPort'),
          kvSideChannelHost: str('kvSideChannelHost'),
          kvTransferMsPerBlock: v['kvTransferMsPerBlock'] as number | undefined,
          transferTimeoutSecs: num('pdTransferTimeoutSecs'),
        }
      : undefined;
  return {
    host: str('host'),
    port: num('port'),
    model: str('model'),
    blockSize: engine.blockSize,
    numGpuBlocks: engine.numGpuBlocks,
    cpuOffloadBlocks: engine.cpuOffloadBlocks,
    maxNumSeqs: engine.maxNumSeqs,
    maxNumBatchedTokens: engine.maxNumBatchedTokens,
    maxModelLen: engine.maxModelLen,
    defaultMaxTokens: num('defaultMaxTokens'),
    cost: costOpts,
    speed: num('speed'),
    tokenizer: str('tokenizer'),
    dataParallelSize: num('dataParallelSize'),
    seed: v['seed'] as number | undefined,
    kvEvents: kvEndpoint
      ? {
          endpoint: kvEndpoint,
          replayEndpoint: str('kvEventsReplayEndpoint'),
          format: str('kvEventsFormat') as 'array' | 'map',
          topic: str('kvEventsTopic'),
        }
      : undefined,
    pd,
    faults,
  };
}

export function registerSimCommand(program: Command): Command {
  const cmd = program
    .command('sim')
    .description('Run simulated vLLM engines (paged KV cache, prefix caching, continuous batching) behind a vLLM/SGLang-compatible HTTP API');
  addOptions(cmd, SIM_FLAGS, ENV_PREFIX);
  cmd.action(async (raw: Record<string, unknown>) => {
    let options: SimServerOptions;
    try {
      options = resolveSimOptions(raw, process.env);
    } catch (e) {
      if (e instanceof ConfigError) {
        process.stderr.write(`kvgate sim: ${e.message}\n`);
        process.exit(2);
      }
      throw e;
    }
    const log = (msg: string): void => {
      process.stderr.write(`kvgate sim: ${msg}\n`);
    };
    let server;
    try {
      server = await startSimServer({ ...options, log, onCrash: () => setImmediate(() => process.exit(1)) });
    } catch (e) {
      log(`cannot start: ${(e as Error).message}`);
      process.exit(1);
    }
    const c = server.engines[0]!.engine.config;
    log(
      `listening on ${server.url} (port ${server.port}) model=${server.model} dp=${server.engines.length} ` +
        `blocks=${c.numGpuBlocks}x${c.blockSize}${c.cpuOffloadBlocks > 0 ? ` cpu-offload-blocks=${c.cpuOffloadBlocks}` : ''} max-num-seqs=${c.maxNumSeqs} max-num-batched-tokens=${c.maxNumBatchedTokens} ` +
        `speed=${options.speed} tokenizer=${server.tokenizer.name}` +
        (options.kvEvents ? ` kv-events=${server.engines.map((h) => h.publisher?.boundEndpoint).join(',')}` : '') +
        (server.pd
          ? ` pd-role=${server.pd.role} pd-protocol=${server.pd.protocol}` +
            (server.pd.sideChannelPort !== null
              ? ` ${server.pd.protocol === 'sglang' ? 'bootstrap-port' : 'kv-side-channel-port'}=${server.pd.sideChannelPort}`
              : ` kv-transfer-ms-per-block=${server.pd.kvTransferMsPerBlock}`)
          : ''),
    );
    // Say which side of the ZMQ pair the publisher is (vLLM's rule): a router must take the other.
    for (const [rank, h] of server.engines.entries()) {
      const pub = h.publisher;
      if (!pub) continue;
      const who = server.engines.length > 1 ? `KV events (rank ${rank})` : 'KV events';
      if (publisherShouldBind(pub.endpoint)) {
        log(`${who}: publisher BINDS ${pub.boundEndpoint ?? pub.endpoint}; a router CONNECTS to it (kvgate serve --kv-events-endpoints tcp://<this host>:<port>)`);
      } else {
        log(`${who}: publisher CONNECTS to ${pub.endpoint}; something must BIND there (kvgate serve --kv-events-bind ${pub.endpoint.replace(/^tcp:\/\/[^:]+:/, 'tcp://*:')}), or no event arrives`);
      }
    }
    let stopping = false;
    const stop = (signal: string): void => {
      if (stopping) return;
      stopping = true;
      log(`${signal}: shutting down`);
      void server.close().then(() => process.exit(0));
    };
    process.on('SIGINT', () => stop('SIGINT'));
    process.on('SIGTERM', () => stop('SIGTERM'));
  });
  return cmd;
}
