import type { RequestContext } from '../core/context.js';
import type { Worker } from '../core/worker.js';
import { describeAll, noneAvailable, type RouteExplanation } from './explain.js';
import { available, BasePolicy } from './policy.js';

/** Two distinct random available workers; the one with fewer in-flight requests wins (ties: first pick). */
export class PowerOfTwoPolicy extends BasePolicy {
  readonly name = 'power_of_two';
  selectWorker(candidates: readonly Worker[], _ctx: RequestContext): Worker | undefined {
    const ws = available(candidates);
    if (ws.length === 0) return undefined;
    if (ws.length === 1) return ws[0];
    const i = this.deps.rng.int(ws.length);
    let j = this.deps.rng.int(ws.length - 1);
    if (j >= i) j++;
    const a = ws[i];
    const b = ws[j];
    return b.load < a.load ? b : a;
  }

  /**
   * Loads, and each worker's exact probability of being chosen: over the n(n−1) equally likely
   * ordered draws (a, b), b wins when its load is lower, else a (computed for up to 256 workers).
   */
  explain(candidates: readonly Worker[], _ctx: RequestContext): RouteExplanation {
    const described = describeAll(candidates, this.deps.clock.now());
    const ws = available(candidates);
    if (ws.length === 0) return noneAvailable(this.name, described);
    const n = ws.length;
    const byId = new Map(described.map((c) => [c.worker, c]));
    if (n === 1) {
      byId.get(ws[0].id)!.probability = 1;
      return { policy: this.name, chosen: ws[0].id, rule: 'only_available', detail: 'one available worker', deterministic: true, candidates: described };
    }
    if (n <= 256) {
      const wins = new Array<number>(n).fill(0);
      for (let a = 0; a < n; a++) for (let b = 0; b < n; b++) if (a !== b) wins[ws[b].load < ws[a].load ? b : a]++;
      for (let k = 0; k < n; k++) byId.get(ws[k].id)!.probability = wins[k] / (n * (n - 1));
    }
    return { policy: this.name, chosen: undefined, rule: 'power_of_two', detail: `two random picks among ${n} available workers; the one with fewer in-flight requests wins`, deterministic: false, candidates: described };
  }
}
