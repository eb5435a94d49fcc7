import type { IncomingHttpHeaders, OutgoingHttpHeaders, ServerResponse } from 'node:http';
import type { Dispatcher, Pool } from 'undici';
import { errors, GatewayError } from '../core/errors.js';
import type { RequestOutcome } from '../policies/policy.js';
import type { ResponseTap } from './response-tap.js';

const HOP_BY_HOP = new Set([
  'connection',
  'keep-alive',
  'proxy-connection',
  'proxy-authenticate',
  'proxy-authorization',
  'te',
  'trailer',
  'transfer-encoding',
  'upgrade',
  'host',
  'content-length',
  'expect',
]);

/** Headers that describe the request body and the answer wanted: always forwarded. */
const CONTENT_HEADERS = new Set(['content-type', 'accept', 'accept-encoding', 'accept-language', 'user-agent']);

/**
 * Client headers forwarded to workers by default, as the SGLang router: authorization (the
 * router drops it again when the worker has a key of its own or kvgate checks client keys),
 * x-request-id and any x-request-id-*, x-correlation-id, the W3C trace context, and the
 * routing-key header. Cookies and any other header stay at the gateway unless --forward-headers
 * names them.
 */
export const DEFAULT_FORWARDED = ['authorization', 'x-correlation-id', 'traceparent', 'tracestate', 'x-smg-routing-key'] as const;

/**
 * Request headers for the worker: the content headers, the allow-list (DEFAULT_FORWARDED,
 * x-request-id*, and `extra`, lower-case names from --forward-headers), plus the request id.
 */
export function forwardHeaders(incoming: IncomingHttpHeaders, requestId: string, extra: ReadonlySet<string> = new Set()): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(incoming)) {
    if (v === undefined || HOP_BY_HOP.has(k)) continue;
    const allowed = CONTENT_HEADERS.has(k) || (DEFAULT_FORWARDED as readonly string[]).includes(k) || k.startsWith('x-request-id') || extra.has(k);
    if (!allowed) continue;
    out[k] = Array.isArray(v) ? v.join(', ') : v;
  }
  out['x-request-id'] = requestId;
  return out;
}

function responseHeaders(upstream: IncomingHttpHeaders, extra: OutgoingHttpHeaders): OutgoingHttpHeaders {
  const out: OutgoingHttpHeaders = {};
  for (const [k, v] of Object.entries(upstream)) {
    if (v === undefined || (HOP_BY_HOP.has(k) && k !== 'content-length')) continue;
    out[k] = v;
  }
  return Object.assign(out, extra);
}

class ClientGone extends Error {}
type TimeoutKind = 'first_byte' | 'idle' | 'total';
class UpstreamTimeout extends Error {
  constructor(readonly kind: TimeoutKind) {
    super(`upstream ${kind} timeout`);
  }
}

export interface ProxyTimeouts {
  /** Whole exchange, headers and body (ms). */
  totalMs: number;
  /** From sending the request to the response headers (ms). */
  firstByteMs: number;
  /** Longest silence between two body chunks (ms). */
  idleMs: number;
}

export interface ProxyOptions {
  pool: Pool;
  path: string;
  headers: Record<string, string>;
  body: Buffer;
  res: ServerResponse;
  /** Added to the response (x-request-id, x-kvgate-worker). */
  extraResponseHeaders: OutgoingHttpHeaders;
  timeouts: ProxyTimeouts;
  /**
   * Answers with these statuses are not relayed: their body is read and handed back in
   * `held`, so the caller can retry elsewhere or relay it later.
   */
  holdStatuses?: ReadonlySet<number>;
  /** Called once when the first body byte arrives (streams: the first token). */
  onFirstByte?: () => void;
  /** Watches the relayed answer (first content chunk, inter-token gaps, usage); never changes it. */
  tap?: ResponseTap;
  /** Called when the request got a connection, with the ms it waited for one (connecting included). */
  onConnection?: (waitedMs: number) => void;
}

export interface HeldResponse {
  status: number;
  headers: IncomingHttpHeaders;
  body: Buffer;
}

export interface ProxyResult {
  /** Status sent to the client (0 if nothing was sent). */
  status: number;
  outcome: RequestOutcome;
  /** Set when the exchange failed before any response byte: the caller answers with it. */
  error?: GatewayError;
  /** A held answer (see holdStatuses): nothing was sent to the client. */
  held?: HeldResponse;
  /** What went wrong upstream, for metrics and the circuit breaker. */
  failure?: 'connect' | 'connect_timeout' | 'first_byte_timeout' | 'idle_timeout' | 'total_timeout' | 'reset';
}

function classify(err: unknown): 'connect' | 'connect_timeout' | 'reset' {
  const code = (err as { code?: string })?.code ?? '';
  if (code === 'UND_ERR_CONNECT_TIMEOUT') return 'connect_timeout';
  if (code === 'ECONNREFUSED' || code === 'ENOTFOUND' || code === 'EHOSTUNREACH' || code === 'EAI_AGAIN' || code === 'ENETUNREACH') return 'connect';
  return 'reset';
}

/** Sends a held answer to the client unchanged. */
export function relayHeld(res: ServerResponse, held: HeldResponse, extra: OutgoingHttpHeaders): void {
  if (res.headersSent || res.destroyed) return;
  const headers = responseHeaders(held.headers, extra);
  headers['content-length'] = held.body.length;
  res.writeHead(held.status, headers);
  res.end(held.body);
}

/**
 * Sends one request to a worker and relays the answer: status, headers and body unchanged,
 * written to the client chunk by chunk as they arrive, with backpressure (the upstream read
 * pauses while the client socket is full). When the client goes away, or a time limit passes,
 * the upstream request is aborted at once and undici closes that connection.
 * Never throws; resolves exactly once.
 *
 * Uses undici's dispatch handler API directly: no AbortController, stream pipeline or
 * intermediate Readable per request, which is where a naive proxy spends its time.
 */
export function proxyRequest(opts: ProxyOptions): Promise<ProxyResult> {
  const { res, timeouts } = opts;
  return new Promise<ProxyResult>((resolve) => {
    let controller: Dispatcher.DispatchController | undefined;
    let abortReason: Error | undefined;
    let status = 0;
    let settled = false;
    let held: { status: number; headers: IncomingHttpHeaders; chunks: Buffer[] } | undefined;
    let firstByte = false;
    let idleTimer: NodeJS.Timeout | undefined;

    const settle = (r: ProxyResult) => {
      if (settled) return;
      settled = true;
      clearTimeout(totalTimer);
      clearTimeout(headerTimer);
      clearTimeout(idleTimer);
      res.removeListener('close', onClientClose);
      res.removeListener('drain', onDrain);
      resolve(r);
    };
    const abort = (reason: Error) => {
      if (abortReason) return;
      abortReason = reason;
      if (controller && !controller.aborted) controller.abort(reason);
      // Before the headers (or before undici even started the request) nothing was sent:
      // answer now; onRequestStart aborts the request as soon as it starts.
      if (!controller || status === 0 || held) finishAborted();
    };
    const finishAborted = () => {
      if (abortReason instanceof ClientGone) return settle({ status, outcome: 'aborted' });
      const kind = (abortReason as UpstreamTimeout).kind;
      const failure = `${kind}_timeout` as const;
      if (status === 0 || held) {
        const message =
          kind === 'first_byte'
            ? `Worker did not start answering within ${timeouts.firstByteMs / 1000} s (--first-byte-timeout-secs)`
            : kind === 'idle'
              ? `Worker went silent for ${timeouts.idleMs / 1000} s (--stream-idle-timeout-secs)`
              : 'Request did not finish within --request-timeout-secs';
        const code = kind === 'total' ? 'worker_timeout' : `worker_${failure}`;
        return settle({ status: 504, outcome: 'timeout', failure, error: errors.gatewayTimeout(message, code) });
      }
      // Mid-body: the client cannot get a new status; close its connection so it sees the break.
      res.destroy();
      return settle({ status, outcome: 'timeout', failure });
    };
    // The idle timer is lazy: a chunk only stamps the time (no timer work per chunk, which at
    // thousands of streamed chunks a second was a timer allocation each); when the timer fires
    // it re-arms for what is left of the silence budget, or aborts if the budget is spent.
    let lastActivity = 0;
    const checkIdle = () => {
      idleTimer = undefined;
      if (settled) return;
      const silent = performance.now() - lastActivity;
      if (silent >= timeouts.idleMs) abort(new UpstreamTimeout('idle'));
      else idleTimer = setTimeout(checkIdle, timeouts.idleMs - silent);
    };
    const armIdle = () => {
      lastActivity = performance.now();
      if (!idleTimer) idleTimer = setTimeout(checkIdle, timeouts.idleMs);
    };
    const onClientClose = () => {
      if (!res.writableFinished) abort(new ClientGone());
    };
    const onDrain = () => controller?.resume();
    const totalTimer = setTimeout(() => abort(new UpstreamTimeout('total')), timeouts.totalMs);
    const headerTimer = setTimeout(() => abort(new UpstreamTimeout('first_byte')), timeouts.firstByteMs);
    res.once('close', onClientClose);
    if (res.destroyed) return settle({ status: 0, outcome: 'aborted' });
    const dispatchedAt = opts.onConnection ? performance.now() : 0;

    opts.pool.dispatch(
      { path: opts.path, method: 'POST', headers: opts.headers, body: opts.body },
      {
        onRequestStart(c) {
          controller = c;
          if (opts.onConnection) opts.onConnection(performance.now() - dispatchedAt);
          if (abortReason) c.abort(abortReason);
        },
        onResponseStart(_c, statusCode, headers) {
          if (settled) return;
          clearTimeout(headerTimer);
          armIdle();
          if (opts.holdStatuses?.has(statusCode)) {
            held = { status: statusCode, headers: headers as IncomingHttpHeaders, chunks: [] };
            return;
          }
          status = statusCode;
          opts.tap?.headers(statusCode, (headers as IncomingHttpHeaders)['content-type']);
          res.writeHead(statusCode, responseHeaders(headers as IncomingHttpHeaders, opts.extraResponseHeaders));
        },
        onResponseData(c, chunk) {
          if (settled) return;
          armIdle();
          if (held) {
            held.chunks.push(chunk);
            return;
          }
          if (!firstByte) {
            firstByte = true;
            opts.onFirstByte?.();
          }
          opts.tap?.data(chunk);
          if (!res.write(chunk)) {
            c.pause();
            res.once('drain', onDrain);
          }
        },
        onResponseEnd() {
          if (settled) return;
          if (held) {
            const h = held;
            return settle({ status: 0, outcome: 'error', held: { status: h.status, headers: h.headers, body: Buffer.concat(h.chunks) } });
          }
          if (!firstByte) opts.onFirstByte?.();
          opts.tap?.end();
          res.end();
          settle({ status, outcome: status >= 500 ? 'error' : 'success' });
        },
        onResponseError(_c, err) {
          if (settled) return;
          if (abortReason) return finishAborted();
          if (status === 0) {
            const kind = classify(err);
            const detail = err.message || String(err);
            if (kind === 'connect_timeout') {
              return settle({ status: 504, outcome: 'timeout', failure: kind, error: errors.gatewayTimeout(`Connecting to the worker timed out: ${detail}`, 'worker_connect_timeout') });
            }
            return settle({ status: 502, outcome: 'error', failure: kind, error: errors.badGateway(`Worker unreachable: ${detail}`) });
          }
          res.destroy(err);
          settle({ status, outcome: 'error', failure: 'reset' });
        },
      },
    );
  });
}
