import type { ManualClock } from '../core/clock.js';
import { WorkerRegistry } from '../core/registry.js';
import { Worker, type WorkerType } from '../core/worker.js';
import type { RoutingPolicy, RoutingShare } from '../policies/policy.js';
import { MemoryBus } from '../sync/memory-transport.js';
import { ReplicaSync } from '../sync/replica-sync.js';
import { queueScheduler, type EventQueue, type LabEvent } from './event-queue.js';

/**
 * Router replicas in the lab: R kvgate replicas behind a round-robin front (arrival i goes to
 * replica i mod R), each with its own worker registry (its own Worker objects for the same
 * engines: same ids and URLs, so in-flight loads are per replica view), its own policy instance,
 * and, with sync on, its own ReplicaSync — the same code `kvgate serve --replica-sync` runs —
 * over one in-memory bus whose messages arrive `syncDelayMs` later on the lab's event queue.
 *
 * The delay models network plus batching: each replica flushes what it recorded every
 * LAB_SYNC_FLUSH_MS (1 ms, so the delay given is nearly all of the lag a peer sees), and a message
 * reaches every peer `syncDelayMs` after it was sent. Heartbeats, snapshot waits and state
 * requests run on the event queue too, against the lab's virtual clock.
 */

/** Flush interval of each lab replica's sync (ms); the configured delay is the rest of the lag. */
export const LAB_SYNC_FLUSH_MS = 1;

export interface RouterReplica {
  index: number;
  registry: WorkerRegistry;
  /** This replica's Worker object for each engine, in engine order. */
  workers: Worker[];
  engineOf: Map<Worker, number>;
  policy: RoutingPolicy;
  sync?: ReplicaSync;
}

export interface RouterReplicasOptions {
  count: number;
  /** Delivery delay of the sync bus (ms), or 'off': replicas share nothing. */
  syncDelayMs: number | 'off';
  queue: EventQueue<LabEvent>;
  clock: ManualClock;
  /** One worker per engine, in engine order (url, type); every replica registers the same list. */
  workerSpecs: ReadonlyArray<{ url: string; type?: WorkerType }>;
  /**
   * Builds replica r's policy. `share` is the replica's RoutingShare when sync is on (read it
   * lazily: the sync is created after the policy, as in the server).
   */
  makePolicy(r: number, share: () => RoutingShare | undefined): RoutingPolicy;
}

export interface RouterReplicas {
  replicas: RouterReplica[];
  bus?: MemoryBus;
  /** The replica that routes arrival i. */
  front(i: number): RouterReplica;
  /**
   * Stops every replica's sync (heartbeats, flush timers). Call when the workload is done.
   * ReplicaSync.close() is async: until the caller yields to the event loop, its pending
   * continuation keeps the sync (chunk dictionary, policies' trees) alive. A caller that runs
   * many clusters should yield between runs (runBench does).
   */
  close(): void;
}

/** One-shot and periodic timers on the lab's event queue (replica sync's `timers`). */
export function labTimers(queue: EventQueue<LabEvent>, clock: { now(): number }) {
  return {
    once(ms: number, fn: () => void): () => void {
      const cancelled = { v: false };
      queue.push(clock.now() + ms, {
        kind: 'deliver',
        fn: () => {
          if (!cancelled.v) fn();
        },
      });
      return () => {
        cancelled.v = true;
      };
    },
    every: queueScheduler(queue, clock),
  };
}

export function buildRouterReplicas(o: RouterReplicasOptions): RouterReplicas {
  if (!Number.isInteger(o.count) || o.count < 1) throw new RangeError(`lab: router replicas must be an integer >= 1 (got ${o.count})`);
  const syncOn = o.count > 1 && o.syncDelayMs !== 'off';
  if (syncOn && !((o.syncDelayMs as number) >= 0)) throw new RangeError(`lab: the replica sync delay must be >= 0 ms or 'off' (got ${o.syncDelayMs})`);
  // One replica has no peers: no sync at all, so a one-replica run is today's run exactly.
  const bus = syncOn ? new MemoryBus((ms, fn) => o.queue.push(o.clock.now() + ms, { kind: 'deliver', fn }), o.syncDelayMs as number) : undefined;
  const timers = labTimers(o.queue, o.clock);
  const replicas: RouterReplica[] = [];
  for (let r = 0; r < o.count; r++) {
    const registry = new WorkerRegistry();
    const workers = o.workerSpecs.map((s) => {
      const w = new Worker({ url: s.url, modelId: 'lab', type: s.type });
      w.healthy = true;
      return registry.add(w);
    });
    const engineOf = new Map<Worker, number>(workers.map((w, i) => [w, i]));
    const replica: RouterReplica = { index: r, registry, workers, engineOf, policy: undefined as unknown as RoutingPolicy };
    let share: RoutingShare | undefined;
    replica.policy = o.makePolicy(r, () => share);
    if (bus) {
      const sync = new ReplicaSync(
        bus.transport(),
        { registry, policies: new Map([['main', replica.policy]]), clock: o.clock, wallNow: () => o.clock.now(), timers },
        { replicaId: `replica-${r}`, flushMs: LAB_SYNC_FLUSH_MS },
      );
      share = sync.shareFor('main');
      replica.sync = sync;
    }
    replicas.push(replica);
  }
  // Every replica starts at time 0, so no one has a snapshot to wait for: each goes on after
  // 1.5 heartbeats (on the event queue) and routes on its own state meanwhile, as in the server.
  for (const r of replicas) r.sync?.start();
  return {
    replicas,
    bus,
    front: (i) => replicas[i % replicas.length],
    close() {
      for (const r of replicas) {
        r.policy.close?.();
        void r.sync?.close();
      }
    },
  };
}
