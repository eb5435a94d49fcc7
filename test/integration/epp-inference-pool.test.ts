import { createServer, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import * as k8s from '@kubernetes/client-node';
import pino from 'pino';
import { describe, expect, it } from 'vitest';
import { InferencePoolWatcher, parseInferencePool, type PoolSpec } from '../../src/epp/inference-pool.js';
import { waitFor } from '../helpers/gateway.js';

const pool = (rv: string, ports: number[], labels: Record<string, string> = { app: 'vllm' }) => ({
  apiVersion: 'inference.networking.k8s.io/v1',
  kind: 'InferencePool',
  metadata: { name: 'llm', namespace: 'prod', resourceVersion: rv },
  spec: { selector: { matchLabels: labels }, targetPorts: ports.map((number) => ({ number })), endpointPickerRef: { name: 'kvgate-epp', port: { number: 9002 } } },
});

describe('InferencePool reader (get + watch of one object, API wire protocol)', () => {
  it('parses selector and target ports and rejects malformed pools', () => {
    expect(parseInferencePool(pool('1', [8000, 8001]))).toEqual({ namespace: 'prod', name: 'llm', selector: { app: 'vllm' }, targetPorts: [8000, 8001], appProtocol: 'http' });
    expect(() => parseInferencePool({ spec: { selector: { matchLabels: {} }, targetPorts: [{ number: 8000 }] } })).toThrow(/matchLabels/);
    expect(() => parseInferencePool({ spec: { selector: { matchLabels: { a: 'b' } }, targetPorts: [{ number: 0 }] } })).toThrow(/targetPorts/);
  });

  it('lists, follows watch events, re-lists after 410 Gone, reports deletion', async () => {
    const requests: string[] = [];
    let lists = 0;
    let current = pool('10', [8000]);
    const watches: ServerResponse[] = [];
    const server = createServer((req, res) => {
      const url = new URL(req.url!, 'http://x');
      requests.push(url.pathname + url.search);
      if (url.pathname !== '/apis/inference.networking.k8s.io/v1/namespaces/prod/inferencepools' || url.searchParams.get('fieldSelector') !== 'metadata.name=llm') {
        res.writeHead(404).end();
        return;
      }
      if (url.searchParams.get('watch') === 'true') {
        res.writeHead(200, { 'content-type': 'application/json', 'transfer-encoding': 'chunked' });
        res.flushHeaders();
        watches.push(res);
        return;
      }
      lists++;
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ apiVersion: 'inference.networking.k8s.io/v1', kind: 'InferencePoolList', metadata: { resourceVersion: current.metadata.resourceVersion }, items: [current] }));
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    const kc = new k8s.KubeConfig();
    kc.loadFromOptions({
      clusters: [{ name: 'c', server: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, skipTLSVerify: true }],
      users: [{ name: 'u' }],
      contexts: [{ name: 'x', cluster: 'c', user: 'u' }],
      currentContext: 'x',
    });
    const seen: Array<PoolSpec | undefined> = [];
    const w = new InferencePoolWatcher({ name: 'llm', namespace: 'prod', log: pino({ level: 'silent' }), kubeConfig: kc, onChange: (p) => seen.push(p) });
    try {
      await w.start();
      expect(seen).toEqual([{ namespace: 'prod', name: 'llm', selector: { app: 'vllm' }, targetPorts: [8000], appProtocol: 'http' }]);
      await waitFor(() => watches.length === 1, 3000, 'watch opened');
      expect(requests.some((r) => r.includes('watch=true') && r.includes('resourceVersion=10'))).toBe(true);
      // A change of ports arrives as one MODIFIED event; a bookmark changes nothing.
      watches[0].write(JSON.stringify({ type: 'BOOKMARK', object: { kind: 'InferencePool', metadata: { resourceVersion: '11' } } }) + '\n');
      current = pool('12', [8000, 8001]);
      watches[0].write(JSON.stringify({ type: 'MODIFIED', object: current }) + '\n');
      await waitFor(() => seen.length === 2, 3000, 'modified');
      expect(seen[1]!.targetPorts).toEqual([8000, 8001]);
      // 410 Gone: the watch ends, the reader lists again (new labels meanwhile) and watches on.
      current = pool('20', [8000, 8001], { app: 'sglang' });
      watches[0].end(JSON.stringify({ type: 'ERROR', object: { kind: 'Status', code: 410, reason: 'Expired', message: 'too old resource version' } }) + '\n');
      await waitFor(() => lists === 2 && watches.length === 2, 5000, 're-list and new watch');
      await waitFor(() => seen.length === 3, 3000, 're-listed pool');
      expect(seen[2]!.selector).toEqual({ app: 'sglang' });
      watches[1].write(JSON.stringify({ type: 'DELETED', object: current }) + '\n');
      await waitFor(() => seen.length === 4, 3000, 'deleted');
      expect(seen[3]).toBeUndefined();
    } finally {
      w.stop();
      for (const r of watches) r.destroy();
      server.closeAllConnections();
      await new Promise<void>((r) => server.close(() => r()));
    }
  });
});
