// Shared plumbing of the fault-injection suite (test/faults): simulated engines (in-process or
// spawned), gateways with captured logs, HTTP helpers that never hang, Prometheus text parsing,
// the "nothing leaked" check and the suite summary written to test/faults/last-run.json.
import { closeSync, existsSync, openSync, readFileSync, renameSync, statSync, unlinkSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Writable } from 'node:stream';
import pino from 'pino';
import { request } from 'undici';
import { defaultServeConfig, type ServeConfig } from '../../src/config/serve-config.js';
import { SeededRng } from '../../src/core/rng.js';
import { Gateway } from '../../src/server/gateway.js';
import { startSimServer, type SimServer, type SimServerOptions } from '../../src/sim/server.js';
import { spawnKvgate, type Spawned } from './processes.js';
import { parseJson } from './http.js';

export const MODEL = 'kvgate-sim';

// ---------------------------------------------------------------------------------------------
// Cleanup stack (each test file registers `afterEach(runCleanups)`).

const cleanups: Array<() => Promise<unknown> | unknown> = [];

export function onCleanup(fn: () => Promise<unknown> | unknown): void {
  cleanups.push(fn);
}

export async function runCleanups(): Promise<void> {
  while (cleanups.length) {
    try {
      await cleanups.pop()!();
    } catch {
      // best effort
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Engines.

/** An in-process simulated engine on an ephemeral loopback port (closed after the test). */
export async function startSim(opts: SimServerOptions = {}): Promise<SimServer> {
  const s = await startSimServer({ host: '127.0.0.1', port: 0, speed: 50, seed: 1, maxModelLen: 4096, defaultMaxTokens: 8, ...opts });
  onCleanup(() => s.close());
  return s;
}

export interface SpawnedSim extends Spawned {
  url: string;
  /** Resolves with the exit code (or null when killed by a signal) once the process is gone. */
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/** A real `kvgate sim` process (node dist/cli/main.js sim ...), killed after the test. */
export async function spawnSim(args: string[]): Promise<SpawnedSim> {
  const p = await spawnKvgate(['sim', '--host', '127.0.0.1', '--port', '0', ...args], /listening on (http:\/\/\S+)/);
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    if (p.child.exitCode !== null || p.child.signalCode !== null) resolve({ code: p.child.exitCode, signal: p.child.signalCode });
    else p.child.once('exit', (code, signal) => resolve({ code, signal }));
  });
  // Never outlive the test process, even if it dies without running its cleanups.
  const killOnExit = () => p.child.kill('SIGKILL');
  process.once('exit', killOnExit);
  onCleanup(async () => {
    process.removeListener('exit', killOnExit);
    if (p.child.exitCode === null && p.child.signalCode === null) p.child.kill('SIGKILL');
    await exited;
  });
  return { ...p, url: p.match[1]!, exited };
}

// ---------------------------------------------------------------------------------------------
// Gateway.

export interface TestGateway {
  gw: Gateway;
  /** Every log line (JSON objects) the gateway wrote at info level and above. */
  logs: Array<Record<string, unknown>>;
}

/** An in-process gateway on an ephemeral port, fast health checks, logs captured in memory. */
export async function startTestGateway(overrides: Partial<ServeConfig>): Promise<TestGateway> {
  const logs: Array<Record<string, unknown>> = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const line of chunk.toString('utf8').split('\n')) {
        if (!line) continue;
        try {
          logs.push(JSON.parse(line) as Record<string, unknown>);
        } catch {
          logs.push({ msg: line });
        }
      }
      cb();
    },
  });
  const config = defaultServeConfig({
    host: '127.0.0.1',
    port: 0,
    logLevel: 'info',
    healthCheckIntervalSecs: 0.1,
    healthCheckTimeoutSecs: 1,
    ...overrides,
  });
  const gw = new Gateway(config, { rng: new SeededRng(7), logger: pino({ level: 'info' }, sink) });
  await gw.start();
  onCleanup(() => gw.close());
  return { gw, logs };
}

// ---------------------------------------------------------------------------------------------
// Requests.

export function chatBody(user: string, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    model: MODEL,
    messages: [
      { role: 'system', content: 'You are a terse assistant used by the kvgate fault suite.' },
      { role: 'user', content: user },
    ],
    max_tokens: 4,
    ...extra,
  };
}

export interface Answer {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  text: string;
  json: any;
  /** Set when the connection failed instead of answering. */
  error?: Error;
}

/** POST with a hard time bound; never throws (a connection failure is reported in `error`). */
export async function post(base: string, path: string, body: unknown, opts: { headers?: Record<string, string>; timeoutMs?: number } = {}): Promise<Answer> {
  try {
    const res = await request(base + path, {
      method: 'POST',
      headers: { 'content-type': 'application/json', ...opts.headers },
      body: typeof body === 'string' || Buffer.isBuffer(body) ? body : JSON.stringify(body),
      signal: AbortSignal.timeout(opts.timeoutMs ?? 20_000),
    });
    const text = await res.body.text();
    return { status: res.statusCode, headers: res.headers, text, json: parseJson(text) };
  } catch (e) {
    return { status: 0, headers: {}, text: '', json: undefined, error: e as Error };
  }
}

export interface OpenStream {
  /** Resolves once the response headers arrived (status 0 if the request failed before). */
  started: Promise<{ status: number; worker: string | undefined }>;
  /** Chunks received so far. */
  chunks: () => number;
  /** Resolves when the body ended or broke; never rejects. */
  done: Promise<{ status: number; worker: string | undefined; text: string; complete: boolean; error?: Error }>;
  abort: () => void;
}

/** Starts a streaming request and consumes it in the background. */
export function openStream(base: string, path: string, body: unknown): OpenStream {
  const ac = new AbortController();
  let n = 0;
  let text = '';
  let resolveStarted!: (v: { status: number; worker: string | undefined }) => void;
  const started = new Promise<{ status: number; worker: string | undefined }>((r) => (resolveStarted = r));
  const done = (async () => {
    let status = 0;
    let worker: string | undefined;
    try {
      const res = await request(base + path, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify(body),
        signal: ac.signal,
      });
      status = res.statusCode;
      worker = res.headers['x-kvgate-worker'] as string | undefined;
      resolveStarted({ status, worker });
      for await (const c of res.body) {
        n++;
        text += (c as Buffer).toString('utf8');
      }
      return { status, worker, text, complete: text.trimEnd().endsWith('data: [DONE]') };
    } catch (e) {
      resolveStarted({ status, worker });
      return { status, worker, text, complete: false, error: e as Error };
    }
  })();
  return { started, chunks: () => n, done, abort: () => ac.abort() };
}

/** Rejects if `p` does not settle within `ms` (so a hang fails the test instead of timing it out). */
export function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let t: NodeJS.Timeout;
  return Promise.race([
    p.finally(() => clearTimeout(t)),
    new Promise<never>((_, reject) => {
      t = setTimeout(() => reject(new Error(`${what}: still pending after ${ms} ms`)), ms);
    }),
  ]);
}

export async function waitFor(cond: () => boolean | Promise<boolean>, timeoutMs = 3000, what = 'condition'): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(10);
  }
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

// ---------------------------------------------------------------------------------------------
// Prometheus text.

/** Sum of the samples of `name` whose labels include all of `labels`. */
export function metricSum(text: string, name: string, labels: Record<string, string> = {}): number {
  let sum = 0;
  for (const line of text.split('\n')) {
    if (!line.startsWith(name)) continue;
    const rest = line.slice(name.length);
    if (rest[0] !== '{' && rest[0] !== ' ') continue;
    const m = rest.match(/^(?:\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const got: Record<string, string> = {};
    for (const kv of (m[1] ?? '').matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) got[kv[1]!] = kv[2]!;
    if (Object.entries(labels).every(([k, v]) => got[k] === v)) sum += Number(m[2]);
  }
  return sum;
}

export async function gatewayMetric(gw: Gateway, name: string, labels: Record<string, string> = {}): Promise<number> {
  return metricSum(await gw.metrics.registry.metrics(), name, labels);
}

export async function simMetric(sim: SimServer | string, name: string, labels: Record<string, string> = {}): Promise<number> {
  const text = typeof sim === 'string' ? await request(sim + '/metrics').then((r) => r.body.text()) : await sim.metrics.render();
  return metricSum(text, name, labels);
}

/** Routing decisions per worker id. */
export async function decisionsFor(gw: Gateway, workerId: string): Promise<number> {
  return (await gw.metrics.decisions.get()).values.filter((v) => v.labels.worker === workerId).reduce((s, v) => s + v.value, 0);
}

// ---------------------------------------------------------------------------------------------
// Gateway state after a scenario.

export interface Leaks {
  /** Σ worker.load once the gateway is quiet (should be 0). */
  leakedInFlight: number;
  /** admission.inUse + admission.waiting once quiet (should be 0). */
  leakedAdmissionSlots: number;
  /** Responses the gateway still considers open. */
  openResponses: number;
}

/** Waits (bounded) for the gateway to be quiet and reports whatever is still held. */
export async function settle(gw: Gateway, timeoutMs = 5000): Promise<Leaks> {
  const read = (): Leaks => ({
    leakedInFlight: gw.registry.all().reduce((s, w) => s + w.load, 0),
    leakedAdmissionSlots: gw.admission.inUse + gw.admission.waiting,
    openResponses: gw.activeRequests,
  });
  const end = Date.now() + timeoutMs;
  let l = read();
  while ((l.leakedInFlight || l.leakedAdmissionSlots || l.openResponses) && Date.now() < end) {
    await sleep(20);
    l = read();
  }
  return l;
}

// ---------------------------------------------------------------------------------------------
// The suite summary: test/faults/last-run.json, one entry per scenario, overwritten on each run.

export interface ScenarioFigures {
  requestsSent: number;
  faultsInjected: number;
  requestsFailedThatShouldHaveSucceeded: number;
  leakedInFlight: number;
  leakedAdmissionSlots: number;
  [extra: string]: unknown;
}

const here = dirname(fileURLToPath(import.meta.url));
export const LAST_RUN_PATH = join(here, '..', 'faults', 'last-run.json');

function withLock<T>(fn: () => T): T {
  const lock = LAST_RUN_PATH + '.lock';
  const end = Date.now() + 5000;
  for (;;) {
    try {
      closeSync(openSync(lock, 'wx'));
      break;
    } catch {
      try {
        if (Date.now() - statSync(lock).mtimeMs > 10_000) unlinkSync(lock); // stale
      } catch {
        // gone meanwhile
      }
      if (Date.now() > end) break; // give up locking rather than fail the test
      const t = Date.now() + 5;
      while (Date.now() < t) {
        // short spin: the critical section is a few ms
      }
    }
  }
  try {
    return fn();
  } finally {
    try {
      unlinkSync(lock);
    } catch {
      // already removed
    }
  }
}

/**
 * Records one scenario's figures. Files of one vitest run share its process (our parent, in the
 * forks pool), so entries from an earlier run are dropped and this run's are merged; the totals
 * are recomputed. Also prints the figures.
 */
export function recordFigures(scenario: string, figures: ScenarioFigures): void {
  const run = `${process.ppid}`;
  const doc = withLock(() => {
    let prev: any;
    try {
      prev = existsSync(LAST_RUN_PATH) ? JSON.parse(readFileSync(LAST_RUN_PATH, 'utf8')) : undefined;
    } catch {
      prev = undefined;
    }
    const sameRun = prev?.run === run && Date.now() - Date.parse(prev?.updatedAt ?? '') < 15 * 60_000;
    const scenarios: Record<string, ScenarioFigures> = sameRun && prev?.scenarios ? prev.scenarios : {};
    scenarios[scenario] = figures;
    const sorted = Object.fromEntries(Object.entries(scenarios).sort(([x], [y]) => x.localeCompare(y)));
    const list = Object.values(scenarios);
    const sum = (k: keyof ScenarioFigures) => list.reduce((s, f) => s + (Number(f[k]) || 0), 0);
    const soak = scenarios['10-soak'];
    const out = {
      run,
      updatedAt: new Date().toISOString(),
      node: process.version,
      totals: {
        scenarios: list.length,
        requestsSent: sum('requestsSent'),
        faultsInjected: sum('faultsInjected'),
        requestsFailedThatShouldHaveSucceeded: sum('requestsFailedThatShouldHaveSucceeded'),
        leakedInFlight: sum('leakedInFlight'),
        leakedAdmissionSlots: sum('leakedAdmissionSlots'),
        rssAfterWarmupMiB: soak?.rssAfterWarmupMiB ?? null,
        rssAtEndMiB: soak?.rssAtEndMiB ?? null,
      },
      scenarios: sorted,
    };
    const tmp = `${LAST_RUN_PATH}.${process.pid}.tmp`;
    writeFileSync(tmp, JSON.stringify(out, null, 2) + '\n');
    renameSync(tmp, LAST_RUN_PATH);
    return out;
  });
  console.log(`[faults] ${scenario}: ${JSON.stringify(figures)}`);
  console.log(`[faults] suite totals so far (${LAST_RUN_PATH}): ${JSON.stringify(doc.totals)}`);
}
