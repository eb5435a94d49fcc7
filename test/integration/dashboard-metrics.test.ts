// Every metric the Grafana dashboard and the Prometheus alerts query exists in /metrics of a
// running kvgate (kv_aware with KV events, engine metrics, admission, --replica-sync on a real
// nats-server), so the dashboard never silently shows "No data" because of a renamed metric.
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import YAML from 'yaml';
import { tmpdir } from 'node:os';
import { startNats, type TestNats } from '../helpers/nats.js';
import { spawnKvgate, type Spawned } from '../helpers/processes.js';

const KEYWORDS = new Set(['by', 'without', 'on', 'ignoring', 'group_left', 'group_right', 'and', 'or', 'unless', 'offset', 'bool', 'inf', 'nan']);

/** Metric names a PromQL expression selects: identifiers that are not functions, keywords, labels or durations. */
export function metricNames(expr: string): string[] {
  let s = expr
    .replace(/"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'/g, '""') // string literals
    .replace(/\{[^}]*\}/g, ' ') // label matchers
    .replace(/\[[^\]]*\]/g, ' ') // range and subquery durations
    .replace(/\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)/g, ' '); // label lists
  s = s.replace(/\boffset\s+\S+/g, ' ');
  const out = new Set<string>();
  const re = /[a-zA-Z_:][a-zA-Z0-9_:]*/g;
  let m: RegExpExecArray | null;
  while ((m = re.exec(s))) {
    const prev = s[m.index - 1];
    if (prev !== undefined && /[0-9.]/.test(prev)) continue; // 5m, 1e3, 0.5
    const rest = s.slice(m.index + m[0].length);
    if (/^\s*\(/.test(rest)) continue; // function or aggregation
    if (KEYWORDS.has(m[0].toLowerCase())) continue;
    out.add(m[0]);
  }
  return [...out];
}

function dashboardExprs(): string[] {
  const d = JSON.parse(readFileSync('deploy/grafana/kvgate.json', 'utf8'));
  const exprs: string[] = [];
  const walk = (panels: any[]) => {
    for (const p of panels) {
      for (const t of p.targets ?? []) exprs.push(t.expr);
      if (p.panels) walk(p.panels);
    }
  };
  walk(d.panels);
  for (const v of d.templating?.list ?? []) if (typeof v.query === 'string' && v.query.startsWith('label_values(')) exprs.push(v.query.slice('label_values('.length).split(',')[0]);
  return exprs;
}

function alertExprs(): string[] {
  const doc = YAML.parse(readFileSync('deploy/prometheus/alerts.yaml', 'utf8'));
  return doc.groups.flatMap((g: any) => g.rules.map((r: any) => String(r.expr)));
}

/** Metric families in a /metrics text, with the series names each one exposes. */
function families(text: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const m of text.matchAll(/^# TYPE (\S+) (\S+)$/gm)) out.set(m[1], m[2]);
  return out;
}
function exposes(fams: Map<string, string>, name: string): boolean {
  if (fams.has(name)) return true;
  const base = name.replace(/_(bucket|sum|count)$/, '');
  return base !== name && (fams.get(base) === 'histogram' || fams.get(base) === 'summary');
}

describe('the PromQL metric-name parser', () => {
  it('finds metric names and skips functions, labels, keywords and durations', () => {
    expect(metricNames('histogram_quantile(0.95, sum by (le, worker) (rate(kvgate_ttft_seconds_bucket{job=~"$job"}[5m])))')).toEqual(['kvgate_ttft_seconds_bucket']);
    expect(metricNames('a_total / on (job) b offset 1h and c{x="y z"} > 0.5 * d_total[1h:5m]').sort()).toEqual(['a_total', 'b', 'c', 'd_total']);
    expect(metricNames('rate(x[1m]) unless ignoring(worker) y')).toEqual(['x', 'y']);
  });
});

const running: Spawned[] = [];
let nats: TestNats;
let url = '';

beforeAll(async () => {
  nats = await startNats();
  const sims: string[] = [];
  const events: string[] = [];
  for (let i = 0; i < 2; i++) {
    // KV events over a local IPC socket (the engine binds it; no network address involved).
    const ev = `ipc://${tmpdir()}/kvgate-dashboard-metrics-${process.pid}-${i}.sock`;
    const s = await spawnKvgate(['sim', '--host', '127.0.0.1', '--port', '0', '--seed', String(i + 1), '--speed', '20', '--kv-events-endpoint', ev], /listening on (http:\/\/\S+)/);
    running.push(s);
    sims.push(s.match[1]);
    events.push(ev);
  }
  const gw = await spawnKvgate(
    [
      'serve',
      '--host', '127.0.0.1',
      '--port', '0',
      '--policy', 'kv_aware',
      '--worker-urls', ...sims,
      '--kv-events-endpoints', ...events,
      '--health-check-interval-secs', '0.5',
      '--engine-metrics-interval-secs', '0.5',
      '--max-concurrent-requests', '8',
      '--replica-sync', nats.url,
      '--replica-heartbeat-ms', '200',
      '--replica-expiry-secs', '2',
    ],
    /"url":"(http:\/\/[^"]+)"[^\n]*kvgate listening/,
  );
  running.push(gw);
  url = gw.match[1];
  for (let i = 0; i < 30 && (await fetch(url + '/readiness')).status !== 200; i++) await new Promise((r) => setTimeout(r, 100));
  for (let i = 0; i < 8; i++) {
    const r = await fetch(url + '/v1/chat/completions', {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'kvgate-sim', messages: [{ role: 'system', content: 'Shared system prompt for metrics. '.repeat(20) }, { role: 'user', content: `q${i}` }], max_tokens: 4, stream: i % 2 === 0, stream_options: i % 2 === 0 ? { include_usage: true } : undefined }),
    });
    await r.text();
  }
}, 60_000);

afterAll(async () => {
  await Promise.all(running.map((p) => p.stop()));
  await nats?.kill('SIGTERM');
});

describe('deploy/grafana/kvgate.json and deploy/prometheus/alerts.yaml', () => {
  it('every metric the dashboard and the alerts query exists in /metrics of a running kvgate', async () => {
    const text = await (await fetch(url + '/metrics')).text();
    const fams = families(text);
    const dash = dashboardExprs();
    const alerts = alertExprs();
    expect(dash.length).toBeGreaterThan(20);
    expect(alerts.length).toBe(5);
    const names = new Set([...dash, ...alerts].flatMap(metricNames));
    expect(names.size).toBeGreaterThan(25);
    const missing = [...names].filter((n) => !exposes(fams, n));
    expect(missing).toEqual([]);
    // And the latency and token series have samples after traffic.
    for (const n of ['kvgate_ttft_seconds_bucket', 'kvgate_itl_seconds_bucket', 'kvgate_prompt_tokens_total', 'kvgate_replica_peers', 'kvgate_kv_last_event_age_seconds', 'kvgate_kv_event_lag_seconds', 'kvgate_kv_events_applied_total', 'nodejs_eventloop_lag_p99_seconds']) {
      expect(text).toMatch(new RegExp(`^${n}[{ ]`, 'm'));
    }
  });
});
