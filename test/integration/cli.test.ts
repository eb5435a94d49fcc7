// End to end through the real CLI: `kvgate sim` engines behind `kvgate serve`, as separate processes.
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runKvgate, spawnKvgate, type Spawned } from '../helpers/processes.js';
import { freePort } from '../helpers/ports.js';

const running: Spawned[] = [];
let simA: string;
let simB: string;

async function serve(args: string[]): Promise<string> {
  const p = await spawnKvgate(['serve', '--host', '127.0.0.1', '--port', '0', '--health-check-interval-secs', '0.5', ...args], /"url":"(http:\/\/[^"]+)"[^\n]*kvgate listening/);
  running.push(p);
  return p.match[1];
}

async function metric(url: string, name: string, labels = ''): Promise<number> {
  const text = await (await fetch(url + '/metrics')).text();
  const line = text.split('\n').find((l) => (l.startsWith(name + '{') || l.startsWith(name + ' ')) && l.includes(labels));
  return line ? Number(line.split(' ').at(-1)) : NaN;
}

beforeAll(async () => {
  const sim = (seed: string) => spawnKvgate(['sim', '--host', '127.0.0.1', '--port', '0', '--speed', '20', '--seed', seed], /listening on (http:\/\/\S+)/);
  const [a, b] = await Promise.all([sim('1'), sim('2')]);
  running.push(a, b);
  simA = a.match[1];
  simB = b.match[1];
});

afterAll(async () => {
  await Promise.all(running.map((p) => p.stop()));
});

const system = 'You are the assistant of a large hardware store. Always answer with the aisle number, the price and a safety note. '.repeat(12);
const chat = (q: string) => ({ model: 'kvgate-sim', messages: [{ role: 'system', content: system }, { role: 'user', content: q }], max_tokens: 4 });

async function send(url: string, body: unknown) {
  const r = await fetch(url + '/v1/chat/completions', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
  const json = (await r.json()) as { usage?: { prompt_tokens_details?: { cached_tokens?: number } } };
  return { status: r.status, worker: r.headers.get('x-kvgate-worker'), json };
}

describe('kvgate serve in front of kvgate sim (separate processes)', () => {
  it('cache_aware keeps a shared system prompt on one worker, whose prefix cache then hits', async () => {
    const url = await serve(['--worker-urls', simA, simB]);
    const workers = new Set<string | null>();
    let lastCached = 0;
    for (let i = 0; i < 20; i++) {
      const r = await send(url, chat(`Where are the hammers, question ${i}?`));
      expect(r.status).toBe(200);
      workers.add(r.worker);
      lastCached = r.json.usage?.prompt_tokens_details?.cached_tokens ?? 0;
    }
    expect(workers.size).toBe(1);
    expect(lastCached).toBeGreaterThan(100);
    const listed = (await (await fetch(url + '/workers')).json()) as { workers: { load: number; model: string }[] };
    expect(listed.workers.map((w) => w.load)).toEqual([0, 0]);
    expect(listed.workers.map((w) => w.model)).toEqual(['kvgate-sim', 'kvgate-sim']);
  });

  it('round_robin alternates the same requests', async () => {
    const url = await serve(['--worker-urls', simA, simB, '--policy', 'round_robin']);
    const seq: (string | null)[] = [];
    for (let i = 0; i < 20; i++) seq.push((await send(url, chat(`q${i}`))).worker);
    for (let i = 1; i < seq.length; i++) expect(seq[i]).not.toBe(seq[i - 1]);
  });

  it('the OpenAI SDK streams through kvgate chunk by chunk; breaking off aborts the engine request', async () => {
    const url = await serve(['--worker-urls', simA, '--policy', 'least_load']);
    const abortedBefore = (await metric(simA, 'vllm:request_success_total', 'finished_reason="abort"')) || 0;
    const client = new OpenAI({ baseURL: url + '/v1', apiKey: 'unused', maxRetries: 0 });
    const stream = await client.chat.completions.create({ model: 'kvgate-sim', messages: [{ role: 'user', content: 'Tell me a long story.' }], max_tokens: 5000, stream: true });
    let chunks = 0;
    for await (const c of stream) {
      if (c.choices[0]?.delta?.content) chunks++;
      if (chunks === 10) break;
    }
    expect(chunks).toBe(10);
    const t0 = Date.now();
    let aborted = abortedBefore;
    while (aborted === abortedBefore && Date.now() - t0 < 1000) {
      await new Promise((r) => setTimeout(r, 25));
      aborted = (await metric(simA, 'vllm:request_success_total', 'finished_reason="abort"')) || 0;
    }
    expect(aborted).toBe(abortedBefore + 1);
    expect(await metric(url, 'kvgate_worker_load')).toBe(0);
  });

  it('stops start-up with a message naming a bad flag', async () => {
    const r = await runKvgate(['serve', '--port', 'abc']);
    expect(r.code).toBe(2);
    expect(r.out).toMatch(/invalid value for --port/);
    const e = await runKvgate(['serve'], { KVGATE_BALANCE_REL_THRESHOLD: 'lots' });
    expect(e.code).toBe(2);
    expect(e.out).toMatch(/--balance-rel-threshold \(from env KVGATE_BALANCE_REL_THRESHOLD\)/);
    const s = await runKvgate(['sim', '--max-num-seqs', '0']);
    expect(s.code).toBe(2);
    expect(s.out).toMatch(/--max-num-seqs/);
  });

  it('a mistyped flag or command prints the one-line error with its suggestion, not the whole help', async () => {
    for (const [args, wrong, right] of [
      [['serve', '--polcy', 'round_robin'], "unknown option '--polcy'", '--policy'],
      [['bench', '--durration-secs', '3'], "unknown option '--durration-secs'", '--duration-secs'],
      [['bnch'], "unknown command 'bnch'", 'bench'],
    ] as const) {
      const r = await runKvgate([...args]);
      expect(r.code).toBe(1);
      expect(r.out).toContain(`error: ${wrong}`);
      expect(r.out).toContain(`(Did you mean ${right}?)`);
      expect(r.out).not.toMatch(/Usage:|Options:/);
      expect(r.out.trim().split('\n').length).toBeLessThanOrEqual(3);
    }
  });

  it('demo: a port already taken is one line with the --port hint, and nothing after it', async () => {
    const taken = createServer();
    await new Promise<void>((r) => taken.listen(0, '127.0.0.1', r));
    const port = (taken.address() as AddressInfo).port;
    try {
      const r = await runKvgate(['demo', '--port', String(port), '--workers', '2', '--warmup-requests', '0']);
      expect(r.code).toBe(1);
      expect(r.out.trim()).toBe(`kvgate demo: port ${port} on 127.0.0.1 is already in use; choose another with --port N (--port 0 takes any free port)`);
    } finally {
      taken.close();
    }
  });
});

describe('kvgate serve --pd-disaggregation in front of kvgate sim processes', () => {
  it.each(['sglang', 'vllm'] as const)('%s protocol: streaming and non-streaming chat', async (protocol) => {
    const boot = [String(await freePort()), String(await freePort())];
    const simArgs = (role: string, i: number) => [
      'sim', '--host', '127.0.0.1', '--port', '0', '--speed', '20', '--pd-role', role, '--pd-protocol', protocol,
      ...(role === 'prefill' ? (protocol === 'sglang' ? ['--bootstrap-port', boot[i]] : ['--kv-side-channel-port', '0']) : []),
    ];
    const sims = await Promise.all([
      spawnKvgate(simArgs('prefill', 0), /listening on (http:\/\/\S+)/),
      spawnKvgate(simArgs('prefill', 1), /listening on (http:\/\/\S+)/),
      spawnKvgate(simArgs('decode', 0), /listening on (http:\/\/\S+)/),
      spawnKvgate(simArgs('decode', 1), /listening on (http:\/\/\S+)/),
    ]);
    running.push(...sims);
    const [p1, p2, d1, d2] = sims.map((s) => s.match[1]);
    const url = await serve(['--pd-disaggregation', '--pd-protocol', protocol, '--prefill', p1, boot[0], '--prefill', p2, boot[1], '--decode', d1, '--decode', d2]);
    const body = { model: 'kvgate-sim', messages: [{ role: 'system', content: system }, { role: 'user', content: 'Which aisle?' }], max_tokens: 8 };
    const r = await fetch(url + '/v1/chat/completions', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
    expect(r.status).toBe(200);
    const json = (await r.json()) as { choices: { message: { content: string } }[]; usage: { completion_tokens: number } };
    expect(json.choices[0].message.content.length).toBeGreaterThan(0);
    expect(json.usage.completion_tokens).toBe(8);
    expect([d1, d2]).toContain(r.headers.get('x-kvgate-worker'));
    expect([p1, p2]).toContain(r.headers.get('x-kvgate-prefill-worker'));
    const s = await fetch(url + '/v1/chat/completions', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ ...body, stream: true }) });
    const text = await s.text();
    expect(text.match(/^data: \{/gm)!.length).toBeGreaterThan(2);
    expect(text).toContain('data: [DONE]');
    const workers = (await (await fetch(url + '/workers')).json()) as { workers: { type: string; load: number }[]; stats: { prefill_count: number; decode_count: number } };
    expect(workers.stats).toMatchObject({ prefill_count: 2, decode_count: 2 });
    expect(workers.workers.every((w) => w.load === 0)).toBe(true);
  });
});
