// `kvgate epp --pool-name`: the InferencePool's selector and target ports find its pods through
// the same pod watcher as `serve --service-discovery`, against an in-process API server that
// speaks the list/watch protocol (no Kubernetes API server can run here).
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import pino from 'pino';
import { defaultEppConfig } from '../../src/config/epp-config.js';
import { SeededRng } from '../../src/core/rng.js';
import { EndpointPicker } from '../../src/epp/endpoint-picker.js';
import { FakeKubeApi } from '../helpers/fake-kube-api.js';
import { FakeWorker } from '../helpers/fake-worker.js';
import { waitFor } from '../helpers/gateway.js';
import { EnvoyStream, extProcClient, setHeaders } from '../helpers/envoy-ext-proc.js';

const portOf = (w: FakeWorker) => Number(new URL(w.url).port);

describe('kvgate epp --pool-name (InferencePool → pods → workers)', () => {
  let api: FakeKubeApi;
  let engines: FakeWorker[];
  let epp: EndpointPicker;
  const savedKubeconfig = process.env.KUBECONFIG;

  beforeAll(async () => {
    api = await new FakeKubeApi().start();
    process.env.KUBECONFIG = api.writeKubeconfig();
    engines = await Promise.all([0, 1, 2].map(() => new FakeWorker({ model: 'fake-model' }).start()));
    api.inferencePools.set('prod/llm', {
      apiVersion: 'inference.networking.k8s.io/v1',
      kind: 'InferencePool',
      metadata: { name: 'llm', namespace: 'prod', resourceVersion: '1' },
      spec: { selector: { matchLabels: { app: 'vllm' } }, targetPorts: [{ number: 8000 }], endpointPickerRef: { name: 'kvgate-epp', port: { number: 9002 } } },
    });
    // On one host every pod is 127.0.0.1, so each names its engine's port (kvgate.io/port).
    engines.forEach((e, i) =>
      api.create({ name: `vllm-${i}`, namespace: 'prod', labels: { app: 'vllm' }, ip: '127.0.0.1', port: portOf(e), annotations: { 'kvgate.io/port': String(portOf(e)) } }),
    );
    api.create({ name: 'other', namespace: 'prod', labels: { app: 'other' }, ip: '127.0.0.1', port: 1, annotations: { 'kvgate.io/port': '1' } });
    epp = new EndpointPicker(
      defaultEppConfig({
        host: '127.0.0.1',
        port: 0,
        grpcPort: 0,
        grpcHealthPort: 0,
        logLevel: 'silent',
        healthCheckIntervalSecs: 0.1,
        healthCheckTimeoutSecs: 1,
        engineMetricsIntervalSecs: 0,
        policy: 'cache_aware',
        poolName: 'llm',
        poolNamespace: 'prod',
      }),
      { rng: new SeededRng(3), logger: pino({ level: 'silent' }) },
    );
    await epp.start();
  }, 30_000);

  afterAll(async () => {
    await epp?.close();
    await api?.close();
    await Promise.all(engines.map((e) => e.close()));
    if (savedKubeconfig === undefined) delete process.env.KUBECONFIG;
    else process.env.KUBECONFIG = savedKubeconfig;
  });

  it('registers the pool’s Ready pods, picks among them, and drops a pod that turns unready', async () => {
    const urls = () => epp.core.registry.all().filter((w) => w.isAvailable()).map((w) => w.url).sort();
    await waitFor(() => urls().length === 3, 10_000, 'the 3 pool pods as healthy workers');
    expect(urls()).toEqual(engines.map((e) => e.url).sort());

    const client = extProcClient(`127.0.0.1:${epp.grpcPort}`);
    try {
      const s = new EnvoyStream(client);
      s.requestHeaders({ ':method': 'POST', ':path': '/v1/chat/completions', ':authority': 'gw', 'content-type': 'application/json' });
      s.requestBody(Buffer.from(JSON.stringify({ model: 'fake-model', messages: [{ role: 'user', content: 'hello' }] })), true);
      const r = (await s.next()) as { request_headers?: { response: unknown } };
      const picked = setHeaders(r.request_headers!.response as never)['x-gateway-destination-endpoint'].split(',')[0];
      expect(engines.map((e) => new URL(e.url).host)).toContain(picked);
      s.cancel();
    } finally {
      client.close();
    }

    api.setReady('vllm-1', false, 'prod');
    await waitFor(() => urls().length === 2, 10_000, 'the unready pod removed');
    expect(urls()).not.toContain(engines[1].url);
    await waitFor(() => epp.core.registry.all().every((w) => w.load === 0), 3000, 'load back to 0');
  });
});
