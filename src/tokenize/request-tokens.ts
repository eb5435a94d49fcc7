import type { BlockHashes, RouteName } from '../core/context.js';
import { GatewayError } from '../core/errors.js';
import { TokenizeCancelled, type PrepareResult, type TokenizePool } from './pool.js';
import type { TokenizerRegistry } from './registry.js';
import type { Tokenizer } from './tokenizer.js';

export type FallbackReason = 'budget' | 'too_long' | 'error';

export interface RequestTokensOptions {
  /** Tokenizer threads (undefined: tokenize on the event loop, the pre-#12 path). */
  pool?: TokenizePool;
  /** Tokenizers the pool's threads hold (loaded from the --tokenizer entries); others run inline. */
  pooled?: ReadonlySet<Tokenizer>;
  /** --max-routing-ms: wait at most this long for token ids, then route by text (0: wait). */
  maxRoutingMs: number;
  /** --max-tokenize-chars: longer prompts are routed by text, not tokenized. */
  maxChars: number;
  /**
   * --inline-tokenize-chars: prompts up to this long are tokenized on the event loop (well under
   * a millisecond). Default 0: short prompts go to the pool's short lane (--short-tokenize-chars),
   * so the event loop holds no tokenizer.
   */
  inlineChars?: number;
  /**
   * --parse-off-loop-bytes: bodies at least this large are parsed, validated and tokenized in a
   * tokenizer thread, never on the event loop (0: never). Needs the threads and no --max-routing-ms.
   */
  offLoopBytes?: number;
  /** --max-json-depth (the threads check it as the event loop does). */
  maxJsonDepth?: number;
  onFallback?: (reason: FallbackReason) => void;
  onCancelled?: () => void;
  onTokenized?: (where: 'pool' | 'inline', seconds: number) => void;
}

export interface TokenRequest {
  route: RouteName;
  model: string;
  body: Record<string, unknown>;
  /** The body's JSON bytes (sent to a thread instead of the parsed body). */
  raw?: Uint8Array;
  /** The routing text (its length caps tokenization; its start picks the thread). */
  text: string;
  /** Block size and seed to hash the ids with in the thread (the policy's `blockHashing`). */
  blocks?: { blockSize: number; seed: bigint };
}

/** Token ids, and their block hashes when a thread computed them (`TokenRequest.blocks`). */
export interface TokenResult {
  ids: ArrayLike<number>;
  hashes?: BlockHashes;
}

/**
 * Token ids of requests for the policies that need them: on a tokenizer thread when the model's
 * tokenizer is one the threads hold (a Promise), else inline (synchronously, as before). Over
 * --max-tokenize-chars, or not ready within --max-routing-ms, the request is routed by its text
 * (undefined) and the fallback counted; a late tokenization still finishes and warms the
 * thread's caches. Malformed fields still answer 400 when found in time.
 */
export class RequestTokens {
  constructor(
    private readonly tokenizers: TokenizerRegistry,
    private readonly opts: RequestTokensOptions,
  ) {}

  /** Tokenize on these threads from now on, for the models whose tokenizer is in `pooled`. */
  usePool(pool: TokenizePool | undefined, pooled: ReadonlySet<Tokenizer>): void {
    this.opts.pool = pool;
    this.opts.pooled = pooled;
  }

  /** Whether a body of `bytes` bytes is to be parsed in a tokenizer thread (`prepare`). */
  offLoop(bytes: number): boolean {
    const o = this.opts;
    return o.pool !== undefined && !(o.maxRoutingMs > 0) && (o.offLoopBytes ?? 0) > 0 && bytes >= o.offLoopBytes!;
  }

  /** Whether ids encoded with the tokenizer of `encodedFor` (a body's `model`, or the default) are the ids `model` needs. */
  sameTokenizer(encodedFor: string | undefined, model: string): boolean {
    const t = this.tokenizers.get(encodedFor);
    return t === this.tokenizers.get(model) && this.opts.pooled?.has(t) === true;
  }

  /**
   * A body parsed, validated and tokenized in a thread (TokenizePool.prepare). Rejects with the
   * body's 400 (not a JSON object); resolves undefined when the thread failed (the caller then
   * parses on the event loop, counted as an 'error' fallback) or the client left (cancelled).
   */
  async prepare(route: RouteName, raw: Uint8Array, blocks: TokenRequest['blocks'], signal?: AbortSignal): Promise<PrepareResult | undefined> {
    const o = this.opts;
    const started = performance.now();
    try {
      const r = await o.pool!.prepare({ route, raw, maxDepth: o.maxJsonDepth ?? 64, maxChars: o.maxChars, blocks }, signal);
      if (r.ids) o.onTokenized?.('pool', (performance.now() - started) / 1000);
      if (r.prepared.tooLong) o.onFallback?.('too_long');
      return r;
    } catch (e) {
      if (e instanceof GatewayError && e.status < 500) throw e;
      if (e instanceof TokenizeCancelled) o.onCancelled?.();
      else o.onFallback?.('error');
      return undefined;
    }
  }

  tokens(t: TokenRequest, signal?: AbortSignal): TokenResult | undefined | Promise<TokenResult | undefined> {
    const o = this.opts;
    if (t.text.length > o.maxChars) {
      o.onFallback?.('too_long');
      return undefined;
    }
    const started = performance.now();
    const pool = o.pool;
    if (!pool || t.text.length <= (o.inlineChars ?? 0) || !o.pooled?.has(this.tokenizers.get(t.model))) {
      const ids = this.tokenizers.tokenize(t.route, t.body, t.model);
      o.onTokenized?.('inline', (performance.now() - started) / 1000);
      return ids && { ids };
    }
    const work = pool.encode({ route: t.route, model: t.model, raw: t.raw, body: t.body, affinity: t.text, blocks: t.blocks }, signal).then(
      (r) => {
        o.onTokenized?.('pool', (performance.now() - started) / 1000);
        return r;
      },
      (e: Error) => {
        if (e instanceof GatewayError && e.status < 500) throw e;
        if (e instanceof TokenizeCancelled) o.onCancelled?.();
        else o.onFallback?.('error');
        return undefined;
      },
    );
    if (!(o.maxRoutingMs > 0)) return work;
    return new Promise((resolve, reject) => {
      let late = false;
      const timer = setTimeout(() => {
        late = true;
        o.onFallback?.('budget');
        resolve(undefined);
      }, o.maxRoutingMs);
      work.then(
        (ids) => {
          clearTimeout(timer);
          if (!late) resolve(ids);
        },
        (e: Error) => {
          clearTimeout(timer);
          if (!late) reject(e);
        },
      );
    });
  }
}
