/**
 * Which prompts were published recently, and for which worker: replica sync publishes a routed
 * prompt only when no replica published it for the same worker (policy role, model) within a
 * window (ReplicaSyncOptions.repeatWindowMs).
 *
 * A direct-mapped table of typed arrays: a slot per (prompt fingerprint, role, model, worker)
 * hash, overwritten by the next key that maps to it. It allocates nothing per prompt, which
 * matters because most prompts are unique and every replica marks every prompt its peers
 * publish. A key evicted by another only means that prompt is published once more than needed;
 * two keys are taken for one only if 64 bits of their hashes agree.
 */
export class RecentlyPublished {
  private readonly lo: Int32Array;
  private readonly hi: Int32Array;
  private readonly at: Float64Array;
  private readonly mask: number;
  /** 32-bit hashes of role, model and worker id strings (few distinct ones; bounded anyway). */
  private readonly names = new Map<string, number>();
  private keyLo = 0;
  private keyHi = 0;

  /** `slots` is rounded up to a power of two. */
  constructor(slots = 65_536) {
    let n = 1;
    while (n < slots) n *= 2;
    this.mask = n - 1;
    this.lo = new Int32Array(n);
    this.hi = new Int32Array(n);
    this.at = new Float64Array(n).fill(Number.NaN);
  }

  /** Whether this prompt went to this worker in a record published less than `windowMs` before `now`. */
  seen(fingerprint: number, role: string, model: string, workerId: string, now: number, windowMs: number): boolean {
    const slot = this.key(fingerprint, role, model, workerId);
    return this.lo[slot] === this.keyLo && this.hi[slot] === this.keyHi && now - this.at[slot] < windowMs;
  }

  /** Records that this prompt was published for this worker at `now`. */
  mark(fingerprint: number, role: string, model: string, workerId: string, now: number): void {
    const slot = this.key(fingerprint, role, model, workerId);
    this.lo[slot] = this.keyLo;
    this.hi[slot] = this.keyHi;
    this.at[slot] = now;
  }

  /** Forgets everything: the next record of every prompt is published. */
  clear(): void {
    this.at.fill(Number.NaN);
  }

  /** Sets keyLo/keyHi for the tuple and returns its slot. */
  private key(fingerprint: number, role: string, model: string, workerId: string): number {
    const place = Math.imul(this.name(role) ^ Math.imul(this.name(model), 0x85ebca6b), 0xc2b2ae35) ^ this.name(workerId);
    const lo = (fingerprint >>> 0) ^ place;
    this.keyLo = lo | 0;
    this.keyHi = (Math.floor(fingerprint / 4294967296) ^ Math.imul(place, 0x9e3779b1)) | 0;
    return (lo ^ (lo >>> 16)) & this.mask;
  }

  private name(s: string): number {
    let h = this.names.get(s);
    if (h !== undefined) return h;
    h = 0x811c9dc5;
    for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 0x01000193);
    if (this.names.size >= 4096) this.names.clear();
    this.names.set(s, h);
    return h;
  }
}
