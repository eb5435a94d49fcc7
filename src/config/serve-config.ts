import { normalizeUrl } from '../core/worker.js';
import { POLICY_NAMES } from '../policies/factory.js';
import { resolveOptions, type OptionSpec } from './options.js';

export interface ServeConfig {
  host: string;
  port: number;
  workerUrls: string[];
  modelId: string | undefined;
  policy: string;
  cacheThreshold: number;
  balanceAbsThreshold: number;
  balanceRelThreshold: number;
  evictionIntervalSecs: number;
  maxTreeSize: number;
  healthCheckIntervalSecs: number;
  healthFailureThreshold: number;
  healthSuccessThreshold: number;
  healthCheckTimeoutSecs: number;
  healthCheckEndpoint: string;
  requestTimeoutSecs: number;
  maxPayloadSize: number;
  logLevel: string;
  logFormat: 'json' | 'pretty';
}

const checkUrls = (urls: string[]): string | undefined => {
  for (const u of urls) {
    try {
      normalizeUrl(u);
    } catch (e) {
      return (e as Error).message;
    }
  }
  const seen = new Set(urls.map((u) => normalizeUrl(u)));
  if (seen.size !== urls.length) return 'the same worker URL is listed twice';
  return undefined;
};

export const serveOptionSpecs: readonly OptionSpec[] = [
  { flag: 'config', kind: 'string', description: 'YAML or JSON file with any of these options (keys as flag names)', argName: 'path' },
  { flag: 'host', kind: 'string', description: 'Address to listen on', default: '0.0.0.0' },
  { flag: 'port', kind: 'int', description: 'Port to listen on (0 = any free port)', default: 30000, min: 0, max: 65535 },
  { flag: 'worker-urls', kind: 'list', description: 'Engine base URLs (vLLM or SGLang OpenAI servers)', default: [], argName: 'url...', check: checkUrls as never },
  { flag: 'model-id', kind: 'string', description: "Model id for --worker-urls workers instead of asking each worker's /v1/models" },
  { flag: 'policy', kind: 'enum', description: 'Routing policy', default: 'cache_aware', choices: POLICY_NAMES },
  { flag: 'cache-threshold', kind: 'number', description: 'cache_aware: minimum matched/total prefix ratio for affinity', default: 0.3, min: 0, max: 1 },
  { flag: 'balance-abs-threshold', kind: 'int', description: 'cache_aware: in-flight difference (max-min) above which load wins over affinity', default: 64, min: 0 },
  { flag: 'balance-rel-threshold', kind: 'number', description: 'cache_aware: ...and max must exceed this multiple of min', default: 1.5, min: 1 },
  { flag: 'eviction-interval-secs', kind: 'number', description: 'cache_aware: seconds between tree eviction passes (0 = never)', default: 120, min: 0 },
  { flag: 'max-tree-size', kind: 'int', description: 'cache_aware: characters kept in the tree per worker', default: 67108864, min: 0 },
  { flag: 'health-check-interval-secs', kind: 'number', description: 'Seconds between health checks of each worker', default: 10, min: 0, exclusiveMin: true },
  { flag: 'health-failure-threshold', kind: 'int', description: 'Consecutive failed checks before a worker is marked unhealthy', default: 3, min: 1 },
  { flag: 'health-success-threshold', kind: 'int', description: 'Consecutive passed checks before an unhealthy worker is used again', default: 2, min: 1 },
  { flag: 'health-check-timeout-secs', kind: 'number', description: 'Timeout of one health check', default: 5, min: 0, exclusiveMin: true },
  { flag: 'health-check-endpoint', kind: 'string', description: 'Path polled on each worker', default: '/health', check: ((p: string) => (p.startsWith('/') ? undefined : 'must start with /')) as never },
  { flag: 'request-timeout-secs', kind: 'number', description: 'Longest a request may take end to end before the worker is abandoned (504)', default: 1800, min: 0, exclusiveMin: true },
  { flag: 'max-payload-size', kind: 'int', description: 'Largest request body accepted, in bytes (413 above)', default: 536870912, min: 1 },
  { flag: 'log-level', kind: 'enum', description: 'Log level', default: 'info', choices: ['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent'] },
  { flag: 'log-format', kind: 'enum', description: 'Log format', default: 'json', choices: ['json', 'pretty'] },
];

export function resolveServeConfig(cli: Record<string, unknown>, env: NodeJS.ProcessEnv = process.env): ServeConfig {
  const o = resolveOptions(serveOptionSpecs, cli, env) as unknown as ServeConfig & { config?: string };
  delete o.config;
  o.workerUrls = o.workerUrls.map((u) => normalizeUrl(u));
  return o;
}

/** Defaults, for programmatic use (tests, demo, lab). */
export function defaultServeConfig(overrides: Partial<ServeConfig> = {}): ServeConfig {
  return { ...resolveServeConfig({}, {}), ...overrides };
}
