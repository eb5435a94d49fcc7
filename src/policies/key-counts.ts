/**
 * Reference counts of non-negative 31-bit integer keys (kv_aware's in-flight block keys) in one
 * open-addressing table of two typed arrays (linear probing, backward-shift deletion).
 *
 * Why not a Map<number, number>: a 100k-token request adds ~6,250 keys when routed and removes
 * them when done, so with a few such requests in flight the Map's hash table keeps growing past
 * and shrinking back below a megabyte, and V8 allocates a new table each time (measured: ~0.7 MB
 * of large objects per 100k-token request on the event loop, which brings on the main thread's
 * full garbage collections). This table grows (doubling) as the in-flight keys need and does not
 * shrink unless it is very large and nearly empty, so steady traffic allocates nothing.
 */
export class KeyCounts {
  private keys: Int32Array;
  private counts: Int32Array;
  private mask: number;
  /** Distinct keys held. */
  size = 0;

  constructor(capacity = 1024) {
    let cap = 16;
    while (cap < capacity) cap *= 2;
    this.keys = new Int32Array(cap).fill(-1);
    this.counts = new Int32Array(cap);
    this.mask = cap - 1;
  }

  /** Slot of `key`, or of the empty slot where it would go. */
  private slot(key: number): number {
    const keys = this.keys;
    const mask = this.mask;
    let i = key & mask;
    while (keys[i] !== -1 && keys[i] !== key) i = (i + 1) & mask;
    return i;
  }

  has(key: number): boolean {
    return this.keys[this.slot(key)] === key;
  }

  /** The key's count (0 when absent). */
  get(key: number): number {
    const i = this.slot(key);
    return this.keys[i] === key ? this.counts[i] : 0;
  }

  /** Counts one more reference to `key` (0 ≤ key < 2^31). */
  add(key: number): void {
    if ((this.size + 1) * 2 > this.keys.length) this.resize(this.keys.length * 2);
    const i = this.slot(key);
    if (this.keys[i] === key) this.counts[i]++;
    else {
      this.keys[i] = key;
      this.counts[i] = 1;
      this.size++;
    }
  }

  /** Drops one reference to `key`; the key goes when its count reaches 0. Absent keys are ignored. */
  release(key: number): void {
    let i = this.slot(key);
    const keys = this.keys;
    if (keys[i] !== key) return;
    if (--this.counts[i] > 0) return;
    // Backward-shift deletion: move later entries of the probe run into the hole when their
    // home slot does not lie cyclically in (hole, their slot].
    const mask = this.mask;
    let j = i;
    for (;;) {
      j = (j + 1) & mask;
      const k = keys[j];
      if (k === -1) break;
      const home = k & mask;
      const stays = i <= j ? home > i && home <= j : home > i || home <= j;
      if (!stays) {
        keys[i] = k;
        this.counts[i] = this.counts[j];
        i = j;
      }
    }
    keys[i] = -1;
    this.counts[i] = 0;
    this.size--;
    if (this.keys.length >= 1 << 20 && this.size * 16 < this.keys.length) this.resize(this.keys.length / 4);
  }

  private resize(cap: number): void {
    const { keys, counts } = this;
    this.keys = new Int32Array(cap).fill(-1);
    this.counts = new Int32Array(cap);
    this.mask = cap - 1;
    for (let i = 0; i < keys.length; i++) {
      if (keys[i] === -1) continue;
      const at = this.slot(keys[i]);
      this.keys[at] = keys[i];
      this.counts[at] = counts[i];
    }
  }
}
