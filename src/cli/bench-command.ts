import type { Command } from 'commander';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { addOptions, ConfigError, resolveOptions, type OptionSpec } from '../config/options.js';
import { engineConfigFrom, engineOptionSpecs } from '../config/engine-options.js';
import { serveOptionSpecs } from '../config/serve-config.js';
import { isPolicyName, POLICY_NAMES, type PolicyOptions } from '../policies/factory.js';
import { runBench, SLO_SEARCH_DEFAULTS } from '../lab/bench.js';
import type { MediumMode } from '../cache/block-index.js';
import { isPeerPolicy, PEER_POLICY_NAMES } from '../lab/peer-policies.js';
import { LAB_DEFAULTS } from '../lab/cluster.js';
import { PD_DEFAULTS } from '../lab/pd-cluster.js';
import { liveMarkdown, parseClasses, runLive } from '../lab/live.js';
import { loadWorkload } from '../lab/workloads/index.js';

const labPolicy = (p: string) => isPolicyName(p) || isPeerPolicy(p);

const policyFlags = [
  'cache-threshold',
  'balance-abs-threshold',
  'balance-rel-threshold',
  'eviction-interval-secs',
  'max-tree-size',
  'kv-overlap-weight',
  'slo-overlap-weight',
  'slo-hold-fraction',
  'kv-active-weight',
  'kv-history-weight',
  'kv-host-hit-weight',
  'kv-disk-hit-weight',
  'kv-events-mediums',
  'router-temperature',
  'window-secs',
  'engine-metrics-stale-secs',
];

const numberList = (what: string) => (v: string[]) => {
  for (const x of v) if (!(Number(x) > 0)) return `every ${what} must be a number > 0 (got '${x}')`;
  return undefined;
};

export const benchOptionSpecs: readonly OptionSpec[] = [
  { flag: 'config', kind: 'string', description: 'YAML or JSON file with any of these options', argName: 'path' },
  { flag: 'workload', kind: 'string', description: 'mooncake:PATH | azure:PATH | shared-prefix:k=v,... | multi-turn:... | toolbench-like:... | random:...', argName: 'spec' },
  { flag: 'workers', kind: 'int', description: 'Engines in the simulated cluster', default: 8, min: 1, max: 1024 },
  {
    flag: 'policies',
    kind: 'list',
    description: `Policies to compare (round_robin and the pooled LRU reference are always added); also the lab-only peer baselines ${PEER_POLICY_NAMES.join(', ')} (docs/lab.md)`,
    default: ['round_robin', 'random', 'power_of_two', 'least_load', 'cache_aware', 'kv_aware', 'prefix_load'],
    check: ((v: string[]) => v.find((p) => !labPolicy(p)) && `unknown policy '${v.find((p) => !labPolicy(p))}' (expected ${[...POLICY_NAMES, ...PEER_POLICY_NAMES].join(', ')})`) as never,
  },
  { flag: 'rate-scale', kind: 'number', description: 'Trace replay speed: arrivals compressed by this factor', default: 1, min: 0, exclusiveMin: true },
  { flag: 'rps', kind: 'number', description: 'Arrival rate for generated workloads (requests/s)', min: 0, exclusiveMin: true },
  { flag: 'sweep', kind: 'list', description: 'Run at each of these rates (rate scales for traces, rps for generators)', check: numberList('rate') as never },
  { flag: 'time-window', kind: 'string', description: 'START:END seconds of the trace to replay', check: ((v: string) => (/^\d+(\.\d+)?:\d+(\.\d+)?$/.test(v) && Number(v.split(':')[0]) < Number(v.split(':')[1]) ? undefined : 'expected START:END seconds with START < END')) as never },
  { flag: 'max-requests', kind: 'int', description: 'Replay at most this many requests', min: 1 },
  { flag: 'seed', kind: 'int', description: 'Seed of every random choice (same seed, same report)', default: 1, min: 0 },
  { flag: 'out', kind: 'string', description: 'Directory for report.json, report.md and the SVG charts', argName: 'dir' },
  { flag: 'quiet', kind: 'bool', description: 'No progress bar', default: false },
  { flag: 'live', kind: 'bool', description: 'Live mode: send the workload as real streaming requests to --target', default: false },
  { flag: 'target', kind: 'string', description: 'Live mode: base URL of kvgate or any OpenAI-compatible endpoint; several, comma-separated, are used in turn (a round-robin front over replicas)', argName: 'url' },
  { flag: 'concurrency', kind: 'int', description: 'Live mode: requests in flight at most', default: 64, min: 1 },
  { flag: 'duration-secs', kind: 'number', description: 'Live mode: stop sending after this many seconds', default: 60, min: 0, exclusiveMin: true },
  { flag: 'drain-secs', kind: 'number', description: 'Live mode: then wait this long for in-flight requests', default: 60, min: 0 },
  { flag: 'model', kind: 'string', description: "Live mode: model to request (default: the target's first model)" },
  { flag: 'api-key', kind: 'string', description: 'Live mode: sent as Authorization: Bearer' },
  { flag: 'classes', kind: 'string', description: 'Live mode: request classes, name=share[:priority=N][:ttft-ms=N][:tpot-ms=N],... (e.g. interactive=0.3:ttft-ms=1000,batch=0.7:priority=-1); reported per class', argName: 'spec' },
  { flag: 'route', kind: 'enum', description: 'Live mode: OpenAI route to use', default: 'completions', choices: ['completions', 'chat'] },
  { flag: 'prefill-workers', kind: 'int', description: 'PD rows: prefill engines of a prefill/decode-disaggregated cluster, run next to the --workers aggregated one (with --decode-workers)', min: 1, max: 1024 },
  { flag: 'decode-workers', kind: 'int', description: 'PD rows: decode engines (with --prefill-workers)', min: 1, max: 1024 },
  { flag: 'prefill-policy', kind: 'enum', description: 'PD rows: policy of the prefill pool (default: each policy under test)', choices: POLICY_NAMES },
  { flag: 'decode-policy', kind: 'enum', description: 'PD rows: policy of the decode pool (default: each policy under test)', choices: POLICY_NAMES },
  { flag: 'kv-transfer-ms-per-block', kind: 'number', description: 'PD rows: KV transfer time per KV block, prefill to decode (0.08 ms = a 2 MiB block at ~25 GB/s)', default: PD_DEFAULTS.transferMsPerBlock, min: 0 },
  { flag: 'router-replicas', kind: 'int', description: 'Router replicas behind a round-robin front (arrival i to replica i mod R), each with its own policy, loads and replica sync', default: LAB_DEFAULTS.routerReplicas, min: 1, max: 256 },
  {
    flag: 'replica-sync-delay-ms',
    kind: 'string',
    description: "Replica sync: peers' routing events and loads arrive this long after they happen (network + batching), or 'off' (replicas share nothing)",
    default: String(LAB_DEFAULTS.replicaSyncDelayMs),
    argName: 'ms|off',
    check: ((v: string) => (v === 'off' || (/^\d+(\.\d+)?$/.test(v) && Number(v) >= 0) ? undefined : `expected a number of ms >= 0 or 'off' (got '${v}')`)) as never,
  },
  { flag: 'ttft-slo-ms', kind: 'number', description: 'TTFT objective (ms): adds goodput columns (requests within it, their output tokens/s) and is slo_aware\'s default objective', min: 0, exclusiveMin: true },
  { flag: 'max-rate-at-slo', kind: 'bool', description: 'Also find, per policy, the highest rate at which --slo-attainment of the requests meet --ttft-slo-ms (doubling then bisection, from the first rate); table + report.json throughput_at_slo', default: false },
  { flag: 'slo-attainment', kind: 'number', description: 'Share of requests that must meet the objective for --max-rate-at-slo (0.9 = TTFT p90 within it)', default: SLO_SEARCH_DEFAULTS.attainment, min: 0, exclusiveMin: true, max: 1 },
  { flag: 'slo-search-precision', kind: 'number', description: '--max-rate-at-slo stops bisecting when the bracket is within this relative width', default: SLO_SEARCH_DEFAULTS.precision, min: 0.001, max: 1 },
  { flag: 'kv-event-delay-ms', kind: 'number', description: 'KV events reach the router this long after the engine step (kv_aware)', default: LAB_DEFAULTS.kvEventDelayMs, min: 0 },
  { flag: 'metrics-interval-ms', kind: 'number', description: 'Engine metrics are sampled this often (least_kv_cache, least_waiting)', default: LAB_DEFAULTS.metricsIntervalMs, min: 1 },
  { flag: 'metrics-delay-ms', kind: 'number', description: '...and seen by the router this long after sampling', default: LAB_DEFAULTS.metricsDelayMs, min: 0 },
  ...serveOptionSpecs.filter((s) => policyFlags.includes(s.flag)),
  ...engineOptionSpecs,
];

/** The policies' options from resolved bench options (also used by scripts/bench-replicas.mjs). */
export function benchPolicyOptions(o: Record<string, unknown>): PolicyOptions {
  return {
    cacheAware: {
      cacheThreshold: o.cacheThreshold as number,
      balanceAbsThreshold: o.balanceAbsThreshold as number,
      balanceRelThreshold: o.balanceRelThreshold as number,
      evictionIntervalSecs: o.evictionIntervalSecs as number,
      maxTreeSize: o.maxTreeSize as number,
    },
    kvAware: {
      overlapWeight: o.kvOverlapWeight as number,
      activeWeight: o.kvActiveWeight as number,
      historyWeight: o.kvHistoryWeight as number,
      temperature: o.routerTemperature as number,
      maxTreeSize: o.maxTreeSize as number,
      evictionIntervalSecs: o.evictionIntervalSecs as number,
    },
    prefixLoad: { windowSecs: o.windowSecs as number },
    engineLoad: { staleAfterMs: (o.engineMetricsStaleSecs as number) * 1000 },
    sloAware: { overlapWeight: o.sloOverlapWeight as number, holdFraction: o.sloHoldFraction as number, ...(o.ttftSloMs !== undefined ? { ttftSloMs: o.ttftSloMs as number } : {}) },
  };
}

const classesFrom = (spec: string) => {
  try {
    return parseClasses(spec);
  } catch (e) {
    throw new ConfigError((e as Error).message);
  }
};

const pdGiven0 = (o: Record<string, unknown>) => o.prefillWorkers !== undefined || o.decodeWorkers !== undefined;

let printer: ((label: string, fraction: number) => void) | undefined;
function progressPrinter(): (label: string, fraction: number) => void {
  if (printer) return printer;
  if (!process.stderr.isTTY) return () => undefined;
  let last = '';
  printer = (label, f) => {
    const width = 30;
    const filled = Math.round(f * width);
    const line = `${label.padEnd(28).slice(0, 28)} [${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${(100 * f).toFixed(0).padStart(3)}%`;
    if (line === last) return;
    last = line;
    process.stderr.write(`\r${line}${f >= 1 ? '\n' : ''}`);
  };
  return printer;
}

export function registerBenchCommand(program: Command): void {
  const cmd = program
    .command('bench')
    .description('Policy lab: replay a trace through every policy on a simulated cluster and report hit rate and latency')
    .addHelpText('after', '\nExample: npx kvgate bench --workload mooncake:traces/mooncake/synthetic_trace.jsonl --workers 8 --out bench-out');
  addOptions(cmd, benchOptionSpecs);
  cmd.action(async (cli: Record<string, unknown>) => {
    try {
      const o = resolveOptions(benchOptionSpecs, cli);
      if (!o.workload) throw new ConfigError('--workload is required (e.g. mooncake:PATH, shared-prefix:groups=8)');
      const spec = o.workload as string;
      const generated = !/^(mooncake|azure):/.test(spec);
      const rateKind = generated ? 'rps' : 'rate-scale';
      const sweep = (o.sweep as string[] | undefined)?.map(Number);
      const rates = sweep ?? [generated ? ((o.rps as number | undefined) ?? 0) : (o.rateScale as number)];
      const timeWindow = o.timeWindow ? ((o.timeWindow as string).split(':').map(Number) as [number, number]) : undefined;
      const policyOptions = benchPolicyOptions(o);
      const cacheAware = policyOptions.cacheAware!;
      const workloadAt = (rate: number, workloadSpec = spec) =>
        loadWorkload(workloadSpec, {
          seed: o.seed as number,
          rateScale: generated ? undefined : rate,
          rps: generated && rate > 0 ? rate : undefined,
          timeWindow,
          maxRequests: o.maxRequests as number | undefined,
        });
      if (o.classes && !o.live) throw new ConfigError('--classes applies to --live runs (the lab has no admission control)');
      if (o.live) {
        if (!o.target) throw new ConfigError('--live needs --target URL');
        if (sweep) throw new ConfigError('--sweep is not available with --live: run one rate per invocation');
        // A generated workload without n= or duration= lasts --duration-secs (its default n is
        // one round, which at the given rate can end long before the duration).
        const liveSpec = generated && !/(^|[:,])(n|duration)=/.test(spec) ? `${spec}${spec.includes(':') ? ',' : ':'}duration=${o.durationSecs as number}` : spec;
        const result = await runLive({
          target: o.target as string,
          workload: workloadAt(rates[0], liveSpec),
          model: o.model as string | undefined,
          concurrency: o.concurrency as number,
          durationSecs: o.durationSecs as number,
          drainSecs: o.drainSecs as number,
          route: o.route as 'completions' | 'chat',
          apiKey: o.apiKey as string | undefined,
          classes: o.classes ? classesFrom(o.classes as string) : undefined,
          progress: o.quiet ? undefined : (f) => progressPrinter()('live', f),
        });
        const md = liveMarkdown(result);
        process.stdout.write(md + '\n');
        if (o.out) {
          mkdirSync(o.out as string, { recursive: true });
          writeFileSync(join(o.out as string, 'live-report.json'), JSON.stringify(result, null, 2) + '\n');
          writeFileSync(join(o.out as string, 'live-report.md'), md + '\n');
          process.stdout.write(`\nwrote ${o.out}/live-report.json and live-report.md\n`);
        }
        return;
      }
      if (o.maxRateAtSlo && o.ttftSloMs === undefined) throw new ConfigError('--max-rate-at-slo needs --ttft-slo-ms');
      if (o.maxRateAtSlo && pdGiven0(o)) throw new ConfigError('--max-rate-at-slo searches aggregated clusters only: drop --prefill-workers/--decode-workers');
      const pdGiven = o.prefillWorkers !== undefined || o.decodeWorkers !== undefined;
      if (pdGiven && (o.prefillWorkers === undefined || o.decodeWorkers === undefined)) {
        throw new ConfigError('PD rows need both --prefill-workers and --decode-workers');
      }
      if (!pdGiven && (o.prefillPolicy !== undefined || o.decodePolicy !== undefined)) {
        throw new ConfigError('--prefill-policy and --decode-policy apply to PD rows: add --prefill-workers N --decode-workers M');
      }
      const pd = pdGiven
        ? {
            prefillWorkers: o.prefillWorkers as number,
            decodeWorkers: o.decodeWorkers as number,
            prefillPolicy: o.prefillPolicy as string | undefined,
            decodePolicy: o.decodePolicy as string | undefined,
            transferMsPerBlock: o.kvTransferMsPerBlock as number,
          }
        : undefined;
      const routerReplicas = o.routerReplicas as number;
      if (routerReplicas > 1 && pd) {
        throw new ConfigError('--router-replicas > 1 is not modelled with PD rows (--prefill-workers/--decode-workers) yet: run the PD rows with one router replica');
      }
      const syncFlag = String(o.replicaSyncDelayMs);
      const replicaSyncDelayMs = syncFlag === 'off' ? ('off' as const) : Number(syncFlag);
      const version = (JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string }).version;
      const { markdown } = await runBench(
        {
          workers: o.workers as number,
          pd,
          policies: o.policies as string[],
          policyOptions,
          lab: { kvEventDelayMs: o.kvEventDelayMs as number, metricsIntervalMs: o.metricsIntervalMs as number, metricsDelayMs: o.metricsDelayMs as number, kvMediums: o.kvEventsMediums as MediumMode },
          engine: engineConfigFrom(o),
          routerReplicas,
          replicaSyncDelayMs,
          seed: o.seed as number,
          rates,
          rateKind,
          workloadAt,
          out: o.out as string | undefined,
          progress: o.quiet ? undefined : progressPrinter(),
          ttftSloMs: o.ttftSloMs as number | undefined,
          maxRateAtSlo: o.maxRateAtSlo ? { ...SLO_SEARCH_DEFAULTS, attainment: o.sloAttainment as number, precision: o.sloSearchPrecision as number } : undefined,
        },
        version,
      );
      process.stdout.write(markdown + '\n');
      if (o.out) process.stdout.write(`\nwrote ${o.out}/report.json, report.md and SVG charts\n`);
    } catch (e) {
      if (e instanceof ConfigError || (e as Error).name === 'WorkloadError') {
        process.stderr.write(`kvgate bench: ${(e as Error).message}\n`);
        process.exit(2);
      }
      throw e;
    }
  });
}
