import { createServer, type Server } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { SimHttpError } from './http-api.js';
import { LLAMA3_8B_KV_BYTES_PER_TOKEN } from './kv-cache.js';

/**
 * Prefill/decode (PD) disaggregation for `kvgate sim`.
 *
 * Real engines move the KV cache from the prefill GPU to the decode GPU over RDMA (NIXL in
 * vLLM, Mooncake/NIXL in SGLang). The simulator has no KV bytes to move, so the hand-off is a
 * small HTTP side channel served by the prefill sim:
 *
 *   GET /kv/{key}  →  200 {"status":"ready","prompt_tokens":N,"blocks":B}   prefill finished
 *                     202 {"status":"pending"}                              prefill running
 *                     404 {"status":"unknown"}                              never seen (or expired)
 *                     410 {"status":"failed","reason":...}                  prefill aborted / failed
 *
 * `key` is SGLang's `bootstrap_room` (served on --bootstrap-port) or the vLLM `transfer_id` the
 * prefill returned in its `kv_transfer_params` (served on --kv-side-channel-port). The decode sim
 * polls until ready, waits blocks × --kv-transfer-ms-per-block of simulated time (the transfer),
 * then submits the request to its engine with `prefilled: true` (no prefill compute).
 */

export type PdRole = 'prefill' | 'decode';
export type PdProtocol = 'sglang' | 'vllm';

export const DEFAULT_BOOTSTRAP_PORT = 8998;
export const DEFAULT_KV_SIDE_CHANNEL_PORT = 5600;
export const DEFAULT_PD_TRANSFER_TIMEOUT_SECS = 30;
/** Effective prefill → decode KV bandwidth assumed by the default transfer time (bytes/s). */
export const KV_LINK_BYTES_PER_SEC = 25e9;
/** Decode-side poll interval of the side channel, in simulated ms (wall = this / speed, ≥ 1 ms). */
export const PD_POLL_INTERVAL_MS = 5;

/**
 * Default transfer time of one KV block: blockSize × 128 KiB (Llama-3-8B bf16 KV per token) over
 * a ~25 GB/s link (RDMA / NVLink-class effective bandwidth). 16-token blocks: 2 MiB → 0.0839 ms.
 */
export function defaultKvTransferMsPerBlock(blockSize: number): number {
  return ((blockSize * LLAMA3_8B_KV_BYTES_PER_TOKEN) / KV_LINK_BYTES_PER_SEC) * 1000;
}

export interface PdOptions {
  role: PdRole;
  /** Default 'sglang'. */
  protocol?: PdProtocol;
  /** SGLang prefill: bootstrap server port (default 8998, 0 = ephemeral). */
  bootstrapPort?: number;
  /** vLLM prefill: KV side-channel port (default 5600, 0 = ephemeral). */
  kvSideChannelPort?: number;
  /** vLLM prefill: host put in `remote_host` (default: --host, or 127.0.0.1 for a wildcard host). */
  kvSideChannelHost?: string;
  /** Simulated ms per KV block moved (default {@link defaultKvTransferMsPerBlock}). */
  kvTransferMsPerBlock?: number;
  /** Decode: give up on a hand-off after this many simulated seconds (default 30). */
  transferTimeoutSecs?: number;
}

// ---------------------------------------------------------------------------------------------
// Request fields
// ---------------------------------------------------------------------------------------------

const bad = (message: string, param: string | null = null): SimHttpError => new SimHttpError(400, message, param);

/** SGLang's bootstrap fields, injected by the PD router into the body sent to both engines. */
export interface SglangBootstrap {
  host: string | undefined;
  /** undefined when absent or null (the decode then uses {@link DEFAULT_BOOTSTRAP_PORT}). */
  port: number | undefined;
  /** Decimal string of bootstrap_room (the side-channel key). */
  room: string;
}

const BATCH_MSG = 'batched PD requests (array-valued bootstrap_host/bootstrap_port/bootstrap_room) are not supported by the simulator; send one request per prompt';

/** Parse bootstrap_host / bootstrap_port / bootstrap_room; undefined when bootstrap_room is absent. */
export function parseSglangBootstrap(body: Record<string, unknown>): SglangBootstrap | undefined {
  for (const k of ['bootstrap_host', 'bootstrap_port', 'bootstrap_room']) {
    if (Array.isArray(body[k])) throw bad(BATCH_MSG, k);
  }
  const roomRaw = body['bootstrap_room'];
  if (roomRaw === undefined || roomRaw === null) return undefined;
  let room: string;
  if (typeof roomRaw === 'number' && Number.isInteger(roomRaw) && roomRaw >= 0) room = BigInt(roomRaw).toString();
  else if (typeof roomRaw === 'string' && /^\d{1,20}$/.test(roomRaw)) room = BigInt(roomRaw).toString();
  else throw bad(`'bootstrap_room' must be a non-negative integer (got ${JSON.stringify(roomRaw)})`, 'bootstrap_room');
  const hostRaw = body['bootstrap_host'];
  if (hostRaw !== undefined && hostRaw !== null && (typeof hostRaw !== 'string' || hostRaw.length === 0)) {
    throw bad("'bootstrap_host' must be a non-empty string", 'bootstrap_host');
  }
  const portRaw = body['bootstrap_port'];
  if (portRaw !== undefined && portRaw !== null && (typeof portRaw !== 'number' || !Number.isInteger(portRaw) || portRaw < 1 || portRaw > 65535)) {
    throw bad(`'bootstrap_port' must be a port number or null (got ${JSON.stringify(portRaw)})`, 'bootstrap_port');
  }
  return {
    host: typeof hostRaw === 'string' ? hostRaw : undefined,
    port: typeof portRaw === 'number' ? portRaw : undefined,
    room,
  };
}

/** vLLM's `kv_transfer_params` (NIXL connector field names, plus the simulator's transfer_id). */
export interface VllmKvParams {
  doRemoteDecode: boolean;
  doRemotePrefill: boolean;
  remoteHost: string | undefined;
  remotePort: number | undefined;
  transferId: string | undefined;
  remoteBlockIds: number[] | undefined;
  remoteEngineId: string | undefined;
}

/** Parse `kv_transfer_params`; undefined when absent or null. */
export function parseVllmKvParams(body: Record<string, unknown>): VllmKvParams | undefined {
  const raw = body['kv_transfer_params'];
  if (raw === undefined || raw === null) return undefined;
  if (typeof raw !== 'object' || Array.isArray(raw)) throw bad("'kv_transfer_params' must be an object", 'kv_transfer_params');
  const o = raw as Record<string, unknown>;
  const flag = (k: string): boolean => {
    const v = o[k];
    if (v === undefined || v === null) return false;
    if (typeof v !== 'boolean') throw bad(`'kv_transfer_params.${k}' must be a boolean`, 'kv_transfer_params');
    return v;
  };
  const str = (k: string): string | undefined => {
    const v = o[k];
    if (v === undefined || v === null) return undefined;
    if (typeof v !== 'string' || v.length === 0) throw bad(`'kv_transfer_params.${k}' must be a non-empty string`, 'kv_transfer_params');
    return v;
  };
  const port = o['remote_port'];
  if (port !== undefined && port !== null && (typeof port !== 'number' || !Number.isInteger(port) || port < 1 || port > 65535)) {
    throw bad(`'kv_transfer_params.remote_port' must be a port number (got ${JSON.stringify(port)})`, 'kv_transfer_params');
  }
  const ids = o['remote_block_ids'];
  if (ids !== undefined && ids !== null && (!Array.isArray(ids) || ids.some((b) => typeof b !== 'number' || !Number.isInteger(b) || b < 0))) {
    throw bad("'kv_transfer_params.remote_block_ids' must be an array of block ids", 'kv_transfer_params');
  }
  const engineId = o['remote_engine_id'];
  return {
    doRemoteDecode: flag('do_remote_decode'),
    doRemotePrefill: flag('do_remote_prefill'),
    remoteHost: str('remote_host'),
    remotePort: typeof port === 'number' ? port : undefined,
    transferId: str('transfer_id'),
    remoteBlockIds: Array.isArray(ids) ? (ids as number[]) : undefined,
    remoteEngineId: typeof engineId === 'string' ? engineId : engineId === undefined || engineId === null ? undefined : String(engineId),
  };
}

/**
 * Deterministic fake log-probability of `tokenId` at `position` (in [-8, -0.001]); the simulator
 * has no model, this only gives logprob-shaped data (SGLang `[logprob, token_id, text]` entries).
 */
export function fakeLogprob(tokenId: number, position: number): number {
  let h = Math.imul(tokenId ^ 0x9e3779b9, 0x85ebca6b) ^ Math.imul(position + 1, 0xc2b2ae35);
  h ^= h >>> 15;
  h = Math.imul(h, 0x2c1b3c6d);
  h ^= h >>> 12;
  return -Math.round(1 + ((h >>> 0) % 8000)) / 1000;
}

/** SGLang `input_token_logprobs`: one `[logprob, token_id, null]` per prompt token, the first logprob null (as SGLang). */
export function inputTokenLogprobs(promptTokens: readonly number[]): [number | null, number, null][] {
  return promptTokens.map((t, i) => [i === 0 ? null : fakeLogprob(t, i), t, null]);
}

// ---------------------------------------------------------------------------------------------
// Side channel (prefill side)
// ---------------------------------------------------------------------------------------------

interface HandoffEntry {
  status: 'pending' | 'ready' | 'failed';
  promptTokens: number;
  blocks: number;
  reason: string;
  /** performance.now() after which the entry is forgotten. */
  expiresAt: number;
  fetched: boolean;
}

export interface KvSideChannelOptions {
  /** Wall ms an entry lives after its last change (default 10 min). */
  ttlMs?: number;
  /** First successful (200) fetch of a key: one hand-off served. */
  onHandoff?: (key: string, blocks: number) => void;
}

/** The prefill sim's hand-off registry and its HTTP server (`GET /kv/{key}`). */
export class KvSideChannel {
  private readonly entries = new Map<string, HandoffEntry>();
  private readonly ttlMs: number;
  private server: Server | null = null;
  private readonly sockets = new Set<Socket>();
  private boundPort = 0;

  constructor(private readonly opts: KvSideChannelOptions = {}) {
    this.ttlMs = opts.ttlMs ?? 600_000;
  }

  /** Bound port (after {@link start}). */
  get port(): number {
    return this.boundPort;
  }

  /** Announce a prefill for `key`; false if the key is already in use. */
  register(key: string): boolean {
    this.sweep();
    if (this.entries.has(key)) return false;
    this.entries.set(key, { status: 'pending', promptTokens: 0, blocks: 0, reason: '', expiresAt: performance.now() + this.ttlMs, fetched: false });
    return true;
  }

  /** The prefill of `key` finished: its KV (blocks) can be pulled. */
  ready(key: string, promptTokens: number, blocks: number): void {
    const e = this.entries.get(key);
    if (!e) return;
    e.status = 'ready';
    e.promptTokens = promptTokens;
    e.blocks = blocks;
    e.expiresAt = performance.now() + this.ttlMs;
  }

  /** The prefill of `key` failed or was aborted: the decode gives up at once. */
  fail(key: string, reason: string): void {
    const e = this.entries.get(key);
    if (!e || e.status === 'ready') return;
    e.status = 'failed';
    e.reason = reason;
    e.expiresAt = performance.now() + this.ttlMs;
  }

  status(key: string): 'pending' | 'ready' | 'failed' | undefined {
    const e = this.entries.get(key);
    return e && e.expiresAt > performance.now() ? e.status : undefined;
  }

  async start(host: string, port: number): Promise<number> {
    const server = createServer((req, res) => {
      const path = (req.url ?? '/').split('?')[0]!;
      const send = (status: number, body: unknown): void => {
        const text = JSON.stringify(body);
        res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
        res.end(text);
      };
      const m = /^\/kv\/([^/]+)$/.exec(path);
      if (path === '/health' && req.method === 'GET') return send(200, { status: 'ok' });
      if (!m) return send(404, { status: 'unknown', error: `Not Found: ${req.method} ${path}` });
      if (req.method !== 'GET') return send(405, { error: `Method Not Allowed: ${req.method} ${path}` });
      let key: string;
      try {
        key = decodeURIComponent(m[1]!);
      } catch {
        return send(400, { error: 'bad key' });
      }
      const e = this.entries.get(key);
      if (!e || e.expiresAt <= performance.now()) return send(404, { status: 'unknown' });
      if (e.status === 'pending') return send(202, { status: 'pending' });
      if (e.status === 'failed') return send(410, { status: 'failed', reason: e.reason });
      if (!e.fetched) {
        e.fetched = true;
        this.opts.onHandoff?.(key, e.blocks);
      }
      return send(200, { status: 'ready', prompt_tokens: e.promptTokens, blocks: e.blocks });
    });
    server.on('connection', (s: Socket) => {
      this.sockets.add(s);
      s.on('close', () => this.sockets.delete(s));
    });
    server.on('clientError', (_err, socket) => socket.destroy());
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, host, () => {
        server.off('error', reject);
        resolve();
      });
    });
    this.server = server;
    this.boundPort = (server.address() as AddressInfo).port;
    return this.boundPort;
  }

  async close(): Promise<void> {
    const s = this.server;
    this.server = null;
    if (!s) return;
    await new Promise<void>((resolve) => {
      s.close(() => resolve());
      for (const sock of this.sockets) sock.destroy();
    });
  }

  private sweep(): void {
    const now = performance.now();
    // Entries are roughly in expiry order (insertion order, refreshed on change): stop at the first live one.
    for (const [k, e] of this.entries) {
      if (e.expiresAt > now) break;
      this.entries.delete(k);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Pull (decode side)
// ---------------------------------------------------------------------------------------------

/** Why a hand-off could not complete. */
export class PdHandoffError extends Error {
  constructor(
    readonly reason: 'timeout' | 'prefill_failed',
    message: string,
  ) {
    super(message);
    this.name = 'PdHandoffError';
  }
}

export interface PullOptions {
  /** e.g. http://127.0.0.1:8998 */
  baseUrl: string;
  key: string;
  /** Wall ms between polls. */
  pollMs: number;
  /** Wall ms before giving up. */
  timeoutMs: number;
  signal?: AbortSignal;
}

export interface PulledKv {
  promptTokens: number;
  blocks: number;
}

const sleep = (ms: number, signal?: AbortSignal): Promise<void> =>
  new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason as Error);
    const t = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    const onAbort = (): void => {
      clearTimeout(t);
      reject(signal!.reason as Error);
    };
    signal?.addEventListener('abort', onAbort, { once: true });
  });

export { sleep as abortableSleep };

/**
 * Poll `GET {baseUrl}/kv/{key}` until the prefill is ready. 202 (pending), 404 (the prefill has
 * not seen the request yet: SGLang sends both at once) and connection errors mean "poll again";
 * 410 means the prefill failed. Throws PdHandoffError on timeout or failure, the signal's reason
 * when aborted.
 */
export async function pullKv(o: PullOptions): Promise<PulledKv> {
  const deadline = performance.now() + o.timeoutMs;
  const url = `${o.baseUrl}/kv/${encodeURIComponent(o.key)}`;
  for (;;) {
    if (o.signal?.aborted) throw o.signal.reason as Error;
    const remaining = deadline - performance.now();
    if (remaining <= 0) throw new PdHandoffError('timeout', 'timed out');
    try {
      const signals = [AbortSignal.timeout(Math.ceil(Math.max(1, Math.min(remaining, 2000))))];
      if (o.signal) signals.push(o.signal);
      const res = await fetch(url, { signal: AbortSignal.any(signals) });
      const text = await res.text();
      if (res.status === 200) {
        const body = JSON.parse(text) as { prompt_tokens?: unknown; blocks?: unknown };
        if (typeof body.prompt_tokens === 'number' && typeof body.blocks === 'number') {
          return { promptTokens: body.prompt_tokens, blocks: body.blocks };
        }
      } else if (res.status === 410) {
        let reason = 'failed';
        try {
          reason = String((JSON.parse(text) as { reason?: unknown }).reason ?? reason);
        } catch {
          /* keep default */
        }
        throw new PdHandoffError('prefill_failed', reason);
      }
    } catch (e) {
      if (e instanceof PdHandoffError) throw e;
      if (o.signal?.aborted) throw o.signal.reason as Error;
      // Connection refused / reset / per-poll timeout: try again until the deadline.
    }
    const wait = Math.min(o.pollMs, deadline - performance.now());
    if (wait > 0) await sleep(wait, o.signal);
  }
}

/** `http://host:port`, bracketing IPv6 literals. */
export function hostPortUrl(host: string, port: number): string {
  const h = host.includes(':') && !host.startsWith('[') ? `[${host}]` : host;
  return `http://${h}:${port}`;
}
