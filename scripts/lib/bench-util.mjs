// Helpers shared by bench:long and bench:stream: processes, ports, load-average gate, metrics.
import { fork, spawn } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { cpus, loadavg, setPriority } from 'node:os';
import { fileURLToPath } from 'node:url';

export const here = (p) => fileURLToPath(new URL(p, import.meta.url));
export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
export const children = [];

export function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

export function requireDist() {
  if (!existsSync(here('../../dist/cli/main.js'))) {
    console.error('dist/ is missing: run `npm run build` first');
    process.exit(1);
  }
}

export function machine() {
  const cpuModel = readFileSync('/proc/cpuinfo', 'utf8').match(/model name\s*:\s*(.*)/)?.[1] ?? 'unknown';
  return `${cpus().length} CPUs (${cpuModel}), Node ${process.version}`;
}

/** Waits (polling every 30 s, at most 15 min) until the 1-minute load average is below `max`; returns it. */
export async function waitForQuietMachine(max = Number(process.env.BENCH_MAX_LOAD ?? 1.5)) {
  const deadline = Date.now() + 15 * 60_000;
  while (loadavg()[0] >= max && Date.now() < deadline) {
    console.log(`load average ${loadavg()[0].toFixed(2)} >= ${max}: waiting 30 s`);
    await sleep(30_000);
  }
  return loadavg().map((x) => x.toFixed(2)).join(' ');
}

export async function cleanup() {
  for (const c of children.splice(0).reverse()) {
    if (c.exitCode !== null || c.signalCode !== null) continue;
    const exited = new Promise((r) => c.once('exit', r));
    c.kill('SIGTERM');
    await Promise.race([exited, sleep(10_000)]);
    if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  }
}

export async function startFakeEngines(n) {
  const ports = [];
  for (let i = 0; i < n; i++) ports.push(await freePort());
  const c = fork(here('./fake-engine.mjs'), ports.map(String), { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  children.push(c);
  await new Promise((resolve, reject) => {
    c.once('message', resolve);
    c.once('exit', (code) => reject(new Error(`fake engine exited ${code}`)));
  });
  return ports.map((p) => `http://127.0.0.1:${p}`);
}

/**
 * BENCH_LOADGEN_NICE=N (N > 0; needs root or CAP_SYS_NICE): the benchmark's own processes (load
 * generator, fake engines) run at nice N and the router under test (bare proxy or kvgate) at nice 0,
 * so the router gets the CPU it would have on its own cores instead of contending with the load.
 */
export const LOADGEN_NICE = Number(process.env.BENCH_LOADGEN_NICE ?? 0);
if (LOADGEN_NICE > 0) setPriority(LOADGEN_NICE);
/** How to start node for a router under test: through `nice -n -N` when BENCH_LOADGEN_NICE is set. */
const targetNode = () => (LOADGEN_NICE > 0 ? { cmd: 'nice', pre: ['-n', String(-LOADGEN_NICE), process.execPath] } : { cmd: process.execPath, pre: [] });

export function forkBare(upstream, cap = 'unlimited') {
  const node = targetNode();
  const viaNice = node.pre.length > 0 ? { execPath: node.cmd, execArgv: node.pre } : {}; // else fork's default: this node
  const child = fork(here('./bare-proxy.mjs'), [upstream, cap], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'], ...viaNice });
  children.push(child);
  return new Promise((resolve, reject) => {
    child.once('message', (m) =>
      resolve({
        url: `http://127.0.0.1:${m.port}`,
        stats: () =>
          new Promise((r) => {
            child.once('message', (s) => r(s.stats));
            child.send('stats');
          }),
      }),
    );
    child.once('exit', (code) => reject(new Error(`bare proxy exited ${code}`)));
  });
}

export async function waitReady(url, path = '/health', tries = 1200) {
  for (let i = 0; i < tries; i++) {
    try {
      const r = await fetch(url + path);
      await r.arrayBuffer();
      if (r.status === 200) return;
    } catch {}
    await sleep(50);
  }
  throw new Error(`${url}${path} did not become ready`);
}

/** Starts `kvgate serve` (dist/) with these extra arguments; returns its URL and a stats() reading its event-loop metrics. */
export async function startKvgate(workers, extra, main = here('../../dist/cli/main.js')) {
  const port = await freePort();
  const args = ['serve', '--host', '127.0.0.1', '--port', String(port), '--worker-urls', ...workers, '--log-level', 'warn', '--engine-metrics-interval-secs', '0', ...extra, ...(process.env.BENCH_KVGATE_ARGS ?? '').split(/\s+/).filter(Boolean)];
  // BENCH_KVGATE_ARGS: extra kvgate flags for every kvgate target (e.g. "--max-tree-size 8000000").
  // BENCH_KVGATE_NODE_ARGS: node options for the kvgate process only, e.g. "--cpu-prof --cpu-prof-dir=/tmp/prof"
  // (profiles are written when kvgate exits on the SIGTERM the scripts send; one file per thread).
  const nodeArgs = (process.env.BENCH_KVGATE_NODE_ARGS ?? '').split(/\s+/).filter(Boolean);
  const node = targetNode();
  const c = spawn(node.cmd, [...node.pre, ...nodeArgs, main, ...args], { stdio: ['ignore', 'inherit', 'inherit'] });
  children.push(c);
  const url = `http://127.0.0.1:${port}`;
  await waitReady(url, '/readiness');
  const stats = async () => {
    const text = await (await fetch(url + '/metrics')).text();
    const m = (re) => Number(re.exec(text)?.[1] ?? NaN);
    return {
      lagP99Ms: m(/^kvgate_event_loop_delay_seconds\{quantile="0\.99"\} (\S+)/m) * 1000,
      elu: m(/^kvgate_event_loop_utilization (\S+)/m),
      budgetFallbacks: m(/^kvgate_tokenize_fallbacks_total\{reason="budget"\} (\S+)/m) || 0,
    };
  };
  return { url, stats };
}

export function percentile(xs, p) {
  if (xs.length === 0) return NaN;
  const s = Float64Array.from(xs).sort();
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))];
}
export const median = (xs) => percentile(xs, 50);
