import { randomUUID } from 'node:crypto';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/**
 * An in-process stand-in for the Kubernetes API server's pod endpoints, speaking the real wire
 * protocol: GET /api/v1/pods and /api/v1/namespaces/{ns}/pods with labelSelector give a v1
 * PodList carrying metadata.resourceVersion; with ?watch=true they give a chunked stream of
 * newline-delimited watch events {type, object} starting after the given resourceVersion
 * (ADDED, MODIFIED, DELETED, BOOKMARK when allowWatchBookmarks=true, and ERROR with a v1
 * Status 410 Expired when the version has been compacted away). A pod whose labels stop
 * matching a watch's selector is sent to that watch as DELETED, as the API server does.
 */

export interface PodSpec {
  name: string;
  namespace?: string;
  labels?: Record<string, string>;
  annotations?: Record<string, string>;
  ip?: string;
  /** containerPort of the container's "http" port. */
  port?: number;
  ready?: boolean;
  phase?: 'Pending' | 'Running' | 'Succeeded' | 'Failed' | 'Unknown';
}

type Pod = Record<string, any>;

interface Change {
  rv: number;
  type: 'ADDED' | 'MODIFIED' | 'DELETED';
  pod: Pod;
  before: Pod | undefined;
}

interface Watcher {
  res: ServerResponse;
  namespace: string | undefined;
  selector: Record<string, string>;
  bookmarks: boolean;
  sent: number;
}

export interface RequestLog {
  path: string;
  query: Record<string, string>;
}

function parseSelector(s: string | undefined): Record<string, string> {
  const out: Record<string, string> = {};
  for (const part of (s ?? '').split(',').filter(Boolean)) {
    const m = /^([^=!]+)==?(.*)$/.exec(part);
    if (!m) throw new Error(`unsupported selector ${part}`);
    out[m[1]] = m[2];
  }
  return out;
}

function matches(pod: Pod | undefined, ns: string | undefined, sel: Record<string, string>): boolean {
  if (!pod) return false;
  if (ns !== undefined && pod.metadata.namespace !== ns) return false;
  const labels = pod.metadata.labels ?? {};
  return Object.entries(sel).every(([k, v]) => labels[k] === v);
}

export class FakeKubeApi {
  private readonly server: Server;
  private readonly pods = new Map<string, Pod>();
  private readonly history: Change[] = [];
  private readonly watchers = new Set<Watcher>();
  private rv = 1000;
  /** Watches from a resourceVersion below this get 410 Expired. */
  private compactedBelow = 0;
  /** Answer the next watch requests with HTTP 410 instead of a 200 stream with an ERROR event. */
  http410Watches = 0;
  readonly requests: RequestLog[] = [];
  /** Watch events written to clients (BOOKMARK and ERROR included). */
  eventsSent = 0;
  /** InferencePools served (inference.networking.k8s.io/v1), by namespace/name; their watches stay open and quiet. */
  readonly inferencePools = new Map<string, Record<string, unknown>>();

  constructor() {
    this.server = createServer((req, res) => this.handle(req, res));
  }

  async start(): Promise<this> {
    await new Promise<void>((r) => this.server.listen(0, '127.0.0.1', r));
    return this;
  }

  get url(): string {
    return `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
  }

  /** A kubeconfig file (no auth, plain HTTP) pointing at this server; returns its path. */
  writeKubeconfig(): string {
    const dir = mkdtempSync(join(tmpdir(), 'kvgate-kube-'));
    const path = join(dir, 'config');
    writeFileSync(
      path,
      [
        'apiVersion: v1',
        'kind: Config',
        'clusters:',
        '- name: fake',
        '  cluster:',
        `    server: ${this.url}`,
        // @kubernetes/client-node refuses plain http:// unless TLS verification is off.
        '    insecure-skip-tls-verify: true',
        'users:',
        '- name: nobody',
        '  user: {}',
        'contexts:',
        '- name: fake',
        '  context:',
        '    cluster: fake',
        '    user: nobody',
        'current-context: fake',
        '',
      ].join('\n'),
    );
    return path;
  }

  async close(): Promise<void> {
    for (const w of this.watchers) w.res.end();
    this.watchers.clear();
    this.server.closeAllConnections();
    await new Promise<void>((r) => this.server.close(() => r()));
  }

  /** Open watch streams. */
  get watchCount(): number {
    return this.watchers.size;
  }

  get resourceVersion(): string {
    return String(this.rv);
  }

  static pod(spec: PodSpec, uid = randomUUID()): Pod {
    const ready = spec.ready ?? true;
    const phase = spec.phase ?? 'Running';
    return {
      kind: 'Pod',
      apiVersion: 'v1',
      metadata: {
        name: spec.name,
        namespace: spec.namespace ?? 'default',
        uid,
        labels: spec.labels ?? {},
        annotations: spec.annotations ?? {},
        creationTimestamp: new Date().toISOString(),
      },
      spec: {
        containers: [{ name: 'engine', image: 'vllm/vllm-openai:latest', ports: spec.port ? [{ name: 'http', containerPort: spec.port, protocol: 'TCP' }] : [] }],
      },
      status: {
        phase,
        ...(phase === 'Pending' || !spec.ip ? {} : { podIP: spec.ip, podIPs: [{ ip: spec.ip }] }),
        conditions: [
          { type: 'Initialized', status: 'True' },
          { type: 'Ready', status: ready ? 'True' : 'False' },
          { type: 'ContainersReady', status: ready ? 'True' : 'False' },
          { type: 'PodScheduled', status: 'True' },
        ],
      },
    };
  }

  /** Creates a pod (ADDED). */
  create(spec: PodSpec): Pod {
    const pod = FakeKubeApi.pod(spec);
    const key = `${pod.metadata.namespace}/${pod.metadata.name}`;
    if (this.pods.has(key)) throw new Error(`pod ${key} exists`);
    this.commit('ADDED', key, pod);
    return pod;
  }

  /** Changes a pod (MODIFIED), keeping its uid. */
  update(name: string, change: (pod: Pod) => void, namespace = 'default'): Pod {
    const key = `${namespace}/${name}`;
    const before = this.pods.get(key);
    if (!before) throw new Error(`no pod ${key}`);
    const pod = structuredClone(before);
    change(pod);
    this.commit('MODIFIED', key, pod);
    return pod;
  }

  setReady(name: string, ready: boolean, namespace = 'default'): Pod {
    return this.update(
      name,
      (p) => {
        for (const c of p.status.conditions) if (c.type === 'Ready' || c.type === 'ContainersReady') c.status = ready ? 'True' : 'False';
      },
      namespace,
    );
  }

  /** Deletes a pod (DELETED with its last state). */
  delete(name: string, namespace = 'default'): void {
    const key = `${namespace}/${name}`;
    const pod = this.pods.get(key);
    if (!pod) throw new Error(`no pod ${key}`);
    this.commit('DELETED', key, structuredClone(pod));
  }

  /** Sends a BOOKMARK at the current resourceVersion to every watch that asked for them. */
  bookmark(): void {
    for (const w of this.watchers) {
      if (w.bookmarks) this.write(w, { type: 'BOOKMARK', object: { kind: 'Pod', apiVersion: 'v1', metadata: { resourceVersion: String(this.rv) } } });
    }
  }

  /**
   * Compacts the event history: every open watch gets ERROR 410 Expired and is closed, and a
   * watch resumed from any version seen so far gets the same, so clients must list again.
   * `meanwhile` runs after the watches are cut and before compaction, so its changes are only
   * visible to a new list.
   */
  expireWatches(meanwhile?: () => void): void {
    for (const w of [...this.watchers]) {
      this.write(w, { type: 'ERROR', object: { kind: 'Status', apiVersion: 'v1', metadata: {}, status: 'Failure', message: 'too old resource version: 1 (2)', reason: 'Expired', code: 410 } });
      this.endWatch(w);
    }
    meanwhile?.();
    // Compacted up to now: the current version (what a new list returns) can still be watched.
    this.compactedBelow = this.rv;
    this.history.length = 0;
  }

  /** Ends every watch cleanly, as the server does at timeoutSeconds; clients resume from their version. */
  closeWatches(): void {
    for (const w of [...this.watchers]) this.endWatch(w);
  }

  private endWatch(w: Watcher): void {
    this.watchers.delete(w);
    w.res.end();
  }

  private commit(type: Change['type'], key: string, pod: Pod): void {
    const before = this.pods.get(key);
    this.rv++;
    pod.metadata.resourceVersion = String(this.rv);
    if (type === 'DELETED') this.pods.delete(key);
    else this.pods.set(key, pod);
    const change: Change = { rv: this.rv, type, pod, before };
    this.history.push(change);
    for (const w of this.watchers) this.deliver(w, change);
  }

  /** What a watch with this namespace and selector sees of a change. */
  private deliver(w: Watcher, c: Change): void {
    const now = c.type !== 'DELETED' && matches(c.pod, w.namespace, w.selector);
    const was = matches(c.before, w.namespace, w.selector);
    let type: string | undefined;
    if (c.type === 'DELETED') type = was || matches(c.pod, w.namespace, w.selector) ? 'DELETED' : undefined;
    else if (now && was) type = 'MODIFIED';
    else if (now) type = 'ADDED';
    else if (was) type = 'DELETED';
    if (type) this.write(w, { type, object: c.pod });
  }

  private write(w: Watcher, event: unknown): void {
    w.sent++;
    this.eventsSent++;
    w.res.write(JSON.stringify(event) + '\n');
  }

  private status(res: ServerResponse, code: number, reason: string, message: string): void {
    res.writeHead(code, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ kind: 'Status', apiVersion: 'v1', metadata: {}, status: 'Failure', message, reason, code }));
  }

  /** InferencePool list (fieldSelector metadata.name=…) or a watch that stays open without events. */
  private inferencePoolList(res: ServerResponse, namespace: string, query: Record<string, string>): void {
    const name = /^metadata\.name=(.+)$/.exec(query.fieldSelector ?? '')?.[1];
    if (query.watch === 'true' || query.watch === '1') {
      res.writeHead(200, { 'content-type': 'application/json', 'transfer-encoding': 'chunked' });
      res.flushHeaders();
      return;
    }
    const items = [...this.inferencePools.entries()].filter(([k]) => k.startsWith(`${namespace}/`) && (name === undefined || k === `${namespace}/${name}`)).map(([, v]) => v);
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ kind: 'InferencePoolList', apiVersion: 'inference.networking.k8s.io/v1', metadata: { resourceVersion: String(this.rv) }, items }));
  }

  private handle(req: IncomingMessage, res: ServerResponse): void {
    const u = new URL(req.url ?? '/', 'http://x');
    const query = Object.fromEntries(u.searchParams.entries());
    this.requests.push({ path: u.pathname, query });
    const ip = /^\/apis\/inference\.networking\.k8s\.io\/v1\/namespaces\/([^/]+)\/inferencepools$/.exec(u.pathname);
    if (req.method === 'GET' && ip) return this.inferencePoolList(res, decodeURIComponent(ip[1]), query);
    const m = /^\/api\/v1\/(?:namespaces\/([^/]+)\/)?pods$/.exec(u.pathname);
    if (req.method !== 'GET' || !m) return this.status(res, 404, 'NotFound', `the server could not find the requested resource (${req.method} ${u.pathname})`);
    const namespace = m[1] === undefined ? undefined : decodeURIComponent(m[1]);
    let selector: Record<string, string>;
    try {
      selector = parseSelector(query.labelSelector);
    } catch (e) {
      return this.status(res, 400, 'BadRequest', (e as Error).message);
    }
    if (query.watch !== 'true' && query.watch !== '1') {
      const items = [...this.pods.values()].filter((p) => matches(p, namespace, selector));
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ kind: 'PodList', apiVersion: 'v1', metadata: { resourceVersion: String(this.rv) }, items }));
      return;
    }
    if (this.http410Watches > 0) {
      this.http410Watches--;
      return this.status(res, 410, 'Expired', 'too old resource version');
    }
    const from = Number(query.resourceVersion ?? '0');
    res.writeHead(200, { 'content-type': 'application/json', 'transfer-encoding': 'chunked' });
    res.flushHeaders();
    const w: Watcher = { res, namespace, selector, bookmarks: query.allowWatchBookmarks === 'true', sent: 0 };
    if (from > 0 && from < this.compactedBelow) {
      this.write(w, { type: 'ERROR', object: { kind: 'Status', apiVersion: 'v1', metadata: {}, status: 'Failure', message: `too old resource version: ${from} (${this.compactedBelow})`, reason: 'Expired', code: 410 } });
      res.end();
      return;
    }
    this.watchers.add(w);
    res.on('close', () => this.watchers.delete(w));
    // No version: the current state as ADDED events (as the API server does). Otherwise replay
    // what happened after the client's version. Then stream live changes.
    if (from === 0) {
      for (const p of this.pods.values()) if (matches(p, namespace, selector)) this.write(w, { type: 'ADDED', object: p });
    } else {
      for (const c of this.history) if (c.rv > from) this.deliver(w, c);
    }
  }
}
