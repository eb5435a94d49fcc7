import type { IncomingHttpHeaders, OutgoingHttpHeaders, ServerResponse } from 'node:http';
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
  /** What went wrong upstream, for metrics. */
  failure?: 'connect' | 'timeout' | 'reset';
}

function classify(err: unknown): 'connect' | 'reset' {
  const code = (err as { code?: string })?.code ?? '';
  if (code === 'ECONNREFUSED' || code === 'ENOTFOUND' || code === 'EHOSTUNREACH' || code === 'UND_ERR_CONNECT_TIMEOUT' || code === 'EAI_AGAIN') return 'connect';
  return 'reset';
}

/**
 * Sends one request to a worker and relays the answer: status, headers and body unchanged,
 * written to the client chunk by chunk as they arrive, with backpressure (the upstream read
 * pauses while the client socket is full). When the client goes away, or the time limit
 * passes, the upstream request is aborted at once and undici closes that connection.
 * Never throws; resolves exactly once.
 *
 * Uses undici's dispatch handler API directly: no AbortController, stream pipeline or
 * intermediate Readable per request, which is where a naive proxy spends its time.
 */
export function proxyRequest(opts: ProxyOptions): Promise<ProxyResult> {
  const { res } = opts;
  return new Promise<ProxyResult>((resolve) => {
    let controller: Dispatcher.DispatchController | undefined;
    let abortReason: Error | undefined;
    let status = 0;
    let settled = false;

    const settle = (r: ProxyResult) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      res.removeListener('close', onClientClose);
      res.removeListener('drain', onDrain);
      resolve(r);
    };
    const abort = (reason: Error) => {
      if (abortReason) return;
      abortReason = reason;
      if (controller && !controller.aborted) controller.abort(reason);
      // Before undici started the request (queued for a connection) there is no controller yet:
      // answer now; onRequestStart aborts it as soon as it starts.
      if (!controller || status === 0) finishAborted();
    };
    const finishAborted = () => {
      if (abortReason instanceof ClientGone) return settle({ status, outcome: 'aborted' });
      if (status === 0) {
        return settle({
          status: 504,
          outcome: 'timeout',
          failure: 'timeout',
          error: errors.gatewayTimeout(`Worker did not answer within ${opts.timeoutMs / 1000} s`),
        });
      }
      res.destroy();
      return settle({ status, outcome: 'timeout', failure: 'timeout' });
    };
    const onClientClose = () => {
      if (!res.writableFinished) abort(new ClientGone());
    };
    const onDrain = () => controller?.resume();
    const timer = setTimeout(() => abort(new UpstreamTimeout()), opts.timeoutMs);
    res.once('close', onClientClose);
    if (res.destroyed) return settle({ status: 0, outcome: 'aborted' });

    opts.pool.dispatch(
      { path: opts.path, method: 'POST', headers: opts.headers, body: opts.body },
      {
        onRequestStart(c) {
          controller = c;
          if (abortReason) c.abort(abortReason);
        },
        onResponseStart(_c, statusCode, headers) {
          if (settled) return;
          status = statusCode;
          res.writeHead(statusCode, responseHeaders(headers as IncomingHttpHeaders, opts.extraResponseHeaders));
        },
        onResponseData(c, chunk) {
          if (settled) return;
          if (!res.write(chunk)) {
            c.pause();
            res.once('drain', onDrain);
          }
        },
        onResponseEnd() {
          if (settled) return;
          res.end();
          settle({ status, outcome: status >= 500 ? 'error' : 'success' });
        },
        onResponseError(_c, err) {
          if (settled) return;
          if (abortReason) return finishAborted();
          if (status === 0) {
            const kind = classify(err);
            const detail = err.message || String(err);
            return settle({ status: 502, outcome: 'error', failure: kind, error: errors.badGateway(`Worker unreachable: ${detail}`) });
          }
          // Mid-body failure: the client cannot get a new status; end its connection so it sees the break.
          res.destroy(err);
          settle({ status, outcome: 'error', failure: 'reset' });
        },
      },
    );
  });
}
