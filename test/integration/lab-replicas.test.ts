import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { runCluster, type ClusterConfig } from '../../src/lab/cluster.js';
import { summarise } from '../../src/lab/report.js';
import { loadWorkload } from '../../src/lab/workloads/index.js';

// Many groups, each a long system prompt, few engines: where each group lands decides the hit rate.
const SPEC = 'shared-prefix:groups=48,system=2000,users=4,question=100,output=20,fresh=1,n=480';
const requests = loadWorkload(SPEC, { seed: 1, rps: 20 }).requests;

function run(policy: string, extra: Partial<ClusterConfig> = {}) {
  const r = runCluster(requests, { workers: 4, policy, engine: { numGpuBlocks: 2000 }, seed: 1, ...extra });
  return { run: r, summary: summarise(r, 20) };
}
const strip = (s: ReturnType<typeof summarise>) => JSON.stringify({ ...s, wallSecs: 0 });

describe('lab: router replicas', () => {
  it('one replica is the run without replicas (no sync, same numbers)', () => {
    const plain = run('cache_aware');
    const one = run('cache_aware', { routerReplicas: 1, replicaSyncDelayMs: 5 });
    expect(strip(one.summary)).toBe(strip(plain.summary));
    expect(one.run.replicas).toEqual({ count: 1, syncDelayMs: 'off' });
  });

  it('cache_aware: 4 replicas without sync lose hit rate; with sync (5 ms) they keep it', () => {
    const one = run('cache_aware').summary;
    const unsynced = run('cache_aware', { routerReplicas: 4, replicaSyncDelayMs: 'off' });
    const synced = run('cache_aware', { routerReplicas: 4, replicaSyncDelayMs: 5 });
    expect(one.hitRate).toBeGreaterThan(0.6);
    // Each replica places each group on its own least-loaded engine: the prompts are cached
    // several times over and evict each other.
    expect(unsynced.summary.hitRate).toBeLessThan(one.hitRate - 0.1);
    expect(unsynced.run.replicas?.sync).toBeUndefined();
    expect(synced.summary.hitRate).toBeGreaterThan(one.hitRate - 0.03);
    // Sync traffic was measured: the first request of a group ships its prompt, later ones a
    // chunk reference and their own suffix.
    const sync = synced.run.replicas!.sync!;
    expect(sync.routedRecords).toBe(requests.length);
    expect(synced.summary.syncBytesPerRequest).toBeGreaterThan(100);
    expect(synced.summary.syncBytesPerRequest).toBeLessThan(10_000);
  });

  it('kv_aware with 4 synced replicas stays near one replica', () => {
    const one = run('kv_aware').summary;
    const synced = run('kv_aware', { routerReplicas: 4, replicaSyncDelayMs: 5 }).summary;
    expect(synced.hitRate).toBeGreaterThan(one.hitRate - 0.03);
  });

  it('is deterministic with replicas (same seed, same numbers), and the seed matters', () => {
    const a = run('power_of_two', { routerReplicas: 3, replicaSyncDelayMs: 5 }).summary;
    const b = run('power_of_two', { routerReplicas: 3, replicaSyncDelayMs: 5 }).summary;
    expect(strip(a)).toBe(strip(b));
    const c = runCluster(requests, { workers: 4, policy: 'power_of_two', engine: { numGpuBlocks: 2000 }, seed: 2, routerReplicas: 3, replicaSyncDelayMs: 5 });
    expect(strip(summarise(c, 20))).not.toBe(strip(a));
  });

  it('kvgate bench --router-replicas records the setting and the sync traffic in report.json', () => {
    const out = mkdtempSync(join(tmpdir(), 'kvgate-replicas-'));
    const stdout = execFileSync(
      process.execPath,
      ['dist/cli/main.js', 'bench', '--workload', 'shared-prefix:groups=16,system=500,users=2,n=64', '--rps', '20', '--workers', '4', '--policies', 'cache_aware', '--router-replicas', '2', '--replica-sync-delay-ms', '5', '--quiet', '--out', out],
      { encoding: 'utf8' },
    );
    expect(stdout).toContain('2 router replicas (sync delay 5 ms)');
    expect(stdout).toContain('sync B/req');
    const report = JSON.parse(readFileSync(join(out, 'report.json'), 'utf8'));
    expect(report.router_replicas).toBe(2);
    expect(report.replica_sync_delay_ms).toBe(5);
    const row = report.rows.find((r: { policy: string }) => r.policy === 'cache_aware');
    expect(row.routerReplicas).toBe(2);
    expect(row.syncBytesPerRequest).toBeGreaterThan(0);
    let err = '';
    try {
      execFileSync(process.execPath, ['dist/cli/main.js', 'bench', '--workload', 'random:n=10', '--router-replicas', '2', '--replica-sync-delay-ms', 'soon'], { encoding: 'utf8', stdio: 'pipe' });
    } catch (e) {
      err = String((e as { stderr: string }).stderr);
    }
    expect(err).toContain("expected a number of ms >= 0 or 'off'");
    err = '';
    try {
      execFileSync(process.execPath, ['dist/cli/main.js', 'bench', '--workload', 'random:n=10', '--router-replicas', '2', '--prefill-workers', '1', '--decode-workers', '1'], { encoding: 'utf8', stdio: 'pipe' });
    } catch (e) {
      err = String((e as { stderr: string }).stderr);
    }
    expect(err).toContain('--router-replicas > 1 is not modelled with PD rows');
  });
});
