// A fast fake engine for bench:long and bench:stream, costing little CPU: one process listening on
// every port given (one "worker" each). POST /v1/chat/completions (and the other generation
// routes) answers at once with a small completion, or, when the body has "stream":true, streams
// SSE chunks at CHUNK_HZ (50/s) until max_tokens chunks are sent or the client leaves. The body is
// never parsed: `"stream":true` and `"max_tokens":N` are found in its first bytes (the bench puts
// them first). One 20 ms ticker drives every open stream. GET /v1/models, /health, /metrics.
import { createServer } from 'node:http';

const CHUNK_HZ = Number(process.env.FAKE_CHUNK_HZ ?? 50);
const ports = process.argv.slice(2).map(Number);
const completion = JSON.stringify({
  id: 'chatcmpl-bench',
  object: 'chat.completion',
  model: 'bench-model',
  choices: [{ index: 0, message: { role: 'assistant', content: 'ok' }, finish_reason: 'stop' }],
  usage: { prompt_tokens: 1, completion_tokens: 1, total_tokens: 2 },
});
const models = JSON.stringify({ object: 'list', data: [{ id: 'bench-model', object: 'model' }] });
const chunk = Buffer.from(`data: ${JSON.stringify({ id: 'c', object: 'chat.completion.chunk', choices: [{ index: 0, delta: { content: 'tok ' } }] })}\n\n`);
const done = Buffer.from('data: [DONE]\n\n');
const streams = new Set();

setInterval(() => {
  for (const s of streams) {
    if (s.res.destroyed) {
      streams.delete(s);
      continue;
    }
    s.res.write(chunk);
    if (++s.sent >= s.total) {
      streams.delete(s);
      s.res.end(done);
    }
  }
}, 1000 / CHUNK_HZ);

function handler(req, res) {
  if (req.method === 'GET') {
    req.resume();
    const out = req.url === '/v1/models' ? models : req.url === '/metrics' ? '' : '{}';
    res.writeHead(200, { 'content-type': req.url === '/metrics' ? 'text/plain' : 'application/json', 'content-length': Buffer.byteLength(out) });
    return res.end(out);
  }
  let head = '';
  req.on('data', (d) => {
    if (head.length < 200) head += d.subarray(0, 200).toString('latin1');
  });
  req.on('end', () => {
    if (head.includes('"stream":true')) {
      const total = Number(/"max_tokens":(\d+)/.exec(head)?.[1] ?? 16);
      res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
      streams.add({ res, sent: 0, total });
      return;
    }
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(completion) });
    res.end(completion);
  });
}

let listening = 0;
for (const port of ports) {
  const server = createServer(handler);
  server.keepAliveTimeout = 65_000;
  server.maxHeadersCount = 0;
  server.listen(port, '127.0.0.1', () => {
    if (++listening === ports.length) process.send?.({ ready: true });
  });
}
process.on('disconnect', () => process.exit(0));
