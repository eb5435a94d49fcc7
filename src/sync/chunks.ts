/**
 * Content-addressed dictionary of prompt chunks, so replicas share routing history without
 * shipping whole prompts.
 *
 * A text (or token sequence) is cut into fixed chunks from its start; each chunk is named by a
 * chained 53-bit hash (of the chunk's UTF-16 units or tokens, seeded with its parent's hash), so
 * one hash names a whole prefix. The hash is computed in JavaScript over the string in place
 * (no slice, no native call, no BigInt): this runs for every routed request, and a native xxh3
 * per chunk measured 4× slower here. A collision would only misplace one routing-history entry. Each replica keeps every chunk it has sent or received. To send a text it names the
 * longest prefix of chunks it knows by the last chunk's hash and count, and sends the rest as is;
 * the receiver rebuilds the prefix from its own dictionary by walking parent links. A chunk a
 * replica has seen was seen by its peers too (it came from, or went to, the shared subject), so
 * a shared system prompt crosses the wire once and every later request that starts with it costs
 * 8 bytes plus its own new suffix. A receiver missing a chunk (it joined late, or evicted it)
 * cannot rebuild that text and says so (undefined); joining replicas fill their dictionary from
 * a snapshot.
 *
 * Bounded: least recently used chunks are dropped beyond `maxUnits` (UTF-16 units or tokens).
 * Recency is a counter stamped on use; eviction drops about the oldest tenth at once (the
 * cutoff stamp read from a sorted sample, not a sort of every chunk).
 *
 * Encoding a text hashes it only past what it shares with the last text encoded that began with
 * the same chunk: the shared length is found by comparing slices (native, about 15× cheaper than
 * hashing them in JavaScript), and those chunks' hashes are reused. A request behind a shared
 * system prompt or a growing conversation costs one comparison per doubling of the prefix.
 */

/** A sequence on the wire: [known chunk count, hash of the last known chunk (0 if none), the rest]. */
export type EncodedText = [number, number, string];
export type EncodedTokens = [number, number, Uint8Array];

/** UTF-16 units per text chunk (one more when the boundary would split a surrogate pair). */
export const TEXT_CHUNK = 256;
/** Tokens per token chunk. */
export const TOKEN_CHUNK = 64;
/** Token chains are seeded apart from text chains, so a text and a token run never share a name. */
const TOKEN_DOMAIN = 0x6b76_6761_74;

interface Entry {
  parent: number;
  /** A text chunk, or a token chunk. */
  chunk: string | Uint32Array;
  /** Recency stamp (ChunkDictionary.clock when last used). */
  used: number;
}

/**
 * A text cut and hashed, not yet encoded. `fingerprint` names the whole text (its last full
 * chunk's chain hash, chained over the units after it): equal texts get equal fingerprints,
 * whatever a dictionary knows, on the sender (prepareText) and on a receiver (decodeText).
 */
export interface PreparedText {
  text: string;
  ends: number[];
  hashes: number[];
  fingerprint: number;
}

/** A token run cut and hashed, not yet encoded (fingerprint as for PreparedText, in the token domain). */
export interface PreparedTokens {
  tokens: Uint32Array;
  hashes: number[];
  fingerprint: number;
}

/** A text encoded recently: its chunk ends and chain hashes, reused for texts that share its start. */
interface RecentText {
  /** Its first chunk, a flat copy (the key it is stored under: it pins no text). */
  key: string;
  text: string;
  ends: number[];
  hashes: number[];
  /** Leading chunks it shared with the recent text it replaced (hashText's first guess for the next one). */
  shared: number;
}

/** A known prefix's chunk entries, oldest first, and its text once joined. */
interface CachedPrefix {
  text: string | undefined;
  entries: Entry[];
}

/** Recent texts remembered for encoding, and the UTF-16 units they may pin in total. */
const RECENT_TEXTS = 1024;
const RECENT_UNITS = 8 * 1024 * 1024;
/** Decoded prefixes kept, and the UTF-16 units they may hold in total. */
const PREFIX_CACHE_ENTRIES = 1024;
const PREFIX_CACHE_UNITS = 8 * 1024 * 1024;

export class ChunkDictionary {
  private readonly entries = new Map<number, Entry>();
  private units = 0;
  private clock = 0;
  /** Keyed by the text's first chunk; Map order is recency order. */
  private readonly recent = new Map<string, RecentText>();
  /**
   * Known prefixes used recently, by their last chunk's hash: their entries (refreshed in place,
   * no lookup per chunk) and, once a decode needed it, their text (decodeText skips the walk and
   * the join). Cleared whenever chunks are evicted, so every entry held here is in `entries`.
   */
  private readonly prefixes = new Map<number, CachedPrefix>();
  /** The recent text stored last (the newest in `recent`): hashText tries it before a lookup. */
  private newestRecent: RecentText | undefined;
  private prefixUnits = 0;
  private recentUnits = 0;
  /** Texts and token runs that could not be rebuilt (a chunk was missing). */
  unresolved = 0;
  /**
   * The fingerprint (see PreparedText) of the sequence the last decodeText / decodeTokens call
   * rebuilt; 0 after a failed decode.
   */
  lastFingerprint = 0;

  /** `recentTexts`: how many recent texts encoding may reuse hashes from (0: hash every text in full). */
  constructor(
    private readonly maxUnits = 32 * 1024 * 1024,
    private readonly recentTexts = RECENT_TEXTS,
  ) {}

  get size(): number {
    return this.entries.size;
  }

  get storedUnits(): number {
    return this.units;
  }

  encodeText(text: string): EncodedText {
    return this.encodePreparedText(this.prepareText(text));
  }

  /** Cuts and hashes a text (reusing a recent text's hashes where equal): enough to name it, before deciding to send it. */
  prepareText(text: string): PreparedText {
    const ends = textChunkEnds(text);
    const hashes = this.hashText(text, ends);
    return { text, ends, hashes, fingerprint: textFingerprint(text, ends, hashes) };
  }

  /** The wire form of a prepared text; the dictionary learns (and refreshes) its chunks. */
  encodePreparedText(p: PreparedText): EncodedText {
    const { text, ends, hashes } = p;
    const known = this.knownPrefix(hashes);
    const now = ++this.clock;
    if (known > 0) this.refreshPrefix(hashes, known, now);
    // knownPrefix found no chunk past `known` (the chain names its whole prefix): all are new.
    for (let i = known; i < hashes.length; i++) {
      const h = hashes[i];
      const had = this.entries.get(h); // only a hash collision within the text
      if (had) had.used = now;
      else this.addEntry(h, i === 0 ? 0 : hashes[i - 1], text.slice(i === 0 ? 0 : ends[i - 1], ends[i]), now);
    }
    if (this.units > this.maxUnits) this.evict();
    const from = known === 0 ? 0 : ends[known - 1];
    return [known, known === 0 ? 0 : hashes[known - 1], text.slice(from)];
  }

  /** The text, or undefined when a chunk of its known prefix is not in this dictionary. */
  decodeText(e: EncodedText): string | undefined {
    const parts = this.decodeTextParts(e);
    return parts === undefined ? undefined : parts[0] + parts[1];
  }

  /**
   * The text as [known prefix, rest] (the text is their concatenation), or undefined when a
   * chunk of its known prefix is not in this dictionary. Nothing here reads the joined text:
   * the prefix is a flat string cached per last chunk hash, and the rest is cut and hashed on its
   * own (chunk ends past the prefix depend only on units past it), so a caller that can use the
   * two parts (CharTree.insertParts) never pays for flattening `prefix + rest`.
   */
  decodeTextParts(e: EncodedText): [string, string] | undefined {
    const [known, last, rest] = e;
    if (!Number.isInteger(known) || known < 0 || typeof rest !== 'string' || typeof last !== 'number') return this.fail();
    let prefix = '';
    let parent = 0;
    const now = ++this.clock;
    if (known > 0) {
      if (!last) return this.fail();
      parent = last;
      const hit = this.prefixes.get(last);
      if (hit !== undefined && hit.entries.length === known) {
        // A prefix used before: its chunks refreshed in place; its text as it was joined (joined
        // now if only encoding used it so far).
        for (const e of hit.entries) e.used = now;
        if (hit.text !== undefined) prefix = hit.text;
        else {
          prefix = hit.entries.map((e) => e.chunk as string).join('');
          this.cachePrefix(last, prefix, hit.entries);
        }
      } else {
        const entries = this.walkEntries(parent, known, now);
        if (!entries) return this.fail();
        prefix = entries.map((e) => e.chunk as string).join('');
        this.cachePrefix(last, prefix, entries);
      }
    }
    // The prefix is `known` whole chunks: only the rest needs cutting and hashing.
    const ends = textChunkEnds(rest);
    let h = parent;
    let from = 0;
    for (let j = 0; j < ends.length; j++) {
      const end = ends[j];
      const p = h;
      h = hashUnits(rest, from, end, p);
      const had = this.entries.get(h);
      if (had) had.used = now;
      else this.addEntry(h, p, rest.slice(from, end), now);
      from = end;
    }
    // Fingerprint: the last full chunk's hash (the prefix's last when the rest has none), chained over what follows.
    this.lastFingerprint = hashUnits(rest, from, rest.length, h);
    if (this.units > this.maxUnits) this.evict();
    return [prefix, rest];
  }

  encodeTokens(tokens: ArrayLike<number>): EncodedTokens {
    return this.encodePreparedTokens(this.prepareTokens(tokens));
  }

  /** Cuts and hashes a token run: enough to name it, before deciding to send it. */
  prepareTokens(tokens: ArrayLike<number>): PreparedTokens {
    const arr = toU32(tokens);
    const full = Math.floor(arr.length / TOKEN_CHUNK);
    const hashes = chainTokens(arr, full, 0, TOKEN_DOMAIN);
    return { tokens: arr, hashes, fingerprint: tokensFingerprint(arr, hashes) };
  }

  /** The wire form of a prepared token run; the dictionary learns (and refreshes) its chunks. */
  encodePreparedTokens(p: PreparedTokens): EncodedTokens {
    const { tokens: arr, hashes } = p;
    const known = this.knownPrefix(hashes);
    this.remember(hashes, known, (i) => arr.slice(i * TOKEN_CHUNK, (i + 1) * TOKEN_CHUNK));
    return [known, known === 0 ? 0 : hashes[known - 1], u32Bytes(arr.subarray(known * TOKEN_CHUNK))];
  }

  decodeTokens(e: EncodedTokens): Uint32Array | undefined {
    const [known, last, restBytes] = e;
    if (!Number.isInteger(known) || known < 0 || typeof last !== 'number' || !(restBytes instanceof Uint8Array) || restBytes.byteLength % 4 !== 0) return this.fail();
    const rest = bytesU32(restBytes);
    const out = new Uint32Array(known * TOKEN_CHUNK + rest.length);
    let parent = TOKEN_DOMAIN;
    if (known > 0) {
      if (!last) return this.fail();
      parent = last;
      const entries = this.walkEntries(parent, known);
      if (!entries) return this.fail();
      let at = 0;
      for (const e of entries) {
        out.set(e.chunk as Uint32Array, at);
        at += e.chunk.length;
      }
    }
    out.set(rest, known * TOKEN_CHUNK);
    const full = Math.floor(out.length / TOKEN_CHUNK);
    const hashes = chainTokens(out, full, known, parent);
    this.remember(hashes, known, (i) => out.slice(i * TOKEN_CHUNK, (i + 1) * TOKEN_CHUNK), true);
    this.lastFingerprint = tokensFingerprint(out, hashes);
    return out;
  }

  /** Entries of chunks `[0, count)` ending at `last`, oldest first; undefined if any is missing. Refreshes them. */
  private walkEntries(last: number, count: number, now = ++this.clock): Entry[] | undefined {
    const out = new Array<Entry>(count);
    let h = last;
    for (let i = count - 1; i >= 0; i--) {
      const e = this.entries.get(h);
      if (!e) return undefined;
      out[i] = e;
      e.used = now;
      h = e.parent;
    }
    return out;
  }

  /**
   * Remembers a known prefix: its entries, and its text if joined (bounded by count and by
   * weight: its text's units, or 4 units per entry held without text; Map order is insertion
   * order, the oldest goes first).
   */
  private cachePrefix(last: number, text: string | undefined, entries: Entry[]): void {
    const weight = prefixWeight(text, entries);
    if (weight > PREFIX_CACHE_UNITS / 16) return;
    const old = this.prefixes.get(last);
    if (old) this.prefixUnits -= prefixWeight(old.text, old.entries);
    this.prefixes.delete(last);
    this.prefixes.set(last, { text, entries });
    this.prefixUnits += weight;
    for (const [k, v] of this.prefixes) {
      if (this.prefixes.size <= PREFIX_CACHE_ENTRIES && this.prefixUnits <= PREFIX_CACHE_UNITS) break;
      this.prefixes.delete(k);
      this.prefixUnits -= prefixWeight(v.text, v.entries);
    }
  }

  /**
   * Refreshes the known chunks [0, known) of a text being encoded: through the prefix cache when
   * it holds them (one lookup), else one lookup per chunk (then cached when all are present).
   */
  private refreshPrefix(hashes: number[], known: number, now: number): void {
    const last = hashes[known - 1];
    const hit = this.prefixes.get(last);
    if (hit !== undefined && hit.entries.length === known) {
      for (const e of hit.entries) e.used = now;
      return;
    }
    const entries: Entry[] = [];
    for (let i = 0; i < known; i++) {
      const e = this.entries.get(hashes[i]);
      // Known by name but evicted here: it cannot be re-added without its chunk (nor cached).
      if (e === undefined) continue;
      e.used = now;
      entries.push(e);
    }
    if (entries.length === known) this.cachePrefix(last, undefined, entries);
  }

  /** Adds a chunk (a flat copy, so the dictionary never pins a whole prompt string). */
  private addEntry(h: number, parent: number, chunk: string, now: number): void {
    const own = (chunk + '\0').slice(0, -1);
    this.entries.set(h, { parent, chunk: own, used: now });
    this.units += own.length;
  }


  /**
   * Chain hashes of a text's full chunks. The chunks it shares with the last text encoded that
   * began with the same first chunk keep that text's hashes (found by comparing slices, largest
   * equal prefix by bisection over chunk ends); only the rest is hashed.
   */
  private hashText(text: string, ends: number[]): number[] {
    if (ends.length === 0) return [];
    const first = ends[0];
    // The text stored last first (requests behind one system prompt all begin alike): one
    // comparison, without hashing the key for a lookup (`startsWith` cost as much as the lookup in a
    // CPU profile; slice equality is a memcmp).
    const key = text.slice(0, first);
    let prev = this.newestRecent;
    if (prev === undefined || key !== prev.key) prev = this.recent.get(key);
    let hashes: number[];
    let shared = 0;
    if (prev) {
      // Largest k such that the first k chunks are equal (chunk ends depend only on the text
      // before them). Bisection; chunks [0, lo) are known equal, so each probe compares only
      // the span from ends[lo − 1] to the probe's end.
      let lo = 1;
      let hi = Math.min(ends.length, prev.ends.length);
      // First guess: as many chunks as `prev` shared with the text before it (requests behind
      // one system prompt share the same count), so the usual case takes one comparison of that
      // span and one probe past it instead of a bisection from the first chunk.
      const guess = Math.min(prev.shared, hi);
      if (guess > 1) {
        const end = ends[guess - 1];
        if (prev.ends[guess - 1] === end && text.slice(first, end) === prev.text.slice(first, end)) lo = guess;
        else hi = guess - 1;
      }
      while (lo < hi) {
        const mid = (lo + hi + 1) >> 1;
        const from = ends[lo - 1];
        const end = ends[mid - 1];
        if (prev.ends[mid - 1] === end && text.slice(from, end) === prev.text.slice(from, end)) lo = mid;
        else hi = mid - 1;
      }
      hashes = chainText(text, ends, lo, prev.hashes);
      shared = lo;
    } else {
      hashes = chainText(text, ends, 0, undefined);
    }
    if (this.recentTexts > 0 && text.length <= RECENT_UNITS / 8) {
      if (prev !== undefined && prev === this.newestRecent) {
        // Already the newest in recency order: replaced in place (its key is the same chunk).
        this.recentUnits += text.length - prev.text.length;
        prev.text = text;
        prev.ends = ends;
        prev.hashes = hashes;
        prev.shared = shared;
      } else {
        if (prev !== undefined) {
          this.recent.delete(prev.key);
          this.recentUnits -= prev.text.length;
        }
        const own = prev?.key ?? (key + '\0').slice(0, -1);
        const r: RecentText = { key: own, text, ends, hashes, shared };
        this.recent.set(own, r);
        this.newestRecent = r;
        this.recentUnits += text.length;
      }
      for (const [k, r] of this.recent) {
        if (this.recent.size <= this.recentTexts && this.recentUnits <= RECENT_UNITS) break;
        this.recent.delete(k);
        this.recentUnits -= r.text.length;
        if (r === this.newestRecent) this.newestRecent = undefined;
      }
    } else if (prev !== undefined) {
      this.recent.delete(prev.key);
      this.recentUnits -= prev.text.length;
      if (prev === this.newestRecent) this.newestRecent = undefined;
    }
    return hashes;
  }

  /** How many leading chunks are known: the last known one names them all. */
  private knownPrefix(hashes: number[]): number {
    for (let i = hashes.length - 1; i >= 0; i--) {
      if (this.entries.has(hashes[i])) return i + 1;
    }
    return 0;
  }

  /**
   * Records chunks [known, hashes.length) as known, and refreshes the known ones (unless
   * `knownFresh`: a walk just did).
   */
  private remember(hashes: number[], known: number, chunkAt: (i: number) => string | Uint32Array, knownFresh = false): void {
    const now = ++this.clock;
    for (let i = knownFresh ? known : 0; i < hashes.length; i++) {
      const h = hashes[i];
      const had = this.entries.get(h);
      if (had) {
        had.used = now;
        continue;
      }
      if (i < known) continue; // known by name but evicted here: cannot re-add without its chunk
      const chunk = chunkAt(i);
      // A flat copy, so the dictionary never pins a whole prompt string.
      const own = typeof chunk === 'string' ? (chunk + '\0').slice(0, -1) : chunk;
      this.entries.set(h, { parent: i === 0 ? 0 : hashes[i - 1], chunk: own, used: now });
      this.units += own.length;
    }
    if (this.units > this.maxUnits) this.evict();
  }

  /** Drops the least recently used chunks until a tenth of the bound is free. */
  private evict(): void {
    // Cached prefixes hold entry objects that may be dropped now: start that cache afresh.
    this.prefixes.clear();
    this.prefixUnits = 0;
    // Not a full sort (a full dictionary holds ~10^5 chunks, and under unique prompts a tenth of
    // it turns over every second or two): the recency stamp below which a tenth of the chunks lie is read from a sorted
    // sample, and every chunk older than that goes in one pass; again, a little further, if the
    // sample was off.
    const target = this.maxUnits * 0.9;
    for (let share = 0.12; this.units > target && this.entries.size > 0; share = Math.min(1, share * 2)) {
      const cutoff = this.usedQuantile(share);
      for (const [h, e] of this.entries) {
        if (e.used > cutoff) continue;
        this.entries.delete(h);
        this.units -= e.chunk.length;
      }
    }
  }

  /** About the `share` quantile of the chunks' recency stamps (from a sample of at most 2,048). */
  private usedQuantile(share: number): number {
    const step = Math.max(1, Math.floor(this.entries.size / 2048));
    const sample: number[] = [];
    let i = 0;
    for (const e of this.entries.values()) if (i++ % step === 0) sample.push(e.used);
    sample.sort((a, b) => a - b);
    return sample[Math.min(sample.length - 1, Math.floor(share * sample.length))];
  }

  private fail(): undefined {
    this.unresolved++;
    this.lastFingerprint = 0;
    return undefined;
  }
}

/** What a cached prefix counts against PREFIX_CACHE_UNITS: its text, else its entry array (8 bytes, 4 units, an entry). */
function prefixWeight(text: string | undefined, entries: Entry[]): number {
  return text !== undefined ? text.length : entries.length * 4;
}

/** A text's fingerprint (PreparedText): its last full chunk's chain hash, chained over the units after it. */
function textFingerprint(text: string, ends: number[], hashes: number[]): number {
  const full = ends.length;
  return hashUnits(text, full === 0 ? 0 : ends[full - 1], text.length, full === 0 ? 0 : hashes[full - 1]);
}

/** A token run's fingerprint (PreparedTokens), in the token domain. */
function tokensFingerprint(tokens: Uint32Array, hashes: number[]): number {
  const full = hashes.length;
  return hashUnits(tokens, full * TOKEN_CHUNK, tokens.length, full === 0 ? TOKEN_DOMAIN : hashes[full - 1]);
}

/** End offsets of the full chunks of a text (the remainder after the last one is not a chunk). */
export function textChunkEnds(text: string): number[] {
  const ends: number[] = [];
  let at = 0;
  for (;;) {
    let end = at + TEXT_CHUNK;
    if (end > text.length) break;
    // Never end a chunk between the halves of a surrogate pair.
    if ((text.charCodeAt(end - 1) & 0xfc00) === 0xd800) {
      end++;
      if (end > text.length) break;
    }
    ends.push(end);
    at = end;
  }
  return ends;
}

/**
 * Chain hashes of a text's full chunks: those of chunks [0, from) taken from `base` (hashes of
 * a text with the same first `from` chunks), the rest hashed, continuing from chunk from−1's.
 */
function chainText(text: string, ends: number[], from: number, base: number[] | undefined): number[] {
  const out = from === 0 || base === undefined ? [] : base.slice(0, from);
  let h = from === 0 || base === undefined ? 0 : base[from - 1];
  for (let i = from; i < ends.length; i++) {
    h = hashUnits(text, i === 0 ? 0 : ends[i - 1], ends[i], h);
    out.push(h);
  }
  return out;
}

function chainTokens(tokens: Uint32Array, full: number, from: number, parent: number): number[] {
  const out = new Array<number>(full).fill(0);
  let h = parent;
  for (let i = from; i < full; i++) {
    h = hashUnits(tokens, i * TOKEN_CHUNK, (i + 1) * TOKEN_CHUNK, h);
    out[i] = h;
  }
  if (from > 0) out[from - 1] = parent;
  return out;
}

/**
 * 53-bit hash of units [from, to) of a string (UTF-16 units) or a token array, seeded with the
 * parent chunk's hash: two 32-bit multiply-xor lanes, cross-mixed at the end (the cyrb53
 * construction). Never 0, which stands for "no parent".
 */
function hashUnits(src: string | Uint32Array, from: number, to: number, seed: number): number {
  let h1 = 0xdeadbeef ^ (seed >>> 0);
  let h2 = 0x41c6ce57 ^ Math.floor(seed / 4294967296);
  if (typeof src === 'string') {
    for (let i = from; i < to; i++) {
      const u = src.charCodeAt(i);
      h1 = Math.imul(h1 ^ u, 2654435761);
      h2 = Math.imul(h2 ^ u, 1597334677);
    }
  } else {
    for (let i = from; i < to; i++) {
      const u = src[i];
      h1 = Math.imul(h1 ^ u, 2654435761);
      h2 = Math.imul(h2 ^ u, 1597334677);
    }
  }
  h1 = Math.imul(h1 ^ (h1 >>> 16), 2246822507);
  h1 ^= Math.imul(h2 ^ (h2 >>> 13), 3266489909);
  h2 = Math.imul(h2 ^ (h2 >>> 16), 2246822507);
  h2 ^= Math.imul(h1 ^ (h1 >>> 13), 3266489909);
  return 4294967296 * (2097151 & h2) + (h1 >>> 0) || 1;
}

function toU32(tokens: ArrayLike<number>): Uint32Array {
  return tokens instanceof Uint32Array ? tokens : Uint32Array.from(tokens as ArrayLike<number>);
}

function u32Bytes(a: Uint32Array): Uint8Array {
  return new Uint8Array(a.buffer.slice(a.byteOffset, a.byteOffset + a.byteLength));
}

function bytesU32(b: Uint8Array): Uint32Array {
  const copy = new Uint8Array(b); // aligned copy
  return new Uint32Array(copy.buffer, 0, copy.byteLength / 4);
}
