#!/usr/bin/env node
// Router replicas in the policy lab: every policy with R = 1, 2, 4, 8 router replicas behind a
// round-robin front, with replica sync (delay 5 ms) and without, on the Mooncake synthetic trace
// and the shared-prefix generator (128 groups), 8 engines, seed 1 — the table of
// docs/benchmarks.md ("Router replicas").
//
//   npx tsc -p tsconfig.json && npm run bench:replicas [-- --workloads mooncake,shared-prefix]
//        [--policies cache_aware,kv_aware] [--replicas 1,2,4,8] [--delay 5] [--out bench-out/replicas]
//
// Each row is the run `kvgate bench --workload W --workers 8 --policies P --router-replicas R
// --replica-sync-delay-ms D|off` makes for policy P (runs are deterministic and independent of
// the other policies in one invocation). Runs are sequential (the machine is shared). Rows are
// appended to OUT/results.jsonl as they finish; a rerun skips rows already there (delete the
// file to start over). OUT/table.md is written at the end.

import { spawnSync } from 'node:child_process';
import { appendFileSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const dist = (p) => {
  const f = join(ROOT, 'dist', p);
  if (!existsSync(f)) {
    console.error(`${f} is missing: run \`npx tsc -p tsconfig.json\` first`);
    process.exit(1);
  }
  return import(pathToFileURL(f).href);
};
const { runCluster } = await dist('lab/cluster.js');
const { summarise } = await dist('lab/report.js');
const { loadWorkload } = await dist('lab/workloads/index.js');
const { benchOptionSpecs, benchPolicyOptions } = await dist('cli/bench-command.js');
const { resolveOptions } = await dist('config/options.js');
const { engineConfigFrom } = await dist('config/engine-options.js');
const { POLICY_NAMES } = await dist('policies/factory.js');

const args = process.argv.slice(2);
const opt = (name, def) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : def;
};

// The workloads of docs/benchmarks.md §1.1 (rate-scale 1) and §1.3 (10 req/s), paths relative to the repository root.
const WORKLOADS = {
  mooncake: { spec: 'mooncake:../shared/data/mooncake/synthetic_trace.jsonl', rateScale: 1 },
  'shared-prefix': { spec: 'shared-prefix:groups=128,system=6000,users=8,question=200,output=100,fresh=1,n=6000', rps: 10 },
};
const workloads = opt('workloads', 'mooncake,shared-prefix').split(',');
const policies = opt('policies', POLICY_NAMES.join(',')).split(',');
const replicas = opt('replicas', '1,2,4,8').split(',').map(Number);
const delay = Number(opt('delay', '5'));
const out = opt('out', join(ROOT, 'bench-out/replicas'));
const seed = 1;
const workers = 8;

mkdirSync(out, { recursive: true });
const resultsFile = join(out, 'results.jsonl');
const done = new Map();
if (existsSync(resultsFile)) {
  for (const line of readFileSync(resultsFile, 'utf8').split('\n')) {
    if (!line.trim()) continue;
    const r = JSON.parse(line);
    done.set(`${r.workload}|${r.policy}|${r.replicas}|${r.sync}`, r);
  }
}

// Defaults exactly as `kvgate bench` resolves them (no flags, no KVGATE_ environment).
const defaults = resolveOptions(benchOptionSpecs, {}, {});
const engine = engineConfigFrom(defaults);
const policyOptions = benchPolicyOptions(defaults);
const lab = { kvEventDelayMs: defaults.kvEventDelayMs, metricsIntervalMs: defaults.metricsIntervalMs, metricsDelayMs: defaults.metricsDelayMs };

/** One row, run in this process (the parent runs each row in a fresh child: heaps stay small). */
function runRow(wname, policy, R, sync) {
  const w = WORKLOADS[wname];
  const spec = w.spec.replace('../shared/', join(ROOT, '..', 'shared') + '/');
  const wl = loadWorkload(spec, { seed, rateScale: w.rateScale, rps: w.rps });
  const t0 = Date.now();
  const run = runCluster(wl.requests, { workers, policy, policyOptions, engine, seed, ...lab, routerReplicas: R, replicaSyncDelayMs: sync });
  const s = summarise(run, w.rateScale ?? w.rps);
  return {
    workload: wname,
    policy,
    replicas: R,
    sync,
    requests: s.requests,
    hitRate: s.hitRate,
    ttftP50: s.ttftP50,
    ttftP90: s.ttftP90,
    ttftP99: s.ttftP99,
    syncBytesPerRequest: s.syncBytesPerRequest,
    syncMessages: run.replicas?.sync?.messages ?? null,
    wallSecs: (Date.now() - t0) / 1000,
    heapMB: Math.round(process.memoryUsage().heapUsed / 1e6),
  };
}

const one = args.indexOf('--one');
if (one >= 0) {
  const [wname, policy, R, sync] = args.slice(one + 1, one + 5);
  process.stdout.write(JSON.stringify(runRow(wname, policy, Number(R), sync === 'off' ? 'off' : Number(sync))) + '\n');
  process.exit(0);
}

const started = Date.now();
for (const wname of workloads) {
  const w = WORKLOADS[wname];
  if (!w) throw new Error(`unknown workload '${wname}' (expected ${Object.keys(WORKLOADS).join(', ')})`);
  const wStart = Date.now();
  for (const policy of policies) {
    for (const R of replicas) {
      for (const sync of R === 1 ? ['off'] : [delay, 'off']) {
        const key = `${wname}|${policy}|${R}|${sync}`;
        if (done.has(key)) continue;
        const child = spawnSync(process.execPath, ['--max-old-space-size=12288', fileURLToPath(import.meta.url), '--one', wname, policy, String(R), String(sync)], {
          encoding: 'utf8',
          stdio: ['ignore', 'pipe', 'inherit'],
        });
        if (child.status !== 0) throw new Error(`${key}: the run failed (exit ${child.status ?? child.signal})`);
        const row = JSON.parse(child.stdout.trim().split('\n').pop());
        appendFileSync(resultsFile, JSON.stringify(row) + '\n');
        done.set(key, row);
        console.error(`${wname} ${policy} R=${R} sync=${sync}: hit ${(100 * row.hitRate).toFixed(1)}% TTFT p90 ${row.ttftP90.toFixed(3)} s (${row.wallSecs.toFixed(1)} s, heap ${row.heapMB} MB)`);
      }
    }
  }
  console.error(`${wname}: ${((Date.now() - wStart) / 1000).toFixed(0)} s`);
}
console.error(`total: ${((Date.now() - started) / 1000).toFixed(0)} s`);

// ---- Table -------------------------------------------------------------------------------------
const pct = (x) => `${(100 * x).toFixed(1)}%`;
const secs = (x) => (Number.isNaN(x) || x === null ? '–' : x < 10 ? x.toFixed(3) : x.toFixed(1));
const md = [];
for (const wname of workloads) {
  md.push(`#### ${wname === 'mooncake' ? 'Mooncake synthetic trace' : 'Shared-prefix generator, 128 groups'} — ${workers} engines, seed ${seed}\n`);
  md.push('| policy | replicas | sync | hit rate | of R=1 | TTFT p50 (s) | TTFT p90 (s) | p90 vs R=1 | sync B/req |');
  md.push('|---|---|---|---|---|---|---|---|---|');
  for (const policy of policies) {
    const one = done.get(`${wname}|${policy}|1|off`);
    for (const R of replicas) {
      for (const sync of R === 1 ? ['off'] : [delay, 'off']) {
        const r = done.get(`${wname}|${policy}|${R}|${sync}`);
        if (!r) continue;
        const of = one && one.hitRate > 0 ? pct(r.hitRate / one.hitRate) : '–';
        const p90 = one && one.ttftP90 > 0 ? `${(r.ttftP90 / one.ttftP90).toFixed(2)}×` : '–';
        const syncLabel = R === 1 ? '–' : sync === 'off' ? 'off' : `${sync} ms`;
        const bytes = r.syncBytesPerRequest === null ? '–' : r.syncBytesPerRequest.toFixed(0);
        md.push(`| ${policy} | ${R} | ${syncLabel} | ${pct(r.hitRate)} | ${of} | ${secs(r.ttftP50)} | ${secs(r.ttftP90)} | ${p90} | ${bytes} |`);
      }
    }
  }
  md.push('');
}
writeFileSync(join(out, 'table.md'), md.join('\n'));
process.stdout.write(md.join('\n') + '\n');
