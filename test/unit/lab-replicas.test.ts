import { describe, expect, it } from 'vitest';
import { ManualClock } from '../../src/core/clock.js';
import type { RequestContext } from '../../src/core/context.js';
import { SeededRng } from '../../src/core/rng.js';
import { EventQueue, type LabEvent } from '../../src/lab/event-queue.js';
import { buildRouterReplicas } from '../../src/lab/replicas.js';
import { CacheAwarePolicy } from '../../src/policies/cache-aware.js';

/** Runs the lab's queue up to `until` (ms), as runEventLoop does between arrivals. */
function runUntil(queue: EventQueue<LabEvent>, clock: ManualClock, until: number): void {
  while (queue.peekTime() <= until) {
    const { time, item } = queue.pop()!;
    clock.set(Math.max(clock.now(), time));
    if (item.kind === 'timer') {
      if (item.cancelled.v) continue;
      item.fn();
      queue.push(clock.now() + item.everyMs, item);
    } else if (item.kind === 'deliver') item.fn();
  }
  clock.set(until);
}

const ctx = (text: string, id: string): RequestContext => ({ requestId: id, route: 'completions', model: 'lab', routingText: text, headers: {}, stream: true, arrivalMs: 0 });

function setup(delay: number | 'off') {
  const clock = new ManualClock(0);
  const queue = new EventQueue<LabEvent>();
  const routers = buildRouterReplicas({
    count: 3,
    syncDelayMs: delay,
    queue,
    clock,
    workerSpecs: [0, 1, 2, 3].map((i) => ({ url: `http://engine-${i}.lab` })),
    makePolicy: (_r, share) =>
      new CacheAwarePolicy({
        clock,
        rng: new SeededRng(1),
        get share() {
          return share();
        },
      }),
  });
  return { clock, queue, routers };
}

describe('lab router replicas (replicas.ts)', () => {
  it('replicas starting together all get past the snapshot wait, and see each other', () => {
    const { clock, queue, routers } = setup(5);
    runUntil(queue, clock, 2000);
    for (const r of routers.replicas) {
      expect(r.sync!.syncState).toBe('synced');
      expect(r.sync!.peerCount).toBe(2);
    }
    expect(routers.front(0)).toBe(routers.replicas[0]);
    expect(routers.front(4)).toBe(routers.replicas[1]);
    routers.close();
    for (const r of routers.replicas) expect(r.sync!.syncState).toBe('closed');
  });

  it("a peer learns a routing decision and a load the sync delay later, not before", () => {
    const { clock, queue, routers } = setup(5);
    runUntil(queue, clock, 2000);
    const [a, b] = routers.replicas;
    const prompt = 'system prompt of one group. '.repeat(40);
    const w = a.policy.selectWorker(a.workers, ctx(prompt + 'q1', 'r1'))!;
    const guard = w.acquire();
    // Flushed after 1 ms, delivered 5 ms later: at +5 ms b does not know yet, at +6 ms it does.
    runUntil(queue, clock, 2005);
    expect(b.workers[a.engineOf.get(w)!].load).toBe(0);
    runUntil(queue, clock, 2006);
    const onB = b.workers[a.engineOf.get(w)!];
    expect(onB.load).toBe(1);
    expect(onB.localLoad).toBe(0);
    // On b that worker is now the busiest (peer load 1): only the shared tree sends the group there.
    expect(b.policy.selectWorker(b.workers, ctx(prompt + 'q2', 'r2'))!.id).toBe(w.id);
    guard.release();
    runUntil(queue, clock, 2020);
    expect(onB.load).toBe(0);
    routers.close();
  });

  it("with sync off the replicas share nothing", () => {
    const { clock, queue, routers } = setup('off');
    expect(routers.bus).toBeUndefined();
    const [a, b] = routers.replicas;
    const w = a.workers[2];
    w.acquire();
    runUntil(queue, clock, 5000);
    expect(b.workers[2].load).toBe(0);
    expect(routers.replicas.every((r) => r.sync === undefined)).toBe(true);
  });
});
