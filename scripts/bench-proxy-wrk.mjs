// npm run bench:proxy:wrk — maximum throughput and p50 latency under wrk, with nginx as the
// upstream: nginx direct, a bare Node proxy (node:http in, undici Pool out, no logic), the same
// bare proxy as 2 node:cluster processes sharing nothing (this machine's ceiling for a second
// process), kvgate (cache_aware) with 1 process, with --processes 2, and with --processes 2
// --replica-sync off (the same without sharing state: what sync costs). Each run also
// reports where the machine's cores went (/proc: the target's processes, wrk, nginx,
// nats-server). Needs the Debian packages wrk and nginx-light (scripts/setup-test-deps.sh) and
// nats-server for --processes 2.
//
// nginx-light runs from a generated config in a temp dir (worker_processes 1, two loopback
// ports that answer POST /v1/chat/completions with a fixed small chat completion): port A is the
// upstream of the bare proxy and the one nginx measured directly, kvgate gets ports A and B as
// two workers so cache_aware has a choice to make. wrk POSTs 4,000-character chat bodies (a shared
// 3,800-character system prompt and a varying user turn): 1,024 bodies in turn, or with
// BENCH_WRK_UNIQUE=1 a new user turn for every request (no prompt ever repeats).
//
// Per round it prints each target's cores (all processes, the main threads, system time),
// context switches per request, and with several processes each one's share; at the end each
// kvgate target's cache counters and replica-sync traffic (messages, records, bytes per record,
// repeats not published again).
//
// Options (env): BENCH_WRK_SECS (10), BENCH_WRK_WARMUP_SECS (2), BENCH_WRK_CONNECTIONS (64),
// BENCH_WRK_THREADS (1), BENCH_ROUNDS (3), BENCH_KVGATE_NODE_ARGS (node options for kvgate, e.g. --cpu-prof --cpu-prof-dir=DIR: every
// process writes a profile), BENCH_KVGATE_ARGS (extra kvgate flags for every kvgate target), BENCH_TARGETS (nginx,bare,bare2,kvgate1,kvgate2,kvgate2nosync: which to
// measure; a kvgate target may add flags, e.g. 'kvgate2[--replica-sync-flush-ms=10]'; each ratio is printed when its targets were measured).
// BENCH_GC=1: kvgate runs under V8's --trace-gc-nvp, and each round and the summary also report, per
// request, the bytes promoted to the old generation and that survived a scavenge, and the GC's CPU
// on the event loop (pauses and incremental marking) and on V8's background threads (every isolate
// of every kvgate process; V8's own timings, so they scale with the machine's speed, the bytes do not).
import { execFileSync, fork, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { request as httpRequest, Agent } from 'node:http';
import { createServer } from 'node:net';
import { cpus, loadavg, tmpdir } from 'node:os';
import { delimiter, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { waitReady } from './lib/bench-util.mjs';

const here = (p) => fileURLToPath(new URL(p, import.meta.url));
const SECS = Number(process.env.BENCH_WRK_SECS ?? 10);
const WARMUP = Number(process.env.BENCH_WRK_WARMUP_SECS ?? 2);
const CONNS = Number(process.env.BENCH_WRK_CONNECTIONS ?? 64);
const THREADS = Number(process.env.BENCH_WRK_THREADS ?? 1);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);

if (!existsSync(here('../dist/cli/main.js'))) {
  console.error('dist/ is missing: run `npm run build` first');
  process.exit(1);
}
function which(name, fallbacks = []) {
  for (const dir of (process.env.PATH ?? '').split(delimiter)) if (dir && existsSync(join(dir, name))) return join(dir, name);
  return fallbacks.find((p) => existsSync(p));
}
const NGINX = which('nginx', ['/usr/sbin/nginx']);
const WRK = which('wrk', ['/usr/bin/wrk']);
if (!NGINX || !WRK) {
  console.error(`missing ${[!NGINX && 'nginx (Debian package nginx-light)', !WRK && 'wrk (Debian package wrk)'].filter(Boolean).join(' and ')}: run scripts/setup-test-deps.sh as root`);
  process.exit(1);
}

const freePort = () =>
  new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const tmp = mkdtempSync(join(tmpdir(), 'kvgate-bench-wrk-'));
const children = [];
async function cleanup() {
  for (const c of children.reverse()) {
    if (c.exitCode !== null || c.signalCode !== null) continue;
    const exited = new Promise((r) => c.once('exit', r));
    c.kill('SIGTERM');
    await Promise.race([exited, sleep(10_000)]);
  }
  rmSync(tmp, { recursive: true, force: true });
}

// --- nginx upstream ------------------------------------------------------------------------
const completion = JSON.stringify({
  id: 'chatcmpl-bench',
  object: 'chat.completion',
  model: 'bench-model',
  choices: [{ index: 0, message: { role: 'assistant', content: 'ok' }, finish_reason: 'stop' }],
  usage: { prompt_tokens: 1000, completion_tokens: 1, total_tokens: 1001 },
});
const models = JSON.stringify({ object: 'list', data: [{ id: 'bench-model', object: 'model' }] });
// What kvgate's engine-metrics scraper reads every second (an idle vLLM).
const engineMetrics = ['vllm:num_requests_running{model_name="bench-model"} 0', 'vllm:num_requests_waiting{model_name="bench-model"} 0', 'vllm:kv_cache_usage_perc{model_name="bench-model"} 0'].join('\\n') + '\\n';
const [portA, portB] = [await freePort(), await freePort()];
const server = (port) => `
  server {
    listen 127.0.0.1:${port};
    default_type application/json;
    location = /v1/chat/completions { return 200 '${completion}'; }
    location = /v1/models { return 200 '${models}'; }
    location = /health { return 200 '{}'; }
    location = /metrics { default_type text/plain; return 200 '${engineMetrics}'; }
  }`;
writeFileSync(
  join(tmp, 'nginx.conf'),
  `worker_processes 1;
daemon off;
pid ${tmp}/nginx.pid;
error_log ${tmp}/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path ${tmp}/client_body;
  proxy_temp_path ${tmp}/proxy;
  fastcgi_temp_path ${tmp}/fastcgi;
  uwsgi_temp_path ${tmp}/uwsgi;
  scgi_temp_path ${tmp}/scgi;
  client_body_buffer_size 64k;
  keepalive_requests 10000000;
  keepalive_timeout 120s;
${server(portA)}
${server(portB)}
}
`,
);


function startNginx() {
  const c = spawn(NGINX, ['-p', tmp, '-c', join(tmp, 'nginx.conf'), '-e', join(tmp, 'error.log')], { stdio: ['ignore', 'inherit', 'inherit'] });
  children.push(c);
  track('nginx', c.pid);
  return c;
}

const bareStats = {};
function forkBare(upstream, processes = 1) {
  const name = processes === 1 ? 'bare' : `bare${processes}`;
  const child = fork(here('./lib/bare-proxy.mjs'), [upstream], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'], env: { ...process.env, BARE_PROCESSES: String(processes) } });
  children.push(child);
  track(name, child.pid);
  bareStats[name] = () =>
    new Promise((r) => {
      child.once('message', (s) => r({ lagP99: s.stats.lagP99Ms, elu: s.stats.elu }));
      child.send('stats');
    });
  return new Promise((resolve, reject) => {
    child.once('message', (m) => resolve(`http://127.0.0.1:${m.port}`));
    child.once('exit', (code) => reject(new Error(`bare proxy exited ${code}`)));
  });
}

async function startKvgate(processes, extra = [], name = `kvgate${processes}`) {
  const port = await freePort();
  const args = ['serve', '--host', '127.0.0.1', '--port', String(port), '--worker-urls', `http://127.0.0.1:${portA}`, `http://127.0.0.1:${portB}`, '--policy', 'cache_aware', '--log-level', 'warn', '--processes', String(processes), ...extra, ...(process.env.BENCH_KVGATE_ARGS ?? '').split(' ').filter(Boolean)];
  const nodeArgs = (process.env.BENCH_KVGATE_NODE_ARGS ?? '').split(' ').filter(Boolean);
  if (GC) nodeArgs.push('--trace-gc-nvp');
  const c = spawn(process.execPath, [...nodeArgs, here('../dist/cli/main.js'), ...args], { stdio: ['ignore', GC ? 'pipe' : 'inherit', 'inherit'] });
  if (GC) readGcTrace(c.stdout, (gcTotals[name] = gcZero()));
  children.push(c);
  track(name, c.pid);
  const url = `http://127.0.0.1:${port}`;
  await waitReady(url, '/readiness');
  // With several processes, each must have checked its workers: ask until enough answers say ready.
  for (let i = 0; i < 20; i++) await scrape(url, '/readiness');
  return url;
}

// --- BENCH_GC=1: V8's --trace-gc-nvp lines, summed per target -----------------------------------
const GC = process.env.BENCH_GC === '1';
const gcTotals = {};
const gcZero = () => ({ scavenges: 0, fullGcs: 0, promoted: 0, survived: 0, mainMs: 0, backgroundMs: 0 });
/** Sums the GC lines of a kvgate target's stdout (all its processes and isolates); passes the rest through. */
function readGcTrace(stream, t) {
  let rest = '';
  stream.setEncoding('utf8');
  stream.on('data', (chunk) => {
    const lines = (rest + chunk).split('\n');
    rest = lines.pop() ?? '';
    for (const line of lines) {
      if (!line.includes(' pause=') || !line.includes(' gc=')) {
        process.stdout.write(line + '\n');
        continue;
      }
      const field = (k) => Number(new RegExp(`\\s${k.replace(/\./g, '\\.')}=([\\d.]+)`).exec(line)?.[1] ?? 0);
      const kind = / gc=(\w+)/.exec(line)?.[1];
      if (kind === 's') {
        t.scavenges++;
        t.promoted += field('promoted');
        t.survived += field('new_space_survived');
      } else t.fullGcs++;
      t.mainMs += field('pause') + (kind === 's' ? 0 : field('incremental'));
      for (const m of line.matchAll(/\sbackground\.[\w.]+=([\d.]+)/g)) t.backgroundMs += Number(m[1]);
    }
  });
}
const gcSince = (name, before, requests) => {
  const a = before, b = gcTotals[name];
  return { promoted: (b.promoted - a.promoted) / requests, survived: (b.survived - a.survived) / requests, mainUs: ((b.mainMs - a.mainMs) * 1000) / requests, backgroundUs: ((b.backgroundMs - a.backgroundMs) * 1000) / requests, scavenges: b.scavenges - a.scavenges, fullGcs: b.fullGcs - a.fullGcs };
};

// --- wrk ------------------------------------------------------------------------------------
const lua = join(tmp, 'chat.lua');
const UNIQUE = process.env.BENCH_WRK_UNIQUE === '1';
writeFileSync(
  lua,
  `-- 1,024 chat bodies of 4,000 characters: one shared 3,800-character system prompt, a varying user turn.
local system = string.sub(string.rep("You are a careful assistant for an online store. Answer briefly and cite the policy section. ", 40), 1, 3800)
local requests = {}
local n = 0
init = function(args)
  for i = 0, 1023 do
    local user = string.format("Customer %d: where is my order number %d? ", i, (i * 7919) % 100000)
    user = user .. string.rep(".", 200 - #user)
    local body = '{"model":"bench-model","messages":[{"role":"system","content":"' .. system .. '"},{"role":"user","content":"' .. user .. '"}],"max_tokens":16}'
    requests[i + 1] = wrk.format("POST", "/v1/chat/completions", { ["Content-Type"] = "application/json" }, body)
  end
end
local unique = ${UNIQUE ? 'true' : 'false'}
request = function()
  n = n + 1
  if unique then
    -- BENCH_WRK_UNIQUE=1: every request's user turn is new (no prompt repeats).
    local user = string.format("Customer %d: where is my order number %d? ", n, (n * 7919) % 100000)
    user = user .. string.rep(".", 200 - #user)
    return wrk.format("POST", "/v1/chat/completions", { ["Content-Type"] = "application/json" }, '{"model":"bench-model","messages":[{"role":"system","content":"' .. system .. '"},{"role":"user","content":"' .. user .. '"}],"max_tokens":16}')
  end
  return requests[(n % 1024) + 1]
end
`,
);

const toMs = (v, unit) => Number(v) * { us: 0.001, ms: 1, s: 1000 }[unit];
function wrk(url, secs) {
  const out = execFileSync(WRK, ['-t', String(THREADS), '-c', String(CONNS), '-d', `${secs}s`, '--latency', '-s', lua, url], { encoding: 'utf8' });
  const rps = Number(out.match(/Requests\/sec:\s+([\d.]+)/)[1]);
  const p = (q) => {
    const m = out.match(new RegExp(`^\\s+${q}%\\s+([\\d.]+)(us|ms|s)`, 'm'));
    return toMs(m[1], m[2]);
  };
  const non2xx = Number(out.match(/Non-2xx or 3xx responses: (\d+)/)?.[1] ?? 0);
  const socketErrors = out.match(/Socket errors: (.*)/)?.[1];
  return { rps, p50: p(50), p99: p(99), non2xx, socketErrors };
}

// --- /metrics over a fresh connection each time (with N processes, each answers from one) ----
const fresh = new Agent({ keepAlive: false });
function scrape(url, path = '/metrics') {
  return new Promise((resolve, reject) => {
    const req = httpRequest(url + path, { agent: fresh }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (d) => (text += d));
      res.on('end', () => resolve(text));
    });
    req.once('error', reject);
    req.end();
  });
}
const metric = (text, name) => Number(text.split('\n').find((l) => l.startsWith(name + ' '))?.split(' ')[1] ?? NaN);

/**
 * Event-loop lag p99 and utilisation of the target over the wrk run (issue #12): kvgate's
 * kvgate_event_loop_* gauges cover the time since the previous scrape (scraped just before and
 * after); the bare proxy answers the same perf_hooks measures over IPC. With --processes 2 each
 * scrape is answered by one of the processes.
 */
async function loopStats(name, url) {
  if (name.startsWith('bare')) return bareStats[name] ? await bareStats[name]() : {};
  if (!name.startsWith('kvgate')) return {};
  const text = await scrape(url);
  const lag = Number(/^kvgate_event_loop_delay_seconds\{quantile="0\.99"\} (\S+)/m.exec(text)?.[1]) * 1000;
  return { lagP99: lag, elu: metric(text, 'kvgate_event_loop_utilization') };
}

// --- CPU accounting: where the machine's cores went during one wrk run ------------------------
// Machine-wide busy time from /proc/stat, each long-lived component's own from /proc/PID/stat
// (a target's processes: its pid and, for --processes N, its children), and wrk's as the
// reaped-children time of this script. Reported in cores (CPU-seconds per second), so
// "busy 2.00 of 2" says the run was CPU-bound and the split says who used the cores.
const TICK = 100; // USER_HZ on Linux
function machineTicks() {
  const f = readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1).map(Number);
  const idle = f[3] + (f[4] ?? 0);
  return { busy: f.reduce((a, b) => a + b, 0) - idle };
}
function pidTicks(pid) {
  try {
    const st = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = st.slice(st.lastIndexOf(')') + 2).split(' ');
    return Number(f[11]) + Number(f[12]); // utime + stime
  } catch {
    return 0;
  }
}
/** System time and context switches (voluntary + involuntary, all threads) of a process. */
function sysAndSwitches(pid) {
  let sys = 0;
  let sw = 0;
  try {
    const st = readFileSync(`/proc/${pid}/stat`, 'utf8');
    sys = Number(st.slice(st.lastIndexOf(')') + 2).split(' ')[12]);
    for (const tid of readdirSync(`/proc/${pid}/task`)) {
      const s = readFileSync(`/proc/${pid}/task/${tid}/status`, 'utf8');
      sw += Number(/voluntary_ctxt_switches:\s+(\d+)/.exec(s)?.[1] ?? 0) + Number(/nonvoluntary_ctxt_switches:\s+(\d+)/.exec(s)?.[1] ?? 0);
    }
  } catch {
    /* gone */
  }
  return { sys, sw };
}
/** The main (JavaScript) thread's own time: /proc/PID/task/PID/stat (the rest of a process is GC helpers, libuv's pool, its other threads). */
function mainThreadTicks(pid) {
  try {
    const st = readFileSync(`/proc/${pid}/task/${pid}/stat`, 'utf8');
    const f = st.slice(st.lastIndexOf(')') + 2).split(' ');
    return Number(f[11]) + Number(f[12]);
  } catch {
    return 0;
  }
}
function childPids(pid) {
  try {
    return readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number);
  } catch {
    return [];
  }
}
function selfReapedTicks() {
  const st = readFileSync('/proc/self/stat', 'utf8');
  const f = st.slice(st.lastIndexOf(')') + 2).split(' ');
  return Number(f[13]) + Number(f[14]); // cutime + cstime: wrk, once reaped
}
const componentPids = {}; // name -> () => pids
function descendants(pid) {
  const out = [pid];
  for (let i = 0; i < out.length; i++) out.push(...childPids(out[i]));
  return out;
}
const comm = (pid) => {
  try {
    return readFileSync(`/proc/${pid}/comm`, 'utf8').trim();
  } catch {
    return '';
  }
};
/** Counts `pid` and its descendants as `name`, except nats-server processes, counted as `nats`. */
const rootPids = {}; // target name -> its top process (for pausing)
function track(name, pid) {
  rootPids[name] = pid;
  componentPids[name] = () => descendants(pid).filter((p) => comm(p) !== 'nats-server');
  const prev = componentPids.nats;
  componentPids.nats = () => [...new Set([...(prev ? prev() : []), ...descendants(pid).filter((p) => comm(p) === 'nats-server')])];
}
/**
 * Stops (SIGSTOP) every target process except `name`'s, and resumes `name`'s (SIGCONT), so a target
 * is measured with no other target's timers, health checks or heartbeats on the cores: an idle
 * target is not free (each took 0.03-0.1 cores in earlier runs), and two-process targets, which need
 * every core, lost most from it. nginx (the upstream) keeps running.
 */
function runOnly(name) {
  for (const [n, pid] of Object.entries(rootPids)) {
    if (n === 'nginx') continue;
    for (const p of descendants(pid)) {
      try {
        process.kill(p, n === name ? 'SIGCONT' : 'SIGSTOP');
      } catch {
        /* gone */
      }
    }
  }
}
function cpuSnapshot() {
  const comp = {};
  const perPid = {};
  const mainThreads = {};
  const sysTicks = {};
  const switches = {};
  for (const [name, pids] of Object.entries(componentPids)) {
    let sum = 0;
    let main = 0;
    let sys = 0;
    let sw = 0;
    for (const p of pids()) {
      const t = pidTicks(p);
      perPid[p] = t;
      sum += t;
      main += mainThreadTicks(p);
      const x = sysAndSwitches(p);
      sys += x.sys;
      sw += x.sw;
    }
    comp[name] = sum;
    mainThreads[name] = main;
    sysTicks[name] = sys;
    switches[name] = sw;
  }
  return { t: process.hrtime.bigint(), machine: machineTicks().busy, wrk: selfReapedTicks(), comp, perPid, mainThreads, sysTicks, switches };
}
/** Cores used by each process of `name` since snapshot `a` (largest first): how evenly a multi-process target's connections were spread. */
function spreadSince(a, name) {
  const b = cpuSnapshot();
  const secs = Number(b.t - a.t) / 1e9;
  return componentPids[name]()
    .map((p) => ((b.perPid[p] ?? 0) - (a.perPid[p] ?? 0)) / TICK / secs)
    .filter((c) => c >= 0.05)
    .sort((x, y) => y - x);
}
function cpuSince(a) {
  const b = cpuSnapshot();
  const secs = Number(b.t - a.t) / 1e9;
  const cores = (ticks) => ticks / TICK / secs;
  const out = { busy: cores(b.machine - a.machine), wrk: cores(b.wrk - a.wrk) };
  for (const name of Object.keys(b.comp)) out[name] = cores(b.comp[name] - (a.comp[name] ?? 0));
  out.mainThreads = {};
  for (const name of Object.keys(b.mainThreads)) out.mainThreads[name] = cores(b.mainThreads[name] - (a.mainThreads[name] ?? 0));
  out.sys = {};
  out.switchesPerSec = {};
  for (const name of Object.keys(b.sysTicks)) {
    out.sys[name] = cores(b.sysTicks[name] - (a.sysTicks[name] ?? 0));
    out.switchesPerSec[name] = (b.switches[name] - (a.switches[name] ?? 0)) / secs;
  }
  return out;
}

// --- run ------------------------------------------------------------------------------------
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
// Wait (every 30 s, at most 15 min) for the 1-minute load average to fall below BENCH_MAX_LOAD (1.5).
for (let waited = 0; loadavg()[0] >= Number(process.env.BENCH_MAX_LOAD ?? 1.5) && waited < 30; waited++) {
  console.log(`load average ${loadavg()[0].toFixed(2)}: waiting 30 s`);
  await sleep(30_000);
}
const cpuModel = readFileSync('/proc/cpuinfo', 'utf8').match(/model name\s*:\s*(.*)/)?.[1] ?? 'unknown';
console.log(`machine: ${cpus().length} CPUs (${cpuModel}), Node ${process.version}; load average ${loadavg().map((x) => x.toFixed(2)).join(' ')}`);
console.log(`wrk: ${THREADS} thread(s), ${CONNS} connections, ${SECS} s per measurement after a ${WARMUP} s warm-up; ${ROUNDS} rounds; ${UNIQUE ? 'a new user turn for every request (BENCH_WRK_UNIQUE=1)' : '1,024 bodies in turn'}`);

const names = (process.env.BENCH_TARGETS ?? 'nginx,bare,bare2,kvgate1,kvgate2,kvgate2nosync').split(',');
const labels = { nginx: 'nginx direct', bare: 'bare Node proxy', bare2: 'bare Node proxy, 2 processes (no shared state)', kvgate1: 'kvgate cache_aware, 1 process', kvgate2: 'kvgate cache_aware, --processes 2', kvgate2nosync: 'kvgate cache_aware, --processes 2 --replica-sync off' };
const results = Object.fromEntries(names.map((n) => [n, []]));
const scrapes = {};
try {
  startNginx();
  await waitReady(`http://127.0.0.1:${portA}`);
  await waitReady(`http://127.0.0.1:${portB}`);
  const starters = {
    nginx: async () => `http://127.0.0.1:${portA}`,
    bare: () => forkBare(`http://127.0.0.1:${portA}`),
    bare2: () => forkBare(`http://127.0.0.1:${portA}`, 2),
    kvgate1: () => startKvgate(1),
    kvgate2: () => startKvgate(2),
    kvgate2nosync: () => startKvgate(2, ['--replica-sync', 'off'], 'kvgate2nosync'),
  };
  const targets = {};
  for (const name of names) {
    // A kvgate target may carry its own extra flags: kvgate2[--replica-sync-flush-ms=10].
    const m = /^(kvgate1|kvgate2|kvgate2nosync)\[(.*)\]$/.exec(name);
    if (m) {
      const flags = m[2].split(/\s+/).filter(Boolean).flatMap((f) => f.split('=', 2));
      const base = m[1];
      const procs = base === 'kvgate1' ? 1 : 2;
      targets[name] = await startKvgate(procs, base === 'kvgate2nosync' ? ['--replica-sync', 'off', ...flags] : flags, name);
      labels[name] = `${labels[base]} ${m[2]}`;
      continue;
    }
    if (!starters[name]) throw new Error(`unknown target ${name}; known: ${Object.keys(starters).join(',')} (and kvgate1/kvgate2/kvgate2nosync[--flag=value ...])`);
    targets[name] = await starters[name]();
  }
  for (let round = 0; round < ROUNDS; round++) {
    for (const name of names) {
      runOnly(name);
      await sleep(200);
      wrk(targets[name], WARMUP);
      const before = await loopStats(name, targets[name]);
      const cpu0 = cpuSnapshot();
      const gc0 = gcTotals[name] ? { ...gcTotals[name] } : undefined;
      const r = wrk(targets[name], SECS);
      r.cpu = cpuSince(cpu0);
      // The last lines of the run may still be in the pipe.
      if (gc0) await sleep(100);
      if (gc0) r.gc = gcSince(name, gc0, r.rps * SECS);
      r.spread = spreadSince(cpu0, name);
      Object.assign(r, await loopStats(name, targets[name], before));
      results[name].push(r);
      const errs = r.non2xx || r.socketErrors ? ` non2xx=${r.non2xx} socket_errors=${r.socketErrors ?? 0}` : '';
      const loop = r.lagP99 !== undefined ? ` loop_lag_p99=${r.lagP99.toFixed(1)}ms ELU=${r.elu.toFixed(2)}` : '';
      const cpu = ` cores: busy=${r.cpu.busy.toFixed(2)} ` + Object.entries(r.cpu).filter(([k, v]) => k !== 'busy' && typeof v === 'number' && v >= 0.005).map(([k, v]) => `${k}=${v.toFixed(2)}`).join(' ');
      const spread = r.spread.length > 1 ? ` per-process cores=${r.spread.map((c) => c.toFixed(2)).join('/')}` : '';
      const mainT = r.cpu.mainThreads[name];
      const threads = mainT !== undefined && r.cpu[name] > 0 ? ` main-thread=${mainT.toFixed(2)} other-threads=${(r.cpu[name] - mainT).toFixed(2)} system=${r.cpu.sys[name].toFixed(2)} switches/req=${(r.cpu.switchesPerSec[name] / r.rps).toFixed(3)}` : '';
      const gcLine = r.gc ? ` gc per request: promoted=${r.gc.promoted.toFixed(0)}B survived=${r.gc.survived.toFixed(0)}B event-loop=${r.gc.mainUs.toFixed(2)}us background=${r.gc.backgroundUs.toFixed(2)}us (${r.gc.scavenges} scavenges, ${r.gc.fullGcs} full)` : '';
      console.log(`round ${round + 1} ${name.padEnd(7)} req/s=${r.rps.toFixed(0)} p50=${r.p50.toFixed(3)}ms p99=${r.p99.toFixed(3)}ms${errs}${loop}${cpu}${spread}${threads}${gcLine}`);
    }
  }
  for (const name of names.filter((n) => n.startsWith('kvgate'))) {
    runOnly(name);
    scrapes[name] = [];
    for (let i = 0; i < 8; i++) {
      const text = await scrape(targets[name]);
      scrapes[name].push({ hits: metric(text, 'kvgate_cache_hits_total'), misses: metric(text, 'kvgate_cache_misses_total'), lb: metric(text, 'kvgate_load_balancing_events_total'), syncMsgs: metric(text, 'kvgate_replica_sync_messages_sent_total'), syncBytes: metric(text, 'kvgate_replica_sync_bytes_sent_total'), syncRouted: metric(text, 'kvgate_replica_sync_routed_sent_total'), syncRepeats: metric(text, 'kvgate_replica_sync_repeats_suppressed_total') });
    }
  }
} finally {
  for (const pid of Object.values(rootPids)) for (const p of descendants(pid)) try { process.kill(p, 'SIGCONT'); } catch {}
  await cleanup();
}

const medOf = (rs, k) => (rs.some((r) => r[k] !== undefined) ? median(rs.map((r) => r[k])) : undefined);
const med = Object.fromEntries(names.map((n) => [n, { rps: median(results[n].map((r) => r.rps)), p50: median(results[n].map((r) => r.p50)), p99: median(results[n].map((r) => r.p99)), lag: medOf(results[n], 'lagP99'), elu: medOf(results[n], 'elu') }]));
const cores = (n, k) => median(results[n].map((r) => r.cpu[k] ?? 0));
console.log(`\nmedians of ${ROUNDS} rounds; body 4,000-char chat; wrk -t${THREADS} -c${CONNS} -d${SECS}s; cores = CPU-seconds per second during the run (machine busy, then the target's own processes, wrk, nginx, nats-server)`);
console.log('| target | max req/s | p50 (ms) | p99 (ms) | loop lag p99 (ms) | ELU | cores: busy / target / wrk / nginx / nats | target CPU µs per request |');
console.log('|---|---|---|---|---|---|---|---|');
for (const n of names) {
  const own = n === 'nginx' ? 0 : cores(n, n);
  const split = [cores(n, 'busy'), own, cores(n, 'wrk'), cores(n, 'nginx'), cores(n, 'nats')].map((x) => x.toFixed(2)).join(' / ');
  const perReq = n === 'nginx' ? cores(n, 'nginx') / med[n].rps : own / med[n].rps;
  console.log(`| ${labels[n]} | ${med[n].rps.toFixed(0)} | ${med[n].p50.toFixed(2)} | ${med[n].p99.toFixed(2)} | ${med[n].lag?.toFixed(1) ?? '–'} | ${med[n].elu?.toFixed(2) ?? '–'} | ${split} | ${(perReq * 1e6).toFixed(0)} |`);
}
if (med.nginx && med.bare && med.kvgate1) {
  const added = (n) => med[n].p50 - med.nginx.p50;
  console.log(`\nadded p50 over nginx direct: bare ${added('bare').toFixed(3)} ms, kvgate ${added('kvgate1').toFixed(3)} ms (ratio ${(added('kvgate1') / added('bare')).toFixed(2)})`);
  console.log(`ratios: kvgate(1 process)/bare req/s=${(med.kvgate1.rps / med.bare.rps).toFixed(2)} p50=${(med.kvgate1.p50 / med.bare.p50).toFixed(2)}`);
}
// Ratios are given two ways: of the medians, and the median of the per-round ratios (each round
// measures every target once, a minute apart, so its ratio pairs measurements taken under the same
// machine state; the second is the paired statistic, robust to drift across rounds).
const paired = (a, b) => median(results[a].map((r, i) => r.rps / results[b][i].rps)).toFixed(2);
if (med.bare && med.bare2) console.log(`bare proxy 2 processes/1 process req/s=${(med.bare2.rps / med.bare.rps).toFixed(2)} (per-round median ${paired('bare2', 'bare')}): what this machine gives a stateless Node proxy for a second process`);
if (med.kvgate1 && med.kvgate2) {
  console.log(`processes2/processes1 req/s=${(med.kvgate2.rps / med.kvgate1.rps).toFixed(2)} (per-round median ${paired('kvgate2', 'kvgate1')}) p50=${(med.kvgate2.p50 / med.kvgate1.p50).toFixed(2)}`);
}
for (const n of names.filter((x) => x.includes('['))) if (med.kvgate1) console.log(`${n}/processes1 req/s=${(med[n].rps / med.kvgate1.rps).toFixed(2)} (per-round median ${paired(n, 'kvgate1')})`);
if (med.kvgate1 && med.kvgate2nosync) console.log(`processes2 without replica sync/processes1 req/s=${(med.kvgate2nosync.rps / med.kvgate1.rps).toFixed(2)} (per-round median ${paired('kvgate2nosync', 'kvgate1')}; the cost of sharing state: compare with the line above)`);
if (GC) {
  console.log('\nGC per request (BENCH_GC=1, V8 --trace-gc-nvp, all processes and isolates of the target; medians of the rounds)');
  console.log('| target | promoted (B) | survived a scavenge (B) | GC on the event loop (µs) | GC on V8 background threads (µs) | full GCs per round |');
  console.log('|---|---|---|---|---|---|');
  for (const n of names.filter((x) => results[x][0]?.gc)) {
    const g = (k) => median(results[n].map((r) => r.gc[k]));
    console.log(`| ${labels[n]} | ${g('promoted').toFixed(0)} | ${g('survived').toFixed(0)} | ${g('mainUs').toFixed(2)} | ${g('backgroundUs').toFixed(2)} | ${g('fullGcs')} |`);
  }
}
console.log('\ncache_aware on kvgate /metrics after all rounds (8 scrapes, a fresh connection each; with --processes 2 each scrape is answered by one process, whose counters are its own):');
for (const name of Object.keys(scrapes)) {
  const distinct = [...new Map(scrapes[name].map((s) => [`${s.hits}/${s.misses}`, s])).values()];
  for (const s of distinct) {
    const rate = s.hits / (s.hits + s.misses);
    console.log(`  ${labels[name]}: kvgate_cache_hits_total=${s.hits} kvgate_cache_misses_total=${s.misses} hit_rate=${(rate * 100).toFixed(3)}% kvgate_load_balancing_events_total=${s.lb}${s.syncMsgs ? ` replica sync: ${s.syncMsgs} messages, ${s.syncRouted} routing records published (${Math.round(s.syncBytes / Math.max(1, s.syncRouted))} bytes each on average, ${Math.round(s.syncRouted / s.syncMsgs)} per message), ${s.syncRepeats} repeats not published again` : ''}`);
  }
}
