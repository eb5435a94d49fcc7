import type { RequestContext } from '../core/context.js';
import type { Worker } from '../core/worker.js';
import { available, BasePolicy, type WorkerPair } from './policy.js';

/** Cycles through the available workers in registration order, skipping unavailable ones. */
export class RoundRobinPolicy extends BasePolicy {
  readonly name = 'round_robin';
  private counter = 0;
  /** Separate cycles for the two pools of a pair, so neither pool's order skews the other's. */
  private prefillCounter = 0;
  private decodeCounter = 0;

  selectWorker(candidates: readonly Worker[], _ctx: RequestContext): Worker | undefined {
    const w = pick(candidates, this.counter);
    if (w) this.counter = (this.counter + 1) % 0x7fffffff;
    return w;
  }

  override selectPair(prefill: readonly Worker[], decode: readonly Worker[], _ctx: RequestContext): WorkerPair | undefined {
    const p = pick(prefill, this.prefillCounter);
    const d = pick(decode, this.decodeCounter);
    if (!p || !d) return undefined;
    this.prefillCounter = (this.prefillCounter + 1) % 0x7fffffff;
    this.decodeCounter = (this.decodeCounter + 1) % 0x7fffffff;
    return { prefill: p, decode: d };
  }
}

function pick(candidates: readonly Worker[], counter: number): Worker | undefined {
  const ws = available(candidates);
  return ws.length === 0 ? undefined : ws[counter % ws.length];
}
