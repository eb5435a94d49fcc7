import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { request } from 'undici';
import type { Gateway } from '../../src/server/gateway.js';
import { FakeKubeApi, type PodSpec } from '../helpers/fake-kube-api.js';
import { FakeWorker } from '../helpers/fake-worker.js';
import { startGateway, waitFor } from '../helpers/gateway.js';
import { send } from '../helpers/http.js';
import { runKvgate, spawnKvgate } from '../helpers/processes.js';

/**
 * Kubernetes pod discovery against an in-process API server that speaks the list/watch
 * protocol (no cluster runs here). Pods point at fake engines on 127.0.0.1, one port each
 * (the kvgate.io/port annotation), so health checks and routing are real.
 */

const DEADLINE = 15_000;

let api: FakeKubeApi;
let kubeconfig: string;
const engines: FakeWorker[] = [];
let gw: Gateway | undefined;

async function engine(model = 'fake-model', opts: ConstructorParameters<typeof FakeWorker>[0] = {}): Promise<FakeWorker> {
  const w = await new FakeWorker({ model, ...opts }).start();
  engines.push(w);
  return w;
}

function portOf(w: FakeWorker): number {
  return Number(new URL(w.url).port);
}

/** A pod whose IP is 127.0.0.1 and whose engine port (annotation) is the fake engine's. */
function podFor(w: FakeWorker, spec: PodSpec): PodSpec {
  return { ip: '127.0.0.1', port: portOf(w), ...spec, annotations: { 'kvgate.io/port': String(portOf(w)), ...spec.annotations } };
}

function healthyUrls(g: Gateway, type?: string): string[] {
  return g.registry
    .all()
    .filter((w) => w.healthy && (type === undefined || w.type === type))
    .map((w) => w.url)
    .sort();
}

function urls(g: Gateway): string[] {
  return g.registry
    .all()
    .map((w) => w.url)
    .sort();
}

const sorted = (xs: FakeWorker[]) => xs.map((w) => w.url).sort();

beforeAll(async () => {
  api = await new FakeKubeApi().start();
  kubeconfig = api.writeKubeconfig();
  process.env.KUBECONFIG = kubeconfig;
});

afterEach(async () => {
  await gw?.close();
  gw = undefined;
  // Fresh pods for the next test: delete what this one created.
  for (const key of [...(api as unknown as { pods: Map<string, unknown> }).pods.keys()]) {
    const [ns, name] = key.split('/');
    api.delete(name, ns);
  }
  api.requests.length = 0;
});

afterAll(async () => {
  await Promise.all(engines.map((e) => e.close()));
  await api.close();
});

describe('service discovery (list+watch against an in-process API server)', () => {
  it('3 Ready pods matching the selector become 3 workers; unready, pending and non-matching pods are ignored', async () => {
    const e = await Promise.all([engine(), engine(), engine(), engine(), engine()]);
    api.create(podFor(e[0], { name: 'vllm-0', labels: { app: 'vllm' } }));
    api.create(podFor(e[1], { name: 'vllm-1', labels: { app: 'vllm' } }));
    api.create(podFor(e[2], { name: 'vllm-2', labels: { app: 'vllm', tier: 'gpu' } }));
    api.create(podFor(e[3], { name: 'other-0', labels: { app: 'other' } }));
    api.create(podFor(e[4], { name: 'vllm-3', labels: { app: 'vllm' }, ready: false }));
    api.create({ name: 'vllm-4', labels: { app: 'vllm' }, phase: 'Pending' });
    const listedAt = api.resourceVersion;
    gw = await startGateway({ serviceDiscovery: true, selector: ['app=vllm'], serviceDiscoveryNamespace: 'default' });
    await waitFor(() => healthyUrls(gw!).length === 3, DEADLINE, '3 healthy workers');
    expect(healthyUrls(gw)).toEqual(sorted(e.slice(0, 3)));
    expect(urls(gw)).toEqual(sorted(e.slice(0, 3)));
    // Each worker's model came from its /v1/models, as for --worker-urls.
    expect(gw.registry.forModel('fake-model')).toHaveLength(3);
    // The wire: a namespaced list with the selector, then a watch from the list's version with bookmarks.
    const list = api.requests.find((r) => r.query.watch === undefined)!;
    expect(list.path).toBe('/api/v1/namespaces/default/pods');
    expect(list.query.labelSelector).toBe('app=vllm');
    await waitFor(() => api.requests.some((r) => r.query.watch === 'true'), DEADLINE, 'a watch request');
    const watch = api.requests.find((r) => r.query.watch === 'true')!;
    expect(watch.path).toBe('/api/v1/namespaces/default/pods');
    expect(watch.query).toMatchObject({ labelSelector: 'app=vllm', resourceVersion: listedAt, allowWatchBookmarks: 'true' });
    // A pod that becomes ready later is added from its MODIFIED event.
    api.setReady('vllm-3', true);
    await waitFor(() => healthyUrls(gw!).length === 4, DEADLINE, 'vllm-3 added');
    expect(healthyUrls(gw)).toContain(e[4].url);
  });

  it('a pod turning unready is removed within one watch event; ready again, it returns; deleted, it leaves', async () => {
    const e = await Promise.all([engine(), engine(), engine()]);
    e.forEach((w, i) => api.create(podFor(w, { name: `p${i}`, labels: { app: 'vllm' } })));
    gw = await startGateway({ serviceDiscovery: true, selector: ['app=vllm'] });
    await waitFor(() => healthyUrls(gw!).length === 3 && api.watchCount === 1, DEADLINE, '3 workers, watching');
    const before = gw.discovery!.watchStats()[0];
    api.setReady('p1', false);
    await waitFor(() => gw!.registry.byUrl(e[1].url).length === 0, DEADLINE, 'p1 removed');
    const after = gw.discovery!.watchStats()[0];
    expect(after.events - before.events).toBe(1);
    expect(after.lists).toBe(before.lists);
    expect(urls(gw)).toEqual(sorted([e[0], e[2]]));
    api.setReady('p1', true);
    await waitFor(() => healthyUrls(gw!).length === 3, DEADLINE, 'p1 back');
    api.delete('p2');
    await waitFor(() => gw!.registry.byUrl(e[2].url).length === 0, DEADLINE, 'p2 removed');
    expect(urls(gw)).toEqual(sorted([e[0], e[1]]));
    // A terminating pod (deletionTimestamp set, still Ready) stops taking traffic at once.
    api.update('p0', (p) => (p.metadata.deletionTimestamp = new Date().toISOString()));
    await waitFor(() => gw!.registry.byUrl(e[0].url).length === 0, DEADLINE, 'p0 removed');
    expect(urls(gw)).toEqual([e[1].url]);
  });

  it('a restarted pod with a new IP (here: a new port) is a new worker, and the old one leaves', async () => {
    const [a, b, b2, c2] = await Promise.all([engine(), engine(), engine(), engine()]);
    api.create(podFor(a, { name: 'sts-0', labels: { app: 'vllm' } }));
    api.create(podFor(b, { name: 'sts-1', labels: { app: 'vllm' } }));
    gw = await startGateway({ serviceDiscovery: true, selector: ['app=vllm'] });
    await waitFor(() => healthyUrls(gw!).length === 2, DEADLINE, '2 workers');
    // StatefulSet restart: same name, new uid, new address.
    api.delete('sts-1');
    api.create(podFor(b2, { name: 'sts-1', labels: { app: 'vllm' } }));
    await waitFor(() => healthyUrls(gw!).includes(b2.url) && gw!.registry.byUrl(b.url).length === 0, DEADLINE, 'sts-1 replaced');
    // The address changing in place (one MODIFIED event) does the same.
    api.update('sts-0', (p) => (p.metadata.annotations['kvgate.io/port'] = String(portOf(c2))));
    await waitFor(() => healthyUrls(gw!).includes(c2.url) && gw!.registry.byUrl(a.url).length === 0, DEADLINE, 'sts-0 moved');
    expect(urls(gw)).toEqual(sorted([b2, c2]));
  });

  it('a watch closed with 410 Gone re-lists and ends with the same set (and reconciles what changed meanwhile)', async () => {
    const e = await Promise.all([engine(), engine(), engine(), engine()]);
    for (let i = 0; i < 3; i++) api.create(podFor(e[i], { name: `g${i}`, labels: { app: 'vllm' } }));
    gw = await startGateway({ serviceDiscovery: true, selector: ['app=vllm'] });
    await waitFor(() => healthyUrls(gw!).length === 3 && api.watchCount === 1, DEADLINE, '3 workers, watching');
    let removed = 0;
    gw.registry.on('removed', () => removed++);
    const s0 = gw.discovery!.watchStats()[0];
    // ERROR event with a v1 Status 410 Expired, nothing changed: same set, nobody removed.
    api.expireWatches();
    await waitFor(() => gw!.discovery!.watchStats()[0].lists === s0.lists + 1 && api.watchCount === 1, DEADLINE, 're-list after 410 event');
    expect(gw.discovery!.watchStats()[0].gone).toBe(s0.gone + 1);
    expect(healthyUrls(gw)).toEqual(sorted(e.slice(0, 3)));
    expect(removed).toBe(0);
    // Changes only a new list can see (history compacted): one pod gone, one added.
    api.expireWatches(() => {
      api.delete('g0');
      api.create(podFor(e[3], { name: 'g3', labels: { app: 'vllm' } }));
    });
    await waitFor(() => healthyUrls(gw!).includes(e[3].url) && gw!.registry.byUrl(e[0].url).length === 0, DEADLINE, 'reconciled after 410');
    expect(urls(gw)).toEqual(sorted(e.slice(1)));
    // An HTTP 410 on the watch request itself does the same.
    const s1 = gw.discovery!.watchStats()[0];
    api.http410Watches = 1;
    api.closeWatches();
    await waitFor(() => gw!.discovery!.watchStats()[0].lists === s1.lists + 1 && api.watchCount === 1, DEADLINE, 're-list after HTTP 410');
    expect(urls(gw)).toEqual(sorted(e.slice(1)));
  });

  it('a cleanly closed watch resumes from the last resourceVersion (bookmarks included) without listing again', async () => {
    const [a, b] = await Promise.all([engine(), engine()]);
    api.create(podFor(a, { name: 'r0', labels: { app: 'vllm' } }));
    gw = await startGateway({ serviceDiscovery: true, selector: ['app=vllm'] });
    await waitFor(() => healthyUrls(gw!).length === 1 && api.watchCount === 1, DEADLINE, 'watching');
    const lists = gw.discovery!.watchStats()[0].lists;
    api.bookmark();
    const bookmarkRv = api.resourceVersion;
    await waitFor(() => gw!.discovery!.watchStats()[0].events >= 1, DEADLINE, 'bookmark received');
    const watchesBefore = api.requests.filter((r) => r.query.watch === 'true').length;
    api.closeWatches();
    await waitFor(() => api.requests.filter((r) => r.query.watch === 'true').length === watchesBefore + 1 && api.watchCount === 1, DEADLINE, 'watch resumed');
    expect(api.requests.filter((r) => r.query.watch === 'true').at(-1)!.query.resourceVersion).toBe(bookmarkRv);
    api.create(podFor(b, { name: 'r1', labels: { app: 'vllm' } }));
    await waitFor(() => healthyUrls(gw!).length === 2, DEADLINE, 'r1 added');
    expect(gw.discovery!.watchStats()[0].lists).toBe(lists);
  });

  it('prefill/decode selectors produce the two pools, with bootstrap ports from sglang.ai/bootstrap-port', async () => {
    const [p0, p1, d0, d1, x] = await Promise.all([engine(), engine(), engine(), engine(), engine()]);
    api.create(podFor(p0, { name: 'prefill-0', namespace: 'llm', labels: { app: 'sglang', role: 'prefill' }, annotations: { 'sglang.ai/bootstrap-port': '9001' } }));
    api.create(podFor(p1, { name: 'prefill-1', namespace: 'llm', labels: { app: 'sglang', role: 'prefill' }, annotations: { 'sglang.ai/bootstrap-port': 'not-a-port' } }));
    api.create(podFor(d0, { name: 'decode-0', namespace: 'llm', labels: { app: 'sglang', role: 'decode' }, annotations: { 'sglang.ai/bootstrap-port': '9009' } }));
    api.create(podFor(d1, { name: 'decode-1', namespace: 'other', labels: { app: 'sglang', role: 'decode' } }));
    api.create(podFor(x, { name: 'router', namespace: 'llm', labels: { app: 'sglang', role: 'router' } }));
    // All namespaces (the default), as the SGLang router.
    gw = await startGateway({ pdDisaggregation: true, serviceDiscovery: true, prefillSelector: ['app=sglang', 'role=prefill'], decodeSelector: ['app=sglang', 'role=decode'] });
    await waitFor(() => healthyUrls(gw!, 'prefill').length === 2 && healthyUrls(gw!, 'decode').length === 2, DEADLINE, 'both pools');
    expect(healthyUrls(gw, 'prefill')).toEqual(sorted([p0, p1]));
    expect(healthyUrls(gw, 'decode')).toEqual(sorted([d0, d1]));
    const byUrl = (u: string) => gw!.registry.byUrl(u)[0];
    expect(byUrl(p0.url).bootstrapPort).toBe(9001);
    expect(byUrl(p1.url).bootstrapPort).toBeNull(); // invalid annotation: no port, as the SGLang router
    expect(byUrl(d0.url).bootstrapPort).toBeNull(); // decode pods have none
    expect(gw.registry.byUrl(x.url)).toHaveLength(0);
    expect(api.requests.filter((r) => r.query.watch === undefined).map((r) => [r.path, r.query.labelSelector]).sort()).toEqual([
      ['/api/v1/pods', 'app=sglang,role=decode'],
      ['/api/v1/pods', 'app=sglang,role=prefill'],
    ]);
    // A request goes to a (prefill, decode) pair with the annotated bootstrap port.
    const res = await send(`${gw.url}/v1/chat/completions`, { body: { model: 'fake-model', messages: [{ role: 'user', content: 'hi' }], max_tokens: 4 } });
    expect(res.status).toBe(200);
    const prefillReq = [p0, p1].flatMap((p) => p.received).find((r) => r.path === '/v1/chat/completions')!;
    const injected = JSON.parse(prefillReq.body);
    expect(injected.bootstrap_host).toBe('127.0.0.1');
    expect([9001, null]).toContain(injected.bootstrap_port);
    // Role change: a decode pod relabelled as prefill moves pools.
    api.update('decode-1', (p) => (p.metadata.labels.role = 'prefill'), 'other');
    await waitFor(() => healthyUrls(gw!, 'prefill').length === 3 && healthyUrls(gw!, 'decode').length === 1, DEADLINE, 'decode-1 moved to prefill');
  });

  it('--model-id-from, several ports per pod, and the DP-size annotation', async () => {
    const [a, b, c] = await Promise.all([engine('served-name'), engine('served-name'), engine('served-name')]);
    api.create(podFor(a, { name: 'm0', labels: { app: 'vllm', model: 'llama-3-8b' } }));
    api.create({ name: 'm1', ip: '127.0.0.1', labels: { app: 'vllm', model: 'qwen3' }, annotations: { 'kvgate.io/port': `${portOf(b)},${portOf(c)}`, 'kvgate.io/dp-size': '2' } });
    gw = await startGateway({ serviceDiscovery: true, selector: ['app=vllm'], modelIdFrom: 'label:model', dpAware: true });
    await waitFor(() => gw!.registry.all().filter((w) => w.healthy).length === 5, DEADLINE, '5 workers');
    expect(gw.registry.forModel('llama-3-8b').map((w) => w.id)).toEqual([`${a.url}@0`]);
    expect(gw.registry.forModel('qwen3').map((w) => w.id).sort()).toEqual([`${b.url}@0`, `${b.url}@1`, `${c.url}@0`, `${c.url}@1`].sort());
    expect(gw.registry.forModel('served-name')).toHaveLength(0);
    api.delete('m1');
    await waitFor(() => gw!.registry.size === 1, DEADLINE, 'm1 ranks removed');
  });

  it('removal does not cut in-flight requests: a stream on a pod that turns unready finishes', async () => {
    const slow = await engine('fake-model', { chunks: 40, chunkDelayMs: 25 });
    api.create(podFor(slow, { name: 's0', labels: { app: 'slow' } }));
    gw = await startGateway({ serviceDiscovery: true, selector: ['app=slow'] });
    await waitFor(() => healthyUrls(gw!).length === 1, DEADLINE, 'worker');
    const worker = gw.registry.byUrl(slow.url)[0];
    const pending = send(`${gw.url}/v1/chat/completions`, { body: { model: 'fake-model', stream: true, messages: [{ role: 'user', content: 'go' }] } });
    await waitFor(() => slow.activeStreams === 1, DEADLINE, 'stream started');
    api.setReady('s0', false);
    await waitFor(() => gw!.registry.size === 0, DEADLINE, 'removed');
    const res = await pending;
    expect(res.status).toBe(200);
    expect(res.text).toContain('tok39');
    expect(res.text).toContain('[DONE]');
    expect(worker.load).toBe(0);
    expect(slow.abortedEarly).toBe(0);
    // New requests find no worker.
    expect((await send(`${gw.url}/v1/chat/completions`, { body: { model: 'fake-model', messages: [{ role: 'user', content: 'x' }] } })).status).toBe(404);
  });

  it('--worker-urls and discovery combine; a pod with a statically registered URL is left alone', async () => {
    const [s, d] = await Promise.all([engine(), engine()]);
    api.create(podFor(s, { name: 'dup', labels: { app: 'vllm' } }));
    api.create(podFor(d, { name: 'd0', labels: { app: 'vllm' } }));
    gw = await startGateway({ workerUrls: [s.url], serviceDiscovery: true, selector: ['app=vllm'] });
    await waitFor(() => healthyUrls(gw!).length === 2, DEADLINE, '2 workers');
    api.delete('dup');
    await waitFor(() => api.watchCount === 1 && gw!.discovery!.status().regular.length === 1, DEADLINE, 'dup gone from discovery');
    expect(healthyUrls(gw)).toEqual(sorted([s, d])); // the static one stays
  });
});

describe('service discovery through the CLI', () => {
  it('kvgate serve --service-discovery routes to discovered pods', async () => {
    const [a, b] = await Promise.all([engine('cli-model'), engine('cli-model')]);
    api.create(podFor(a, { name: 'cli-0', namespace: 'serving', labels: { app: 'engine' } }));
    api.create(podFor(b, { name: 'cli-1', namespace: 'serving', labels: { app: 'engine' } }));
    const proc = await spawnKvgate(
      ['serve', '--host', '127.0.0.1', '--port', '0', '--service-discovery', '--selector', 'app=engine', '--service-discovery-namespace', 'serving', '--health-check-interval-secs', '0.2', '--log-level', 'info'],
      /"url":"(http:\/\/127\.0\.0\.1:\d+)"[^\n]*kvgate listening/,
      DEADLINE,
      { KUBECONFIG: kubeconfig },
    );
    try {
      const base = proc.match[1];
      const healthy = async () => ((await send(`${base}/workers`)).json?.workers ?? []).filter((w: { healthy: boolean }) => w.healthy).length;
      const end = Date.now() + DEADLINE;
      while ((await healthy()) < 2 && Date.now() < end) await new Promise((r) => setTimeout(r, 50));
      expect(await healthy()).toBe(2);
      const res = await send(`${base}/v1/chat/completions`, { body: { model: 'cli-model', messages: [{ role: 'user', content: 'hello' }] } });
      expect(res.status).toBe(200);
      expect([a.url, b.url]).toContain(res.headers['x-kvgate-worker']);
      const ready = await request(`${base}/readiness`);
      expect(ready.statusCode).toBe(200);
      await ready.body.dump();
      expect(proc.output()).toContain('service discovery: watching pods');
    } finally {
      await proc.stop();
    }
  });

  it('bad discovery flags and a missing API server fail clearly', async () => {
    const noSd = await runKvgate(['serve', '--selector', 'app=x']);
    expect(noSd.code).toBe(2);
    expect(noSd.out).toContain('--selector needs --service-discovery');
    const badSel = await runKvgate(['serve', '--service-discovery', '--selector', 'app']);
    expect(badSel.code).toBe(2);
    expect(badSel.out).toContain("invalid value for --selector: 'app' is not key=value");
    const noSel = await runKvgate(['serve', '--service-discovery']);
    expect(noSel.code).toBe(2);
    expect(noSel.out).toContain('--service-discovery needs --selector');
    const pdSel = await runKvgate(['serve', '--service-discovery', '--pd-disaggregation', '--prefill-selector', 'role=prefill']);
    expect(pdSel.code).toBe(2);
    expect(pdSel.out).toContain('--decode-selector');
    const badFrom = await runKvgate(['serve', '--service-discovery', '--selector', 'a=b', '--model-id-from', 'header:x']);
    expect(badFrom.code).toBe(2);
    expect(badFrom.out).toContain('invalid value for --model-id-from');
    const home = mkdtempSync(join(tmpdir(), 'kvgate-home-'));
    const none = await runKvgate(['serve', '--port', '0', '--host', '127.0.0.1', '--service-discovery', '--selector', 'a=b'], { KUBECONFIG: '', HOME: home, KUBERNETES_SERVICE_HOST: '' });
    expect(none.code).toBe(1);
    expect(none.out).toContain('no Kubernetes API server found');
  });
});
