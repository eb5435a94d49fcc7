import { availableParallelism } from 'node:os';
import { normalizeUrl } from '../core/worker.js';
import { parseModelIdFrom, parseSelector } from '../discovery/pods.js';
import { POLICY_NAMES } from '../policies/factory.js';
import { camel, ConfigError, resolveOptions, type OptionSpec } from './options.js';

export interface ServeConfig {
  host: string;
  port: number;
  workerUrls: string[];
  modelId: string | undefined;
  strictModel: boolean;
  sessionAffinityHeader: string | undefined;
  sessionAffinityTtlSecs: number;
  forwardHeaders: string[];
  caCertPaths: string[];
  clientCertPath: string | undefined;
  clientKeyPath: string | undefined;
  cbWindowDurationSecs: number;
  workerStartupCheckInterval: number;
  prometheusPort: number | undefined;
  prometheusHost: string;
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
  // Observability
  explainDecisions: boolean;
  decisionLogSampleRate: number;
  otlpTracesEndpoint: string | undefined;
  // Reliability
  retryMaxRetries: number;
  retryInitialBackoffMs: number;
  retryMaxBackoffMs: number;
  retryBackoffMultiplier: number;
  retryJitterFactor: number;
  disableRetries: boolean;
  cbFailureThreshold: number;
  cbSuccessThreshold: number;
  cbTimeoutDurationSecs: number;
  disableCircuitBreaker: boolean;
  maxConcurrentRequests: number;
  queueSize: number;
  queueTimeoutSecs: number;
  apiKeyRateLimitRps: number;
  apiKeyTokenLimitPerMin: number;
  /** slo_aware's default objectives (ms) of requests without x-slo-ttft-ms / x-slo-tpot-ms. */
  ttftSloMs: number | undefined;
  tpotSloMs: number | undefined;
  /** API key → priority class (`KEY=N`); requests of other keys have priority 0 unless x-kvgate-priority says. */
  apiKeyPriority: string[];
  /** Header whose value is the fairness key of the admission queue (default: the API key, else the client address). */
  fairnessHeader: string | undefined;
  connectTimeoutSecs: number;
  firstByteTimeoutSecs: number;
  streamIdleTimeoutSecs: number;
  workerStartupTimeoutSecs: number;
  shutdownGracePeriodSecs: number;
  // Security and input limits
  apiKey: string[];
  apiKeyFile: string | undefined;
  adminApiKey: string | undefined;
  allowRemoteAdmin: boolean;
  workerApiKey: string | undefined;
  tlsCertPath: string | undefined;
  tlsKeyPath: string | undefined;
  maxJsonDepth: number;
  maxHeaderSize: number;
  // KV events, tokenizers, data parallelism, engine metrics
  kvEventsEndpoints: string[];
  kvEventsReplayEndpoints: string[];
  kvEventsBind: string | undefined;
  kvEventsMediums: 'gpu-only' | 'separate';
  kvEventsStaleSecs: number;
  kvIndexMaxBlocks: number;
  kvOverlapWeight: number;
  sloOverlapWeight: number;
  sloHoldFraction: number;
  kvActiveWeight: number;
  kvHistoryWeight: number;
  kvHostHitWeight: number;
  kvDiskHitWeight: number;
  routerTemperature: number;
  tokenizer: string[];
  tokenizeThreads: number;
  tokenizeNice: number;
  v8ConcurrentMarking: 'auto' | 'on' | 'off';
  tokenizerWordCache: number;
  maxRoutingMs: number;
  maxTokenizeChars: number;
  inlineTokenizeChars: number;
  shortTokenizeChars: number;
  parseOffLoopBytes: number;
  maxConnectionsPerWorker: number | undefined;
  dpAware: boolean;
  dpSize: number | undefined;
  engineMetricsIntervalSecs: number;
  engineMetricsStaleSecs: number;
  windowSecs: number;
  // Prefill/decode disaggregation
  pdDisaggregation: boolean;
  prefill: Array<{ url: string; bootstrapPort: number | null }>;
  decode: string[];
  prefillPolicy: string | undefined;
  decodePolicy: string | undefined;
  pdProtocol: 'sglang' | 'vllm';
  // Replica sync
  replicaSync: string | undefined;
  replicaId: string | undefined;
  replicaSyncSubject: string;
  replicaSyncUser: string | undefined;
  replicaSyncPassword: string | undefined;
  replicaSyncToken: string | undefined;
  replicaSyncCreds: string | undefined;
  replicaSyncTlsCa: string | undefined;
  replicaSyncTlsCert: string | undefined;
  replicaSyncTlsKey: string | undefined;
  replicaSyncFlushMs: number;
  replicaHeartbeatMs: number;
  replicaExpirySecs: number;
  replicaSnapshotTimeoutSecs: number;
  // Kubernetes service discovery
  serviceDiscovery: boolean;
  selector: string[];
  prefillSelector: string[];
  decodeSelector: string[];
  serviceDiscoveryNamespace: string | undefined;
  serviceDiscoveryPort: number;
  modelIdFrom: string | undefined;
  // Several processes on one machine
  processes: number;
  disableConnectionBalance: boolean;
  natsServerBin: string | undefined;
}

const checkSelector = (items: string[]): string | undefined => {
  try {
    parseSelector(items);
    return undefined;
  } catch (e) {
    return (e as Error).message;
  }
};

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
  { flag: 'strict-model', kind: 'bool', description: "With one model served, still answer 404 to requests naming another model (default: route them to it, as the SGLang router does)", default: false },
  { flag: 'session-affinity-header', kind: 'string', description: 'Keep the requests carrying the same value of this header (e.g. X-Session-ID) on one worker, on top of any policy', argName: 'name' },
  { flag: 'session-affinity-ttl-secs', kind: 'number', description: 'A session binding expires this long after its last request', default: 3600, min: 0, exclusiveMin: true },
  { flag: 'forward-headers', kind: 'list', description: 'Request headers forwarded to workers besides the default allow-list (authorization, x-request-id*, x-correlation-id, traceparent, tracestate, x-smg-routing-key)', default: [], argName: 'name...' },
  { flag: 'ca-cert-paths', kind: 'list', description: 'CA certificates (PEM) trusted for https:// workers (health checks, metrics scraping, proxying)', default: [], argName: 'path...' },
  { flag: 'client-cert-path', kind: 'string', description: 'Client certificate (PEM) presented to https:// workers (mTLS)', argName: 'path' },
  { flag: 'client-key-path', kind: 'string', description: 'Private key (PEM) of --client-cert-path', argName: 'path' },
  { flag: 'cb-window-duration-secs', kind: 'number', description: 'Failures older than this no longer count toward --cb-failure-threshold (0 = consecutive failures, no window)', default: 120, min: 0 },
  { flag: 'worker-startup-check-interval', kind: 'number', description: 'Seconds between health checks of a worker that has not passed its first one yet (at most --health-check-interval-secs)', default: 1, min: 0, exclusiveMin: true },
  { flag: 'prometheus-port', kind: 'int', description: 'Serve /metrics on its own listener at this port (default: on the main port only)', min: 0, max: 65535 },
  { flag: 'prometheus-host', kind: 'string', description: 'Address of the --prometheus-port listener', default: '0.0.0.0' },
  { flag: 'policy', kind: 'enum', description: 'Routing policy', default: 'cache_aware', choices: POLICY_NAMES },
  { flag: 'cache-threshold', kind: 'number', description: 'cache_aware: minimum matched/total prefix ratio for affinity', default: 0.3, min: 0, max: 1 },
  { flag: 'balance-abs-threshold', kind: 'int', description: 'cache_aware: in-flight difference (max-min) above which load wins over affinity', default: 64, min: 0 },
  { flag: 'balance-rel-threshold', kind: 'number', description: 'cache_aware: ...and max must exceed this multiple of min', default: 1.5, min: 1 },
  { flag: 'eviction-interval-secs', kind: 'number', description: 'cache_aware: seconds between tree eviction passes (0 = never)', default: 120, min: 0 },
  { flag: 'max-tree-size', kind: 'int', description: 'cache_aware (and kv_aware\'s routing history): characters kept in the tree per worker; trimmed every --eviction-interval-secs, and at once when an insert takes a worker a quarter past it', default: 67108864, min: 0 },
  { flag: 'health-check-interval-secs', kind: 'number', description: 'Seconds between health checks of each worker', default: 10, min: 0, exclusiveMin: true },
  { flag: 'health-failure-threshold', kind: 'int', description: 'Consecutive failed checks before a worker is marked unhealthy', default: 3, min: 1 },
  { flag: 'health-success-threshold', kind: 'int', description: 'Consecutive passed checks before an unhealthy worker is used again', default: 2, min: 1 },
  { flag: 'health-check-timeout-secs', kind: 'number', description: 'Timeout of one health check', default: 5, min: 0, exclusiveMin: true },
  { flag: 'health-check-endpoint', kind: 'string', description: 'Path polled on each worker', default: '/health', check: ((p: string) => (p.startsWith('/') ? undefined : 'must start with /')) as never },
  { flag: 'request-timeout-secs', kind: 'number', description: 'Longest a request may take end to end before the worker is abandoned (504)', default: 1800, min: 0, exclusiveMin: true },
  { flag: 'max-payload-size', kind: 'int', description: 'Largest request body accepted, in bytes (413 above)', default: 536870912, min: 1 },
  { flag: 'log-level', kind: 'enum', description: 'Log level', default: 'info', choices: ['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent'] },
  { flag: 'log-format', kind: 'enum', description: 'Log format', default: 'json', choices: ['json', 'pretty'] },
  { flag: 'explain-decisions', kind: 'bool', description: 'Explain every routing decision: a compact summary in the x-kvgate-route response header (costs one extra policy evaluation per request)', default: false },
  { flag: 'decision-log-sample-rate', kind: 'number', description: 'Share of routing decisions logged as one structured line with their explanation (0 = none, 1 = all)', default: 0, min: 0, max: 1 },
  { flag: 'otlp-traces-endpoint', kind: 'string', description: 'Export OpenTelemetry traces (OTLP/HTTP JSON) to this URL, e.g. http://collector:4318/v1/traces (default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT; tracing is off without either)', argName: 'url' },
  { flag: 'retry-max-retries', kind: 'int', description: 'Attempts per request in total, the first included', default: 5, min: 1, max: 100 },
  { flag: 'retry-initial-backoff-ms', kind: 'number', description: 'Delay before the first retry', default: 50, min: 0 },
  { flag: 'retry-max-backoff-ms', kind: 'number', description: 'Longest delay between attempts', default: 30000, min: 0 },
  { flag: 'retry-backoff-multiplier', kind: 'number', description: 'Growth of the delay per attempt', default: 1.5, min: 1 },
  { flag: 'retry-jitter-factor', kind: 'number', description: 'Random spread of each delay (0.2 = ±20%)', default: 0.2, min: 0, max: 1 },
  { flag: 'disable-retries', kind: 'bool', description: 'One attempt per request', default: false },
  { flag: 'cb-failure-threshold', kind: 'int', description: 'Consecutive failures that open a worker\'s circuit breaker', default: 10, min: 1 },
  { flag: 'cb-success-threshold', kind: 'int', description: 'Consecutive successes in half-open that close it', default: 3, min: 1 },
  { flag: 'cb-timeout-duration-secs', kind: 'number', description: 'Seconds an open breaker waits before a trial (half-open)', default: 60, min: 0 },
  { flag: 'disable-circuit-breaker', kind: 'bool', description: 'Never open circuit breakers', default: false },
  { flag: 'max-concurrent-requests', kind: 'int', description: 'Requests served at once (0 = no limit)', default: 0, min: 0 },
  { flag: 'queue-size', kind: 'int', description: 'Requests that may wait for a slot beyond --max-concurrent-requests (429 when full)', default: 100, min: 0 },
  { flag: 'queue-timeout-secs', kind: 'number', description: 'Longest wait for a slot (408 after)', default: 60, min: 0, exclusiveMin: true },
  { flag: 'api-key-rate-limit-rps', kind: 'number', description: 'Requests per second allowed per API key (0 = no limit; 429 above)', default: 0, min: 0 },
  { flag: 'api-key-token-limit-per-min', kind: 'number', description: 'Prompt + completion tokens per minute allowed per API key (per client address without keys); 0 = no limit; 429 while the key\'s budget is spent', default: 0, min: 0 },
  { flag: 'ttft-slo-ms', kind: 'number', description: 'slo_aware: default TTFT objective (ms) of requests without x-slo-ttft-ms; also their admission deadline', min: 0, exclusiveMin: true },
  { flag: 'tpot-slo-ms', kind: 'number', description: 'slo_aware: default time-per-output-token objective (ms) of requests without x-slo-tpot-ms', min: 0, exclusiveMin: true },
  { flag: 'api-key-priority', kind: 'list', description: 'Priority class of an API key, KEY=N (integer; negative = sheddable); x-kvgate-priority overrides it per request', default: [], argName: 'key=n...', check: ((v: string[]) => v.find((x) => !/^[^=]+=-?\d+$/.test(x)) && `expected KEY=INTEGER (got '${v.find((x) => !/^[^=]+=-?\d+$/.test(x))}')`) as never },
  { flag: 'fairness-header', kind: 'string', description: 'Header whose value is the fairness key of the admission queue (default: the API key, else the client address)', argName: 'name' },
  { flag: 'connect-timeout-secs', kind: 'number', description: 'Timeout to open a connection to a worker', default: 10, min: 0, exclusiveMin: true },
  { flag: 'first-byte-timeout-secs', kind: 'number', description: 'Timeout for a worker to start answering (response headers)', default: 600, min: 0, exclusiveMin: true },
  { flag: 'stream-idle-timeout-secs', kind: 'number', description: 'Longest silence between two chunks of a response', default: 300, min: 0, exclusiveMin: true },
  { flag: 'worker-startup-timeout-secs', kind: 'number', description: 'How long a new worker may take to pass its first health check before it is reported as failed', default: 1800, min: 0 },
  { flag: 'shutdown-grace-period-secs', kind: 'number', description: 'On SIGTERM/SIGINT, how long in-flight requests may finish', default: 180, min: 0 },
  { flag: 'api-key', kind: 'list', description: 'Keys accepted as Authorization: Bearer on data-plane routes', default: [], argName: 'key...' },
  { flag: 'api-key-file', kind: 'string', description: 'File of data-plane keys, one per line', argName: 'path' },
  { flag: 'admin-api-key', kind: 'string', description: 'Key required on admin routes (without it they answer only loopback clients)', argName: 'key' },
  { flag: 'allow-remote-admin', kind: 'bool', description: 'Without --admin-api-key, also answer admin routes from other hosts', default: false },
  { flag: 'worker-api-key', kind: 'string', description: 'Key sent to the --worker-urls workers as Authorization: Bearer', argName: 'key' },
  { flag: 'tls-cert-path', kind: 'string', description: 'TLS certificate (PEM) for the listener', argName: 'path' },
  { flag: 'tls-key-path', kind: 'string', description: 'TLS private key (PEM) for the listener', argName: 'path' },
  { flag: 'max-json-depth', kind: 'int', description: 'Deepest nesting accepted in a JSON body (400 above)', default: 64, min: 1 },
  { flag: 'max-header-size', kind: 'int', description: 'Largest request header block in bytes (431 above)', default: 16384, min: 1024 },
  { flag: 'kv-events-endpoints', kind: 'list', description: 'ZMQ PUB endpoint of each --worker-urls entry, same order (rank r of a DP worker: port + r)', default: [], argName: 'url...' },
  { flag: 'kv-events-replay-endpoints', kind: 'list', description: 'ZMQ replay (ROUTER) endpoint of each --worker-urls entry, same order', default: [], argName: 'url...' },
  { flag: 'kv-events-bind', kind: 'string', description: 'Bind one SUB that engines connect to (topic must name the worker host:port)', argName: 'url' },
  { flag: 'kv-events-mediums', kind: 'enum', description: 'Events for CPU/disk tiers: ignore them, or index them apart from GPU (kv_aware credits them with --kv-host-hit-weight / --kv-disk-hit-weight; see docs/benchmarks.md)', default: 'separate', choices: ['gpu-only', 'separate'] },
  { flag: 'kv-events-stale-secs', kind: 'number', description: 'kv_aware: events this much older than a worker\'s last finished request count as stale (approximate fallback)', default: 5, min: 0, exclusiveMin: true },
  { flag: 'kv-index-max-blocks', kind: 'int', description: 'Largest KV block index (nodes); LRU leaves are pruned beyond it', default: 1000000, min: 1000 },
  { flag: 'kv-overlap-weight', kind: 'number', description: 'kv_aware: weight of the prefill blocks still needed (see docs/benchmarks.md for why 4, not Dynamo\'s 1; slo_aware has --slo-overlap-weight)', default: 4, min: 0 },
  { flag: 'slo-overlap-weight', kind: 'number', description: 'slo_aware: its own weight of the prefill blocks still needed (kv_aware\'s is --kv-overlap-weight; see docs/benchmarks.md §10.9 for why 1)', default: 1, min: 0 },
  { flag: 'slo-hold-fraction', kind: 'number', description: 'slo_aware: keep a request on the worker whose engine holds most of it while that worker is predicted within this fraction of the TTFT objective (0 = off: the cheapest worker meeting it; docs/benchmarks.md §10.12 for why 0.75)', default: 0.75, min: 0 },
  { flag: 'kv-active-weight', kind: 'number', description: 'kv_aware: weight of the blocks in-flight requests occupy', default: 0.1, min: 0 },
  { flag: 'kv-host-hit-weight', kind: 'number', description: 'kv_aware: a prefix block held only in host memory (CPU offload tier) counts this much of a GPU block (with --kv-events-mediums separate)', default: 0.75, min: 0, max: 1 },
  { flag: 'kv-disk-hit-weight', kind: 'number', description: 'kv_aware: a prefix block held only on disk/remote storage counts this much of a GPU block (with --kv-events-mediums separate)', default: 0.25, min: 0, max: 1 },
  { flag: 'kv-history-weight', kind: 'number', description: 'kv_aware: how much routing history counts next to engine events (affinity)', default: 1, min: 0, max: 1 },
  { flag: 'router-temperature', kind: 'number', description: 'kv_aware: 0 = lowest cost wins; > 0 samples a softmax over normalised costs', default: 0, min: 0 },
  { flag: 'tokenizer', kind: 'list', description: 'Hugging Face tokenizer.json (or its directory) for every model, or MODEL=PATH per model; default: the simulator\'s tokenizer', default: [], argName: 'path...' },
  { flag: 'tokenize-threads', kind: 'int', description: 'Threads that tokenize requests for kv_aware / prefix_load off the event loop (0: on the event loop); a long prompt is spread over all idle ones; default: cores, at most 4', default: Math.min(4, availableParallelism()), min: 0, max: 64 },
  { flag: 'tokenize-nice', kind: 'int', description: 'Linux: nice value of the tokenizer threads (the event loop keeps its own), so that tokenizing never delays routing and relaying; 0 = same priority', default: 10, min: 0, max: 19 },
  { flag: 'v8-concurrent-marking', kind: 'enum', description: "Whether V8 marks the heap on background threads during garbage collection: on (Node's default), off (on the event loop only), auto = off when this process runs tokenizer threads (they take every idle core under long prompts, and the marking threads then take turns with the event loop for the cores, which stalls it; docs/benchmarks.md §9.11), on otherwise", default: 'auto', choices: ['auto', 'on', 'off'] },
  { flag: 'tokenizer-word-cache', kind: 'int', description: 'Pre-tokens (words) whose BPE ids each tokenizer (per thread) keeps, for the byte-level BPE tokenizers where that is exact (Qwen2/3, Llama-3); 0 = off', default: 65536, min: 0 },
  { flag: 'max-routing-ms', kind: 'number', description: 'Wait at most this long for a request\'s token ids, then route it by text (counted in kvgate_tokenize_fallbacks_total); 0 = wait', default: 0, min: 0 },
  { flag: 'max-tokenize-chars', kind: 'int', description: 'Prompts longer than this (characters) are routed by text, not tokenized (the engine refuses prompts past its context itself)', default: 1500000, min: 1 },
  { flag: 'parse-off-loop-bytes', kind: 'int', description: 'Request bodies at least this large (bytes) are parsed, validated and tokenized in a tokenizer thread, not on the event loop (needs the threads, a policy that tokenizes, no --max-routing-ms; not in PD mode); 0 = never', default: 262144, min: 0 },
  { flag: 'inline-tokenize-chars', kind: 'int', description: 'Prompts up to this long (characters) are tokenized on the event loop, which then loads the tokenizers at start; 0 = none: every prompt goes to the tokenizer threads and the event loop loads a tokenizer only if something still needs one there (/debug/route)', default: 0, min: 0 },
  { flag: 'short-tokenize-chars', kind: 'int', description: 'Prompts up to this long (characters, and longer than --inline-tokenize-chars) are tokenized by one more thread of their own that longer prompts never use, so they never wait behind a long prompt; 0 = no such thread (they share the tokenizer threads)', default: 4096, min: 0 },
  { flag: 'max-connections-per-worker', kind: 'int', description: 'Cap on open connections (= concurrent requests) to each worker; default: no cap (engines queue and report it). Time waiting for a connection: kvgate_upstream_connection_wait_seconds', min: 1 },
  { flag: 'dp-aware', kind: 'bool', description: 'Route to each data-parallel rank of a worker as its own worker (url@rank)', default: false },
  { flag: 'dp-size', kind: 'int', description: 'DP ranks per worker when /get_server_info does not say (vLLM)', min: 1, max: 1024 },
  { flag: 'engine-metrics-interval-secs', kind: 'number', description: "Scrape each worker's /metrics this often for engine load (0 = never)", default: 1, min: 0 },
  { flag: 'engine-metrics-stale-secs', kind: 'number', description: 'Engine metrics older than this are not used', default: 5, min: 0, exclusiveMin: true },
  { flag: 'window-secs', kind: 'number', description: 'prefix_load: history window', default: 180, min: 0, exclusiveMin: true },
  { flag: 'pd-disaggregation', kind: 'bool', description: 'Prefill/decode disaggregation: route each request to a (prefill, decode) pair', default: false },
  { flag: 'prefill', kind: 'list', description: 'Prefill worker URL, optionally followed by its SGLang bootstrap port (repeatable: --prefill URL [PORT])', default: [], argName: 'url-and-port...' },
  { flag: 'decode', kind: 'list', description: 'Decode worker URL (repeatable)', default: [], argName: 'url...' },
  { flag: 'prefill-policy', kind: 'enum', description: 'Policy for the prefill pool (default: --policy)', choices: POLICY_NAMES },
  { flag: 'decode-policy', kind: 'enum', description: 'Policy for the decode pool (default: --policy)', choices: POLICY_NAMES },
  { flag: 'replica-sync', kind: 'string', description: "Share routing state with the other kvgate replicas over this NATS server (nats://host:port[,nats://...]); off when unset. 'off': never, not even between the --processes of this replica (each keeps its own routing state)", argName: 'url', check: ((u: string) => (u === 'off' || u.split(',').every((x) => /^(nats|tls):\/\/[^\s/]+$/.test(x.trim())) ? undefined : "expected nats://host:port (comma-separated for a cluster) or 'off'")) as never },
  { flag: 'replica-id', kind: 'string', description: 'This replica\'s name among its peers (default: hostname:port:pid)', argName: 'id' },
  { flag: 'replica-sync-subject', kind: 'string', description: 'NATS subject prefix shared by the replicas of one cluster', default: 'kvgate', check: ((s: string) => (/^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$/.test(s) ? undefined : 'letters, digits, _ and - separated by dots')) as never },
  { flag: 'replica-sync-user', kind: 'string', description: 'NATS user', argName: 'user' },
  { flag: 'replica-sync-password', kind: 'string', description: 'NATS password', argName: 'password' },
  { flag: 'replica-sync-token', kind: 'string', description: 'NATS authentication token', argName: 'token' },
  { flag: 'replica-sync-creds', kind: 'string', description: 'NATS credentials file (JWT + nkey seed)', argName: 'path' },
  { flag: 'replica-sync-tls-ca', kind: 'string', description: 'CA certificate (PEM) to verify the NATS server', argName: 'path' },
  { flag: 'replica-sync-tls-cert', kind: 'string', description: 'Client certificate (PEM) for NATS mutual TLS', argName: 'path' },
  { flag: 'replica-sync-tls-key', kind: 'string', description: 'Client key (PEM) for NATS mutual TLS', argName: 'path' },
  { flag: 'replica-sync-flush-ms', kind: 'number', description: 'Routing events are batched for this long before they are published', default: 10, min: 0 },
  { flag: 'replica-heartbeat-ms', kind: 'number', description: 'A replica publishes at least this often (heartbeat)', default: 1000, min: 10 },
  { flag: 'replica-expiry-secs', kind: 'number', description: 'A peer silent this long is dropped with its in-flight load', default: 3, min: 0, exclusiveMin: true },
  { flag: 'replica-snapshot-timeout-secs', kind: 'number', description: 'Longest a joining replica waits for the shared state before it reports ready', default: 5, min: 0 },
  { flag: 'service-discovery', kind: 'bool', description: 'Discover workers from Kubernetes pods (list+watch; in-cluster service account, else KUBECONFIG or ~/.kube/config)', default: false },
  { flag: 'selector', kind: 'list', description: 'Service discovery: label selector of worker pods, key=value... (all must match)', default: [], argName: 'key=value...', check: checkSelector as never },
  { flag: 'prefill-selector', kind: 'list', description: 'Service discovery with --pd-disaggregation: label selector of prefill pods', default: [], argName: 'key=value...', check: checkSelector as never },
  { flag: 'decode-selector', kind: 'list', description: 'Service discovery with --pd-disaggregation: label selector of decode pods', default: [], argName: 'key=value...', check: checkSelector as never },
  { flag: 'service-discovery-namespace', kind: 'string', description: 'Service discovery: namespace to watch (default: all namespaces)', argName: 'name', check: ((n: string) => (/^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/.test(n) && n.length <= 63 ? undefined : 'not a valid namespace name')) as never },
  { flag: 'service-discovery-port', kind: 'int', description: "Service discovery: worker port on each pod (a pod's kvgate.io/port annotation overrides it)", default: 8000, min: 1, max: 65535 },
  { flag: 'model-id-from', kind: 'string', description: "Service discovery: take each pod's model id from its namespace, label:<key> or annotation:<key> instead of its /v1/models", argName: 'source', check: ((v: string) => { try { parseModelIdFrom(v); return undefined; } catch (e) { return (e as Error).message; } }) as never },
  { flag: 'pd-protocol', kind: 'enum', description: 'Hand-off protocol: sglang (bootstrap room, both at once) or vllm (NIXL kv_transfer_params, prefill then decode)', default: 'sglang', choices: ['sglang', 'vllm'] },
  { flag: 'processes', kind: 'string', description: 'Serving processes sharing the port (auto = one per core); above 1 a supervisor forks and restarts them', default: '1', argName: 'n|auto', check: ((v: string) => (/^(auto|[1-9][0-9]{0,3})$/.test(v) ? undefined : 'expected a whole number from 1 to 9999, or auto')) as never },
  { flag: 'disable-connection-balance', kind: 'bool', description: 'With --processes above 1, never ask clients to reconnect to even out the processes\' shares of connections', default: false },
  { flag: 'nats-server-bin', kind: 'string', description: 'With --processes above 1 and no --replica-sync: the nats-server the supervisor starts (default: nats-server on PATH, else /usr/sbin/nats-server)', argName: 'path' },
];

/** `--prefill URL [PORT] URL ...` tokens → workers: a number (or "none") after a URL is its bootstrap port. */
function parsePrefill(tokens: string[]): Array<{ url: string; bootstrapPort: number | null }> {
  const out: Array<{ url: string; bootstrapPort: number | null }> = [];
  for (const t of tokens) {
    if (/^\d+$/.test(t) || t === 'none') {
      const last = out.at(-1);
      if (!last || last.bootstrapPort !== null) throw new ConfigError(`invalid value for --prefill: bootstrap port '${t}' must follow a prefill URL`);
      const port = t === 'none' ? null : Number(t);
      if (port !== null && (port < 1 || port > 65535)) throw new ConfigError(`invalid value for --prefill: bootstrap port ${t} out of range`);
      last.bootstrapPort = port;
      continue;
    }
    try {
      out.push({ url: normalizeUrl(t), bootstrapPort: null });
    } catch (e) {
      throw new ConfigError(`invalid value for --prefill: ${(e as Error).message}`);
    }
  }
  return out;
}

export function resolveServeConfig(cli: Record<string, unknown>, env: NodeJS.ProcessEnv = process.env): ServeConfig {
  const raw = resolveOptions(serveOptionSpecs, cli, env) as unknown as ServeConfig & { config?: string; prefill: unknown };
  const o = raw as ServeConfig & { config?: string };
  delete o.config;
  o.prefill = parsePrefill(raw.prefill as unknown as string[]);
  try {
    o.decode = o.decode.map((u) => normalizeUrl(u));
  } catch (e) {
    throw new ConfigError(`invalid value for --decode: ${(e as Error).message}`);
  }
  const sd = o.serviceDiscovery;
  if (!sd) {
    for (const f of ['selector', 'prefill-selector', 'decode-selector', 'service-discovery-namespace', 'model-id-from'] as const) {
      const v = (o as unknown as Record<string, unknown>)[camel(f)];
      if (v !== undefined && !(Array.isArray(v) && v.length === 0)) throw new ConfigError(`--${f} needs --service-discovery`);
    }
  }
  if (o.pdDisaggregation) {
    if ((o.prefill.length === 0 && !(sd && o.prefillSelector.length > 0)) || (o.decode.length === 0 && !(sd && o.decodeSelector.length > 0))) {
      throw new ConfigError('--pd-disaggregation needs at least one --prefill and one --decode worker (each pool may instead come from --service-discovery with --prefill-selector / --decode-selector)');
    }
    if (o.workerUrls.length > 0) throw new ConfigError('invalid value for --worker-urls: with --pd-disaggregation use --prefill and --decode');
    if (o.selector.length > 0) throw new ConfigError('invalid value for --selector: with --pd-disaggregation use --prefill-selector and --decode-selector');
  } else {
    if (o.prefill.length > 0 || o.decode.length > 0) throw new ConfigError('--prefill/--decode need --pd-disaggregation');
    if (o.prefillSelector.length > 0 || o.decodeSelector.length > 0) throw new ConfigError('--prefill-selector/--decode-selector need --pd-disaggregation');
    if (sd && o.selector.length === 0) throw new ConfigError('--service-discovery needs --selector key=value (an empty selector would match no pod)');
  }
  o.workerUrls = o.workerUrls.map((u) => normalizeUrl(u));
  if (o.kvEventsEndpoints.length > 0 && o.kvEventsEndpoints.length !== o.workerUrls.length) {
    throw new ConfigError(`invalid value for --kv-events-endpoints: give one per --worker-urls entry (${o.workerUrls.length}), got ${o.kvEventsEndpoints.length}`);
  }
  if (o.kvEventsReplayEndpoints.length > 0 && o.kvEventsReplayEndpoints.length !== o.kvEventsEndpoints.length) {
    throw new ConfigError('invalid value for --kv-events-replay-endpoints: give one per --kv-events-endpoints entry');
  }
  for (const ep of [...o.kvEventsEndpoints, ...o.kvEventsReplayEndpoints, ...(o.kvEventsBind ? [o.kvEventsBind] : [])]) {
    if (!/^(tcp|ipc|inproc):\/\/.+/.test(ep)) throw new ConfigError(`invalid value for --kv-events-*: '${ep}' is not a ZMQ endpoint (tcp://host:port, ipc://path)`);
  }
  if ((o.replicaSyncTlsCert === undefined) !== (o.replicaSyncTlsKey === undefined)) {
    throw new ConfigError('invalid value for --replica-sync-tls-cert / --replica-sync-tls-key: give both or neither');
  }
  if (o.replicaHeartbeatMs >= o.replicaExpirySecs * 1000) {
    throw new ConfigError('invalid value for --replica-expiry-secs: must be longer than --replica-heartbeat-ms');
  }
  if ((o.clientCertPath === undefined) !== (o.clientKeyPath === undefined)) {
    throw new ConfigError('invalid value for --client-cert-path / --client-key-path: give both or neither');
  }
  o.forwardHeaders = o.forwardHeaders.map((h) => h.toLowerCase());
  const processes = String(o.processes as unknown);
  o.processes = processes === 'auto' ? availableParallelism() : Number(processes);
  if (o.processes > 1 && o.port === 0) {
    throw new ConfigError('invalid value for --port: 0 (any free port) cannot be used with --processes above 1; give a fixed port, which every process serves and a restarted process binds again');
  }
  if (o.processes > 1 && o.kvEventsBind !== undefined) {
    throw new ConfigError('invalid value for --kv-events-bind: with --processes above 1 each process would bind the same ZMQ endpoint; use --kv-events-endpoints (every process connects to the engines)');
  }
  o.otlpTracesEndpoint = resolveTracesEndpoint(o.otlpTracesEndpoint, env);
  if ((o.tlsCertPath === undefined) !== (o.tlsKeyPath === undefined)) {
    throw new ConfigError('invalid value for --tls-cert-path / --tls-key-path: give both or neither');
  }
  return o;
}

/** --otlp-traces-endpoint, else the standard OTEL_EXPORTER_OTLP_TRACES_ENDPOINT; must be an http(s) URL. */
export function resolveTracesEndpoint(given: string | undefined, env: NodeJS.ProcessEnv): string | undefined {
  const v = given ?? (env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT || undefined);
  if (v === undefined) return undefined;
  let u: URL;
  try {
    u = new URL(v);
  } catch {
    throw new ConfigError(`invalid value for --otlp-traces-endpoint: '${v}' is not a URL`);
  }
  if (u.protocol !== 'http:' && u.protocol !== 'https:') throw new ConfigError(`invalid value for --otlp-traces-endpoint: '${v}' must be an http:// or https:// URL (OTLP/HTTP)`);
  return v;
}

/** Defaults, for programmatic use (tests, demo, lab). */
export function defaultServeConfig(overrides: Partial<ServeConfig> = {}): ServeConfig {
  return { ...resolveServeConfig({}, {}), ...overrides };
}
