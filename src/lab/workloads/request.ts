import type { LabRequest } from '../workload.js';
import { fillSegment, tokensToText } from './tokens.js';

/**
 * Bounded cache of segment tokens for workloads whose segments repeat (Mooncake blocks, system
 * prompts, tool prefixes, conversation history): a hit is a memcpy instead of ~5 ns of hashing
 * per token. Entries hold the longest prefix of a segment built so far. Two generations
 * approximate LRU in O(1): when the young map reaches half the budget it becomes the old one
 * (the previous old one is dropped); a hit in the old map moves the entry to the young one.
 */
export class SegmentCache {
  private young = new Map<number, Uint32Array>();
  private old = new Map<number, Uint32Array>();
  private youngTokens = 0;

  constructor(
    readonly salt: number,
    readonly budgetTokens = 8 * 1024 * 1024,
  ) {}

  /** Writes the first `len` tokens of segment `key` to out[at...]. */
  fill(out: Uint32Array, at: number, key: number, len: number): void {
    let hit = this.young.get(key);
    if (!hit) {
      hit = this.old.get(key);
      if (hit) {
        this.old.delete(key);
        this.put(key, hit);
      }
    }
    if (hit && hit.length >= len) {
      out.set(len === hit.length ? hit : hit.subarray(0, len), at);
      return;
    }
    fillSegment(out, at, key, this.salt, 0, len);
    if (len <= this.budgetTokens / 8) this.put(key, out.slice(at, at + len)); // huge segments are not kept
  }

  private put(key: number, tokens: Uint32Array): void {
    const prev = this.young.get(key);
    if (prev) this.youngTokens -= prev.length;
    if (this.youngTokens + tokens.length > this.budgetTokens / 2) {
      this.old = this.young;
      this.young = new Map();
      this.youngTokens = 0;
    }
    this.young.set(key, tokens);
    this.youngTokens += tokens.length;
  }
}

/**
 * Recently built prompts, kept strongly up to a token budget (oldest build dropped first), so
 * repeated `req.promptTokens` reads return the same array without holding every prompt of a
 * long trace in memory.
 */
class PromptMemo {
  private queue: SegmentedRequest[] = [];
  private head = 0;
  private tokens = 0;

  constructor(readonly budgetTokens: number) {}

  add(req: SegmentedRequest): void {
    this.queue.push(req);
    this.tokens += req.numPromptTokens;
    while (this.tokens > this.budgetTokens && this.queue.length - this.head > 1) {
      const old = this.queue[this.head++]!;
      this.tokens -= old.numPromptTokens;
      old.forgetTokens();
    }
    if (this.head > 1024 && this.head * 2 > this.queue.length) {
      this.queue = this.queue.slice(this.head);
      this.head = 0;
    }
  }
}

/** Token budget of the memo of built prompts (shared by all workloads): 16M tokens = 64 MB. */
export const PROMPT_MEMO_TOKENS = 16 * 1024 * 1024;
const memo = new PromptMemo(PROMPT_MEMO_TOKENS);

/**
 * A prompt described as a list of segments (key, length); its tokens and text are built on
 * demand from the segment keys (see tokens.ts), so a workload holds a few numbers per segment
 * instead of its prompts (the full Mooncake conversation trace is 145M prompt tokens).
 *
 * `promptTokens` is a getter: the array is built on first read and kept in a shared memo of the
 * most recently built prompts (16M tokens); repeated reads return the same array (so index
 * loops over `req.promptTokens[i]` are cheap) until 16M tokens of other prompts have been built
 * since, after which a read rebuilds an identical array. Do not mutate it. `text()` is built from
 * the tokens on every call (a few ms per 100k tokens) and never cached.
 */
export class SegmentedRequest implements LabRequest {
  id: string;
  arrivalMs: number;
  outputTokens: number;
  group?: string;
  /** Number of prompt tokens (without building them). */
  readonly numPromptTokens: number;
  private built: Uint32Array | undefined;

  constructor(
    id: string,
    arrivalMs: number,
    outputTokens: number,
    /** Segment keys, in prompt order. */
    readonly keys: ArrayLike<number>,
    /** Tokens taken from each segment (its first `lens[i]` tokens). */
    readonly lens: ArrayLike<number>,
    /** Token content: salt + optional cache shared by the workload's requests. */
    private readonly source: { salt: number; cache?: SegmentCache | undefined },
    group?: string,
  ) {
    this.id = id;
    this.arrivalMs = arrivalMs;
    this.outputTokens = outputTokens;
    if (group !== undefined) this.group = group;
    let n = 0;
    for (let i = 0; i < lens.length; i++) n += lens[i]!;
    this.numPromptTokens = n;
  }

  get promptTokens(): Uint32Array {
    return this.built ?? this.build();
  }

  text(): string {
    return tokensToText(this.promptTokens);
  }

  /** Drops the memoised array (called by the memo). */
  forgetTokens(): void {
    this.built = undefined;
  }

  private build(): Uint32Array {
    const out = new Uint32Array(this.numPromptTokens);
    const { salt, cache } = this.source;
    let at = 0;
    for (let i = 0; i < this.keys.length; i++) {
      const len = this.lens[i]!;
      if (cache) cache.fill(out, at, this.keys[i]!, len);
      else fillSegment(out, at, this.keys[i]!, salt, 0, len);
      at += len;
    }
    this.built = out;
    memo.add(this);
    return out;
  }
}
