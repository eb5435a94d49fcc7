import { setMaxListeners } from 'node:events';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { Agent, request } from 'undici';
import { quantile } from './report.js';
import type { Workload } from './workload.js';

export interface LiveOptions {
  /** Base URL of kvgate or any OpenAI-compatible endpoint. */
  target: string;
  workload: Workload;
  /** Model to ask for; default: the first model the target lists. */
  model?: string;
  /** Requests in flight at most; an arrival waits for a free slot. */
  concurrency: number;
  /** Stop sending new requests after this many seconds; in-flight ones get `drainSecs` to finish. */
  durationSecs: number;
  drainSecs?: number;
  route: 'completions' | 'chat';
  apiKey?: string;
  progress?: (fraction: number) => void;
  /** Request classes (--classes): each request gets one, in proportion to `share`, with its headers. */
  classes?: LiveClass[];
}

/** A class of live requests: its share of the workload and the headers it sends (priority, objectives). */
export interface LiveClass {
  name: string;
  share: number;
  headers: Record<string, string>;
  /** Its TTFT objective (ms), if it sends one: the report counts how many met it. */
  ttftMs?: number;
}

/** Per-class outcome of a live run. */
export interface LiveClassResult {
  name: string;
  sent: number;
  ok: number;
  /** Refused by kvgate with 429, by x-kvgate-dropped-reason (or 'other'). */
  refused: Record<string, number>;
  /** Other failures by status. */
  errors: Record<string, number>;
  ttftP50: number;
  ttftP90: number;
  /** Served requests within the class's TTFT objective (null without one). */
  withinObjective: number | null;
  /** Time from sending to the refusal's status line, p50 / p99 (ms). */
  refusalMsP50: number;
  refusalMsP99: number;
}

/** Parses `name=share[:priority=N][:ttft-ms=N][:tpot-ms=N],...` (shares are normalised). */
export function parseClasses(spec: string): LiveClass[] {
  const out: LiveClass[] = [];
  for (const part of spec.split(',').map((x) => x.trim()).filter(Boolean)) {
    const [head, ...opts] = part.split(':');
    const m = /^([\w-]+)=(\d+(\.\d+)?)$/.exec(head);
    if (!m || !(Number(m[2]) > 0)) throw new Error(`--classes: expected name=share (got '${head}')`);
    const c: LiveClass = { name: m[1], share: Number(m[2]), headers: {} };
    for (const o of opts) {
      const kv = /^(priority|ttft-ms|tpot-ms)=(-?\d+(\.\d+)?)$/.exec(o);
      if (!kv) throw new Error(`--classes: unknown option '${o}' of class ${c.name} (priority=N, ttft-ms=N, tpot-ms=N)`);
      if (kv[1] === 'priority') c.headers['x-kvgate-priority'] = String(Math.trunc(Number(kv[2])));
      else if (kv[1] === 'ttft-ms') {
        c.headers['x-slo-ttft-ms'] = kv[2];
        c.ttftMs = Number(kv[2]);
      } else c.headers['x-slo-tpot-ms'] = kv[2];
    }
    out.push(c);
  }
  if (out.length === 0) throw new Error('--classes: no class given');
  return out;
}

export interface LiveResult {
  target: string;
  workload: string;
  model: string;
  sent: number;
  succeeded: number;
  failed: number;
  /** HTTP status (0 = connection error, -1 = cut at the end of the run) → count. */
  errors: Record<string, number>;
  /** Σ cached / Σ prompt tokens, from the usage the engines reported (when they report it). */
  hitRate: number | null;
  ttftP50: number;
  ttftP90: number;
  ttftP99: number;
  e2eP50: number;
  e2eP99: number;
  /** Seconds requests waited for a free concurrency slot (client-side queueing), p90. */
  slotWaitP90: number;
  /** The load generator's own event-loop delay during the run (ms): p99 and max. Every client-side time includes it. */
  clientLoopDelayMsP99: number;
  clientLoopDelayMsMax: number;
  outputTokensPerSec: number;
  /** Requests per worker, from the x-kvgate-worker response header (kvgate targets). */
  perWorker: Record<string, number>;
  wallSecs: number;
  /** Seconds of arrivals sent: --duration-secs, or less when the workload ran out first. */
  sendSecs: number;
  /** The workload had fewer requests than --duration-secs asked for. */
  workloadRanOut: boolean;
  /** With --classes: each class's outcome. */
  classes?: LiveClassResult[];
  /**
   * slo_aware targets: how close the predicted TTFT (`x-kvgate-predicted-ttft-ms`) came to the
   * TTFT observed here, over the successful requests that carried one.
   */
  prediction?: { requests: number; within25Pct: number; medianRelError: number; p80RelError: number };
}

interface Usage {
  prompt_tokens?: number;
  completion_tokens?: number;
  prompt_tokens_details?: { cached_tokens?: number } | null;
}

/** Request bodies built before a live run starts, at most this many bytes (the rest are built when sent). */
const PREBUILT_BODY_BYTES = 256 * 1024 * 1024;
const EMPTY_BODY = Buffer.alloc(0);

async function firstModel(target: string, agent: Agent, headers: Record<string, string>): Promise<string> {
  const res = await request(`${target}/v1/models`, { dispatcher: agent, headers, signal: AbortSignal.timeout(10_000) });
  if (res.statusCode !== 200) throw new Error(`GET ${target}/v1/models answered ${res.statusCode}`);
  const body = (await res.body.json()) as { data?: Array<{ id?: string }> };
  const id = body.data?.[0]?.id;
  if (!id) throw new Error(`${target}/v1/models lists no model; pass --model`);
  return id;
}

/**
 * Live mode: the workload's requests sent as real streaming OpenAI requests at their arrival
 * times (open loop, bounded by `concurrency`), measuring time to first token and latency from
 * the client side. Works against kvgate or any OpenAI-compatible endpoint.
 */
export async function runLive(o: LiveOptions): Promise<LiveResult> {
  // Several targets (comma-separated) are a round-robin front, e.g. kvgate replicas behind a load balancer.
  const targets = o.target.split(',').map((t) => t.trim().replace(/\/+$/, '')).filter(Boolean);
  const target = targets.join(',');
  const agent = new Agent({ connections: o.concurrency + 4, headersTimeout: 0, bodyTimeout: 0 });
  const headers: Record<string, string> = { 'content-type': 'application/json' };
  if (o.apiKey) headers.authorization = `Bearer ${o.apiKey}`;
  const model = o.model ?? (await firstModel(targets[0], agent, headers));
  const reqs = o.workload.requests;
  // Classes: request i takes the class where a fixed low-discrepancy sequence falls (deterministic, proportional).
  const classes = o.classes ?? [];
  const totalShare = classes.reduce((a, c) => a + c.share, 0);
  const classOf = (i: number): number => {
    if (classes.length === 0) return -1;
    const u = ((i + 1) * 0.6180339887498949) % 1;
    let acc = 0;
    for (let k = 0; k < classes.length; k++) {
      acc += classes[k].share / totalShare;
      if (u < acc) return k;
    }
    return classes.length - 1;
  };
  const perClass = classes.map(() => ({ sent: 0, ok: 0, refused: {} as Record<string, number>, errors: {} as Record<string, number>, ttft: [] as number[], within: 0, refusalMs: [] as number[] }));
  const ttft: number[] = [];
  const predErr: number[] = [];
  const e2e: number[] = [];
  const slotWait: number[] = [];
  const errors: Record<string, number> = {};
  const perWorker: Record<string, number> = {};
  let prompt = 0;
  let cached = 0;
  let usageSeen = 0;
  let outTokens = 0;
  let sent = 0;
  let succeeded = 0;
  let inFlight = 0;
  const waiters: Array<() => void> = [];
  const cut = new AbortController();
  // Every request in flight listens on this one signal: as many listeners as --concurrency.
  setMaxListeners(0, cut.signal);
  const path = o.route === 'chat' ? '/v1/chat/completions' : '/v1/completions';
  const bodyOf = (i: number): Buffer => {
    const r = reqs[i];
    const text = r.text();
    return Buffer.from(
      JSON.stringify({
        model,
        ...(o.route === 'chat' ? { messages: [{ role: 'user', content: text }] } : { prompt: text }),
        max_tokens: r.outputTokens,
        stream: true,
        stream_options: { include_usage: true },
        ignore_eos: true,
      }),
    );
  };
  // The bodies are built before the clock starts (up to PREBUILT_BODY_BYTES; later ones when
  // sent), so building prompts and their JSON does not hold this event loop while responses
  // arrive: that delay would be counted in every TTFT and refusal time measured here.
  const prebuilt: Buffer[] = [];
  let prebuiltBytes = 0;
  for (let i = 0; i < reqs.length && reqs[i].arrivalMs <= o.durationSecs * 1000 && prebuiltBytes < PREBUILT_BODY_BYTES; i++) {
    prebuilt.push(bodyOf(i));
    prebuiltBytes += prebuilt[i].byteLength;
  }
  const loopDelay = monitorEventLoopDelay({ resolution: 10 });
  loopDelay.enable();
  const t0 = performance.now();
  const deadline = t0 + o.durationSecs * 1000;

  const one = async (i: number, scheduledAt: number) => {
    const body = prebuilt[i] ?? bodyOf(i);
    if (i < prebuilt.length) prebuilt[i] = EMPTY_BODY; // sent once: let it go
    const start = performance.now();
    slotWait.push((start - scheduledAt) / 1000);
    let first = -1;
    let usage: Usage | undefined;
    let chunks = 0;
    const k = classOf(i);
    const pc = k >= 0 ? perClass[k] : undefined;
    if (pc) pc.sent++;
    try {
      const res = await request(targets[i % targets.length] + path, { method: 'POST', dispatcher: agent, headers: k >= 0 ? { ...headers, ...classes[k].headers } : headers, body, signal: cut.signal });
      const worker = res.headers['x-kvgate-worker'];
      const predicted = Number(res.headers['x-kvgate-predicted-ttft-ms']);
      if (typeof worker === 'string') perWorker[worker] = (perWorker[worker] ?? 0) + 1;
      if (res.statusCode !== 200) {
        if (pc) {
          if (res.statusCode === 429) {
            const reason = String(res.headers['x-kvgate-dropped-reason'] ?? 'other');
            pc.refused[reason] = (pc.refused[reason] ?? 0) + 1;
            pc.refusalMs.push(performance.now() - start);
          } else pc.errors[res.statusCode] = (pc.errors[res.statusCode] ?? 0) + 1;
        }
        await res.body.dump();
        errors[res.statusCode] = (errors[res.statusCode] ?? 0) + 1;
        return;
      }
      let buf = '';
      for await (const piece of res.body) {
        buf += (piece as Buffer).toString('utf8');
        let nl: number;
        while ((nl = buf.indexOf('\n')) >= 0) {
          const line = buf.slice(0, nl).trim();
          buf = buf.slice(nl + 1);
          if (!line.startsWith('data:')) continue;
          const data = line.slice(5).trim();
          if (data === '[DONE]') continue;
          let msg: { choices?: Array<{ text?: string; delta?: { content?: string } }>; usage?: Usage | null };
          try {
            msg = JSON.parse(data);
          } catch {
            continue;
          }
          const c = msg.choices?.[0];
          if (c && (c.text || c.delta?.content)) {
            chunks++;
            if (first < 0) first = performance.now();
          }
          if (msg.usage) usage = msg.usage;
        }
      }
      const end = performance.now();
      succeeded++;
      if (first >= 0) ttft.push((first - start) / 1000);
      if (pc) {
        pc.ok++;
        if (first >= 0) {
          pc.ttft.push((first - start) / 1000);
          if (classes[k].ttftMs !== undefined && first - start <= classes[k].ttftMs!) pc.within++;
        }
      }
      if (first >= 0 && Number.isFinite(predicted) && first > start) predErr.push(Math.abs(predicted - (first - start)) / (first - start));
      e2e.push((end - start) / 1000);
      outTokens += usage?.completion_tokens ?? chunks;
      if (usage?.prompt_tokens !== undefined) {
        usageSeen++;
        prompt += usage.prompt_tokens;
        cached += usage.prompt_tokens_details?.cached_tokens ?? 0;
      }
    } catch {
      const key = cut.signal.aborted ? '-1' : '0';
      errors[key] = (errors[key] ?? 0) + 1;
      if (pc) pc.errors[key] = (pc.errors[key] ?? 0) + 1;
    }
  };

  const running: Promise<void>[] = [];
  for (let i = 0; i < reqs.length; i++) {
    const due = t0 + reqs[i].arrivalMs;
    if (due > deadline) break;
    const wait = due - performance.now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    while (inFlight >= o.concurrency) await new Promise<void>((r) => waiters.push(r));
    if (performance.now() > deadline) break;
    inFlight++;
    sent++;
    o.progress?.(Math.min(1, (performance.now() - t0) / (o.durationSecs * 1000)));
    running.push(
      one(i, due).finally(() => {
        inFlight--;
        waiters.shift()?.();
      }),
    );
  }
  const lastArrivalSecs = reqs.length > 0 ? reqs[Math.min(reqs.length, Math.max(sent, 1)) - 1].arrivalMs / 1000 : 0;
  // Ran out: every request sent, and the arrivals stopped well before the deadline (more than
  // three mean inter-arrival gaps before it, so a workload generated for the duration does not count).
  const meanGapSecs = reqs.length > 1 ? lastArrivalSecs / (reqs.length - 1) : 0;
  const ranOut = sent === reqs.length && lastArrivalSecs + 3 * meanGapSecs < o.durationSecs;
  const drain = setTimeout(() => cut.abort(), (o.drainSecs ?? 60) * 1000);
  await Promise.all(running);
  clearTimeout(drain);
  await agent.close();
  o.progress?.(1);
  const wallSecs = (performance.now() - t0) / 1000;
  loopDelay.disable();
  // The histogram holds how late each 10 ms tick fired (ns), the period included.
  const lateMs = (ns: number) => Math.max(0, ns / 1e6 - 10);
  const sorted = (xs: number[]) => Float64Array.from(xs).sort();
  const t = sorted(ttft);
  const e = sorted(e2e);
  return {
    target,
    workload: o.workload.name,
    model,
    sent,
    succeeded,
    failed: sent - succeeded,
    errors,
    hitRate: usageSeen > 0 && prompt > 0 ? cached / prompt : null,
    ttftP50: quantile(t, 0.5),
    ttftP90: quantile(t, 0.9),
    ttftP99: quantile(t, 0.99),
    e2eP50: quantile(e, 0.5),
    e2eP99: quantile(e, 0.99),
    slotWaitP90: quantile(sorted(slotWait), 0.9),
    clientLoopDelayMsP99: lateMs(loopDelay.percentile(99)),
    clientLoopDelayMsMax: lateMs(loopDelay.max),
    outputTokensPerSec: outTokens / wallSecs,
    perWorker,
    wallSecs,
    sendSecs: ranOut ? lastArrivalSecs : o.durationSecs,
    workloadRanOut: ranOut,
    ...(classes.length > 0
      ? {
          classes: classes.map((c, k): LiveClassResult => {
            const pc = perClass[k];
            const t = sorted(pc.ttft);
            const rm = sorted(pc.refusalMs);
            return { name: c.name, sent: pc.sent, ok: pc.ok, refused: pc.refused, errors: pc.errors, ttftP50: quantile(t, 0.5), ttftP90: quantile(t, 0.9), withinObjective: c.ttftMs !== undefined && pc.ok > 0 ? pc.within / pc.ok : null, refusalMsP50: quantile(rm, 0.5), refusalMsP99: quantile(rm, 0.99) };
          }),
        }
      : {}),
    ...(predErr.length > 0
      ? (() => {
          const pe = sorted(predErr);
          return { prediction: { requests: pe.length, within25Pct: pe.filter((x) => x <= 0.25).length / pe.length, medianRelError: quantile(pe, 0.5), p80RelError: quantile(pe, 0.8) } };
        })()
      : {}),
  };
}

export function liveMarkdown(r: LiveResult): string {
  const f = (x: number) => (Number.isNaN(x) ? '–' : x.toFixed(3));
  const errs = Object.entries(r.errors)
    .map(([k, v]) => `${k === '0' ? 'connection' : k === '-1' ? 'cut at end' : k}: ${v}`)
    .join(', ');
  return [
    `### live: ${r.workload} → ${r.target} (model ${r.model})`,
    '',
    '| sent | ok | failed | hit rate | TTFT p50 (s) | TTFT p90 (s) | TTFT p99 (s) | E2E p50 (s) | E2E p99 (s) | out tok/s | slot wait p90 (s) |',
    '|---|---|---|---|---|---|---|---|---|---|---|',
    `| ${r.sent} | ${r.succeeded} | ${r.failed} | ${r.hitRate === null ? '–' : `${(100 * r.hitRate).toFixed(1)}%`} | ${f(r.ttftP50)} | ${f(r.ttftP90)} | ${f(r.ttftP99)} | ${f(r.e2eP50)} | ${f(r.e2eP99)} | ${r.outputTokensPerSec.toFixed(0)} | ${f(r.slotWaitP90)} |`,
    '',
    r.workloadRanOut
      ? `The workload ran out after ${r.sendSecs.toFixed(1)} s of arrivals, before --duration-secs: give it more requests (n=, duration=).`
      : `Sent arrivals for ${r.sendSecs} s (--duration-secs).`,
    errs ? `Errors: ${errs}.` : 'No errors.',
    `Load generator's own event-loop delay: p99 ${r.clientLoopDelayMsP99.toFixed(1)} ms, max ${r.clientLoopDelayMsMax.toFixed(1)} ms (in every client-side time here).`,
    r.classes
      ? [
          '',
          '| class | sent | ok | refused (429) | other failures | TTFT p50 (s) | TTFT p90 (s) | within objective | refusal p50 / p99 (ms) |',
          '|---|---|---|---|---|---|---|---|---|',
          ...r.classes.map(
            (c) =>
              `| ${c.name} | ${c.sent} | ${c.ok} | ${Object.entries(c.refused).map(([k, v]) => `${k} ${v}`).join(', ') || '0'} | ${Object.entries(c.errors).map(([k, v]) => `${k}: ${v}`).join(', ') || '0'} | ${f(c.ttftP50)} | ${f(c.ttftP90)} | ${c.withinObjective === null ? '–' : `${(100 * c.withinObjective).toFixed(1)}%`} | ${Number.isNaN(c.refusalMsP50) ? '–' : `${c.refusalMsP50.toFixed(1)} / ${c.refusalMsP99.toFixed(1)}`} |`,
          ),
          '',
        ].join('\n')
      : '',
    r.prediction
      ? `Predicted TTFT (x-kvgate-predicted-ttft-ms) within 25% of the observed for ${(100 * r.prediction.within25Pct).toFixed(1)}% of ${r.prediction.requests} requests (relative error p50 ${(100 * r.prediction.medianRelError).toFixed(1)}%, p80 ${(100 * r.prediction.p80RelError).toFixed(1)}%).`
      : '',
    Object.keys(r.perWorker).length ? `Requests per worker: ${Object.entries(r.perWorker).map(([w, n]) => `${w} ${n}`).join(', ')}.` : '',
  ].join('\n');
}
