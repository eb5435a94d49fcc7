/** Token usage as the engine reported it (OpenAI `usage`). */
export interface EngineUsage {
  promptTokens?: number;
  completionTokens?: number;
  /** usage.prompt_tokens_details.cached_tokens (vLLM with --enable-prompt-tokens-details, SGLang). */
  cachedTokens?: number;
}

export interface TapHooks {
  /** The first content chunk of a stream arrived (or the whole non-streaming answer). */
  onFirstContent?(atMs: number): void;
  /** Time between two content chunks (seconds), once per content event after the first. */
  onInterToken?(seconds: number): void;
}

const CONTENT_KEYS = ['"content"', '"text"', '"reasoning_content"', '"reasoning"', '"tool_calls"'].map((k) => Buffer.from(k));
const USAGE_KEY = Buffer.from('"usage"');
const MAX_USAGE_CHARS = 8192;
const MAX_ITL_SAMPLES_PER_READ = 64;
const SPACE = new Set([0x20, 0x09, 0x0a, 0x0d]);

/**
 * Watches a response as the proxy relays it, without buffering it or changing it: when the first
 * content chunk of a server-sent-event stream arrives (a `content`, `text`, `reasoning_content`
 * or `tool_calls` value that is not empty — not the role-only first chunk engines send), the
 * gaps between content chunks, and the engine's `usage` (the last `"usage":{…}` object seen, in
 * a streamed usage chunk or a JSON body). Per chunk it costs a few native Buffer.indexOf calls;
 * the usage object is copied out (at most 8 KiB) and parsed once, at the end.
 *
 * Inter-token latency is measured between reads that carry content: a read carrying k content
 * events after a gap g counts k samples of g / k. A key split across two reads is not seen as
 * content (the next content read counts instead); usage keys split across reads are found.
 */
export class ResponseTap {
  streaming = false;
  /** The upstream status relayed (0 until the headers arrived). */
  status = 0;
  /** performance.now() of the first content chunk (streams) or of the end (non-streaming). */
  firstContentAt: number | undefined;
  endedAt: number | undefined;
  contentEvents = 0;
  private lastContentAt: number | undefined;
  private usageText: string | undefined;
  /** An unfinished usage object (it continues in the next read). */
  private partial: { text: string; depth: number; inString: boolean; escaped: boolean } | undefined;
  /** How many bytes of `"usage"` the previous read ended with (a key split across reads). */
  private carried = 0;
  /** The previous read ended after a `"usage"` key: 1 = its colon is still to come, 2 = its value. */
  private afterKey: 0 | 1 | 2 = 0;

  constructor(private readonly hooks: TapHooks = {}) {}

  /** Response headers: a text/event-stream answer is a stream. */
  headers(status: number, contentType: string | string[] | undefined): void {
    this.status = status;
    const ct = Array.isArray(contentType) ? contentType[0] : contentType;
    this.streaming = typeof ct === 'string' && ct.toLowerCase().includes('text/event-stream');
  }

  data(chunk: Buffer, now: number = performance.now()): void {
    this.scanUsage(chunk);
    if (!this.streaming) return;
    const k = countContent(chunk);
    if (k === 0) return;
    this.contentEvents += k;
    if (this.lastContentAt === undefined) {
      this.firstContentAt = now;
      this.hooks.onFirstContent?.(now);
    } else if (this.hooks.onInterToken) {
      const gap = (now - this.lastContentAt) / 1000 / k;
      for (let i = 0; i < Math.min(k, MAX_ITL_SAMPLES_PER_READ); i++) this.hooks.onInterToken(gap);
    }
    this.lastContentAt = now;
  }

  end(now: number = performance.now()): void {
    if (this.endedAt !== undefined) return;
    this.endedAt = now;
    if (!this.streaming && this.firstContentAt === undefined) {
      this.firstContentAt = now;
      this.hooks.onFirstContent?.(now);
    }
  }

  /** The last usage object the response carried, parsed; undefined when none (or unreadable). */
  usage(): EngineUsage | undefined {
    if (this.usageText === undefined) return undefined;
    let u: Record<string, unknown>;
    try {
      u = JSON.parse(this.usageText) as Record<string, unknown>;
    } catch {
      return undefined;
    }
    if (!u || typeof u !== 'object') return undefined;
    const num = (v: unknown) => (typeof v === 'number' && Number.isFinite(v) && v >= 0 ? v : undefined);
    const details = u.prompt_tokens_details as Record<string, unknown> | null | undefined;
    return {
      promptTokens: num(u.prompt_tokens),
      completionTokens: num(u.completion_tokens),
      cachedTokens: num(details && typeof details === 'object' ? details.cached_tokens : undefined) ?? num(u.cached_tokens),
    };
  }

  private scanUsage(chunk: Buffer): void {
    if (chunk.length === 0) return;
    let from = 0;
    if (this.partial) {
      from = this.continueCapture(chunk, 0);
      if (from < 0) return;
    } else if (this.afterKey !== 0) {
      const expect = this.afterKey;
      this.afterKey = 0;
      from = this.startCapture(chunk, 0, expect);
      if (from < 0) return;
    }
    // A key split between the previous read and this one: the previous read ended with the
    // first `carried` bytes of `"usage"` (no copy kept: which prefix is enough).
    const carried = this.carried;
    this.carried = 0;
    if (carried > 0 && from === 0 && continuesKey(chunk, carried)) {
      const rest = USAGE_KEY.length - carried;
      if (chunk.length < rest) {
        this.carried = carried + chunk.length; // still inside the key
        return;
      }
      from = this.startCapture(chunk, rest);
      if (from < 0) return; // continues in the next read
    }
    for (;;) {
      const at = chunk.indexOf(USAGE_KEY, from);
      if (at < 0) break;
      const next = this.startCapture(chunk, at + USAGE_KEY.length);
      if (next < 0) return; // continues in the next read
      from = next;
    }
    this.carried = usagePrefixAtEnd(chunk, from);
  }

  /** After a `"usage"` key at `pos`: `:` then `{…}` (captured) or null. Returns where scanning goes on, −1 while open. */
  private startCapture(buf: Buffer, pos: number, expect: 1 | 2 = 1): number {
    let i = pos;
    if (expect === 1) {
      while (i < buf.length && SPACE.has(buf[i])) i++;
      if (i >= buf.length) return this.awaitNext(1, buf.length);
      if (buf[i] !== 0x3a /* : */) return i;
      i++;
    }
    while (i < buf.length && SPACE.has(buf[i])) i++;
    if (i >= buf.length) return this.awaitNext(2, buf.length);
    if (buf[i] !== 0x7b /* { */) return i;
    this.partial = { text: '', depth: 0, inString: false, escaped: false };
    return this.continueCapture(buf, i);
  }

  /** The read ended after the key (1: before its colon; 2: before the value): go on in the next read. */
  private awaitNext(expect: 1 | 2, end: number): number {
    this.afterKey = expect;
    return end;
  }

  /** Scans the capture on from `start`; returns the index after its closing brace, or −1 when the read ended first. */
  private continueCapture(buf: Buffer, start: number): number {
    const p = this.partial!;
    let i = start;
    for (; i < buf.length; i++) {
      const c = buf[i];
      if (p.inString) {
        if (p.escaped) p.escaped = false;
        else if (c === 0x5c) p.escaped = true;
        else if (c === 0x22) p.inString = false;
        continue;
      }
      if (c === 0x22) p.inString = true;
      else if (c === 0x7b) p.depth++;
      else if (c === 0x7d && --p.depth === 0) {
        p.text += buf.toString('utf8', start, i + 1);
        this.partial = undefined;
        if (p.text.length <= MAX_USAGE_CHARS) this.usageText = p.text;
        return i + 1;
      }
    }
    p.text += buf.toString('utf8', start, buf.length);
    if (p.text.length > MAX_USAGE_CHARS) this.partial = undefined; // not a usage object worth reading
    return -1;
  }
}

/** Whether `buf` goes on with `"usage"` from its byte `offset` (as far as `buf` reaches). */
function continuesKey(buf: Buffer, offset: number): boolean {
  const n = Math.min(buf.length, USAGE_KEY.length - offset);
  for (let i = 0; i < n; i++) if (buf[i] !== USAGE_KEY[offset + i]) return false;
  return true;
}

/**
 * The length k (1..5, or 0) of the proper prefix of `"usage"` that `buf` ends with, not before
 * `from`. At most one k matches: the prefixes all end in a different byte.
 */
function usagePrefixAtEnd(buf: Buffer, from: number): number {
  const n = buf.length;
  for (let k = Math.min(USAGE_KEY.length - 1, n - from); k > 0; k--) {
    if (buf[n - 1] !== USAGE_KEY[k - 1]) continue;
    let j = 0;
    while (j < k && buf[n - k + j] === USAGE_KEY[j]) j++;
    if (j === k) return k;
  }
  return 0;
}

/**
 * Content events in one read: keys of CONTENT_KEYS whose value is a non-empty string
 * (tool_calls: a non-empty array). One pass over the bytes: at each `"`, the byte after it
 * tells which key it could start (c, t, r), then that key is compared — no key starts another
 * one's prefix, and each `"` is tried, as a search for each key would.
 */
export function countContent(buf: Buffer): number {
  let n = 0;
  const len = buf.length;
  // Where the last match of each key ended: a key is not searched again inside its own match.
  const ends = [0, 0, 0, 0, 0];
  for (let at = 0; at < len; at++) {
    if (buf[at] !== 0x22) continue;
    const c = buf[at + 1];
    let k: number;
    if (c === 0x63 /* c */) k = 0;
    else if (c === 0x74 /* t */) k = buf[at + 2] === 0x65 /* e */ ? 1 : 4;
    else if (c === 0x72 /* r */) k = buf[at + 10] === 0x5f /* _ */ ? 2 : 3;
    else continue;
    if (at < ends[k]!) continue;
    const key = CONTENT_KEYS[k]!;
    const kl = key.length;
    if (at + kl > len) continue;
    let j = 2;
    while (j < kl && buf[at + j] === key[j]) j++;
    if (j < kl) continue;
    ends[k] = at + kl;
    let i = at + kl;
    while (i < len && SPACE.has(buf[i]!)) i++;
    if (buf[i] !== 0x3a) continue;
    i++;
    while (i < len && SPACE.has(buf[i]!)) i++;
    const open = buf[i];
    if (open === 0x22 /* " */ && i + 1 < len && buf[i + 1] !== 0x22) n++;
    else if (open === 0x5b /* [ */ && key === CONTENT_KEYS[4]) {
      let m = i + 1;
      while (m < len && SPACE.has(buf[m]!)) m++;
      if (m < len && buf[m] !== 0x5d) n++;
    }
  }
  return n;
}
