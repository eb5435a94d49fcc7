import type { WorkerType } from '../core/worker.js';

/**
 * What a Kubernetes pod means to kvgate: whether it is routable, and which workers it stands
 * for. Pure functions over the pod object as the API server sends it (JSON), so they are the
 * same for list items and watch events, and testable without a cluster.
 */

/** The parts of a v1 Pod that discovery reads (the API's JSON field names). */
export interface PodObject {
  metadata?: {
    name?: string;
    namespace?: string;
    uid?: string;
    resourceVersion?: string;
    labels?: Record<string, string>;
    annotations?: Record<string, string>;
    deletionTimestamp?: unknown;
  };
  spec?: { containers?: Array<{ name?: string; ports?: Array<{ name?: string; containerPort?: number }> }> };
  status?: { phase?: string; podIP?: string; conditions?: Array<{ type?: string; status?: string }> };
}

/** SGLang's annotation for a prefill pod's disaggregation bootstrap port. */
export const BOOTSTRAP_PORT_ANNOTATION = 'sglang.ai/bootstrap-port';
/** Overrides --service-discovery-port for one pod: one port, or several ("8000,8001") = one worker per port. */
export const PORT_ANNOTATION = 'kvgate.io/port';
/** Data-parallel ranks behind the pod's port, when the engine's /get_server_info does not say (with --dp-aware). */
export const DP_SIZE_ANNOTATION = 'kvgate.io/dp-size';
/** The pod's ZMQ KV-event publisher port (tcp://<podIP>:<port>); with several ports, the first worker's. */
export const KV_EVENTS_PORT_ANNOTATION = 'kvgate.io/kv-events-port';
/** Its replay (ROUTER) port. */
export const KV_EVENTS_REPLAY_PORT_ANNOTATION = 'kvgate.io/kv-events-replay-port';

const LABEL_NAME = /^([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]$/;
const DNS_SUBDOMAIN = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$/;
const LABEL_VALUE = /^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$/;

/** Whether `key` is a valid label/annotation key (optional DNS prefix + '/' + name). */
export function isLabelKey(key: string): boolean {
  const slash = key.lastIndexOf('/');
  const name = slash < 0 ? key : key.slice(slash + 1);
  const prefix = slash < 0 ? undefined : key.slice(0, slash);
  if (prefix !== undefined && (prefix.length === 0 || prefix.length > 253 || !DNS_SUBDOMAIN.test(prefix))) return false;
  return name.length <= 63 && LABEL_NAME.test(name);
}

/** `k=v` items → map; throws with a message naming the bad item. Equality only, as the SGLang router. */
export function parseSelector(items: readonly string[]): Record<string, string> {
  const out: Record<string, string> = {};
  for (const item of items) {
    const eq = item.indexOf('=');
    if (eq <= 0) throw new Error(`'${item}' is not key=value`);
    const key = item.slice(0, eq);
    const value = item.slice(eq + 1).replace(/^=/, ''); // k==v is the same selector as k=v
    if (!isLabelKey(key)) throw new Error(`'${key}' is not a valid label key`);
    if (value.length > 63 || !LABEL_VALUE.test(value)) throw new Error(`'${value}' is not a valid label value`);
    if (key in out && out[key] !== value) throw new Error(`label '${key}' is given two values`);
    out[key] = value;
  }
  return out;
}

/** The API server's labelSelector query value for an equality selector. */
export function selectorString(selector: Record<string, string>): string {
  return Object.entries(selector)
    .map(([k, v]) => `${k}=${v}`)
    .join(',');
}

export function matchesSelector(pod: PodObject, selector: Record<string, string>): boolean {
  const entries = Object.entries(selector);
  if (entries.length === 0) return false; // an empty selector matches nothing (as the SGLang router)
  const labels = pod.metadata?.labels ?? {};
  return entries.every(([k, v]) => labels[k] === v);
}

/** `namespace`, `label:<key>` or `annotation:<key>`: where a discovered pod's model id comes from. */
export type ModelIdSource = { from: 'namespace' } | { from: 'label' | 'annotation'; key: string };

export function parseModelIdFrom(raw: string): ModelIdSource {
  if (raw === 'namespace') return { from: 'namespace' };
  const m = /^(label|annotation):(.+)$/.exec(raw);
  if (!m) throw new Error(`expected namespace, label:<key> or annotation:<key>`);
  if (!isLabelKey(m[2])) throw new Error(`'${m[2]}' is not a valid ${m[1]} key`);
  return { from: m[1] as 'label' | 'annotation', key: m[2] };
}

export function modelIdOf(pod: PodObject, source: ModelIdSource): string | undefined {
  const md = pod.metadata ?? {};
  const v = source.from === 'namespace' ? md.namespace : source.from === 'label' ? md.labels?.[source.key] : md.annotations?.[source.key];
  return v === undefined || v === '' ? undefined : v;
}

/** Running, Ready=True, with an IP, and not being deleted: the only pods that take traffic. */
export function isRoutable(pod: PodObject): boolean {
  if (pod.metadata?.deletionTimestamp) return false;
  if (pod.status?.phase !== 'Running' || !pod.status.podIP) return false;
  return (pod.status.conditions ?? []).some((c) => c.type === 'Ready' && c.status === 'True');
}

/** Namespace/name: a pod's identity across events (a re-created pod of the same name replaces it). */
export function podKey(pod: PodObject): string {
  return `${pod.metadata?.namespace ?? ''}/${pod.metadata?.name ?? ''}`;
}

function port(raw: string | undefined): number | undefined {
  if (raw === undefined || !/^\d+$/.test(raw.trim())) return undefined;
  const n = Number(raw.trim());
  return n >= 1 && n <= 65535 ? n : undefined;
}

/** One worker a routable pod stands for. */
export interface PodTarget {
  url: string;
  type: WorkerType;
  bootstrapPort: number | null;
  modelId: string | undefined;
  dpSize: number | undefined;
  kvEventsEndpoint: string | undefined;
  kvEventsReplayEndpoint: string | undefined;
}

export interface TargetOptions {
  type: WorkerType;
  /** --service-discovery-port. */
  defaultPort: number;
  /** Several ports per pod (an InferencePool's targetPorts); overrides defaultPort. */
  defaultPorts?: number[];
  modelIdFrom: ModelIdSource | undefined;
  /** --model-id (used when --model-id-from is not given). */
  modelId: string | undefined;
}

export interface TargetsResult {
  targets: PodTarget[];
  /** Annotations that were present but invalid (ignored), for a warning. */
  problems: string[];
}

/**
 * The workers a pod stands for, or none if it is not routable. URL: http://<podIP>:<port>, the
 * port from the `kvgate.io/port` annotation (a comma list gives one worker per port, e.g. one
 * per data-parallel rank of a vLLM engine run with one API server per rank), else
 * --service-discovery-port. IPv6 pod IPs are bracketed.
 */
export function podTargets(pod: PodObject, opts: TargetOptions): TargetsResult {
  const problems: string[] = [];
  if (!isRoutable(pod)) return { targets: [], problems };
  const ann = pod.metadata?.annotations ?? {};
  const ip = pod.status!.podIP!;
  const host = ip.includes(':') ? `[${ip}]` : ip;
  let ports = opts.defaultPorts && opts.defaultPorts.length > 0 ? opts.defaultPorts : [opts.defaultPort];
  if (ann[PORT_ANNOTATION] !== undefined) {
    const list = ann[PORT_ANNOTATION].split(',').map((s) => port(s));
    if (list.length > 0 && list.every((p) => p !== undefined) && new Set(list).size === list.length) ports = list as number[];
    else problems.push(`${PORT_ANNOTATION}=${JSON.stringify(ann[PORT_ANNOTATION])} is not a port or a comma list of distinct ports`);
  }
  const annotatedPort = (key: string): number | undefined => {
    if (ann[key] === undefined) return undefined;
    const p = port(ann[key]);
    if (p === undefined) problems.push(`${key}=${JSON.stringify(ann[key])} is not a port`);
    return p;
  };
  let bootstrapPort: number | null = null;
  if (opts.type === 'prefill') bootstrapPort = annotatedPort(BOOTSTRAP_PORT_ANNOTATION) ?? null;
  let dpSize: number | undefined;
  if (ann[DP_SIZE_ANNOTATION] !== undefined) {
    const n = Number(ann[DP_SIZE_ANNOTATION]);
    if (Number.isInteger(n) && n >= 1 && n <= 1024) dpSize = n;
    else problems.push(`${DP_SIZE_ANNOTATION}=${JSON.stringify(ann[DP_SIZE_ANNOTATION])} is not an integer in 1..1024`);
  }
  const kvPort = annotatedPort(KV_EVENTS_PORT_ANNOTATION);
  const kvReplayPort = kvPort === undefined ? undefined : annotatedPort(KV_EVENTS_REPLAY_PORT_ANNOTATION);
  const modelId = opts.modelIdFrom ? modelIdOf(pod, opts.modelIdFrom) : opts.modelId;
  if (opts.modelIdFrom && modelId === undefined) {
    const src = opts.modelIdFrom.from === 'namespace' ? 'namespace' : `${opts.modelIdFrom.from} ${opts.modelIdFrom.key}`;
    problems.push(`no ${src} to take the model id from; reading it from the worker's /v1/models`);
  }
  const targets = ports.map((p, i) => ({
    url: `http://${host}:${p}`,
    type: opts.type,
    bootstrapPort,
    modelId,
    dpSize,
    // One publisher per engine: with several ports (one engine per port), rank i publishes on kvPort + i.
    kvEventsEndpoint: kvPort === undefined ? undefined : `tcp://${host}:${kvPort + i}`,
    kvEventsReplayEndpoint: kvReplayPort === undefined ? undefined : `tcp://${host}:${kvReplayPort + i}`,
  }));
  return { targets, problems };
}

/** Two targets register the same way (a change means re-registering the worker). */
export function sameTarget(a: PodTarget, b: PodTarget): boolean {
  return (
    a.url === b.url &&
    a.type === b.type &&
    a.bootstrapPort === b.bootstrapPort &&
    a.modelId === b.modelId &&
    a.dpSize === b.dpSize &&
    a.kvEventsEndpoint === b.kvEventsEndpoint &&
    a.kvEventsReplayEndpoint === b.kvEventsReplayEndpoint
  );
}
