import type { RequestContext } from '../core/context.js';
import type { Worker } from '../core/worker.js';
import { available, BasePolicy } from './policy.js';

/** Uniform choice over available workers. */
export class RandomPolicy extends BasePolicy {
  readonly name = 'random';
  selectWorker(candidates: readonly Worker[], _ctx: RequestContext): Worker | undefined {
    const ws = available(candidates);
    if (ws.length === 0) return undefined;
    return ws[this.deps.rng.int(ws.length)];
  }
}
