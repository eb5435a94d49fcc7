// The baseline for bench:proxy: node:http in, an undici Pool out, no logic at all. Like kvgate it
// buffers the request body and sends it with a content-length, so the comparison is like for like.
// argv: upstream URL (or several, comma-separated: round robin), then optionally the connection cap ('unlimited' for none; default 256).
// Answers IPC 'stats' with its event-loop lag p99 and utilisation since the previous 'stats'.
// With BARE_PROCESSES=N (N > 1) it forks N such proxies with node:cluster on one port, as
// `kvgate serve --processes N` does (SCHED_NONE), sharing nothing: the machine's ceiling for N
// stateless processes. Its 'stats' answer is then empty.
import cluster from 'node:cluster';
import { createServer } from 'node:http';
import { monitorEventLoopDelay, performance } from 'node:perf_hooks';
import { pipeline } from 'node:stream/promises';
import { Pool } from 'undici';

const processes = Number(process.env.BARE_PROCESSES ?? 1);
if (processes > 1 && cluster.isPrimary) {
  cluster.schedulingPolicy = process.env.NODE_CLUSTER_SCHED_POLICY === "rr" ? cluster.SCHED_RR : cluster.SCHED_NONE;
  for (let i = 0; i < processes; i++) cluster.fork();
  let told = false;
  cluster.on('listening', (_w, address) => {
    if (!told) process.send({ port: address.port });
    told = true;
  });
  process.on('message', (m) => m === 'stats' && process.send({ stats: {} }));
  process.on('disconnect', () => process.exit(0));
  process.on('SIGTERM', () => process.exit(0));
} else {
  await serve();
}

async function serve() {
const cap = process.argv[3] === 'unlimited' ? null : Number(process.argv[3] ?? 256);
const pools = process.argv[2].split(',').map((u) => new Pool(u, { connections: cap, headersTimeout: 0, bodyTimeout: 0 }));
let next = 0;
const delay = monitorEventLoopDelay({ resolution: 10 });
delay.enable();
let elu = performance.eventLoopUtilization();
process.on('message', (m) => {
  if (m !== 'stats') return;
  const now = performance.eventLoopUtilization();
  process.send({ stats: { lagP99Ms: Math.max(0, delay.percentile(99) / 1e6 - 10), elu: performance.eventLoopUtilization(now, elu).utilization } });
  elu = now;
  delay.reset();
});
const server = createServer(async (req, res) => {
  try {
    const chunks = [];
    for await (const c of req) chunks.push(c);
    const pool = pools[next++ % pools.length];
    const up = await pool.request({ path: req.url, method: req.method, headers: { 'content-type': 'application/json' }, body: Buffer.concat(chunks) });
    res.writeHead(up.statusCode, { 'content-type': up.headers['content-type'] });
    await pipeline(up.body, res);
  } catch {
    if (!res.headersSent) res.writeHead(502);
    res.end();
  }
});
server.keepAliveTimeout = 65_000;
server.listen(0, '127.0.0.1', () => cluster.isPrimary && process.send({ port: server.address().port }));
if (cluster.isPrimary) process.on('disconnect', () => process.exit(0));
}
