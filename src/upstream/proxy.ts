import type { IncomingHttpHeaders, OutgoingHttpHeaders, ServerResponse } from 'node:http';
import { pipeline } from 'node:stream/promises';
import type { Dispatcher, Pool } from 'undici';
import { errors, GatewayError } from '../core/errors.js';
import type { RequestOutcome } from '../policies/policy.js';

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

/** Request headers for the worker: the client's, minus hop-by-hop ones, plus the request id. */
export function forwardHeaders(incoming: IncomingHttpHeaders, requestId: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(incoming)) {
    if (v === undefined || HOP_BY_HOP.has(k)) continue;
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
class UpstreamTimeout extends Error {}

export interface ProxyOptions {
  pool: Pool;
  path: string;
  headers: Record<string, string>;
  body: Buffer;
  res: ServerResponse;
  /** Added to the response (x-request-id, x-kvgate-worker). */
  extraResponseHeaders: OutgoingHttpHeaders;
  /** Total time allowed for the exchange, headers and body. */
  timeoutMs: number;
}

export interface ProxyResult {
  /** Status sent to the client (0 if nothing could be sent). */
  status: number;
  outcome: RequestOutcome;
  /** Set when the exchange failed before any response byte: the caller answers with it. */
  error?: GatewayError;
  /** What went wrong upstream, for metrics: connect, timeout, reset, status. */
  failure?: 'connect' | 'timeout' | 'reset';
}

function classify(err: unknown): 'connect' | 'reset' {
  const code = (err as { code?: string })?.code ?? '';
  if (code === 'ECONNREFUSED' || code === 'ENOTFOUND' || code === 'EHOSTUNREACH' || code === 'UND_ERR_CONNECT_TIMEOUT' || code === 'EAI_AGAIN') return 'connect';
  return 'reset';
}

/**
 * Sends one request to a worker and relays the answer: status, headers and body unchanged,
 * streamed chunk by chunk with backpressure. When the client goes away the upstream request
 * is aborted at once (undici closes the connection). Never throws.
 */
export async function proxyRequest(opts: ProxyOptions): Promise<ProxyResult> {
  const { res } = opts;
  const ac = new AbortController();
  const onClose = () => {
    if (!res.writableFinished) ac.abort(new ClientGone());
  };
  res.once('close', onClose);
  const timer = setTimeout(() => ac.abort(new UpstreamTimeout()), opts.timeoutMs);
  try {
    if (res.destroyed) return { status: 0, outcome: 'aborted' };
    let up: Dispatcher.ResponseData;
    try {
      up = await opts.pool.request({
        path: opts.path,
        method: 'POST',
        headers: opts.headers,
        body: opts.body,
        signal: ac.signal,
      });
    } catch (err) {
      if (ac.signal.reason instanceof ClientGone) return { status: 0, outcome: 'aborted' };
      if (ac.signal.reason instanceof UpstreamTimeout) {
        return { status: 504, outcome: 'timeout', failure: 'timeout', error: errors.gatewayTimeout(`Worker did not answer within ${opts.timeoutMs / 1000} s`) };
      }
      const kind = classify(err);
      const detail = (err as Error).message || String(err);
      return { status: 502, outcome: 'error', failure: kind, error: errors.badGateway(`Worker unreachable: ${detail}`) };
    }
    res.writeHead(up.statusCode, responseHeaders(up.headers as IncomingHttpHeaders, opts.extraResponseHeaders));
    try {
      await pipeline(up.body, res);
      return { status: up.statusCode, outcome: up.statusCode >= 500 ? 'error' : 'success' };
    } catch (err) {
      if (ac.signal.reason instanceof ClientGone || (res.destroyed && !ac.signal.aborted)) {
        // The client left mid-body; pipeline destroyed the upstream body, which aborts the worker's request.
        up.body.destroy();
        return { status: up.statusCode, outcome: 'aborted' };
      }
      res.destroy(err as Error);
      if (ac.signal.reason instanceof UpstreamTimeout) return { status: up.statusCode, outcome: 'timeout', failure: 'timeout' };
      return { status: up.statusCode, outcome: 'error', failure: 'reset' };
    }
  } finally {
    clearTimeout(timer);
    res.removeListener('close', onClose);
  }
}
