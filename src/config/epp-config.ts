import { ConfigError, resolveOptions, type OptionSpec } from './options.js';
import { resolveServeConfig, resolveTracesEndpoint, serveOptionSpecs, type ServeConfig } from './serve-config.js';

/** `kvgate epp`: the serve options that apply to an endpoint picker, plus its own. */
export interface EppConfig extends ServeConfig {
  grpcPort: number;
  grpcHealthPort: number;
  poolName: string | undefined;
  poolNamespace: string;
  poolGroup: string;
  fallbackEndpoints: number;
  conformanceTestHooks: boolean;
}

/**
 * Serve flags that mean nothing when Envoy, not kvgate, proxies the request: retries (the
 * gateway retries down the fallback list), client API keys and rate limits (the gateway's job),
 * upstream timeouts, and prefill/decode disaggregation (not in the GIE protocol).
 */
const SERVE_ONLY = new Set([
  'retry-max-retries',
  'retry-initial-backoff-ms',
  'retry-max-backoff-ms',
  'retry-backoff-multiplier',
  'retry-jitter-factor',
  'disable-retries',
  'api-key',
  'api-key-file',
  'api-key-rate-limit-rps',
  'connect-timeout-secs',
  'first-byte-timeout-secs',
  'stream-idle-timeout-secs',
  'max-header-size',
  'pd-disaggregation',
  'prefill',
  'decode',
  'prefill-policy',
  'decode-policy',
  'pd-protocol',
]);

/** Serve flags whose meaning shifts in EPP mode (same name and kind, other default or text). */
const OVERRIDES: Record<string, Partial<OptionSpec>> = {
  port: { description: 'Port of the HTTP admin and metrics server (/health, /readiness, /metrics, /workers; 0 = any free port)', default: 9090 },
  host: { description: 'Address the HTTP admin server and both gRPC servers listen on' },
  'tls-cert-path': { description: 'TLS certificate (PEM) for the ext_proc gRPC server (plaintext without it)' },
  'tls-key-path': { description: 'TLS private key (PEM) for the ext_proc gRPC server' },
  'request-timeout-secs': { description: 'Longest a picked request holds load on its endpoint when the gateway never reports its end' },
  'max-payload-size': { description: 'Largest request body the picker reads, in bytes (ImmediateResponse 413 above)' },
  'max-concurrent-requests': { description: 'Requests picked and not yet finished at once (0 = no limit; ImmediateResponse 429 when the queue is full)' },
};

const EPP_SPECS: OptionSpec[] = [
  { flag: 'grpc-port', kind: 'int', description: 'Port of the Envoy ext_proc gRPC server (0 = any free port)', default: 9002, min: 0, max: 65535 },
  { flag: 'grpc-health-port', kind: 'int', description: 'Port of the gRPC health server (services "", liveness, readiness, envoy.service.ext_proc.v3.ExternalProcessor)', default: 9003, min: 0, max: 65535 },
  { flag: 'pool-name', kind: 'string', description: 'InferencePool whose selector and targetPorts define the endpoints (Kubernetes)', argName: 'name' },
  { flag: 'pool-namespace', kind: 'string', description: 'Namespace of --pool-name', default: 'default', argName: 'namespace' },
  { flag: 'pool-group', kind: 'enum', description: 'API group of the InferencePool (v1)', default: 'inference.networking.k8s.io', choices: ['inference.networking.k8s.io'] },
  { flag: 'fallback-endpoints', kind: 'int', description: 'Next-best endpoints listed after the chosen one in x-gateway-destination-endpoint (the gateway tries them in order)', default: 2, min: 0, max: 16 },
  { flag: 'conformance-test-hooks', kind: 'bool', description: 'Honour the GIE conformance hooks: test-epp-endpoint-selection request header, X-Echo-Set-Header and x-conformance-test-served-endpoint (tests only)', default: false },
];

export const eppOptionSpecs: readonly OptionSpec[] = [
  ...serveOptionSpecs.filter((s) => !SERVE_ONLY.has(s.flag)).map((s) => (OVERRIDES[s.flag] ? { ...s, ...OVERRIDES[s.flag] } : s)),
  ...EPP_SPECS,
];

export function resolveEppConfig(cli: Record<string, unknown>, env: NodeJS.ProcessEnv = process.env): EppConfig {
  const o = resolveOptions(eppOptionSpecs, cli, env);
  delete o.config;
  // The shared options go through serve's own checks (URLs, KV-event endpoint counts, TLS pair),
  // already resolved, so serve defaults fill the flags that do not apply.
  const shared: Record<string, unknown> = {};
  for (const s of serveOptionSpecs) if (s.flag !== 'config' && !SERVE_ONLY.has(s.flag)) shared[camelOf(s.flag)] = o[camelOf(s.flag)];
  const serve = resolveServeConfig(shared, {});
  const out: EppConfig = {
    ...serve,
    grpcPort: o.grpcPort as number,
    grpcHealthPort: o.grpcHealthPort as number,
    poolName: o.poolName as string | undefined,
    poolNamespace: o.poolNamespace as string,
    poolGroup: o.poolGroup as string,
    fallbackEndpoints: o.fallbackEndpoints as number,
    conformanceTestHooks: o.conformanceTestHooks as boolean,
  };
  out.otlpTracesEndpoint = resolveTracesEndpoint(out.otlpTracesEndpoint, env);
  if (out.poolName !== undefined && !/^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$/.test(out.poolName)) {
    throw new ConfigError(`invalid value for --pool-name: '${out.poolName}' is not a Kubernetes object name`);
  }
  return out;
}

function camelOf(flag: string): string {
  return flag.replace(/-([a-z0-9])/g, (_, c: string) => c.toUpperCase());
}

/** Defaults, for programmatic use (tests). */
export function defaultEppConfig(overrides: Partial<EppConfig> = {}): EppConfig {
  return { ...resolveEppConfig({}, {}), ...overrides };
}
