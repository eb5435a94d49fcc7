import type { RequestContext } from '../core/context.js';
import type { Worker } from '../core/worker.js';
import { available, BasePolicy } from './policy.js';

/** Cycles through the available workers in registration order, skipping unavailable ones. */
export class RoundRobinPolicy extends BasePolicy {
  readonly name = 'round_robin';
  private counter = 0;
  selectWorker(candidates: readonly Worker[], _ctx: RequestContext): Worker | undefined {
    const ws = available(candidates);
    if (ws.length === 0) return undefined;
    const w = ws[this.counter % ws.length];
    this.counter = (this.counter + 1) % 0x7fffffff;
    return w;
  }
}
