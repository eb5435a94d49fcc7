import * as k8s from '@kubernetes/client-node';
import type { Logger } from 'pino';

/** What kvgate needs of an InferencePool (inference.networking.k8s.io/v1). */
export interface PoolSpec {
  namespace: string;
  name: string;
  /** spec.selector.matchLabels: the pods of the pool. */
  selector: Record<string, string>;
  /** spec.targetPorts[].number: each selected pod serves on every one (several = DP ranks). */
  targetPorts: number[];
  /** spec.appProtocol (http or kubernetes.io/h2c). */
  appProtocol: string;
}

const GROUP = 'inference.networking.k8s.io';
const VERSION = 'v1';
const PLURAL = 'inferencepools';

/** Reads the parts of an InferencePool object kvgate uses; throws on a malformed one. */
export function parseInferencePool(obj: unknown): PoolSpec {
  const o = obj as { metadata?: { name?: string; namespace?: string }; spec?: Record<string, unknown> };
  const spec = o?.spec;
  if (!spec || typeof spec !== 'object') throw new Error('InferencePool has no spec');
  const sel = spec.selector as { matchLabels?: Record<string, unknown> } | undefined;
  const labels = sel?.matchLabels ?? {};
  const selector: Record<string, string> = {};
  for (const [k, v] of Object.entries(labels)) {
    if (typeof v !== 'string') throw new Error(`InferencePool spec.selector.matchLabels.${k} is not a string`);
    selector[k] = v;
  }
  if (Object.keys(selector).length === 0) throw new Error('InferencePool spec.selector.matchLabels is empty');
  const ports = (spec.targetPorts as Array<{ number?: unknown }> | undefined) ?? [];
  const targetPorts = ports.map((p) => p?.number);
  if (targetPorts.length === 0 || !targetPorts.every((n): n is number => Number.isInteger(n) && (n as number) >= 1 && (n as number) <= 65535)) {
    throw new Error('InferencePool spec.targetPorts must list 1 to 8 port numbers');
  }
  return {
    namespace: o.metadata?.namespace ?? '',
    name: o.metadata?.name ?? '',
    selector,
    targetPorts,
    appProtocol: typeof spec.appProtocol === 'string' ? spec.appProtocol : 'http',
  };
}

export interface PoolWatchOptions {
  name: string;
  namespace: string;
  log: Logger;
  /** Called with the pool's spec on every change, and with undefined when it is deleted. */
  onChange(pool: PoolSpec | undefined): void;
  /** Defaults to the standard lookup: in-cluster service account, else KUBECONFIG / ~/.kube/config. */
  kubeConfig?: k8s.KubeConfig;
}

/**
 * Follows one InferencePool: a list (fieldSelector metadata.name=<name>, which gives the
 * resourceVersion) then a watch from that version; when the watch ends (timeout, 410 Gone,
 * connection loss) it lists again and resumes, with a growing delay after failures. No polling.
 * Resolves once the first list answered (or failed: it is retried in the background).
 */
export class InferencePoolWatcher {
  private readonly kc: k8s.KubeConfig;
  private readonly api: k8s.CustomObjectsApi;
  private abort: AbortController | undefined;
  private stopped = false;
  private retryMs = 500;
  private timer: NodeJS.Timeout | undefined;
  private last: string | undefined;

  constructor(private readonly opts: PoolWatchOptions) {
    this.kc = opts.kubeConfig ?? defaultKubeConfig();
    this.api = this.kc.makeApiClient(k8s.CustomObjectsApi);
  }

  async start(): Promise<void> {
    await this.cycle();
  }

  stop(): void {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.abort?.abort();
  }

  private emit(pool: PoolSpec | undefined): void {
    const key = JSON.stringify(pool ?? null);
    if (key === this.last) return;
    this.last = key;
    this.opts.onChange(pool);
  }

  private async cycle(): Promise<void> {
    if (this.stopped) return;
    const { name, namespace, log } = this.opts;
    let rv: string;
    try {
      const list = (await this.api.listNamespacedCustomObject({ group: GROUP, version: VERSION, namespace, plural: PLURAL, fieldSelector: `metadata.name=${name}` })) as {
        items?: unknown[];
        metadata?: { resourceVersion?: string };
      };
      const item = list.items?.[0];
      try {
        this.emit(item ? parseInferencePool(item) : undefined);
        if (!item) log.warn({ pool: `${namespace}/${name}` }, 'InferencePool not found; waiting for it');
      } catch (e) {
        log.error({ pool: `${namespace}/${name}`, err: (e as Error).message }, 'InferencePool is malformed; keeping the previous endpoints');
      }
      rv = list.metadata?.resourceVersion ?? '';
      this.retryMs = 500;
    } catch (e) {
      log.error({ pool: `${namespace}/${name}`, err: (e as Error).message }, 'cannot list the InferencePool; retrying');
      this.again();
      return;
    }
    const path = `/apis/${GROUP}/${VERSION}/namespaces/${encodeURIComponent(namespace)}/${PLURAL}`;
    // Not awaited: start() resolves once the list answered, the watch runs on its own.
    void new k8s.Watch(this.kc)
      .watch(
        path,
        { fieldSelector: `metadata.name=${name}`, resourceVersion: rv, allowWatchBookmarks: true },
        (phase, obj) => {
          if (phase === 'BOOKMARK') return;
          if (phase === 'ERROR') return; // e.g. 410 Gone: the watch ends and done() lists again
          if (phase === 'DELETED') return this.emit(undefined);
          try {
            this.emit(parseInferencePool(obj));
          } catch (e) {
            log.error({ pool: `${namespace}/${name}`, err: (e as Error).message }, 'InferencePool is malformed; keeping the previous endpoints');
          }
        },
        (err) => {
          if (err && !this.stopped) log.warn({ err: (err as Error)?.message ?? String(err) }, 'InferencePool watch ended; listing again');
          this.again(err ? undefined : 200);
        },
      )
      .then(
        (ac) => {
          this.abort = ac;
          if (this.stopped) ac.abort();
        },
        (e) => {
          log.error({ err: (e as Error).message }, 'cannot watch the InferencePool; retrying');
          this.again();
        },
      );
  }

  private again(delayMs?: number): void {
    if (this.stopped) return;
    const d = delayMs ?? this.retryMs;
    if (delayMs === undefined) this.retryMs = Math.min(this.retryMs * 2, 30_000);
    this.timer = setTimeout(() => void this.cycle(), d);
    this.timer.unref();
  }
}

function defaultKubeConfig(): k8s.KubeConfig {
  const kc = new k8s.KubeConfig();
  kc.loadFromDefault();
  return kc;
}
