/**
 * One long prompt's encode spread over the tokenizer threads (used by pool-worker.ts).
 *
 * The thread that got the request (the coordinator) renders it, cuts it at the tokenizer's added
 * tokens (segments) and the long uncached segments at points where the ids provably do not
 * change (HfTokenizer.cutPieces), and offers the pieces to the other threads on a
 * BroadcastChannel. Pieces are claimed one at a time through a shared counter (Atomics.add), by
 * the coordinator and by whichever threads are idle: a thread busy with its own request claims
 * nothing, so the coordinator is never slower than encoding alone, less the claims of idle
 * threads. Helpers send each piece's ids back on the channel; the coordinator puts the segments
 * together (and into its segment cache) in order. Nothing of this runs on the event loop.
 */
import { BroadcastChannel } from 'node:worker_threads';
import { HfTokenizer } from './hf.js';
import { EncodeCancelled } from './tokenizer.js';

/** Offer sent to the other threads. */
interface HelpOffer {
  type: 'help';
  job: string;
  model: string;
  pieces: string[];
  /** Int32Array view: [0] = next piece to claim. */
  next: SharedArrayBuffer;
}

interface PieceDone {
  type: 'piece';
  job: string;
  index: number;
  ids: Uint32Array;
}

/** A claimed piece not back after this long is encoded by the coordinator (a helper thread died). */
const HELPER_TIMEOUT_MS = 5_000;

export interface ParallelEncoderOptions {
  /** BroadcastChannel name shared by the pool's threads (unique per pool). */
  channel: string;
  /** Tokenizer of a model (the thread's registry). */
  tokenizerOf(model: string): unknown;
  /** Unique prefix of this thread's job ids. */
  threadKey: string;
}

export class ParallelEncoder {
  private readonly bc: BroadcastChannel;
  private readonly waiting = new Map<string, (d: PieceDone) => void>();
  private jobs = 0;

  constructor(private readonly opts: ParallelEncoderOptions) {
    this.bc = new BroadcastChannel(opts.channel);
    this.bc.unref();
    this.bc.onmessage = (ev: unknown) => {
      const m = (ev as { data: HelpOffer | PieceDone }).data;
      if (m.type === 'piece') this.waiting.get(m.job)?.(m);
      else if (m.type === 'help') this.help(m);
    };
  }

  /**
   * Ids of `text` (no special tokens added) encoded by this thread and idle helpers; the same as
   * `tokenizer.encodeIds(text, { addSpecialTokens: false })`. `pieceChars`: target piece size.
   */
  async encode(tokenizer: HfTokenizer, model: string, text: string, pieceChars: number, shouldStop?: () => boolean): Promise<Uint32Array> {
    const plan = tokenizer.planSegments(text);
    // Pieces of the segments still to encode: [segment index in plan, pieces].
    const pieces: string[] = [];
    const owners: { at: number; first: number; count: number }[] = [];
    for (let at = 0; at < plan.length; at++) {
      const p = plan[at];
      if (typeof p !== 'string') continue;
      const cut = tokenizer.cutPieces(p, pieceChars);
      owners.push({ at, first: pieces.length, count: cut.length });
      pieces.push(...cut);
    }
    const results: (Uint32Array | undefined)[] = new Array(pieces.length);
    if (pieces.length > 1) {
      const next = new SharedArrayBuffer(4);
      const counter = new Int32Array(next);
      const job = `${this.opts.threadKey}:${++this.jobs}`;
      let missing = pieces.length;
      let wake: (() => void) | undefined;
      this.waiting.set(job, (d) => {
        if (results[d.index] === undefined) {
          results[d.index] = d.ids;
          missing--;
          if (missing === 0) wake?.();
        }
      });
      try {
        this.bc.postMessage({ type: 'help', job, model, pieces, next } satisfies HelpOffer);
        for (let i = Atomics.add(counter, 0, 1); i < pieces.length; i = Atomics.add(counter, 0, 1)) {
          if (shouldStop?.()) {
            Atomics.store(counter, 0, pieces.length);
            throw new EncodeCancelled();
          }
          results[i] = tokenizer.encodePiece(pieces[i]);
          missing--;
        }
        if (missing > 0) {
          // Helpers' pieces arrive as messages: wait for them on this thread's loop.
          await new Promise<void>((resolve) => {
            const t = setTimeout(resolve, HELPER_TIMEOUT_MS);
            wake = () => {
              clearTimeout(t);
              resolve();
            };
          });
        }
      } finally {
        this.waiting.delete(job);
      }
      if (shouldStop?.()) throw new EncodeCancelled();
    }
    for (let i = 0; i < pieces.length; i++) results[i] ??= tokenizer.encodePiece(pieces[i]);
    // Assemble: each encoded segment from its pieces (and into the segment cache), then all.
    const parts: (number | Uint32Array)[] = plan.map((p) => (typeof p === 'string' ? new Uint32Array(0) : p));
    for (const o of owners) {
      const ids = o.count === 1 ? results[o.first]! : concat(results.slice(o.first, o.first + o.count) as Uint32Array[]);
      tokenizer.rememberSegment(plan[o.at] as string, ids);
      parts[o.at] = ids;
    }
    return concat(parts);
  }

  close(): void {
    this.bc.close();
  }

  private help(m: HelpOffer): void {
    const tokenizer = this.opts.tokenizerOf(m.model);
    if (!(tokenizer instanceof HfTokenizer)) return;
    const counter = new Int32Array(m.next);
    for (let i = Atomics.add(counter, 0, 1); i < m.pieces.length; i = Atomics.add(counter, 0, 1)) {
      const ids = tokenizer.encodePiece(m.pieces[i]);
      this.bc.postMessage({ type: 'piece', job: m.job, index: i, ids } satisfies PieceDone);
    }
  }
}

function concat(parts: readonly (number | Uint32Array)[]): Uint32Array {
  let n = 0;
  for (const p of parts) n += typeof p === 'number' ? 1 : p.length;
  const out = new Uint32Array(n);
  let at = 0;
  for (const p of parts) {
    if (typeof p === 'number') out[at++] = p;
    else {
      out.set(p, at);
      at += p.length;
    }
  }
  return out;
}
