import type { RequestContext } from '../core/context.js';
import type { Worker } from '../core/worker.js';
import { describeAll, noneAvailable, type PairExplanation, type RouteExplanation } from './explain.js';
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

  /** Loads, and the worker the cycle reaches next (the counter is not advanced). */
  explain(candidates: readonly Worker[], _ctx: RequestContext): RouteExplanation {
    return explainCycle(this.name, candidates, this.counter);
  }

  override explainPair(prefill: readonly Worker[], decode: readonly Worker[], _ctx: RequestContext): PairExplanation {
    return { prefill: explainCycle(this.name, prefill, this.prefillCounter), decode: explainCycle(this.name, decode, this.decodeCounter) };
  }
}

function explainCycle(policy: string, candidates: readonly Worker[], counter: number): RouteExplanation {
  const described = describeAll(candidates);
  const w = pick(candidates, counter);
  if (!w) return noneAvailable(policy, described);
  const n = available(candidates).length;
  return { policy, chosen: w.id, rule: 'cyclic', detail: `next in the cycle over ${n} available workers (position ${counter % n})`, deterministic: true, candidates: described };
}

function pick(candidates: readonly Worker[], counter: number): Worker | undefined {
  const ws = available(candidates);
  return ws.length === 0 ? undefined : ws[counter % ws.length];
}
