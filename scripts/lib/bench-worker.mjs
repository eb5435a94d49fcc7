// Upstream for bench:proxy: answers every POST with a fixed chat completion as fast as it can.
import { createServer } from 'node:http';

const body = JSON.stringify({
  id: 'chatcmpl-bench',
  object: 'chat.completion',
  model: 'bench-model',
  choices: [{ index: 0, message: { role: 'assistant', content: 'ok' }, finish_reason: 'stop' }],
  usage: { prompt_tokens: 1000, completion_tokens: 1, total_tokens: 1001 },
});
const models = JSON.stringify({ object: 'list', data: [{ id: 'bench-model', object: 'model' }] });
const server = createServer((req, res) => {
  req.resume();
  req.on('end', () => {
    const out = req.url === '/v1/models' ? models : req.url === '/health' ? '{}' : body;
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(out) });
    res.end(out);
  });
});
server.keepAliveTimeout = 65_000;
server.listen(0, '127.0.0.1', () => process.send({ port: server.address().port }));
process.on('disconnect', () => process.exit(0));
