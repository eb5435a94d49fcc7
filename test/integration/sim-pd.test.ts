import { afterEach, describe, expect, it } from 'vitest';
import { resolveSimOptions } from '../../src/cli/sim-command.js';
import { defaultKvTransferMsPerBlock, type PdOptions } from '../../src/sim/pd.js';
import { startSimServer, type SimServer, type SimServerOptions } from '../../src/sim/server.js';

/**
 * Prefill/decode disaggregation in `kvgate sim`: a prefill sim and a decode sim started
 * in-process, the hand-off driven by hand exactly as a PD router would.
 */

const servers: SimServer[] = [];
afterEach(async () => {
  await Promise.all(servers.splice(0).map((s) => s.close()));
});

async function start(pd: PdOptions | undefined, opts: SimServerOptions = {}): Promise<SimServer> {
  const s = await startSimServer({ host: '127.0.0.1', port: 0, seed: 11, speed: 20, pd, ...opts });
  servers.push(s);
  return s;
}

async function pair(protocol: 'sglang' | 'vllm', decodeOpts: Partial<PdOptions> = {}, opts: SimServerOptions = {}): Promise<{ prefill: SimServer; decode: SimServer }> {
  const prefill = await start({ role: 'prefill', protocol, bootstrapPort: 0, kvSideChannelPort: 0 }, opts);
  const decode = await start({ role: 'decode', protocol, ...decodeOpts }, opts);
  return { prefill, decode };
}

function post(s: SimServer, path: string, body: unknown, signal?: AbortSignal): Promise<Response> {
  return fetch(s.url + path, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body), signal });
}

interface SseResult {
  status: number;
  events: unknown[];
  done: boolean;
  /** Client-side arrival time (performance.now()) of each data event. */
  times: number[];
}

/** Read an SSE response; records when each `data:` event arrived to see chunk-by-chunk delivery. */
async function readSse(res: Response): Promise<SseResult> {
  let buf = '';
  const payloads: string[] = [];
  const times: number[] = [];
  const decoder = new TextDecoder();
  for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
    buf += decoder.decode(chunk, { stream: true });
    let i: number;
    while ((i = buf.indexOf('\n\n')) >= 0) {
      const block = buf.slice(0, i);
      buf = buf.slice(i + 2);
      expect(block.startsWith('data: ')).toBe(true);
      payloads.push(block.slice('data: '.length));
      times.push(performance.now());
    }
  }
  const done = payloads[payloads.length - 1] === '[DONE]';
  return {
    status: res.status,
    done,
    times: times.slice(0, done ? -1 : undefined),
    events: payloads.filter((p) => p !== '[DONE]').map((p) => JSON.parse(p) as unknown),
  };
}

async function metric(s: SimServer, name: string, labels: Record<string, string> = {}): Promise<number> {
  const text = await (await fetch(s.url + '/metrics')).text();
  const want = Object.entries(labels).map(([k, v]) => `${k}="${v}"`);
  for (const line of text.split('\n')) {
    if (!line.startsWith(name + '{') && !line.startsWith(name + ' ')) continue;
    if (want.every((w) => line.includes(w))) return Number(line.slice(line.lastIndexOf(' ') + 1));
  }
  throw new Error(`metric ${name} ${JSON.stringify(labels)} not found`);
}

const longText = (n: number, seed: string): string => {
  let s = '';
  for (let i = 0; s.length < n; i++) s += `${seed} sentence number ${i} about disaggregated prefill and decode. `;
  return s.slice(0, n);
};

const randomRoom = (): number => Math.floor(Math.random() * 2 ** 52);

interface GenerateResponse {
  text: string;
  output_ids: number[];
  meta_info: {
    prompt_tokens: number;
    completion_tokens: number;
    cached_tokens: number;
    e2e_latency: number;
    finish_reason: { type: string; length: number } | null;
    input_token_logprobs?: [number | null, number, null][];
    output_token_logprobs?: [number, number, null][];
  };
}

interface OpenAiResponse {
  id: string;
  choices: { text?: string; message?: { content: string }; finish_reason: string }[];
  usage: { prompt_tokens: number; completion_tokens: number; prompt_tokens_details: { cached_tokens: number } };
  kv_transfer_params?: Record<string, unknown> | null;
}

describe('kvgate sim PD: SGLang protocol (bootstrap_room)', () => {
  it('same body to both at once: decode answers the full output with prefilled KV, prefill 1 token', async () => {
    const { prefill, decode } = await pair('sglang');
    expect(prefill.pd).toMatchObject({ role: 'prefill', protocol: 'sglang' });
    const bootstrapPort = prefill.pd!.sideChannelPort!;
    expect(bootstrapPort).toBeGreaterThan(0);
    const room = randomRoom();
    const body = {
      text: longText(6000, 'sglang'),
      sampling_params: { max_new_tokens: 12 },
      bootstrap_host: '127.0.0.1',
      bootstrap_port: bootstrapPort,
      bootstrap_room: room,
    };
    const [pr, dr] = await Promise.all([post(prefill, '/generate', body), post(decode, '/generate', body)]);
    expect(pr.status).toBe(200);
    expect(dr.status).toBe(200);
    const p = (await pr.json()) as GenerateResponse;
    const d = (await dr.json()) as GenerateResponse;
    const promptTokens = p.meta_info.prompt_tokens;
    expect(promptTokens).toBeGreaterThan(1400);
    expect(p.output_ids).toHaveLength(1);
    expect(p.meta_info).toMatchObject({ completion_tokens: 1, finish_reason: { type: 'length', length: 1 } });
    expect(d.output_ids).toHaveLength(12);
    expect(d.meta_info).toMatchObject({ prompt_tokens: promptTokens, completion_tokens: 12, cached_tokens: 0, finish_reason: { type: 'length', length: 12 } });
    expect(d.text.length).toBeGreaterThan(0);
    expect(p.meta_info.input_token_logprobs).toBeUndefined(); // only with return_logprob

    // The prefill computed the prompt; the decode imported it and computed no prompt token.
    const ps = prefill.engines[0]!.engine.stats();
    const ds = decode.engines[0]!.engine.stats();
    expect(ps.prefillTokensComputed).toBe(promptTokens);
    expect(ps.generationTokens).toBe(1);
    expect(ds.prefillTokensComputed).toBe(0);
    expect(ds.prefilledAdmissions).toBe(1);
    expect(ds.importedTokens).toBe(promptTokens - 1);
    expect(ds.generationTokens).toBe(12);
    // Imported blocks are cached on the decode engine like computed ones.
    expect(decode.engines[0]!.engine.cachedBlockHashes().size).toBe(Math.floor((promptTokens + 11) / 16));

    // The bootstrap server keeps answering for the room; unknown rooms are 404.
    const blocks = Math.ceil(promptTokens / 16);
    const kv = await fetch(`http://127.0.0.1:${bootstrapPort}/kv/${room}`);
    expect(kv.status).toBe(200);
    expect(await kv.json()).toEqual({ status: 'ready', prompt_tokens: promptTokens, blocks });
    const unknown = await fetch(`http://127.0.0.1:${bootstrapPort}/kv/${room + 1}`);
    expect(unknown.status).toBe(404);
    expect(await unknown.json()).toEqual({ status: 'unknown' });

    // Hand-off metrics on both sides, the transfer time = blocks × the default per-block time.
    expect(await metric(prefill, 'kvgate_sim_kv_transfers_total', { role: 'prefill' })).toBe(1);
    expect(await metric(decode, 'kvgate_sim_kv_transfers_total', { role: 'decode' })).toBe(1);
    expect(await metric(decode, 'kvgate_sim_kv_transfer_blocks_total', { role: 'decode' })).toBe(blocks);
    expect(await metric(decode, 'kvgate_sim_kv_transfer_seconds_sum', { role: 'decode' })).toBeCloseTo((blocks * defaultKvTransferMsPerBlock(16)) / 1000, 9);
    expect(await metric(decode, 'kvgate_sim_kv_handoff_wait_seconds_count', { role: 'decode' })).toBe(1);
    // The decode's TTFT metric counts from its HTTP arrival: the wait for the prefill, the
    // transfer and one decode step (≥ 6 ms).
    const transferSecs = (blocks * defaultKvTransferMsPerBlock(16)) / 1000;
    const waitSecs = await metric(decode, 'kvgate_sim_kv_handoff_wait_seconds_sum', { role: 'decode' });
    expect(await metric(decode, 'vllm:time_to_first_token_seconds_sum')).toBeGreaterThanOrEqual(waitSecs + transferSecs + 0.006);
    expect(await metric(decode, 'vllm:inter_token_latency_seconds_count')).toBe(11);
    expect(d.meta_info.e2e_latency).toBeGreaterThanOrEqual(waitSecs + transferSecs + 12 * 0.006);
  });

  it('streams the decode answer chunk by chunk (generate and chat); the prefill streams its single token', async () => {
    const { prefill, decode } = await pair('sglang', {}, { speed: 5 });
    const bootstrap = { bootstrap_host: '127.0.0.1', bootstrap_port: prefill.pd!.sideChannelPort, bootstrap_room: randomRoom() };
    const body = { text: longText(2000, 'stream'), sampling_params: { max_new_tokens: 8 }, stream: true, ...bootstrap };
    const [p, d] = await Promise.all([post(prefill, '/generate', body).then(readSse), post(decode, '/generate', body).then(readSse)]);
    expect(p.done && d.done).toBe(true);
    expect(p.events).toHaveLength(1);
    expect((p.events[0] as GenerateResponse).output_ids).toHaveLength(1);
    const ev = d.events as GenerateResponse[];
    expect(ev).toHaveLength(8);
    ev.forEach((e, i) => expect(e.output_ids).toHaveLength(i + 1));
    for (let i = 1; i < ev.length; i++) expect(ev[i]!.text.startsWith(ev[i - 1]!.text)).toBe(true);
    expect(ev[7]!.meta_info).toMatchObject({ completion_tokens: 8, cached_tokens: 0, finish_reason: { type: 'length' } });
    // One decode step ≈ 6 ms simulated ≈ 1.2 ms wall at speed 5: chunks arrive spread out, not in one burst.
    expect(d.times[7]! - d.times[0]!).toBeGreaterThan(5);

    // Chat completions with the same injection (the SGLang router does this for every route).
    const chat = {
      messages: [{ role: 'user', content: longText(1500, 'chat') }],
      max_tokens: 6,
      stream: true,
      stream_options: { include_usage: true },
      ...bootstrap,
      bootstrap_room: randomRoom(),
    };
    const [pc, dc] = await Promise.all([post(prefill, '/v1/chat/completions', chat).then(readSse), post(decode, '/v1/chat/completions', chat).then(readSse)]);
    type Chunk = { choices: { delta: { content?: string }; finish_reason: string | null }[]; usage?: OpenAiResponse['usage'] };
    const dch = dc.events as Chunk[];
    // role chunk + 6 content chunks + usage chunk.
    expect(dch).toHaveLength(8);
    expect(dch[6]!.choices[0]!.finish_reason).toBe('length');
    expect(dch[7]!.usage).toMatchObject({ completion_tokens: 6, prompt_tokens_details: { cached_tokens: 0 } });
    const pch = pc.events as Chunk[];
    expect(pch[pch.length - 1]!.usage).toMatchObject({ completion_tokens: 1 });
    expect(dch[7]!.usage!.prompt_tokens).toBe(pch[pch.length - 1]!.usage!.prompt_tokens);
    expect(decode.engines[0]!.engine.stats().prefillTokensComputed).toBe(0);
  });

  it('return_logprob: the prefill returns input_token_logprobs, the decode []; merged they cover the prompt', async () => {
    const { prefill, decode } = await pair('sglang');
    const regular = await start(undefined);
    const prompt = longText(800, 'logprob');
    const body = {
      text: prompt,
      sampling_params: { max_new_tokens: 5 },
      return_logprob: true,
      bootstrap_host: '127.0.0.1',
      bootstrap_port: prefill.pd!.sideChannelPort,
      bootstrap_room: randomRoom(),
    };
    const [p, d] = (await Promise.all([post(prefill, '/generate', body), post(decode, '/generate', body)].map(async (r) => (await r).json()))) as GenerateResponse[];
    const n = p!.meta_info.prompt_tokens;
    const input = p!.meta_info.input_token_logprobs!;
    expect(input).toHaveLength(n);
    expect(input[0]![0]).toBeNull(); // SGLang has no logprob for the first token
    for (const [lp, id, txt] of input.slice(1)) {
      expect(lp).toBeLessThan(0);
      expect(Number.isInteger(id)).toBe(true);
      expect(txt).toBeNull();
    }
    expect(p!.meta_info.output_token_logprobs).toHaveLength(1);
    expect(d!.meta_info.input_token_logprobs).toEqual([]);
    expect(d!.meta_info.output_token_logprobs).toHaveLength(5);
    expect(d!.meta_info.output_token_logprobs!.map((e) => e[1])).toEqual(d!.output_ids);
    // What a router's merge (prefill's input logprobs in front of the decode's) gives equals a
    // regular engine's answer for the same prompt.
    const merged = [...input, ...d!.meta_info.input_token_logprobs!];
    const r = (await (await post(regular, '/generate', { text: prompt, sampling_params: { max_new_tokens: 1 }, return_logprob: true })).json()) as GenerateResponse;
    expect(r.meta_info.input_token_logprobs).toEqual(merged);

    // Streaming: every decode chunk carries input_token_logprobs (to merge into) and cumulative output logprobs.
    const sbody = { ...body, stream: true, bootstrap_room: randomRoom() };
    const [ps, ds] = await Promise.all([post(prefill, '/generate', sbody).then(readSse), post(decode, '/generate', sbody).then(readSse)]);
    expect((ps.events[0] as GenerateResponse).meta_info.input_token_logprobs).toHaveLength(n);
    const dev = ds.events as GenerateResponse[];
    expect(dev).toHaveLength(5);
    dev.forEach((e, i) => {
      expect(e.meta_info.input_token_logprobs).toEqual([]);
      expect(e.meta_info.output_token_logprobs).toHaveLength(i + 1);
    });
  });

  it('a room that never gets a prefill fails after --pd-transfer-timeout-secs with an error naming it', async () => {
    const { prefill, decode } = await pair('sglang', { transferTimeoutSecs: 4 });
    const room = randomRoom();
    const t0 = performance.now();
    const r = await post(decode, '/generate', {
      text: 'nobody prefills this',
      sampling_params: { max_new_tokens: 4 },
      bootstrap_host: '127.0.0.1',
      bootstrap_port: prefill.pd!.sideChannelPort,
      bootstrap_room: room,
    });
    const elapsed = performance.now() - t0;
    expect(r.status).toBe(504);
    const j = (await r.json()) as { error: { message: string; code: number; type: string } };
    expect(j.error.code).toBe(504);
    expect(j.error.type).toBe('GatewayTimeoutError');
    expect(j.error.message).toContain(`bootstrap_room ${room}`);
    expect(j.error.message).toMatch(/timed out/);
    // 4 simulated seconds at speed 20 = 200 ms of wall time.
    expect(elapsed).toBeGreaterThan(150);
    expect(elapsed).toBeLessThan(5000);
    expect(await metric(decode, 'kvgate_sim_kv_transfer_failures_total', { role: 'decode', reason: 'timeout' })).toBe(1);
    expect(decode.engines[0]!.engine.stats()).toMatchObject({ running: 0, waiting: 0, finishedRequests: 0 });

    // A prefill engine that is not even there: same error after the timeout.
    const r2 = await post(decode, '/generate', { text: 'x', bootstrap_host: '127.0.0.1', bootstrap_port: 1, bootstrap_room: 7 });
    expect(r2.status).toBe(504);
    expect(((await r2.json()) as { error: { message: string } }).error.message).toContain('bootstrap_room 7');
  });

  it('the bootstrap server answers 202 while the prefill runs; an aborted prefill fails the decode at once', async () => {
    const { prefill, decode } = await pair('sglang', { transferTimeoutSecs: 600 }, { speed: 1 });
    const port = prefill.pd!.sideChannelPort!;
    const room = randomRoom();
    const body = { text: longText(30_000, 'slow'), sampling_params: { max_new_tokens: 1 }, bootstrap_host: '127.0.0.1', bootstrap_port: port, bootstrap_room: room };
    const pending = post(prefill, '/generate', body);
    let sawPending = false;
    for (let i = 0; i < 200 && !sawPending; i++) {
      const r = await fetch(`http://127.0.0.1:${port}/kv/${room}`);
      if (r.status === 202) {
        expect(await r.json()).toEqual({ status: 'pending' });
        sawPending = true;
      } else await r.arrayBuffer();
    }
    expect(sawPending).toBe(true);
    await (await pending).json();
    expect((await fetch(`http://127.0.0.1:${port}/kv/${room}`)).status).toBe(200);

    // Prefill aborted by its client → 410 on the side channel → the decode fails with 502.
    const room2 = randomRoom();
    const body2 = { ...body, text: longText(30_000, 'other'), bootstrap_room: room2 };
    const ctrl = new AbortController();
    const p2 = post(prefill, '/generate', body2, ctrl.signal).catch(() => undefined);
    const d2 = post(decode, '/generate', body2);
    await new Promise((r) => setTimeout(r, 100));
    ctrl.abort();
    await p2;
    const dr = await d2;
    expect(dr.status).toBe(502);
    expect(((await dr.json()) as { error: { message: string } }).error.message).toContain(`bootstrap_room ${room2}`);
    expect((await fetch(`http://127.0.0.1:${port}/kv/${room2}`)).status).toBe(410);
  });

  it('rejects requests without bootstrap fields or with batched ones; keeps the info endpoints', async () => {
    const { prefill, decode } = await pair('sglang');
    for (const s of [prefill, decode]) {
      const r = await post(s, '/generate', { text: 'hello', sampling_params: { max_new_tokens: 2 } });
      expect(r.status).toBe(400);
      expect(((await r.json()) as { error: { message: string } }).error.message).toMatch(/bootstrap_room/);
      const b = await post(s, '/generate', { text: ['a', 'b'], bootstrap_host: ['h', 'h'], bootstrap_port: [1, 1], bootstrap_room: [1, 2] });
      expect(b.status).toBe(400);
      expect(((await b.json()) as { error: { message: string } }).error.message).toMatch(/batched PD requests/);
      expect((await fetch(s.url + '/health')).status).toBe(200);
      expect((await fetch(s.url + '/v1/models')).status).toBe(200);
    }
    const noHost = await post(decode, '/generate', { text: 'hello', bootstrap_room: 5 });
    expect(noHost.status).toBe(400);
    expect(((await noHost.json()) as { error: { message: string } }).error.message).toMatch(/bootstrap_host/);

    const pinfo = (await (await fetch(prefill.url + '/get_server_info')).json()) as Record<string, unknown>;
    expect(pinfo).toMatchObject({
      pd_role: 'prefill',
      pd_protocol: 'sglang',
      bootstrap_port: prefill.pd!.sideChannelPort,
      disaggregation_mode: 'prefill',
      kv_side_channel_port: null,
    });
    const dinfo = (await (await fetch(decode.url + '/get_server_info')).json()) as Record<string, unknown>;
    expect(dinfo).toMatchObject({ pd_role: 'decode', pd_protocol: 'sglang', bootstrap_port: null, disaggregation_mode: 'decode' });
    const regular = await start(undefined);
    const rinfo = (await (await fetch(regular.url + '/get_server_info')).json()) as Record<string, unknown>;
    expect(rinfo).toMatchObject({ pd_role: null, pd_protocol: null, bootstrap_port: null, disaggregation_mode: 'null' });
    // A regular sim ignores bootstrap fields.
    expect((await post(regular, '/generate', { text: 'hello', bootstrap_room: 1 })).status).toBe(200);
  });

  it('applies the transfer time: blocks × --kv-transfer-ms-per-block before the decode starts', async () => {
    // 40 ms per block (simulated): a ~1000-token prompt is 63 blocks → ~2.5 s simulated, 125 ms wall.
    const { prefill, decode } = await pair('sglang', { kvTransferMsPerBlock: 40 });
    const body = {
      input_ids: Array.from({ length: 1000 }, (_, i) => 300 + i),
      sampling_params: { max_new_tokens: 3 },
      bootstrap_host: '127.0.0.1',
      bootstrap_port: prefill.pd!.sideChannelPort,
      bootstrap_room: randomRoom(),
    };
    const t0 = performance.now();
    const [, dr] = await Promise.all([post(prefill, '/generate', body), post(decode, '/generate', body)]);
    const d = (await dr.json()) as GenerateResponse;
    const wall = performance.now() - t0;
    const blocks = Math.ceil(1000 / 16);
    expect(await metric(decode, 'kvgate_sim_kv_transfer_seconds_sum', { role: 'decode' })).toBeCloseTo((blocks * 40) / 1000, 6);
    expect(wall).toBeGreaterThan((blocks * 40) / 20 - 5);
    expect(d.meta_info.e2e_latency).toBeGreaterThan((blocks * 40) / 1000);
    // TTFT as the decode's metrics report it includes the transfer; the engine's own TTFT
    // (decode step only) does not: no prompt token was computed.
    expect(await metric(decode, 'vllm:time_to_first_token_seconds_sum')).toBeGreaterThan((blocks * 40) / 1000);
    expect(decode.engines[0]!.engine.stats().prefillTokensComputed).toBe(0);
  });
});

describe('kvgate sim PD: vLLM protocol (kv_transfer_params)', () => {
  const prefillParams = { do_remote_decode: true, do_remote_prefill: false, remote_engine_id: null, remote_block_ids: null, remote_host: null, remote_port: null };

  it('prefill (max_tokens 1, stream false) returns kv_transfer_params; the decode pulls them and answers in full', async () => {
    const { prefill, decode } = await pair('vllm');
    const prompt = longText(5000, 'vllm');
    const pr = await post(prefill, '/v1/completions', { prompt, max_tokens: 1, stream: false, kv_transfer_params: prefillParams });
    expect(pr.status).toBe(200);
    const p = (await pr.json()) as OpenAiResponse;
    const n = p.usage.prompt_tokens;
    expect(p.usage.completion_tokens).toBe(1);
    const params = p.kv_transfer_params!;
    expect(params).toMatchObject({
      do_remote_prefill: true,
      do_remote_decode: false,
      remote_engine_id: prefill.pd!.engineId,
      remote_host: '127.0.0.1',
      remote_port: prefill.pd!.sideChannelPort,
      tp_size: 1,
      transfer_id: expect.stringMatching(/^xfer-[0-9a-f]{32}$/),
    });
    const ids = params['remote_block_ids'] as number[];
    expect(ids).toHaveLength(Math.ceil(n / 16));
    expect(new Set(ids).size).toBe(ids.length);
    expect(ids.every((b) => Number.isInteger(b) && b >= 0)).toBe(true);

    const dr = await post(decode, '/v1/completions', { prompt, max_tokens: 20, kv_transfer_params: params });
    expect(dr.status).toBe(200);
    const d = (await dr.json()) as OpenAiResponse;
    expect(d.usage).toMatchObject({ prompt_tokens: n, completion_tokens: 20, prompt_tokens_details: { cached_tokens: 0 } });
    expect(d.choices[0]!.finish_reason).toBe('length');
    expect(d.kv_transfer_params).toBeNull();
    const ds = decode.engines[0]!.engine.stats();
    expect(ds).toMatchObject({ prefillTokensComputed: 0, prefilledAdmissions: 1, generationTokens: 20 });
    expect(prefill.engines[0]!.engine.stats().prefillTokensComputed).toBe(n);
    expect(await metric(prefill, 'kvgate_sim_kv_transfers_total', { role: 'prefill' })).toBe(1);
    expect(await metric(decode, 'kvgate_sim_kv_transfers_total', { role: 'decode' })).toBe(1);
    expect(await metric(decode, 'kvgate_sim_kv_transfer_seconds_sum', { role: 'decode' })).toBeCloseTo(
      (Math.ceil(n / 16) * defaultKvTransferMsPerBlock(16)) / 1000,
      9,
    );
    const info = (await (await fetch(prefill.url + '/get_server_info')).json()) as Record<string, unknown>;
    expect(info).toMatchObject({ pd_role: 'prefill', pd_protocol: 'vllm', kv_side_channel_port: prefill.pd!.sideChannelPort, bootstrap_port: null });
  });

  it('streams the decode (chat, include_usage) chunk by chunk', async () => {
    const { prefill, decode } = await pair('vllm', { kvTransferMsPerBlock: 5 }, { speed: 5 });
    const messages = [{ role: 'user', content: longText(3000, 'vllm-chat') }];
    const p = (await (await post(prefill, '/v1/chat/completions', { messages, max_tokens: 1, stream: false, kv_transfer_params: prefillParams })).json()) as OpenAiResponse;
    expect(p.choices[0]!.message!.content.length).toBeGreaterThan(0);
    const t0 = performance.now();
    const d = await readSse(
      await post(decode, '/v1/chat/completions', {
        messages,
        max_tokens: 10,
        stream: true,
        stream_options: { include_usage: true },
        kv_transfer_params: p.kv_transfer_params,
      }),
    );
    expect(d.status).toBe(200);
    expect(d.done).toBe(true);
    type Chunk = { choices: { delta: { role?: string; content?: string }; finish_reason: string | null }[]; usage?: OpenAiResponse['usage'] };
    const ch = d.events as Chunk[];
    expect(ch).toHaveLength(12); // role + 10 tokens + usage
    expect(ch[0]!.choices[0]!.delta).toEqual({ role: 'assistant', content: '' });
    expect(ch[10]!.choices[0]!.finish_reason).toBe('length');
    expect(ch[11]!.usage).toMatchObject({ prompt_tokens: p.usage.prompt_tokens, completion_tokens: 10, prompt_tokens_details: { cached_tokens: 0 } });
    // The first chunk waits for the transfer (blocks × 5 ms simulated = /5 wall).
    const blocks = Math.ceil(p.usage.prompt_tokens / 16);
    expect(d.times[0]! - t0).toBeGreaterThan(blocks - 5);
    expect(d.times[10]! - d.times[1]!).toBeGreaterThan(5);
    expect(decode.engines[0]!.engine.stats().prefillTokensComputed).toBe(0);
    expect(await metric(decode, 'vllm:inter_token_latency_seconds_count')).toBe(9);
  });

  it('rejects missing or wrong kv_transfer_params; an unknown transfer_id times out naming it', async () => {
    const { prefill, decode } = await pair('vllm', { transferTimeoutSecs: 2 });
    const msg = async (r: Response): Promise<string> => ((await r.json()) as { error: { message: string } }).error.message;

    let r = await post(decode, '/v1/completions', { prompt: 'hi', max_tokens: 2 });
    expect(r.status).toBe(400);
    expect(await msg(r)).toMatch(/kv_transfer_params/);
    r = await post(decode, '/v1/completions', { prompt: 'hi', kv_transfer_params: { do_remote_prefill: true, remote_host: '127.0.0.1', remote_port: 5 } });
    expect(r.status).toBe(400);
    expect(await msg(r)).toMatch(/transfer_id/);
    r = await post(decode, '/v1/completions', { prompt: 'hi', kv_transfer_params: 'nope' });
    expect(r.status).toBe(400);
    r = await post(prefill, '/v1/completions', { prompt: 'hi', max_tokens: 1 });
    expect(r.status).toBe(400);
    expect(await msg(r)).toMatch(/do_remote_decode/);
    r = await post(prefill, '/v1/completions', { prompt: 'hi', max_tokens: 1, stream: true, kv_transfer_params: prefillParams });
    expect(r.status).toBe(400);
    expect(await msg(r)).toMatch(/stream=false/);

    r = await post(decode, '/v1/completions', {
      prompt: 'hi',
      max_tokens: 2,
      kv_transfer_params: { do_remote_prefill: true, do_remote_decode: false, remote_host: '127.0.0.1', remote_port: prefill.pd!.sideChannelPort, transfer_id: 'xfer-missing' },
    });
    expect(r.status).toBe(504);
    expect(await msg(r)).toContain('transfer_id xfer-missing');
  });
});

describe('kvgate sim PD: flags and shared metrics', () => {
  it('parses --pd-role / --pd-protocol and the side-channel flags', () => {
    expect(resolveSimOptions({}).pd).toBeUndefined();
    expect(resolveSimOptions({ pdRole: 'none' }).pd).toBeUndefined();
    expect(resolveSimOptions({ pdRole: 'prefill' }).pd).toEqual({
      role: 'prefill',
      protocol: 'sglang',
      bootstrapPort: 8998,
      kvSideChannelPort: 5600,
      kvSideChannelHost: undefined,
      kvTransferMsPerBlock: undefined,
      transferTimeoutSecs: 30,
    });
    expect(
      resolveSimOptions({ pdRole: 'decode', pdProtocol: 'vllm', kvTransferMsPerBlock: '0.5', pdTransferTimeoutSecs: '2.5' }).pd,
    ).toMatchObject({ role: 'decode', protocol: 'vllm', kvTransferMsPerBlock: 0.5, transferTimeoutSecs: 2.5 });
    expect(resolveSimOptions({}, { KVGATE_SIM_PD_ROLE: 'decode', KVGATE_SIM_BOOTSTRAP_PORT: '0' }).pd).toMatchObject({ role: 'decode', bootstrapPort: 0 });
    expect(() => resolveSimOptions({ pdRole: 'both' })).toThrow(/--pd-role/);
    expect(() => resolveSimOptions({ pdRole: 'decode', pdTransferTimeoutSecs: '0' })).toThrow(/--pd-transfer-timeout-secs/);
    expect(() => resolveSimOptions({ pdRole: 'decode', kvTransferMsPerBlock: '-1' })).toThrow(/--kv-transfer-ms-per-block/);
    // 2 MiB per 16-token block over 25 GB/s.
    expect(defaultKvTransferMsPerBlock(16)).toBeCloseTo(0.0839, 4);
  });

  it('every sim reports vllm:inter_token_latency_seconds (one gap per token after the first)', async () => {
    const s = await start(undefined, { speed: 1 });
    await (await post(s, '/v1/completions', { prompt: 'tell me a story', max_tokens: 6 })).json();
    expect(await metric(s, 'vllm:inter_token_latency_seconds_count', { engine: '0' })).toBe(5);
    const sum = await metric(s, 'vllm:inter_token_latency_seconds_sum', { engine: '0' });
    // Five decode steps of a short sequence: ~6 ms each (simulated; timer lateness can add a little).
    expect(sum / 5).toBeGreaterThan(0.006);
    expect(sum / 5).toBeLessThan(0.05);
    const text = await (await fetch(s.url + '/metrics')).text();
    expect(text).not.toContain('kvgate_sim_kv_transfers_total');
  });
});
