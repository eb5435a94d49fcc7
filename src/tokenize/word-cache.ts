/**
 * A bounded map from pre-token (a word with its leading space, a run of digits, punctuation...)
 * to its BPE ids: the word cache Hugging Face's Rust BPE keeps, here in front of the pure-JS
 * library's byte-level mapping and BPE (see HfTokenizer's word caching).
 *
 * Bounded by entries with two generations instead of a strict LRU: a hit in the young map costs
 * one Map lookup (no reordering, which is what makes an insertion-ordered LRU's hit expensive); a
 * hit in the old map moves the entry to the young one; when the young map holds half the bound,
 * it becomes the old one and the previous old one is dropped. So at most `maxEntries` entries,
 * and an entry used at least once per half-bound of new words is never evicted. Values: one id
 * as a number (most words), several as a Uint32Array.
 */
export type WordIds = number | Uint32Array;

export class WordCache {
  private young = new Map<string, WordIds>();
  private old = new Map<string, WordIds>();
  private readonly half: number;
  hits = 0;
  misses = 0;

  constructor(readonly maxEntries: number) {
    if (!(maxEntries >= 2)) throw new RangeError('maxEntries must be >= 2');
    this.half = Math.floor(maxEntries / 2);
  }

  get size(): number {
    return this.young.size + this.old.size;
  }

  get(word: string): WordIds | undefined {
    let v = this.young.get(word);
    if (v !== undefined) {
      this.hits++;
      return v;
    }
    v = this.old.get(word);
    if (v !== undefined) {
      this.hits++;
      this.old.delete(word);
      this.put(word, v);
      return v;
    }
    this.misses++;
    return undefined;
  }

  /** `word` must not be a slice of a large string that the cache would then keep alive (see HfTokenizer). */
  set(word: string, ids: WordIds): void {
    this.old.delete(word);
    this.put(word, ids);
  }

  clear(): void {
    this.young.clear();
    this.old.clear();
  }

  private put(word: string, ids: WordIds): void {
    if (this.young.size >= this.half) {
      this.old = this.young;
      this.young = new Map();
    }
    this.young.set(word, ids);
  }
}
