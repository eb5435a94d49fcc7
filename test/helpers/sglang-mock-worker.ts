/**
 * A mock worker shaped like the SGLang router's own test mock (a FastAPI app): /health,
 * /health_generate, /v1/models, /get_server_info, /get_load, /generate, /v1/chat/completions,
 * /v1/completions, streaming as SSE, and /flush_cache. Written for kvgate's tests on node:http
 * (optionally https with a client-certificate check). It records every request's headers, and
 * names itself in each answer (`x-worker-id` header and `worker_id` in the body).
 */
import { createServer as createHttp, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createHttps } from 'node:https';
import type { AddressInfo } from 'node:net';

export interface MockWorkerOptions {
  model?: string;
  /** Serve https with this certificate/key; with `ca`, require a client certificate signed by it. */
  tls?: { cert: Buffer; key: Buffer; ca?: Buffer };
  /** Answer generation routes with this status (e.g. 500) instead of 200. */
  failStatus?: number;
}

export interface SeenRequest {
  method: string;
  path: string;
  headers: IncomingMessage['headers'];
  body: Record<string, unknown> | undefined;
  /** The client certificate's subject CN when one was presented over TLS. */
  clientCn?: string;
}

export class SglangMockWorker {
  readonly seen: SeenRequest[] = [];
  private readonly server: Server;
  readonly model: string;
  private id = '';

  constructor(private readonly opts: MockWorkerOptions = {}) {
    this.model = opts.model ?? 'mock-model';
    const handler = (req: IncomingMessage, res: ServerResponse) => void this.handle(req, res);
    this.server = opts.tls
      ? (createHttps({ cert: opts.tls.cert, key: opts.tls.key, ...(opts.tls.ca ? { ca: opts.tls.ca, requestCert: true, rejectUnauthorized: true } : {}) }, handler) as unknown as Server)
      : createHttp(handler);
  }

  async start(): Promise<this> {
    await new Promise<void>((r) => this.server.listen(0, '127.0.0.1', r));
    this.id = `worker-${this.port}`;
    return this;
  }

  get port(): number {
    return (this.server.address() as AddressInfo).port;
  }

  get url(): string {
    return `${this.opts.tls ? 'https' : 'http'}://127.0.0.1:${this.port}`;
  }

  get workerId(): string {
    return this.id;
  }

  /** Generation requests this worker served. */
  get generations(): SeenRequest[] {
    return this.seen.filter((s) => s.method === 'POST' && ['/generate', '/v1/chat/completions', '/v1/completions'].includes(s.path));
  }

  async close(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((r) => this.server.close(() => r()));
  }

  private json(res: ServerResponse, status: number, body: unknown): void {
    res.writeHead(status, { 'content-type': 'application/json', 'x-worker-id': this.id });
    res.end(JSON.stringify(body));
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const chunks: Buffer[] = [];
    for await (const c of req) chunks.push(c as Buffer);
    const raw = Buffer.concat(chunks).toString('utf8');
    let body: Record<string, unknown> | undefined;
    try {
      body = raw ? (JSON.parse(raw) as Record<string, unknown>) : undefined;
    } catch {
      return this.json(res, 400, { error: { message: 'bad json' } });
    }
    const path = (req.url ?? '/').split('?')[0];
    const peer = (req.socket as { getPeerCertificate?: () => { subject?: { CN?: string } } }).getPeerCertificate?.();
    this.seen.push({ method: req.method ?? 'GET', path, headers: req.headers, body, clientCn: peer?.subject?.CN });
    switch (path) {
      case '/health':
      case '/health_generate':
        return this.json(res, 200, { status: 'ok' });
      case '/v1/models':
        return this.json(res, 200, { object: 'list', data: [{ id: this.model, object: 'model', owned_by: 'sglang' }] });
      case '/get_server_info':
        return this.json(res, 200, { model_path: this.model, served_model_name: this.model, dp_size: 1, tp_size: 1 });
      case '/get_load':
        return this.json(res, 200, { num_reqs: 0, num_waiting_reqs: 0, num_tokens: 0 });
      case '/flush_cache':
        return this.json(res, 200, { status: 'flushed' });
      case '/generate':
      case '/v1/chat/completions':
      case '/v1/completions':
        break;
      default:
        return this.json(res, 404, { detail: 'Not Found' });
    }
    if (this.opts.failStatus) return this.json(res, this.opts.failStatus, { error: { message: 'mock failure' } });
    const text = `hello from ${this.id}`;
    const stream = body?.stream === true;
    const chat = path === '/v1/chat/completions';
    const sglang = path === '/generate';
    if (!stream) {
      if (sglang) return this.json(res, 200, { text, meta_info: { id: 'gen-1', finish_reason: { type: 'stop' } }, worker_id: this.id });
      return this.json(res, 200, {
        id: 'cmpl-1',
        object: chat ? 'chat.completion' : 'text_completion',
        model: body?.model ?? this.model,
        choices: [chat ? { index: 0, message: { role: 'assistant', content: text }, finish_reason: 'stop' } : { index: 0, text, finish_reason: 'stop' }],
        usage: { prompt_tokens: 3, completion_tokens: 4, total_tokens: 7 },
        worker_id: this.id,
      });
    }
    res.writeHead(200, { 'content-type': 'text/event-stream', 'x-worker-id': this.id });
    for (const piece of ['hello', ' from', ` ${this.id}`]) {
      const chunk = sglang
        ? { text: piece, meta_info: { id: 'gen-1' } }
        : chat
          ? { id: 'c1', object: 'chat.completion.chunk', choices: [{ index: 0, delta: { content: piece } }] }
          : { id: 'c1', object: 'text_completion', choices: [{ index: 0, text: piece }] };
      res.write(`data: ${JSON.stringify(chunk)}\n\n`);
    }
    res.end('data: [DONE]\n\n');
  }
}
