import type { IncomingMessage, OutgoingHttpHeaders, ServerResponse } from 'node:http';
import { isUtf8 } from 'node:buffer';
import { errors, GatewayError } from '../core/errors.js';

export function sendJson(res: ServerResponse, status: number, body: unknown, headers: OutgoingHttpHeaders = {}): void {
  if (res.headersSent) {
    res.destroy();
    return;
  }
  const text = JSON.stringify(body);
  res.writeHead(status, { ...headers, 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

export function sendError(res: ServerResponse, err: GatewayError, headers: OutgoingHttpHeaders = {}): void {
  sendJson(res, err.status, err.toBody(), headers);
}

/**
 * Reads a request body up to `limit` bytes. Over the limit (by Content-Length or by counting)
 * it rejects with 413 without buffering the rest.
 */
export function readBody(req: IncomingMessage, limit: number): Promise<Buffer> {
  const declared = req.headers['content-length'];
  if (declared !== undefined && Number(declared) > limit) return Promise.reject(errors.payloadTooLarge(limit));
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    let done = false;
    const finish = (err?: GatewayError) => {
      if (done) return;
      done = true;
      req.removeListener('data', onData);
      req.removeListener('end', onEnd);
      req.removeListener('error', onError);
      req.removeListener('aborted', onAborted);
      if (err) reject(err);
      else resolve(chunks.length === 1 ? chunks[0] : Buffer.concat(chunks, size));
    };
    const onData = (chunk: Buffer) => {
      size += chunk.length;
      if (size > limit) {
        finish(errors.payloadTooLarge(limit));
        req.pause();
        return;
      }
      chunks.push(chunk);
    };
    const onEnd = () => finish();
    const onError = () => finish(errors.badRequest('Request body could not be read', 'body_read_error'));
    const onAborted = () => finish(errors.badRequest('Client aborted the request body', 'client_aborted'));
    req.on('data', onData);
    req.on('end', onEnd);
    req.on('error', onError);
    req.on('aborted', onAborted);
  });
}

/**
 * Whether a parsed JSON value nests arrays/objects deeper than `limit`. Visits containers only
 * (cost grows with the number of JSON nodes, not bytes) and stops at limit + 1, so it never
 * recurses deeper than that. (V8's JSON.parse is iterative, so parsing itself is safe.)
 */
export function deeperThan(value: unknown, limit: number, depth = 0): boolean {
  if (value === null || typeof value !== 'object') return false;
  if (depth + 1 > limit) return true;
  if (Array.isArray(value)) {
    for (const v of value) if (v !== null && typeof v === 'object' && deeperThan(v, limit, depth + 1)) return true;
    return false;
  }
  for (const k in value) {
    const v = (value as Record<string, unknown>)[k];
    if (v !== null && typeof v === 'object' && deeperThan(v, limit, depth + 1)) return true;
  }
  return false;
}

/**
 * Parses a JSON object body; anything else is a 400 naming the problem: empty, invalid UTF-8,
 * nested deeper than `maxDepth`, not JSON, or not an object.
 */
export function parseJsonObject(buf: Buffer, maxDepth = 64): Record<string, unknown> {
  if (buf.length === 0) throw errors.badRequest('Request body is empty; expected a JSON object', 'invalid_json');
  if (!isUtf8(buf)) throw errors.badRequest('Request body is not valid UTF-8', 'invalid_utf8');
  let value: unknown;
  try {
    value = JSON.parse(buf.toString('utf8'));
  } catch (e) {
    throw errors.badRequest(`Request body is not valid JSON: ${(e as Error).message}`, 'invalid_json');
  }
  if (value === null || typeof value !== 'object' || Array.isArray(value)) throw errors.badRequest('Request body must be a JSON object', 'invalid_json');
  if (deeperThan(value, maxDepth)) throw errors.badRequest(`Request body nests JSON deeper than ${maxDepth} levels`, 'json_too_deep');
  return value as Record<string, unknown>;
}
