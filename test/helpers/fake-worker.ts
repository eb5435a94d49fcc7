import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';

export interface FakeWorkerOptions {
  model?: string;
  /** Status for generation routes (default 200). */
  status?: number;
  /** Number of SSE chunks for streaming answers. */
  chunks?: number;
  /** Delay between SSE chunks, ms. */
  chunkDelayMs?: number;
  /** Delay before answering non-streaming requests, ms. */
  delayMs?: number;
  /** Never answer generation routes. */
  hang?: boolean;
  healthy?: boolean;
}

export interface ReceivedRequest {
  path: string;
  headers: IncomingMessage['headers'];
  body: string;
}

/** A minimal OpenAI-shaped worker for narrow integration tests. */
export class FakeWorker {
  readonly received: ReceivedRequest[] = [];
  /** Requests whose connection closed before the worker finished answering. */
  abortedEarly = 0;
  activeStreams = 0;
  private server: Server;
  opts: Required<FakeWorkerOptions>;

  constructor(opts: FakeWorkerOptions = {}) {
    this.opts = { model: 'fake-model', status: 200, chunks: 5, chunkDelayMs: 5, delayMs: 0, hang: false, healthy: true, ...opts };
    this.server = createServer((req, res) => void this.handle(req, res));
  }

  async start(): Promise<this> {
    await new Promise<void>((r) => this.server.listen(0, '127.0.0.1', r));
    return this;
  }

  get url(): string {
    return `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
  }

  async close(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((r) => this.server.close(() => r()));
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const chunks: Buffer[] = [];
    for await (const c of req) chunks.push(c as Buffer);
    const body = Buffer.concat(chunks).toString('utf8');
    const path = req.url ?? '/';
    this.received.push({ path, headers: req.headers, body });
    const json = (status: number, obj: unknown) => {
      res.writeHead(status, { 'content-type': 'application/json' });
      res.end(JSON.stringify(obj));
    };
    if (path === '/health') return json(this.opts.healthy ? 200 : 503, {});
    if (path === '/v1/models') return json(200, { object: 'list', data: [{ id: this.opts.model, object: 'model' }] });
    if (path === '/flush_cache') return json(200, { ok: true });
    if (path === '/get_load') return json(200, [{ dp_rank: 0, num_reqs: 1, num_waiting_reqs: 0, num_tokens: 42 }]);
    if (this.opts.hang) {
      res.on('close', () => this.abortedEarly++);
      return;
    }
    if (this.opts.status !== 200) return json(this.opts.status, { error: { message: 'injected', code: this.opts.status } });
    let parsed: { stream?: boolean } = {};
    try {
      parsed = JSON.parse(body);
    } catch {
      return json(400, { error: { message: 'bad json' } });
    }
    if (parsed.stream) {
      res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
      this.activeStreams++;
      let closed = false;
      res.on('close', () => {
        this.activeStreams--;
        if (!res.writableFinished) {
          closed = true;
          this.abortedEarly++;
        }
      });
      for (let i = 0; i < this.opts.chunks && !closed; i++) {
        const chunk = { id: 'chatcmpl-fake', object: 'chat.completion.chunk', model: this.opts.model, choices: [{ index: 0, delta: { content: `tok${i} ` }, finish_reason: null }] };
        res.write(`data: ${JSON.stringify(chunk)}\n\n`);
        await new Promise((r) => setTimeout(r, this.opts.chunkDelayMs));
      }
      if (!closed) res.end('data: [DONE]\n\n');
      return;
    }
    if (this.opts.delayMs > 0) await new Promise((r) => setTimeout(r, this.opts.delayMs));
    json(200, {
      id: 'chatcmpl-fake',
      object: 'chat.completion',
      model: this.opts.model,
      choices: [{ index: 0, message: { role: 'assistant', content: 'hello' }, finish_reason: 'stop' }],
      usage: { prompt_tokens: 3, completion_tokens: 1, total_tokens: 4 },
      echo_path: path,
    });
  }
}
