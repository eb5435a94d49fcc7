import { randomUUID } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { randomRng, SeededRng, type Rng } from '../core/rng.js';
import type { CostModelConfig } from '../engine/cost-model.js';
import { RealtimeDriver, ScaledClock } from './driver.js';
import { Engine, EngineRequestError, type RequestRecord, type TokenOutput } from './engine.js';
import { parseChat, parseCompletion, parseGenerate, SimHttpError, usageOf, type ParsedGeneration } from './http-api.js';
import { endpointForRank } from '../events/endpoints.js';
import { KvEventPublisher } from './kv-publisher.js';
import { SimMetrics } from './metrics.js';
import {
  abortableSleep,
  DEFAULT_BOOTSTRAP_PORT,
  DEFAULT_KV_SIDE_CHANNEL_PORT,
  DEFAULT_PD_TRANSFER_TIMEOUT_SECS,
  defaultKvTransferMsPerBlock,
  hostPortUrl,
  inputTokenLogprobs,
  fakeLogprob,
  KvSideChannel,
  parseSglangBootstrap,
  parseVllmKvParams,
  PD_POLL_INTERVAL_MS,
  PdHandoffError,
  pullKv,
  type PdOptions,
  type PdProtocol,
  type PdRole,
} from './pd.js';
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
  /** Blocks of the simulated CPU-offload tier (0 = none). */
  cpuOffloadBlocks?: number;
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
  /** Prefill/decode disaggregation role (absent = a regular engine). See pd.ts. */
  pd?: PdOptions;
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
  /** PD settings in effect (null for a regular engine). */
  pd: SimPdInfo | null;
  /** True once --crash-after-requests fired. */
  readonly crashed: boolean;
  close(): Promise<void>;
}

export interface SimPdInfo {
  role: PdRole;
  protocol: PdProtocol;
  /** Prefill: bound port of the bootstrap server (SGLang) or KV side channel (vLLM); null on a decode. */
  sideChannelPort: number | null;
  /** vLLM prefill: host announced in kv_transfer_params.remote_host. */
  sideChannelHost: string;
  kvTransferMsPerBlock: number;
  transferTimeoutSecs: number;
  /** remote_engine_id of this sim (vLLM). */
  engineId: string;
}

const MAX_BODY_BYTES = 64 * 1024 * 1024;

/** Per-request options of runRequest (PD hand-offs, SGLang logprobs). */
interface RunOpts {
  /** PD decode: the prompt's KV was imported (engine submit with prefilled: true). */
  prefilled?: boolean;
  /** PD prefill (vLLM): keep the engine's block ids for kv_transfer_params.remote_block_ids. */
  reportBlockIds?: boolean;
  /** Simulated ms between the HTTP arrival and the engine submission (PD decode hand-off). */
  handoffMs?: number;
  /** Report cached_tokens 0 (PD decode: the prompt's KV came from the prefill). */
  zeroCached?: boolean;
  /** SGLang return_logprob on a decode: input_token_logprobs is [] (the prefill returns them). */
  noInputLogprobs?: boolean;
  /** Extra top-level fields of a non-streaming OpenAI response (vLLM kv_transfer_params). */
  extraBody?: (rec: RequestRecord) => Record<string, unknown>;
  /** Called when the engine is done with the request (before the response is written). */
  onEnd?: (rec: RequestRecord) => void;
}

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
        cpuOffloadBlocks: opts.cpuOffloadBlocks,
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

  // Prefill/decode disaggregation.
  const host = opts.host ?? '0.0.0.0';
  const wildcardHost = host === '0.0.0.0' || host === '::';
  let pdInfo: SimPdInfo | null = null;
  let sideChannel: KvSideChannel | null = null;
  const pendingHandoffs = new Set<AbortController>();
  if (opts.pd) {
    const o = opts.pd;
    if (o.role !== 'prefill' && o.role !== 'decode') throw new RangeError(`pd.role must be 'prefill' or 'decode' (got ${String(o.role)})`);
    const protocol = o.protocol ?? 'sglang';
    if (protocol !== 'sglang' && protocol !== 'vllm') throw new RangeError(`pd.protocol must be 'sglang' or 'vllm' (got ${String(protocol)})`);
    const perBlock = o.kvTransferMsPerBlock ?? defaultKvTransferMsPerBlock(engines[0]!.engine.config.blockSize);
    if (!(perBlock >= 0) || !Number.isFinite(perBlock)) throw new RangeError(`pd.kvTransferMsPerBlock must be a finite number >= 0 (got ${perBlock})`);
    const timeoutSecs = o.transferTimeoutSecs ?? DEFAULT_PD_TRANSFER_TIMEOUT_SECS;
    if (!(timeoutSecs > 0) || !Number.isFinite(timeoutSecs)) throw new RangeError(`pd.transferTimeoutSecs must be a finite number > 0 (got ${timeoutSecs})`);
    pdInfo = {
      role: o.role,
      protocol,
      sideChannelPort: null,
      sideChannelHost: o.kvSideChannelHost ?? (wildcardHost ? '127.0.0.1' : host),
      kvTransferMsPerBlock: perBlock,
      transferTimeoutSecs: timeoutSecs,
      engineId: `kvgate-sim-${randomUUID().slice(0, 8)}`,
    };
    metrics.enablePd(o.role);
    if (o.role === 'prefill') {
      const sidePort = protocol === 'sglang' ? (o.bootstrapPort ?? DEFAULT_BOOTSTRAP_PORT) : (o.kvSideChannelPort ?? DEFAULT_KV_SIDE_CHANNEL_PORT);
      if (!Number.isInteger(sidePort) || sidePort < 0 || sidePort > 65535) throw new RangeError(`PD side-channel port must be in [0, 65535] (got ${sidePort})`);
      // Entries outlive the decode's timeout (in wall time) comfortably.
      const ttlMs = Math.max(600_000, (4 * timeoutSecs * 1000) / clock.speed);
      sideChannel = new KvSideChannel({ ttlMs, onHandoff: (_key, blocks) => metrics.observeKvTransfer(blocks) });
      try {
        pdInfo.sideChannelPort = await sideChannel.start(host, sidePort);
      } catch (e) {
        await Promise.allSettled(engines.map((h) => h.publisher?.close()));
        throw new Error(`cannot bind the PD ${protocol === 'sglang' ? 'bootstrap' : 'KV side-channel'} port ${sidePort}: ${(e as Error).message}`);
      }
      log(
        `PD prefill (${protocol}): ${protocol === 'sglang' ? 'bootstrap' : 'KV side-channel'} server on ${hostPortUrl(wildcardHost ? '127.0.0.1' : host, pdInfo.sideChannelPort)} (port ${pdInfo.sideChannelPort})`,
      );
    } else {
      log(`PD decode (${protocol}): ${perBlock} ms per KV block, hand-off timeout ${timeoutSecs} s`);
    }
  }
  const pd = pdInfo;

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
    for (const ac of pendingHandoffs) ac.abort(new Error('server crashed'));
    void Promise.allSettled([...engines.map((h) => h.publisher?.close()), sideChannel?.close()]);
    opts.onCrash?.();
  };

  const promptTokensOf = (p: ParsedGeneration): number[] => {
    if ('tokenIds' in p.prompt) return p.prompt.tokenIds;
    if ('messages' in p.prompt) return tokenizer.encode(tokenizer.renderChat(p.prompt.messages), { addSpecialTokens: false });
    return tokenizer.encode(p.prompt.text);
  };

  /** What a PD sim does with one generation request, decided (and validated) before faults. */
  type PdPlan =
    | { kind: 'sglang-prefill'; room: string }
    | { kind: 'sglang-decode'; room: string; baseUrl: string }
    | { kind: 'vllm-prefill' }
    | { kind: 'vllm-decode'; transferId: string; baseUrl: string };

  const pdPlanOf = (body: Record<string, unknown>, p: ParsedGeneration): PdPlan | undefined => {
    if (!pd) return undefined;
    if (pd.protocol === 'sglang') {
      const b = parseSglangBootstrap(body);
      if (!b) {
        throw new SimHttpError(
          400,
          `This is a PD ${pd.role} engine (SGLang protocol): the request must carry bootstrap_room (and bootstrap_host / bootstrap_port), as injected by a PD router`,
          'bootstrap_room',
        );
      }
      if (pd.role === 'prefill') return { kind: 'sglang-prefill', room: b.room };
      if (b.host === undefined) {
        throw new SimHttpError(400, 'A PD decode engine (SGLang protocol) needs bootstrap_host: the prefill engine to take the KV cache from', 'bootstrap_host');
      }
      return { kind: 'sglang-decode', room: b.room, baseUrl: hostPortUrl(b.host, b.port ?? DEFAULT_BOOTSTRAP_PORT) };
    }
    const k = parseVllmKvParams(body);
    if (pd.role === 'prefill') {
      if (!k || !k.doRemoteDecode) {
        throw new SimHttpError(
          400,
          'This is a PD prefill engine (vLLM protocol): the request must carry kv_transfer_params {"do_remote_decode": true, "do_remote_prefill": false}',
          'kv_transfer_params',
        );
      }
      if (k.doRemotePrefill) throw new SimHttpError(400, 'kv_transfer_params.do_remote_prefill must be false on a PD prefill engine', 'kv_transfer_params');
      if (p.stream) {
        throw new SimHttpError(400, 'kv_transfer_params.do_remote_decode requires stream=false: the simulator returns kv_transfer_params in the JSON response', 'stream');
      }
      return { kind: 'vllm-prefill' };
    }
    if (!k || !k.doRemotePrefill) {
      throw new SimHttpError(
        400,
        "This is a PD decode engine (vLLM protocol): the request must carry the prefill response's kv_transfer_params (do_remote_prefill: true, remote_host, remote_port, transfer_id)",
        'kv_transfer_params',
      );
    }
    if (k.doRemoteDecode) throw new SimHttpError(400, 'kv_transfer_params.do_remote_decode must be false on a PD decode engine', 'kv_transfer_params');
    for (const [field, v] of [
      ['remote_host', k.remoteHost],
      ['remote_port', k.remotePort],
      ['transfer_id', k.transferId],
    ] as const) {
      if (v === undefined) throw new SimHttpError(400, `kv_transfer_params.${field} is required on a PD decode engine (vLLM protocol)`, 'kv_transfer_params');
    }
    return { kind: 'vllm-decode', transferId: k.transferId!, baseUrl: hostPortUrl(k.remoteHost!, k.remotePort!) };
  };

  async function handleGeneration(req: IncomingMessage, res: ServerResponse, kind: ParsedGeneration['kind']): Promise<void> {
    if (!ready()) throw new SimHttpError(503, 'The server is starting up (--startup-delay-secs)');
    const body = parseJsonBody(await readBody(req));
    const arrivalMs = clock.now();
    // Batched PD fields (arrays) get their own clear 400 before the prompt is looked at.
    if (pd?.protocol === 'sglang') parseSglangBootstrap(body);
    const parsed = kind === 'chat' ? parseChat(body) : kind === 'completions' ? parseCompletion(body) : parseGenerate(body);
    if (parsed.model !== undefined && parsed.model !== model) {
      throw new SimHttpError(404, `The model \`${parsed.model}\` does not exist.`, 'model');
    }
    const pdPlan = pdPlanOf(body, parsed);
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

    if (!pdPlan) {
      runRequest(res, parsed, handle, promptTokens, maxTokens);
      return;
    }
    const blockSize = handle.engine.config.blockSize;
    const promptBlocks = Math.ceil(promptTokens.length / blockSize);
    switch (pdPlan.kind) {
      case 'sglang-prefill':
      case 'vllm-prefill': {
        // SGLang prefill generates exactly one token whatever max_new_tokens says; a vLLM
        // prefill request comes with max_tokens 1 from the router, and is treated the same.
        const key = pdPlan.kind === 'sglang-prefill' ? pdPlan.room : `xfer-${randomUUID().replace(/-/g, '')}`;
        const side = sideChannel!;
        if (!side.register(key)) {
          throw new SimHttpError(400, `bootstrap_room ${key} is already in use on this prefill engine`, 'bootstrap_room');
        }
        const onEnd = (rec: RequestRecord): void => {
          if (rec.finishReason === 'length') side.ready(key, rec.promptTokens, promptBlocks);
          else {
            side.fail(key, 'the prefill request was aborted');
            metrics.observeKvTransferFailure('aborted');
          }
        };
        const extraBody =
          pdPlan.kind === 'vllm-prefill'
            ? (rec: RequestRecord): Record<string, unknown> => ({
                kv_transfer_params: {
                  do_remote_prefill: true,
                  do_remote_decode: false,
                  remote_engine_id: pd!.engineId,
                  remote_block_ids: rec.blockIds ?? [],
                  remote_host: pd!.sideChannelHost,
                  remote_port: pd!.sideChannelPort,
                  tp_size: 1,
                  transfer_id: key,
                },
              })
            : undefined;
        try {
          runRequest(res, parsed, handle, promptTokens, 1, { onEnd, extraBody, reportBlockIds: pdPlan.kind === 'vllm-prefill' });
        } catch (e) {
          side.fail(key, `the prefill request failed: ${(e as Error).message}`);
          throw e;
        }
        return;
      }
      case 'sglang-decode':
      case 'vllm-decode':
        return runDecode(res, parsed, handle, promptTokens, maxTokens, arrivalMs, pdPlan);
    }
  }

  /**
   * PD decode: poll the prefill's side channel until its KV is ready, wait the simulated
   * transfer time, then run the request with prefilled KV. Errors before the engine submission
   * are answered as JSON (504 on timeout, 502 when the prefill failed or disagrees).
   */
  async function runDecode(
    res: ServerResponse,
    parsed: ParsedGeneration,
    handle: SimEngineHandle,
    promptTokens: number[],
    maxTokens: number,
    arrivalMs: number,
    plan: { kind: 'sglang-decode'; room: string; baseUrl: string } | { kind: 'vllm-decode'; transferId: string; baseUrl: string },
  ): Promise<void> {
    const info = pd!;
    const what = plan.kind === 'sglang-decode' ? `bootstrap_room ${plan.room}` : `transfer_id ${plan.transferId}`;
    const key = plan.kind === 'sglang-decode' ? plan.room : plan.transferId;
    const ac = new AbortController();
    pendingHandoffs.add(ac);
    const onClose = (): void => ac.abort(new Error('client closed the connection'));
    res.on('close', onClose);
    const speed = clock.speed;
    let pulled;
    let transferMs = 0;
    try {
      pulled = await pullKv({
        baseUrl: plan.baseUrl,
        key,
        pollMs: Math.max(1, PD_POLL_INTERVAL_MS / speed),
        timeoutMs: Math.max(0, (info.transferTimeoutSecs * 1000 - (clock.now() - arrivalMs)) / speed),
        signal: ac.signal,
      });
      const waitMs = clock.now() - arrivalMs;
      if (pulled.promptTokens !== promptTokens.length) {
        metrics.observeKvTransferFailure('mismatch');
        throw new SimHttpError(
          502,
          `KV hand-off mismatch for ${what}: the prefill engine at ${plan.baseUrl} computed ${pulled.promptTokens} prompt tokens, this decode engine has ${promptTokens.length} (different tokenizers or request bodies?)`,
        );
      }
      transferMs = pulled.blocks * info.kvTransferMsPerBlock;
      if (transferMs > 0) await abortableSleep(transferMs / speed, ac.signal);
      metrics.observeKvTransfer(pulled.blocks, transferMs, waitMs);
    } catch (e) {
      if (e instanceof SimHttpError) throw e;
      if (ac.signal.aborted) {
        metrics.observeKvTransferFailure('aborted');
        res.destroy();
        return;
      }
      if (e instanceof PdHandoffError) {
        metrics.observeKvTransferFailure(e.reason);
        if (e.reason === 'timeout') {
          throw new SimHttpError(
            504,
            `KV hand-off timed out for ${what}: the prefill engine at ${plan.baseUrl} did not hand over the KV cache within ${info.transferTimeoutSecs} s (--pd-transfer-timeout-secs)`,
          );
        }
        throw new SimHttpError(502, `KV hand-off failed for ${what}: the prefill engine at ${plan.baseUrl} reports: ${e.message}`);
      }
      throw e;
    } finally {
      pendingHandoffs.delete(ac);
      res.off('close', onClose);
    }
    if (res.destroyed || closing) {
      res.destroy();
      return;
    }
    runRequest(res, parsed, handle, promptTokens, maxTokens, {
      prefilled: true,
      handoffMs: clock.now() - arrivalMs,
      zeroCached: true,
      noInputLogprobs: true,
      extraBody: info.protocol === 'vllm' ? () => ({ kv_transfer_params: null }) : undefined,
    });
  }

  function runRequest(
    res: ServerResponse,
    p: ParsedGeneration,
    h: SimEngineHandle,
    promptTokens: number[],
    maxTokens: number,
    ro: RunOpts = {},
  ): void {
    const id = p.kind === 'chat' ? `chatcmpl-${randomUUID().replace(/-/g, '')}` : p.kind === 'completions' ? `cmpl-${randomUUID().replace(/-/g, '')}` : randomUUID().replace(/-/g, '');
    const created = nowSecs();
    const rankHeader = { 'x-data-parallel-rank': String(h.rank) };
    const handoffMs = ro.handoffMs ?? 0;
    let text = '';
    const outputIds: number[] = [];
    let done = false;
    let lastTokenMs = -1;

    const sse = (obj: unknown): void => {
      if (!res.destroyed && !res.writableEnded) res.write(`data: ${JSON.stringify(obj)}\n\n`);
    };
    // SGLang logprobs (return_logprob): fake but deterministic, one entry per token.
    let inputLogprobs: unknown[] | undefined;
    const logprobMeta = (): Record<string, unknown> => {
      if (!p.returnLogprob) return {};
      inputLogprobs ??= ro.noInputLogprobs ? [] : inputTokenLogprobs(promptTokens);
      return {
        input_token_logprobs: inputLogprobs,
        output_token_logprobs: outputIds.map((t, i) => [fakeLogprob(t, promptTokens.length + i), t, null]),
      };
    };
    const sglangMeta = (finished: boolean, cached: number): Record<string, unknown> => ({
      id,
      finish_reason: finished ? { type: 'length', length: outputIds.length } : null,
      prompt_tokens: promptTokens.length,
      completion_tokens: outputIds.length,
      cached_tokens: ro.zeroCached ? 0 : cached,
      ...logprobMeta(),
    });
    const cachedNow = (): number => h.engine.requestInfo(id)?.cachedTokens ?? 0;

    const onToken = (out: TokenOutput): void => {
      const nowMs = h.engine.lastStepEndMs;
      if (out.index === 0) metrics.observeFirstToken(h.rank, out.ttftMs + handoffMs);
      else if (lastTokenMs >= 0) metrics.observeInterToken(h.rank, nowMs - lastTokenMs);
      lastTokenMs = nowMs;
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
      metrics.observe(h.rank, rec, handoffMs);
      ro.onEnd?.(rec);
      if (done) return;
      done = true;
      if (rec.finishReason === 'abort') {
        res.destroy(); // server shutting down or client gone
        return;
      }
      const cached = ro.zeroCached ? 0 : rec.cachedTokens;
      const usage = usageOf(rec.promptTokens, rec.outputTokens, cached);
      const e2eLatency = (rec.e2eMs + handoffMs) / 1000;
      if (p.stream) {
        if (p.kind === 'generate') {
          sse({ text, output_ids: outputIds, meta_info: { ...sglangMeta(true, cached), e2e_latency: e2eLatency } });
        } else if (p.includeUsage) {
          sse({ id, object: p.kind === 'chat' ? 'chat.completion.chunk' : 'text_completion', created, model, choices: [], usage });
        }
        res.end('data: [DONE]\n\n');
        return;
      }
      const extra = ro.extraBody?.(rec) ?? {};
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
            ...extra,
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
            ...extra,
          },
          rankHeader,
        );
      } else {
        sendJson(res, 200, { text, output_ids: outputIds, meta_info: { ...sglangMeta(true, cached), e2e_latency: e2eLatency }, ...extra }, rankHeader);
      }
    };

    try {
      h.driver.submit({ id, promptTokens, maxTokens, prefilled: ro.prefilled, reportBlockIds: ro.reportBlockIds }, { onToken, onFinish });
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
      pd_role: pd?.role ?? null,
      pd_protocol: pd?.protocol ?? null,
      bootstrap_port: pd?.protocol === 'sglang' ? pd.sideChannelPort : null,
      kv_side_channel_port: pd?.protocol === 'vllm' ? pd.sideChannelPort : null,
      // SGLang's own names for the same facts.
      disaggregation_mode: pd?.role ?? 'null',
      disaggregation_bootstrap_port: pd?.protocol === 'sglang' ? pd.sideChannelPort : null,
      simulator: {
        engine: 'kvgate-sim',
        speed: clock.speed,
        num_gpu_blocks: c.numGpuBlocks,
        cost_model: c.cost,
        kv_events: opts.kvEvents
          ? engines.map((h) => ({ dp_rank: h.rank, endpoint: h.publisher?.boundEndpoint, replay_endpoint: h.publisher?.boundReplayEndpoint }))
          : null,
        pd: pd
          ? {
              role: pd.role,
              protocol: pd.protocol,
              side_channel_port: pd.sideChannelPort,
              side_channel_host: pd.role === 'prefill' ? pd.sideChannelHost : null,
              engine_id: pd.engineId,
              kv_transfer_ms_per_block: pd.kvTransferMsPerBlock,
              transfer_timeout_secs: pd.transferTimeoutSecs,
            }
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
    await Promise.allSettled([...engines.map((h) => h.publisher?.close()), sideChannel?.close()]);
    throw e;
  }
  const port = (server.address() as AddressInfo).port;
  const urlHost = wildcardHost ? '127.0.0.1' : host.includes(':') ? `[${host}]` : host;

  return {
    url: `http://${urlHost}:${port}`,
    port,
    model,
    engines,
    metrics,
    tokenizer,
    pd,
    get crashed() {
      return crashed;
    },
    async close(): Promise<void> {
      if (closing) return;
      closing = true;
      for (const h of engines) h.driver.stop();
      for (const r of hanging) r.destroy();
      for (const ac of pendingHandoffs) ac.abort(new Error('server closing'));
      await new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const s of sockets) s.destroy();
      });
      await Promise.allSettled([...engines.map((h) => h.publisher?.close()), sideChannel?.close()]);
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
