import { randomUUID } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { randomRng, SeededRng, type Rng } from '../core/rng.js';
import type { CostModelConfig } from './cost-model.js';
import { RealtimeDriver, ScaledClock } from './driver.js';
import { Engine, EngineRequestError, type RequestRecord, type TokenOutput } from './engine.js';
import { parseChat, parseCompletion, parseGenerate, SimHttpError, usageOf, type ParsedGeneration } from './http-api.js';
import { endpointForRank, KvEventPublisher } from './kv-publisher.js';
import { SimMetrics } from './metrics.js';
import { loadTokenizer, type Tokenizer as SimTokenizer } from '../tokenize/index.js';

/**
 * `kvgate sim`: an HTTP server that looks like vLLM (and answers SGLang's /generate, /get_load,
 * /flush_cache) backed by simulated engines (engine.ts) driven in real time (driver.ts).
 * With data parallelism N, N independent engines sit behind one port; a request is pinned to a
 * rank with the `X-data-parallel-rank` header or the `data_parallel_rank` body field, otherwise
 * it goes to the least loaded rank. Each rank can publish vLLM-format KV events over ZMQ.
 */

export interface FaultOptions {
  /** Probability that a generation request is answered with `failStatus`. */
  failRate: number;
  /** The first N generation requests are answered with `failStatus`. */
  failFirstN: number;
  failStatus: number;
  /** Probability that a generation request is accepted and never answered. */
  hangRate: number;
  /** After this many generation requests the server crashes (0 = never). */
  crashAfterRequests: number;
  /** /health answers 503 and generation is refused until this many seconds after start. */
  startupDelaySecs: number;
}

export const DEFAULT_FAULTS: Readonly<FaultOptions> = Object.freeze({
  failRate: 0,
  failFirstN: 0,
  failStatus: 500,
  hangRate: 0,
  crashAfterRequests: 0,
  startupDelaySecs: 0,
});

export interface KvEventsOptions {
  /** PUB endpoint of rank 0, e.g. tcp://*:5557; rank r uses port + r. */
  endpoint: string;
  replayEndpoint?: string;
  format?: 'array' | 'map';
  topic?: string;
  bufferSteps?: number;
}

export interface SimServerOptions {
  host?: string;
  /** 0 = ephemeral. Default 8000. */
  port?: number;
  /** Served model name. */
  model?: string;
  blockSize?: number;
  numGpuBlocks?: number;
  maxNumSeqs?: number;
  maxNumBatchedTokens?: number;
  maxModelLen?: number;
  cost?: Partial<CostModelConfig>;
  /** Simulated time runs this many times faster than real time. */
  speed?: number;
  /** A tokenizer, or a path to a Hugging Face tokenizer.json (or its directory). */
  tokenizer?: SimTokenizer | string;
  dataParallelSize?: number;
  /** max_tokens when a request gives none. */
  defaultMaxTokens?: number;
  /** Seed of the generated tokens and of the fault dice (random when absent). */
  seed?: number;
  kvEvents?: KvEventsOptions;
  faults?: Partial<FaultOptions>;
  /** Called after a --crash-after-requests crash (the CLI exits the process). */
  onCrash?: () => void;
  /** Diagnostic log lines. */
  log?: (msg: string) => void;
}

export interface SimEngineHandle {
  rank: number;
  engine: Engine;
  driver: RealtimeDriver;
  publisher: KvEventPublisher | null;
}

export interface SimServer {
  url: string;
  port: number;
  model: string;
  engines: SimEngineHandle[];
  metrics: SimMetrics;
  tokenizer: SimTokenizer;
  /** True once --crash-after-requests fired. */
  readonly crashed: boolean;
  close(): Promise<void>;
}

const MAX_BODY_BYTES = 64 * 1024 * 1024;

function sendJson(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  if (res.headersSent || res.destroyed) {
    res.destroy();
    return;
  }
  const text = JSON.stringify(body);
  res.writeHead(status, { ...headers, 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

function sendError(res: ServerResponse, err: SimHttpError): void {
  sendJson(res, err.status, err.toBody());
}

function readBody(req: IncomingMessage): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    req.on('data', (c: Buffer) => {
      size += c.length;
      if (size > MAX_BODY_BYTES) {
        reject(new SimHttpError(413, `Request body exceeds ${MAX_BODY_BYTES} bytes`));
        req.destroy();
        return;
      }
      chunks.push(c);
    });
    req.on('end', () => resolve(Buffer.concat(chunks, size)));
    req.on('error', reject);
  });
}

function parseJsonBody(buf: Buffer): Record<string, unknown> {
  let v: unknown;
  try {
    v = JSON.parse(buf.toString('utf8'));
  } catch (e) {
    throw new SimHttpError(400, `Invalid JSON body: ${(e as Error).message}`);
  }
  if (v === null || typeof v !== 'object' || Array.isArray(v)) throw new SimHttpError(400, 'Request body must be a JSON object');
  return v as Record<string, unknown>;
}

function nowSecs(): number {
  return Math.floor(Date.now() / 1000);
}

export async function startSimServer(opts: SimServerOptions = {}): Promise<SimServer> {
  const model = opts.model ?? 'kvgate-sim';
  const dp = opts.dataParallelSize ?? 1;
  if (!Number.isInteger(dp) || dp < 1) throw new RangeError(`dataParallelSize must be a positive integer (got ${dp})`);
  const faults: FaultOptions = { ...DEFAULT_FAULTS, ...opts.faults };
  validateFaults(faults);
  const defaultMaxTokens = opts.defaultMaxTokens ?? 256;
  if (!Number.isInteger(defaultMaxTokens) || defaultMaxTokens < 1) throw new RangeError('defaultMaxTokens must be a positive integer');
  const log = opts.log ?? (() => {});
  const tokenizer = typeof opts.tokenizer === 'string' || opts.tokenizer === undefined ? await loadTokenizer(opts.tokenizer) : opts.tokenizer;
  const clock = new ScaledClock(opts.speed ?? 1);
  const faultRng: Rng = opts.seed === undefined ? randomRng() : new SeededRng(opts.seed ^ 0x5eed);

  // Engines, drivers and KV-event publishers, one per DP rank.
  const engines: SimEngineHandle[] = [];
  try {
    for (let rank = 0; rank < dp; rank++) {
      let publisher: KvEventPublisher | null = null;
      if (opts.kvEvents) {
        const ev = opts.kvEvents;
        publisher = new KvEventPublisher({
          endpoint: endpointForRank(ev.endpoint, rank),
          replayEndpoint: ev.replayEndpoint ? endpointForRank(ev.replayEndpoint, rank) : undefined,
          format: ev.format ?? 'array',
          dpRank: rank,
          topic: ev.topic,
          bufferSteps: ev.bufferSteps,
        });
        await publisher.start();
      }
      const pub = publisher;
      const engine = new Engine({
        clock,
        rng: opts.seed === undefined ? randomRng() : new SeededRng(opts.seed + rank),
        blockSize: opts.blockSize,
        numGpuBlocks: opts.numGpuBlocks,
        maxNumSeqs: opts.maxNumSeqs,
        maxNumBatchedTokens: opts.maxNumBatchedTokens,
        maxModelLen: opts.maxModelLen,
        vocabSize: tokenizer.vocabSize,
        cost: opts.cost,
        kvEventSink: pub ? (events) => pub.publish(events) : undefined,
      });
      engines.push({ rank, engine, driver: new RealtimeDriver(engine, clock), publisher });
    }
  } catch (e) {
    await Promise.allSettled(engines.map((h) => h.publisher?.close()));
    throw e;
  }
  const metrics = new SimMetrics(model, engines);

  const startedAt = performance.now();
  let generationRequests = 0;
  let crashed = false;
  let closing = false;
  let rr = 0;
  const sockets = new Set<Socket>();
  const hanging = new Set<ServerResponse>();

  const ready = (): boolean => performance.now() - startedAt >= faults.startupDelaySecs * 1000;

  const pickRank = (pinned: number | undefined): SimEngineHandle => {
    if (pinned !== undefined) {
      if (pinned >= dp) throw new SimHttpError(400, `data_parallel_rank ${pinned} is out of range [0, ${dp})`, 'data_parallel_rank');
      return engines[pinned]!;
    }
    // Least loaded (running + waiting), ties broken round-robin.
    let best: SimEngineHandle | undefined;
    let bestLoad = Infinity;
    for (let i = 0; i < dp; i++) {
      const h = engines[(rr + i) % dp]!;
      const s = h.engine.stats();
      const load = s.running + s.waiting;
      if (load < bestLoad) {
        best = h;
        bestLoad = load;
      }
    }
    rr = (rr + 1) % dp;
    return best!;
  };

  const headerRank = (req: IncomingMessage): number | undefined => {
    const raw = req.headers['x-data-parallel-rank'];
    if (raw === undefined) return undefined;
    const v = Array.isArray(raw) ? raw[0]! : raw;
    if (!/^\d+$/.test(v.trim())) throw new SimHttpError(400, `Invalid X-data-parallel-rank header: ${JSON.stringify(v)}`, 'X-data-parallel-rank');
    return Number(v.trim());
  };

  const crash = (): void => {
    if (crashed) return;
    crashed = true;
    log(`crashing after ${faults.crashAfterRequests} requests (--crash-after-requests)`);
    for (const h of engines) h.driver.stop();
    server.close();
    for (const s of sockets) s.destroy();
    void Promise.allSettled(engines.map((h) => h.publisher?.close()));
    opts.onCrash?.();
  };

  const promptTokensOf = (p: ParsedGeneration): number[] => {
    if ('tokenIds' in p.prompt) return p.prompt.tokenIds;
    if ('messages' in p.prompt) return tokenizer.encode(tokenizer.renderChat(p.prompt.messages), { addSpecialTokens: false });
    return tokenizer.encode(p.prompt.text);
  };

  async function handleGeneration(req: IncomingMessage, res: ServerResponse, kind: ParsedGeneration['kind']): Promise<void> {
    if (!ready()) throw new SimHttpError(503, 'The server is starting up (--startup-delay-secs)');
    const body = parseJsonBody(await readBody(req));
    const parsed = kind === 'chat' ? parseChat(body) : kind === 'completions' ? parseCompletion(body) : parseGenerate(body);
    if (parsed.model !== undefined && parsed.model !== model) {
      throw new SimHttpError(404, `The model \`${parsed.model}\` does not exist.`, 'model');
    }
    const handle = pickRank(headerRank(req) ?? parsed.dpRank);
    const promptTokens = promptTokensOf(parsed);
    if (promptTokens.length === 0) throw new SimHttpError(400, 'The prompt is empty after tokenization', 'prompt');
    const limit = handle.engine.maxRequestTokens;
    if (promptTokens.length >= limit) {
      throw new SimHttpError(
        400,
        `This model's maximum context length is ${limit} tokens. However, your request has ${promptTokens.length} input tokens. Please reduce the length of the input messages.`,
      );
    }
    let maxTokens = parsed.maxTokens;
    if (maxTokens === undefined) maxTokens = Math.min(defaultMaxTokens, limit - promptTokens.length);
    else if (promptTokens.length + maxTokens > limit) {
      throw new SimHttpError(
        400,
        `This model's maximum context length is ${limit} tokens. However, you requested ${promptTokens.length + maxTokens} tokens (${promptTokens.length} in the messages, ${maxTokens} in the completion). Please reduce the length of the messages or completion.`,
      );
    }

    // Fault injection (valid generation requests only).
    generationRequests++;
    if (faults.crashAfterRequests > 0 && generationRequests > faults.crashAfterRequests) {
      crash();
      return;
    }
    if (generationRequests <= faults.failFirstN || (faults.failRate > 0 && faultRng.next() < faults.failRate)) {
      throw new SimHttpError(faults.failStatus, `Injected failure (kvgate sim fault injection, status ${faults.failStatus})`);
    }
    if (faults.hangRate > 0 && faultRng.next() < faults.hangRate) {
      hanging.add(res);
      res.on('close', () => hanging.delete(res));
      return; // never answered
    }

    runRequest(res, parsed, handle, promptTokens, maxTokens);
  }

  function runRequest(res: ServerResponse, p: ParsedGeneration, h: SimEngineHandle, promptTokens: number[], maxTokens: number): void {
    const id = p.kind === 'chat' ? `chatcmpl-${randomUUID().replace(/-/g, '')}` : p.kind === 'completions' ? `cmpl-${randomUUID().replace(/-/g, '')}` : randomUUID().replace(/-/g, '');
    const created = nowSecs();
    const rankHeader = { 'x-data-parallel-rank': String(h.rank) };
    let text = '';
    const outputIds: number[] = [];
    let done = false;

    const sse = (obj: unknown): void => {
      if (!res.destroyed && !res.writableEnded) res.write(`data: ${JSON.stringify(obj)}\n\n`);
    };
    const sglangMeta = (finished: boolean, cached: number): Record<string, unknown> => ({
      id,
      finish_reason: finished ? { type: 'length', length: outputIds.length } : null,
      prompt_tokens: promptTokens.length,
      completion_tokens: outputIds.length,
      cached_tokens: cached,
    });
    const cachedNow = (): number => h.engine.requestInfo(id)?.cachedTokens ?? 0;

    const onToken = (out: TokenOutput): void => {
      if (out.index === 0) metrics.observeFirstToken(h.rank, out.ttftMs);
      const piece = tokenizer.decodeToken(out.token);
      text += piece;
      outputIds.push(out.token);
      if (!p.stream) return;
      const finish = out.finished ? 'length' : null;
      if (p.kind === 'chat') {
        const chunk = (delta: Record<string, unknown>, finishReason: string | null) => ({
          id,
          object: 'chat.completion.chunk',
          created,
          model,
          choices: [{ index: 0, delta, logprobs: null, finish_reason: finishReason, stop_reason: null }],
        });
        if (out.index === 0) sse(chunk({ role: 'assistant', content: '' }, null));
        sse(chunk({ content: piece }, finish));
      } else if (p.kind === 'completions') {
        sse({ id, object: 'text_completion', created, model, choices: [{ index: 0, text: piece, logprobs: null, finish_reason: finish, stop_reason: null }] });
      } else if (!out.finished) {
        // SGLang streams the cumulative text; the final chunk is sent by onFinish.
        sse({ text, output_ids: [...outputIds], meta_info: sglangMeta(false, cachedNow()) });
      }
    };

    const onFinish = (rec: RequestRecord): void => {
      metrics.observe(h.rank, rec);
      if (done) return;
      done = true;
      if (rec.finishReason === 'abort') {
        res.destroy(); // server shutting down or client gone
        return;
      }
      const usage = usageOf(rec.promptTokens, rec.outputTokens, rec.cachedTokens);
      if (p.stream) {
        if (p.kind === 'generate') {
          sse({ text, output_ids: outputIds, meta_info: { ...sglangMeta(true, rec.cachedTokens), e2e_latency: rec.e2eMs / 1000 } });
        } else if (p.includeUsage) {
          sse({ id, object: p.kind === 'chat' ? 'chat.completion.chunk' : 'text_completion', created, model, choices: [], usage });
        }
        res.end('data: [DONE]\n\n');
        return;
      }
      if (p.kind === 'chat') {
        sendJson(
          res,
          200,
          {
            id,
            object: 'chat.completion',
            created,
            model,
            choices: [{ index: 0, message: { role: 'assistant', content: text }, logprobs: null, finish_reason: 'length', stop_reason: null }],
            usage,
          },
          rankHeader,
        );
      } else if (p.kind === 'completions') {
        sendJson(
          res,
          200,
          {
            id,
            object: 'text_completion',
            created,
            model,
            choices: [{ index: 0, text, logprobs: null, finish_reason: 'length', stop_reason: null }],
            usage,
          },
          rankHeader,
        );
      } else {
        sendJson(res, 200, { text, output_ids: outputIds, meta_info: { ...sglangMeta(true, rec.cachedTokens), e2e_latency: rec.e2eMs / 1000 } }, rankHeader);
      }
    };

    try {
      h.driver.submit({ id, promptTokens, maxTokens }, { onToken, onFinish });
    } catch (e) {
      if (e instanceof EngineRequestError) throw new SimHttpError(400, e.message);
      throw e;
    }
    // Client went away before the end: abort in the engine (frees its KV blocks).
    res.on('close', () => {
      if (!done) h.driver.abort(id);
    });
    if (res.destroyed) {
      h.driver.abort(id);
      return;
    }
    if (p.stream) {
      res.writeHead(200, { ...rankHeader, 'content-type': 'text/event-stream', 'cache-control': 'no-cache', connection: 'keep-alive' });
      res.flushHeaders();
    }
  }

  async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const path = (req.url ?? '/').split('?')[0]!;
    const method = req.method ?? 'GET';
    const route = ROUTES[path];
    if (!route) throw new SimHttpError(404, `Not Found: ${method} ${path}`);
    if (route !== method) throw new SimHttpError(405, `Method Not Allowed: ${method} ${path}`);
    switch (path) {
      case '/v1/chat/completions':
        return handleGeneration(req, res, 'chat');
      case '/v1/completions':
        return handleGeneration(req, res, 'completions');
      case '/generate':
        return handleGeneration(req, res, 'generate');
      case '/health':
        if (!ready()) throw new SimHttpError(503, 'The server is starting up (--startup-delay-secs)');
        res.writeHead(200, { 'content-length': 0 });
        res.end();
        return;
      case '/v1/models':
        return sendJson(res, 200, {
          object: 'list',
          data: [
            {
              id: model,
              object: 'model',
              created: nowSecs(),
              owned_by: 'kvgate-sim',
              root: model,
              parent: null,
              max_model_len: engines[0]!.engine.maxRequestTokens,
              permission: [],
            },
          ],
        });
      case '/get_server_info':
      case '/server_info':
        return sendJson(res, 200, serverInfo());
      case '/get_model_info':
        return sendJson(res, 200, { model_path: model, tokenizer_path: tokenizer.name, is_generation: true });
      case '/get_load':
        return sendJson(
          res,
          200,
          engines.map((h) => {
            const s = h.engine.stats();
            return {
              dp_rank: h.rank,
              num_reqs: s.running + s.waiting,
              num_waiting_reqs: s.waiting,
              num_tokens: (s.numGpuBlocks - s.freeBlocks) * h.engine.config.blockSize,
            };
          }),
        );
      case '/flush_cache':
      case '/reset_prefix_cache':
        for (const h of engines) h.engine.reset();
        if (path === '/flush_cache') {
          res.writeHead(200, { 'content-type': 'text/plain' });
          res.end('Cache flushed.\n');
        } else {
          res.writeHead(200, { 'content-length': 0 });
          res.end();
        }
        return;
      case '/metrics': {
        const text = await metrics.render();
        res.writeHead(200, { 'content-type': metrics.contentType });
        res.end(text);
        return;
      }
    }
  }

  const serverInfo = (): Record<string, unknown> => {
    const c = engines[0]!.engine.config;
    return {
      model_path: model,
      served_model_name: model,
      tokenizer_path: tokenizer.name,
      dp_size: dp,
      tp_size: 1,
      page_size: c.blockSize,
      max_total_num_tokens: c.numGpuBlocks * c.blockSize,
      max_running_requests: c.maxNumSeqs,
      chunked_prefill_size: c.maxNumBatchedTokens,
      context_length: c.maxModelLen,
      simulator: {
        engine: 'kvgate-sim',
        speed: clock.speed,
        num_gpu_blocks: c.numGpuBlocks,
        cost_model: c.cost,
        kv_events: opts.kvEvents
          ? engines.map((h) => ({ dp_rank: h.rank, endpoint: h.publisher?.boundEndpoint, replay_endpoint: h.publisher?.boundReplayEndpoint }))
          : null,
      },
      version: 'kvgate-sim',
    };
  };

  const server: Server = createServer((req, res) => {
    handle(req, res).catch((err: unknown) => {
      if (err instanceof SimHttpError) return sendError(res, err);
      log(`internal error on ${req.method} ${req.url}: ${(err as Error).stack ?? String(err)}`);
      sendError(res, new SimHttpError(500, `Internal error: ${(err as Error).message}`));
    });
  });
  server.on('connection', (s: Socket) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  server.on('clientError', (_err, socket) => socket.destroy());

  try {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(opts.port ?? 8000, opts.host ?? '0.0.0.0', () => {
        server.off('error', reject);
        resolve();
      });
    });
  } catch (e) {
    await Promise.allSettled(engines.map((h) => h.publisher?.close()));
    throw e;
  }
  const port = (server.address() as AddressInfo).port;
  const host = opts.host ?? '0.0.0.0';
  const urlHost = host === '0.0.0.0' || host === '::' ? '127.0.0.1' : host.includes(':') ? `[${host}]` : host;

  return {
    url: `http://${urlHost}:${port}`,
    port,
    model,
    engines,
    metrics,
    tokenizer,
    get crashed() {
      return crashed;
    },
    async close(): Promise<void> {
      if (closing) return;
      closing = true;
      for (const h of engines) h.driver.stop();
      for (const r of hanging) r.destroy();
      await new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const s of sockets) s.destroy();
      });
      await Promise.allSettled(engines.map((h) => h.publisher?.close()));
    },
  };
}

/** path → method. */
const ROUTES: Record<string, string> = {
  '/v1/chat/completions': 'POST',
  '/v1/completions': 'POST',
  '/generate': 'POST',
  '/health': 'GET',
  '/v1/models': 'GET',
  '/get_server_info': 'GET',
  '/server_info': 'GET',
  '/get_model_info': 'GET',
  '/get_load': 'GET',
  '/flush_cache': 'POST',
  '/reset_prefix_cache': 'POST',
  '/metrics': 'GET',
};

function validateFaults(f: FaultOptions): void {
  const prob = (k: 'failRate' | 'hangRate') => {
    if (!(f[k] >= 0 && f[k] <= 1)) throw new RangeError(`${k} must be in [0, 1] (got ${f[k]})`);
  };
  prob('failRate');
  prob('hangRate');
  for (const k of ['failFirstN', 'crashAfterRequests'] as const) {
    if (!Number.isInteger(f[k]) || f[k] < 0) throw new RangeError(`${k} must be a non-negative integer (got ${f[k]})`);
  }
  if (!Number.isInteger(f.failStatus) || f.failStatus < 400 || f.failStatus > 599) {
    throw new RangeError(`failStatus must be an HTTP error status 400-599 (got ${f.failStatus})`);
  }
  if (!(f.startupDelaySecs >= 0) || !Number.isFinite(f.startupDelaySecs)) {
    throw new RangeError(`startupDelaySecs must be a finite number >= 0 (got ${f.startupDelaySecs})`);
  }
}
