// kvgate in PD mode in front of simulated prefill and decode engines, both hand-off protocols:
// the "done when" scenario, end to end over real HTTP.
import OpenAI from 'openai';
import { afterEach, describe, expect, it } from 'vitest';
import { startSimServer, type SimServer } from '../../src/sim/server.js';
import type { Gateway } from '../../src/server/gateway.js';
import { startGateway } from '../helpers/gateway.js';

const cleanups: Array<() => Promise<unknown>> = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!().catch(() => undefined);
});

async function sim(role: 'prefill' | 'decode', protocol: 'sglang' | 'vllm', seed: number): Promise<SimServer> {
  const s = await startSimServer({
    host: '127.0.0.1',
    port: 0,
    speed: 20,
    seed,
    pd: { role, protocol, bootstrapPort: 0, kvSideChannelPort: 0, transferTimeoutSecs: 10 },
  });
  cleanups.push(() => s.close());
  return s;
}

async function cluster(protocol: 'sglang' | 'vllm'): Promise<{ gw: Gateway; prefills: SimServer[]; decodes: SimServer[] }> {
  const prefills = [await sim('prefill', protocol, 1), await sim('prefill', protocol, 2)];
  const decodes = [await sim('decode', protocol, 3), await sim('decode', protocol, 4)];
  const prefill = [];
  for (const p of prefills) {
    const info = (await (await fetch(p.url + '/get_server_info')).json()) as { bootstrap_port?: number | null };
    prefill.push({ url: p.url, bootstrapPort: protocol === 'sglang' ? (info.bootstrap_port ?? null) : null });
  }
  const gw = await startGateway({ pdDisaggregation: true, pdProtocol: protocol, prefill, decode: decodes.map((d) => d.url), prefillPolicy: 'cache_aware', decodePolicy: 'least_load' });
  cleanups.push(() => gw.close());
  return { gw, prefills, decodes };
}

const system = 'You are a concise assistant for a train operator; answer with times and platforms. '.repeat(10);

describe.each(['sglang', 'vllm'] as const)('kvgate --pd-disaggregation --pd-protocol %s in front of kvgate sim', (protocol) => {
  it('serves non-streaming and streaming chat from the decode engines; a shared prefix stays on one prefill engine', async () => {
    const { gw, prefills, decodes } = await cluster(protocol);
    const client = new OpenAI({ baseURL: gw.url + '/v1', apiKey: 'unused', maxRetries: 0 });
    const prefillWorkers = new Set<string | null>();
    for (let i = 0; i < 6; i++) {
      const { data, response } = await client.chat.completions
        .create({ model: 'kvgate-sim', messages: [{ role: 'system', content: system }, { role: 'user', content: `When is train ${i}?` }], max_tokens: 12 })
        .withResponse();
      expect(data.choices[0].message.content!.length).toBeGreaterThan(0);
      expect(data.usage!.completion_tokens).toBe(12);
      expect(data.usage!.prompt_tokens).toBeGreaterThan(100);
      prefillWorkers.add(response.headers.get('x-kvgate-prefill-worker'));
      expect(decodes.map((d) => d.url)).toContain(response.headers.get('x-kvgate-worker'));
    }
    expect(prefillWorkers.size).toBe(1);

    const stream = await client.chat.completions.create({
      model: 'kvgate-sim',
      messages: [{ role: 'system', content: system }, { role: 'user', content: 'Stream the timetable.' }],
      max_tokens: 20,
      stream: true,
      stream_options: { include_usage: true },
    });
    let chunks = 0;
    let usage: OpenAI.CompletionUsage | undefined | null;
    for await (const c of stream) {
      if (c.choices[0]?.delta?.content) chunks++;
      if (c.usage) usage = c.usage;
    }
    expect(chunks).toBeGreaterThan(1);
    expect(usage?.completion_tokens).toBe(20);
    // Prompts were computed on the prefill engines; the decode engines imported their KV.
    const computed = (ss: SimServer[]) => ss.reduce((s, x) => s + x.engines[0]!.engine.stats().prefillTokensComputed, 0);
    expect(computed(prefills)).toBeGreaterThan(100); // the shared system prompt once, then cache hits
    expect(computed(decodes)).toBe(0);
    expect(decodes.reduce((s, d) => s + d.engines[0]!.engine.stats().prefilledAdmissions, 0)).toBe(7);
    expect(gw.registry.all().every((w) => w.load === 0)).toBe(true);
  });
});
