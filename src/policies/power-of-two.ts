import type { RequestContext } from '../core/context.js';
import type { Worker } from '../core/worker.js';
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
}
