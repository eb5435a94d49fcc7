/**
 * A least-recently-used map bounded by entry count and by a total weight (e.g. characters or
 * tokens). Insertion-ordered Map: a hit moves the entry to the back, eviction takes the front.
 */
export class LruCache<K, V> {
  private readonly map = new Map<K, { value: V; weight: number }>();
  private totalWeight = 0;
  hits = 0;
  misses = 0;

  constructor(
    readonly maxEntries: number,
    readonly maxWeight = Infinity,
  ) {
    if (!(maxEntries >= 0)) throw new RangeError('maxEntries must be >= 0');
  }

  get size(): number {
    return this.map.size;
  }

  get weight(): number {
    return this.totalWeight;
  }

  get(key: K): V | undefined {
    const e = this.map.get(key);
    if (e === undefined) {
      this.misses++;
      return undefined;
    }
    this.hits++;
    this.map.delete(key);
    this.map.set(key, e);
    return e.value;
  }

  /** Inserts (or replaces) an entry; one heavier than `maxWeight` is not kept. */
  set(key: K, value: V, weight = 1): void {
    const old = this.map.get(key);
    if (old !== undefined) {
      this.totalWeight -= old.weight;
      this.map.delete(key);
    }
    if (this.maxEntries === 0 || weight > this.maxWeight) return;
    this.map.set(key, { value, weight });
    this.totalWeight += weight;
    while (this.map.size > this.maxEntries || this.totalWeight > this.maxWeight) {
      const [k, e] = this.map.entries().next().value!;
      this.map.delete(k);
      this.totalWeight -= e.weight;
    }
  }

  clear(): void {
    this.map.clear();
    this.totalWeight = 0;
  }
}
