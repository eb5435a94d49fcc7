import { describe, expect, it } from 'vitest';
import { isRoutable, parseModelIdFrom, parseSelector, podTargets, type PodObject } from '../../src/discovery/pods.js';

const pod = (over: { ip?: string; phase?: string; ready?: string; ann?: Record<string, string>; labels?: Record<string, string>; deleting?: boolean } = {}): PodObject => ({
  metadata: { name: 'p', namespace: 'llm', labels: over.labels ?? { app: 'vllm' }, annotations: over.ann ?? {}, ...(over.deleting ? { deletionTimestamp: '2025-01-01T00:00:00Z' } : {}) },
  status: { phase: over.phase ?? 'Running', podIP: over.ip ?? '10.0.0.7', conditions: [{ type: 'Ready', status: over.ready ?? 'True' }] },
});
const opts = { type: 'regular' as const, defaultPort: 8000, modelIdFrom: undefined, modelId: undefined };

describe('discovery: pods → workers', () => {
  it('parses equality selectors and rejects malformed ones', () => {
    expect(parseSelector(['app=vllm', 'kvgate.io/role==decode'])).toEqual({ app: 'vllm', 'kvgate.io/role': 'decode' });
    expect(() => parseSelector(['app'])).toThrow(/not key=value/);
    expect(() => parseSelector(['app=a b'])).toThrow(/label value/);
    expect(() => parseSelector(['-bad=x'])).toThrow(/label key/);
    expect(() => parseSelector(['a=1', 'a=2'])).toThrow(/two values/);
  });

  it('only Running, Ready, addressed, not terminating pods are routable', () => {
    expect(isRoutable(pod())).toBe(true);
    expect(isRoutable(pod({ phase: 'Pending' }))).toBe(false);
    expect(isRoutable(pod({ ready: 'False' }))).toBe(false);
    expect(isRoutable(pod({ ip: '' }))).toBe(false);
    expect(isRoutable(pod({ deleting: true }))).toBe(false);
  });

  it('URL from the pod IP and port (annotation overrides, comma list = one worker per port, IPv6 bracketed)', () => {
    expect(podTargets(pod(), opts).targets.map((t) => t.url)).toEqual(['http://10.0.0.7:8000']);
    expect(podTargets(pod({ ann: { 'kvgate.io/port': '9000' } }), opts).targets.map((t) => t.url)).toEqual(['http://10.0.0.7:9000']);
    const multi = podTargets(pod({ ann: { 'kvgate.io/port': '8000,8001', 'kvgate.io/kv-events-port': '5557' } }), opts).targets;
    expect(multi.map((t) => [t.url, t.kvEventsEndpoint])).toEqual([
      ['http://10.0.0.7:8000', 'tcp://10.0.0.7:5557'],
      ['http://10.0.0.7:8001', 'tcp://10.0.0.7:5558'],
    ]);
    expect(podTargets(pod({ ip: 'fd00::7' }), opts).targets[0].url).toBe('http://[fd00::7]:8000');
    const bad = podTargets(pod({ ann: { 'kvgate.io/port': '80000' } }), opts);
    expect(bad.targets[0].url).toBe('http://10.0.0.7:8000');
    expect(bad.problems[0]).toMatch(/kvgate.io\/port/);
    expect(podTargets(pod({ ready: 'False' }), opts).targets).toEqual([]);
  });

  it('bootstrap port for prefill pods only; model id from namespace, label or annotation', () => {
    const ann = { 'sglang.ai/bootstrap-port': '8998', 'example.com/model': 'llama' };
    expect(podTargets(pod({ ann }), { ...opts, type: 'prefill' }).targets[0].bootstrapPort).toBe(8998);
    expect(podTargets(pod({ ann }), { ...opts, type: 'decode' }).targets[0].bootstrapPort).toBeNull();
    expect(podTargets(pod(), { ...opts, modelIdFrom: parseModelIdFrom('namespace') }).targets[0].modelId).toBe('llm');
    expect(podTargets(pod({ labels: { app: 'vllm', model: 'qwen' } }), { ...opts, modelIdFrom: parseModelIdFrom('label:model') }).targets[0].modelId).toBe('qwen');
    expect(podTargets(pod({ ann }), { ...opts, modelIdFrom: parseModelIdFrom('annotation:example.com/model') }).targets[0].modelId).toBe('llama');
    expect(() => parseModelIdFrom('header:x')).toThrow();
  });
});
