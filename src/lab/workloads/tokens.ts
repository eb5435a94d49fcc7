import { fmix32 } from '../../core/hash.js';

/**
 * Synthetic token content for lab workloads.
 *
 * Traces (Mooncake, Azure) carry token counts and prefix-block ids, not tokens, and the
 * generators only describe structure. Every workload therefore builds its prompts from
 * *segments*: a segment is a key (a Mooncake hash id, a system prompt, a question...) whose
 * tokens are a pure function of (salt, key, position) — a counter-based hash, so any token of
 * any segment can be produced on demand, with no table and no state.
 *
 * - Token ids are in [0, VOCAB) (VOCAB = 128,000).
 * - The first token of a segment is a bijection of (key mod VOCAB) (shifted by the salt), so two
 *   segments whose keys differ by less than VOCAB never start with the same token: requests
 *   that diverge at a segment boundary share exactly the tokens before it, not one token more
 *   by chance.
 * - Each token id has a fixed 4-character text (lowercase letters, at most one space, never a
 *   leading space), and the map is injective. Texts are the concatenation of token texts, so
 *   for whole tokens: text(A) is a prefix of text(B) iff A is a token prefix of B, and the
 *   common character prefix of two prompts is 4 × their common token prefix (+0..3 characters
 *   when the next tokens happen to start alike). The 4-character grid also lines up with
 *   the simulator's default ChunkTokenizer (4 code points per token), so re-tokenising the text
 *   reproduces the same sharing structure.
 */

/** Token ids are drawn from [0, VOCAB). */
export const VOCAB = 128_000;
/** Characters of text per token. */
export const CHARS_PER_TOKEN = 4;

const L3 = 26 * 26 * 26; // 17,576
const SPACED = 3 * L3; // ids [0, 52,728): three letters and one space at position 1, 2 or 3

const A = 97; // 'a'
const SPACE = 32;

/** Writes the 4 character codes of token `id` (in [0, VOCAB)) to out[at..at+3]. */
function writeTokenCodes(id: number, out: Uint8Array, at: number): void {
  if (id < SPACED) {
    const pos = 1 + Math.floor(id / L3);
    let r = id % L3;
    let o = at;
    for (let i = 0; i < 4; i++) {
      if (i === pos) {
        out[o++] = SPACE;
      } else {
        out[o++] = A + (r % 26);
        r = Math.floor(r / 26);
      }
    }
    return;
  }
  let r = id - SPACED; // < 75,272 < 26^4
  for (let i = 0; i < 4; i++) {
    out[at + i] = A + (r % 26);
    r = Math.floor(r / 26);
  }
}

/** The fixed text of a token id (4 ASCII characters). */
export function tokenText(id: number): string {
  if (!Number.isInteger(id) || id < 0 || id >= VOCAB) throw new RangeError(`token id ${id} is outside [0, ${VOCAB})`);
  const b = new Uint8Array(CHARS_PER_TOKEN);
  writeTokenCodes(id, b, 0);
  return String.fromCharCode(b[0]!, b[1]!, b[2]!, b[3]!);
}

let table32: Uint32Array | undefined;
let reverse: Map<string, number> | undefined;

/** The 4 text bytes of every token, in memory order, viewed as one Uint32 per token. */
function textTable(): Uint32Array {
  if (table32) return table32;
  const bytes = new Uint8Array(VOCAB * CHARS_PER_TOKEN);
  for (let id = 0; id < VOCAB; id++) writeTokenCodes(id, bytes, id * CHARS_PER_TOKEN);
  table32 = new Uint32Array(bytes.buffer);
  return table32;
}

/** Text of a token sequence: the concatenation of the tokens' fixed texts (4 chars each). */
export function tokensToText(tokens: ArrayLike<number>): string {
  const n = tokens.length;
  if (n === 0) return '';
  const table = textTable();
  // Same byte order on both sides, so one 32-bit copy per token moves its 4 characters.
  const out = new Uint32Array(n);
  for (let i = 0; i < n; i++) {
    const id = tokens[i]!;
    if (!(id >= 0 && id < VOCAB)) throw new RangeError(`token id ${id} at position ${i} is outside [0, ${VOCAB})`);
    out[i] = table[id]!;
  }
  return Buffer.from(out.buffer, 0, n * CHARS_PER_TOKEN).toString('latin1');
}

/** Inverse of tokensToText (for tests and tools). Throws on text that no token sequence produces. */
export function textToTokens(text: string): Uint32Array {
  if (text.length % CHARS_PER_TOKEN !== 0) throw new RangeError(`text length ${text.length} is not a multiple of ${CHARS_PER_TOKEN}`);
  if (!reverse) {
    reverse = new Map();
    for (let id = 0; id < VOCAB; id++) reverse.set(tokenText(id), id);
  }
  const out = new Uint32Array(text.length / CHARS_PER_TOKEN);
  for (let i = 0; i < out.length; i++) {
    const chunk = text.slice(i * CHARS_PER_TOKEN, (i + 1) * CHARS_PER_TOKEN);
    const id = reverse.get(chunk);
    if (id === undefined) throw new RangeError(`"${chunk}" at character ${i * CHARS_PER_TOKEN} is not a token text`);
    out[i] = id;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Segment token content
// ---------------------------------------------------------------------------------------------

/** A 32-bit salt from a seed (workloads whose token content depends on the seed). */
export function saltFromSeed(seed: number, stream: number): number {
  return fmix32((fmix32(seed >>> 0) ^ Math.imul(stream + 1, 0x9e3779b9)) >>> 0);
}

// Multiplier coprime with VOCAB = 2^10 × 5^3: (A·x + b) mod VOCAB is a bijection on [0, VOCAB).
const FIRST_MUL = 48_271;

/**
 * Writes tokens [from, from + count) of segment `key` into out[at...].
 * `key` is a non-negative safe integer; `salt` a uint32.
 */
export function fillSegment(out: Uint32Array, at: number, key: number, salt: number, from: number, count: number): void {
  const lo = key >>> 0;
  const hi = Math.floor(key / 4294967296) >>> 0;
  const base = fmix32((lo ^ fmix32((hi ^ salt) >>> 0)) >>> 0);
  let j = from;
  let o = at;
  const end = from + count;
  if (j === 0 && count > 0) {
    const shift = salt % VOCAB;
    out[o++] = (((key % VOCAB) * FIRST_MUL) % VOCAB + shift) % VOCAB;
    j = 1;
  }
  for (; j < end; j++) out[o++] = fmix32((base + Math.imul(j, 0x9e3779b9)) >>> 0) % VOCAB;
}

/** The tokens of one whole segment (convenience for tests). */
export function segmentTokens(key: number, salt: number, length: number): Uint32Array {
  const out = new Uint32Array(length);
  fillSegment(out, 0, key, salt, 0, length);
  return out;
}
