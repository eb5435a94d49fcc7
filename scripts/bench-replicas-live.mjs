// Live replica benchmark: kvgate replicas behind a round-robin front (kvgate bench --live with
// several --target URLs) over 4 `kvgate sim` engines, on the shared-prefix workload; the
// engines' own usage reports give the hit rate. Modes: 1 replica; R replicas with
// --replica-sync over a real nats-server; R replicas without it. Fresh engines per mode.
//
//   npm run bench:replicas:live [-- --replicas 4 --duration 30 --rps 20 --policy cache_aware]
//
// Needs nats-server (Debian package; scripts/setup-test-deps.sh installs it). Loopback only.
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const args = process.argv.slice(2);
const opt = (name, def) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : def;
};
const R = Number(opt('replicas', 4));
const duration = Number(opt('duration', 30));
const rps = Number(opt('rps', 20));
const policy = opt('policy', 'cache_aware');
const workload = opt('workload', 'shared-prefix:groups=32,system=1000,users=8,question=50,output=20,fresh=1');
const engineArgs = ['--num-gpu-blocks', opt('num-gpu-blocks', '3000')];

const { findNatsServer, NatsServer } = await import('../dist/processes/nats-server.js');
const natsBin = findNatsServer();

const procs = [];
function start(cmd, argv, ready) {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, argv, { stdio: ['ignore', 'pipe', 'pipe'] });
    procs.push(child);
    let out = '';
    const timer = setTimeout(() => reject(new Error(`${argv[0]} not ready:\n${out}`)), 20_000);
    const on = (d) => {
      out += d;
      const m = ready ? out.match(ready) : [''];
      if (m) {
        clearTimeout(timer);
        resolve({ child, match: m });
      }
    };
    child.stdout.on('data', on);
    child.stderr.on('data', on);
    child.once('exit', (c) => reject(new Error(`${argv[0]} exited ${c}:\n${out}`)));
  });
}
const kvgate = (argv, ready) => start(process.execPath, ['dist/cli/main.js', ...argv], ready);
const natsServers = [];
async function stopAll() {
  await Promise.all(natsServers.splice(0).map((n) => n.kill('SIGTERM')));
  await Promise.all(
    procs.splice(0).map(
      (c) =>
        new Promise((r) => {
          if (c.exitCode !== null) return r();
          c.once('exit', r);
          c.kill('SIGTERM');
        }),
    ),
  );
}
process.on('SIGINT', () => void stopAll().then(() => process.exit(1)));

async function waitReady(url) {
  for (let i = 0; i < 200; i++) {
    try {
      if ((await fetch(url + '/readiness')).status === 200) return;
    } catch {}
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`${url} never ready`);
}

async function mode(name, replicas, sync) {
  const sims = await Promise.all([1, 2, 3, 4].map((s) => kvgate(['sim', '--host', '127.0.0.1', '--port', '0', '--seed', String(s), ...engineArgs], /listening on (http:\/\/\S+)/)));
  const simUrls = sims.map((s) => s.match[1]);
  let natsUrl;
  if (sync) {
    const nats = await NatsServer.start({ bin: natsBin, host: '127.0.0.1', port: 0 });
    natsServers.push(nats);
    natsUrl = nats.url;
  }
  const urls = [];
  for (let i = 0; i < replicas; i++) {
    const r = await kvgate(
      ['serve', '--host', '127.0.0.1', '--port', '0', '--worker-urls', ...simUrls, '--policy', policy, ...(sync ? ['--replica-sync', natsUrl] : [])],
      /"url":"(http:\/\/[^"]+)"[^\n]*kvgate listening/,
    );
    urls.push(r.match[1]);
  }
  await Promise.all(urls.map(waitReady));
  const out = mkdtempSync(join(tmpdir(), 'kvgate-replicas-'));
  await new Promise((resolve, reject) => {
    const c = spawn(process.execPath, ['dist/cli/main.js', 'bench', '--live', '--target', urls.join(','), '--workload', workload, '--rps', String(rps), '--duration-secs', String(duration), '--route', 'chat', '--quiet', '--out', out], { stdio: ['ignore', 'ignore', 'inherit'] });
    c.once('exit', (code) => (code === 0 ? resolve() : reject(new Error(`bench exited ${code}`))));
  });
  const rep = JSON.parse(readFileSync(join(out, 'live-report.json'), 'utf8'));
  rmSync(out, { recursive: true, force: true });
  let bytesPerRequest = null;
  if (sync) {
    const st = await (await fetch(urls[0] + '/replicas')).json();
    bytesPerRequest = st.bytes_per_routed_request;
  }
  await stopAll();
  return { name, replicas, sync, hitRate: rep.hitRate, ttftP50: rep.ttftP50, ttftP90: rep.ttftP90, sent: rep.sent, failed: rep.failed, bytesPerRequest };
}

const rows = [];
try {
  rows.push(await mode('1 replica', 1, false));
  rows.push(await mode(`${R} replicas, --replica-sync`, R, true));
  rows.push(await mode(`${R} replicas, no sync`, R, false));
} finally {
  await stopAll();
}
const base = rows[0].hitRate;
console.log(`\n${policy}, ${workload}, ${rps} req/s for ${duration} s, 4 kvgate sim engines (${engineArgs.join(' ')})\n`);
console.log('| front | hit rate (engine-reported) | of 1 replica | TTFT p50 | TTFT p90 | requests | failed | sync bytes/request |');
console.log('|---|---|---|---|---|---|---|---|');
for (const r of rows) {
  console.log(
    `| ${r.name} | ${(r.hitRate * 100).toFixed(1)}% | ${((r.hitRate / base) * 100).toFixed(1)}% | ${(r.ttftP50 * 1000).toFixed(0)} ms | ${(r.ttftP90 * 1000).toFixed(0)} ms | ${r.sent} | ${r.failed} | ${r.bytesPerRequest ?? '–'} |`,
  );
}
