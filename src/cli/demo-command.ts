import type { Command } from 'commander';
import { request } from 'undici';
import pino from 'pino';
import { addOptions, ConfigError, resolveOptions, type OptionSpec } from '../config/options.js';
import { defaultServeConfig } from '../config/serve-config.js';
import { POLICY_NAMES } from '../policies/factory.js';
import { Gateway } from '../server/gateway.js';
import { startSimServer, type SimServer } from '../sim/server.js';

const demoOptionSpecs: readonly OptionSpec[] = [
  { flag: 'port', kind: 'int', description: 'Port of the gateway', default: 30000, min: 0, max: 65535 },
  { flag: 'host', kind: 'string', description: 'Address of the gateway', default: '127.0.0.1' },
  { flag: 'workers', kind: 'int', description: 'Simulated engines behind the gateway', default: 4, min: 1, max: 64 },
  { flag: 'policy', kind: 'enum', description: 'Routing policy', default: 'cache_aware', choices: POLICY_NAMES },
  { flag: 'speed', kind: 'number', description: 'Simulated engines run this many times faster than real time', default: 1, min: 0, exclusiveMin: true },
  { flag: 'warmup-requests', kind: 'int', description: 'Requests of the warm-up workload (0 = none)', default: 24, min: 0 },
];

const SYSTEM_PROMPTS = [
  'You are the support assistant of an online bookshop. Answer in two sentences, cite the relevant policy section, and never invent order data. ',
  'You are a senior code reviewer. Point out bugs first, then style issues, each with a one-line fix. Keep a neutral tone and reference line numbers. ',
  'You are a travel planner. Suggest an itinerary with times, transport between stops and a budget estimate in euros. Prefer public transport. ',
];
const QUESTIONS = ['Where is my order?', 'Can I return a damaged item?', 'What does this function do?', 'Plan two days in Lisbon.', 'Is this loop correct?', 'How much is a train to Porto?'];

function table(gw: Gateway, sims: SimServer[]): string {
  const rows = gw.registry.all().map((w, i) => {
    const stats = sims[i]?.engines[0]?.engine.stats();
    const hit = stats && stats.prefixCacheQueries > 0 ? `${((100 * stats.prefixCacheHits) / stats.prefixCacheQueries).toFixed(1)}%` : '–';
    return [w.id, String(w.processed), hit, String(w.load), w.healthy ? 'yes' : 'no'];
  });
  const head = ['worker', 'requests', 'prefix-cache hit rate', 'load', 'healthy'];
  const widths = head.map((h, c) => Math.max(h.length, ...rows.map((r) => r[c].length)));
  const line = (cells: string[]) => cells.map((x, c) => x.padEnd(widths[c])).join('  ');
  return [line(head), line(widths.map((w) => '-'.repeat(w))), ...rows.map(line)].join('\n');
}

async function warmUp(url: string, model: string, n: number): Promise<number> {
  let ok = 0;
  const one = async (i: number) => {
    const sys = SYSTEM_PROMPTS[i % SYSTEM_PROMPTS.length].repeat(6);
    const res = await request(`${url}/v1/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model, messages: [{ role: 'system', content: sys }, { role: 'user', content: QUESTIONS[i % QUESTIONS.length] }], max_tokens: 16 }),
    });
    await res.body.dump();
    if (res.statusCode === 200) ok++;
  };
  for (let i = 0; i < n; i += 4) await Promise.all(Array.from({ length: Math.min(4, n - i) }, (_, k) => one(i + k)));
  return ok;
}

export function registerDemoCommand(program: Command): void {
  const cmd = program.command('demo').description('Start simulated engines and kvgate in front of them, send a warm-up workload, and keep serving until Ctrl-C');
  addOptions(cmd, demoOptionSpecs, 'KVGATE_DEMO_');
  cmd.action(async (cli: Record<string, unknown>) => {
    let o: Record<string, unknown>;
    try {
      o = resolveOptions(demoOptionSpecs, cli, process.env, 'KVGATE_DEMO_');
    } catch (e) {
      if (e instanceof ConfigError) {
        process.stderr.write(`kvgate demo: ${e.message}\n`);
        process.exit(2);
      }
      throw e;
    }
    const model = 'kvgate-sim';
    const sims: SimServer[] = [];
    let gw: Gateway | undefined;
    let stopping = false;
    const shutdown = async (code: number, quiet = false) => {
      if (stopping) return;
      stopping = true;
      if (!quiet) process.stdout.write('\nshutting down…\n');
      await gw?.close();
      await Promise.all(sims.map((s) => s.close()));
      process.exit(code);
    };
    process.on('SIGINT', () => void shutdown(0));
    process.on('SIGTERM', () => void shutdown(0));
    try {
      for (let i = 0; i < (o.workers as number); i++) {
        sims.push(await startSimServer({ host: '127.0.0.1', port: 0, model, speed: o.speed as number, seed: i + 1 }));
      }
      gw = new Gateway(
        defaultServeConfig({
          host: o.host as string,
          port: o.port as number,
          policy: o.policy as string,
          workerUrls: sims.map((s) => s.url),
          healthCheckIntervalSecs: 2,
        }),
        { logger: pino({ level: 'warn' }) },
      );
      await gw.start();
    } catch (e) {
      const err = e as NodeJS.ErrnoException;
      const why =
        err.code === 'EADDRINUSE'
          ? `port ${o.port as number} on ${o.host as string} is already in use; choose another with --port N (--port 0 takes any free port)`
          : `cannot start: ${err.message}`;
      process.stderr.write(`kvgate demo: ${why}\n`);
      await shutdown(1, true);
      return;
    }
    const url = gw.url;
    process.stdout.write(
      [
        `kvgate ${o.policy} gateway on ${url} in front of ${sims.length} simulated engines (${sims.map((s) => s.url).join(', ')})`,
        '',
        'Try it:',
        `  curl -s ${url}/v1/chat/completions -H 'content-type: application/json' \\`,
        `    -d '{"model":"${model}","messages":[{"role":"user","content":"Hello!"}],"max_tokens":16}'`,
        '',
        '  // OpenAI SDK (Node):',
        `  const client = new OpenAI({ baseURL: '${url}/v1', apiKey: 'unused' });`,
        `  const stream = await client.chat.completions.create({ model: '${model}', messages: [{ role: 'user', content: 'Hello!' }], stream: true });`,
        '',
        `Dashboard: ${url}/dashboard   (live workers, decisions and where each prefix lives; open it in a browser)`,
        `Workers: ${url}/workers   Metrics: ${url}/metrics   Why a request goes where: curl -s -X POST ${url}/debug/route -d '{"messages":[{"role":"user","content":"Hello!"}]}'`,
        '',
      ].join('\n'),
    );
    const n = o.warmupRequests as number;
    if (n > 0) {
      process.stdout.write(`Sending a warm-up workload: ${n} chat requests from ${SYSTEM_PROMPTS.length} applications with long system prompts…\n`);
      const ok = await warmUp(url, model, n);
      process.stdout.write(`${ok}/${n} succeeded.\n\n`);
    }
    process.stdout.write(table(gw, sims) + '\n\nServing until Ctrl-C (the table is reprinted when traffic arrives).\n');
    let lastTotal = gw.registry.all().reduce((s, w) => s + w.processed, 0);
    const timer = setInterval(() => {
      const total = gw!.registry.all().reduce((s, w) => s + w.processed, 0);
      if (total !== lastTotal && gw!.registry.all().every((w) => w.load === 0)) {
        lastTotal = total;
        process.stdout.write('\n' + table(gw!, sims) + '\n');
      }
    }, 2000);
    timer.unref();
  });
}
