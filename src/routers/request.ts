import type { IncomingHttpHeaders, IncomingMessage, ServerResponse } from 'node:http';
import type { Clock } from '../core/clock.js';
import type { BlockHashes, RequestContext, RouteName } from '../core/context.js';
import type { BlockHashing } from '../policies/policy.js';
import { errors, GatewayError } from '../core/errors.js';
import type { WorkerRegistry } from '../core/registry.js';
import type { WorkerType } from '../core/worker.js';
import type { RequestTrace } from '../observability/tracing.js';
import { bodyView, lazyBody, parseJsonObject, type BodyView } from '../core/request-body.js';
import type { PrepareResult } from '../tokenize/pool.js';
import type { BodyError } from '../tokenize/pool-worker.js';

/** A generation request as the HTTP front hands it to a router. */
export interface RoutedRequest {
  req: IncomingMessage;
  res: ServerResponse;
  route: RouteName;
  path: string;
  requestId: string;
  rawBody: Buffer;
  body: Record<string, unknown>;
  /** performance.now() when the request arrived (TTFT and end-to-end latency count from it). */
  arrivedAt?: number;
  /** The request's trace (tracing on). */
  trace?: RequestTrace;
  /** The model the request was routed to, once resolved (set by routeModel; metrics label). */
  model?: string;
  /** Admission priority (x-kvgate-priority / --api-key-priority; negative = sheddable). */
  priority?: number;
  /**
   * The HTTP front did not parse the body (over --parse-off-loop-bytes): `body` is empty until
   * the router has a tokenizer thread parse it (preparedContext).
   */
  unparsed?: boolean;
  /** Token usage the engine reported for the exchange that answered (per-key token limits). */
  usage?: { promptTokens?: number; completionTokens?: number };
}

/** What buildContext reads of a request: the HTTP front's RoutedRequest, or the endpoint picker's. */
export interface ContextSource {
  route: RouteName;
  requestId: string;
  body: Record<string, unknown>;
  req: { headers: IncomingHttpHeaders };
}

export type Tokenize = (route: RouteName, model: string, body: Record<string, unknown>) => ArrayLike<number> | undefined;

/**
 * Token ids for policies that need them, possibly computed off the event loop (a Promise):
 * tokenize/request-tokens.ts. Undefined: route by text.
 */
export interface TokenSource {
  tokens(
    t: { route: RouteName; model: string; body: Record<string, unknown>; raw?: Uint8Array; text: string; blocks?: BlockHashing },
    signal?: AbortSignal,
  ): { ids: ArrayLike<number>; hashes?: BlockHashes } | undefined | Promise<{ ids: ArrayLike<number>; hashes?: BlockHashes } | undefined>;
}

/** What can tell that the client left (the HTTP response). */
export interface Closable {
  readonly destroyed: boolean;
  once(event: 'close', fn: () => void): unknown;
  removeListener(event: 'close', fn: () => void): unknown;
}

/**
 * Which model a request is for, as the SGLang router decides it: with one model served (by
 * workers of the given types), every request goes to it whatever its `model` names, or none;
 * the request's `model` must match a served model only when several are served or `strict`
 * (--strict-model). Unknown model → 404; unknown but some worker's model not yet discovered → 503.
 * A request naming another model than the one it is routed to has its `model` rewritten (body
 * and bytes) so that engines checking the name (vLLM) serve it too.
 */
export function resolveModel(registry: WorkerRegistry, body: Record<string, unknown>, types: readonly WorkerType[], strict = false): string {
  const requested = body.model;
  const served = (m: string) => types.some((t) => registry.forModel(m, t).length > 0);
  const models = registry.models().filter(served);
  const undiscovered = registry.all().some((w) => w.modelId === undefined && types.includes(w.type));
  if (requested !== undefined && requested !== null) {
    if (typeof requested !== 'string') throw errors.badRequest("'model' must be a string", 'invalid_type', 'model');
    if (served(requested)) return requested;
    const base = adapterBase(registry, requested, types);
    if (base !== undefined) return base;
    if (!strict && models.length === 1 && !undiscovered) return models[0];
    if (undiscovered) throw errors.noHealthyWorkers(requested);
    throw errors.modelNotFound(requested);
  }
  if (models.length === 1) return models[0];
  if (models.length === 0) throw errors.noHealthyWorkers(undefined);
  throw errors.badRequest(`'model' is required: this gateway serves ${models.length} models (${models.join(', ')})`, 'missing_field', 'model');
}

/** The model whose workers list `name` as a LoRA adapter, if any (first found). */
export function adapterBase(registry: WorkerRegistry, name: string, types: readonly WorkerType[]): string | undefined {
  for (const w of registry.all()) if (w.modelId !== undefined && types.includes(w.type) && w.loraAdapters.includes(name)) return w.modelId;
  return undefined;
}

/** The LoRA adapter a request names for `model` (its `model` is an adapter of it), else undefined. */
export function loraOf(registry: WorkerRegistry, body: Record<string, unknown>, model: string): string | undefined {
  const name = body.model;
  if (typeof name !== 'string' || name === model) return undefined;
  return registry.forModel(model).some((w) => w.loraAdapters.includes(name)) ? name : undefined;
}

/**
 * Resolves the model of a routed request and, when the request named another model than the
 * one served (and not one of its LoRA adapters), rewrites its `model` (parsed body and the
 * bytes sent upstream).
 */
export function routeModel(registry: WorkerRegistry, r: RoutedRequest, types: readonly WorkerType[], strict = false): string {
  const model = resolveModel(registry, r.body, types, strict);
  r.model = model;
  if (typeof r.body.model === 'string' && r.body.model !== model && loraOf(registry, r.body, model) === undefined) {
    r.body = { ...r.body, model };
    r.rawBody = Buffer.from(JSON.stringify(r.body));
  }
  return model;
}

/** What policies see of a request: routing text (all messages), token ids when needed, limits. */
/**
 * `registry` (optional) lets the context name the LoRA adapter the request asks for (its `model`
 * is an adapter a worker of `model` lists).
 */
export function buildContext(r: ContextSource, model: string, clock: Clock, tokenize: Tokenize | undefined, needsTokens: boolean, registry?: WorkerRegistry): RequestContext {
  const view = bodyView(r.route, r.body);
  const tokenIds = view.tokenIds ?? (needsTokens ? tokenize?.(r.route, model, r.body) : undefined);
  return contextOf(r, view, model, clock, registry, tokenIds);
}

/**
 * The context from a body's view (core/request-body.ts `bodyView`, computed here or by a
 * tokenizer thread) and its `model` field: the one place a RequestContext is assembled.
 */
export function contextOf(
  r: { route: RouteName; requestId: string; body: Record<string, unknown>; req: { headers: IncomingHttpHeaders } },
  view: BodyView,
  model: string,
  clock: Clock,
  registry: WorkerRegistry | undefined,
  tokenIds: ArrayLike<number> | undefined,
): RequestContext {
  const named = r.body.model;
  const lora = typeof named === 'string' && named !== model ? named : undefined;
  return {
    requestId: r.requestId,
    route: r.route,
    model,
    loraName: lora !== undefined && registry?.forModel(model).some((w) => w.loraAdapters.includes(lora)) ? lora : undefined,
    routingText: view.text,
    tokenIds,
    headers: r.req.headers,
    stream: view.stream,
    maxOutputTokens: view.maxOutputTokens,
    arrivalMs: clock.now(),
  };
}

/**
 * buildContext with the token ids of a TokenSource, for a policy that needs them. The policy
 * interface stays synchronous: token ids are ready (or given up on, see --max-routing-ms) before
 * the policy is called. Synchronous (no Promise, no extra work) when the policy needs no tokens,
 * the request carries its token ids, or the source answers inline. The work stops when `client`
 * closes first.
 */
export function contextFor(
  r: ContextSource & { rawBody?: Uint8Array },
  model: string,
  clock: Clock,
  source: TokenSource | undefined,
  needsTokens: boolean,
  client?: Closable | AbortSignal,
  registry?: WorkerRegistry,
  trace?: RequestTrace,
  hashing?: (ctx: RequestContext) => BlockHashing | undefined,
): RequestContext | Promise<RequestContext> {
  const ctx = buildContext(r, model, clock, undefined, false, registry);
  if (!needsTokens || !source || ctx.tokenIds !== undefined) return ctx;
  return withTokens(r, ctx, model, source, client, trace, hashing);
}

/** `ctx` with the token ids (and block hashes) of `source`; see contextFor. */
function withTokens(
  r: ContextSource & { rawBody?: Uint8Array },
  ctx: RequestContext,
  model: string,
  source: TokenSource,
  client?: Closable | AbortSignal,
  trace?: RequestTrace,
  hashing?: (ctx: RequestContext) => BlockHashing | undefined,
): RequestContext | Promise<RequestContext> {
  const span = trace?.child('tokenize', { 'kvgate.model': model });
  const done = (got: { ids: ArrayLike<number> } | undefined) => {
    if (span) {
      span.setAttribute('kvgate.prompt_tokens', got?.ids.length ?? 0);
      span.end();
    }
  };
  let ac: AbortController | undefined;
  let onClose: (() => void) | undefined;
  if (client instanceof AbortSignal) {
    ac = { signal: client } as AbortController;
    client = undefined;
  } else if (client) {
    ac = new AbortController();
    if (client.destroyed) ac.abort();
    else client.once('close', (onClose = () => ac!.abort()));
  }
  let got: ReturnType<TokenSource['tokens']>;
  try {
    got = source.tokens({ route: r.route, model, body: r.body, raw: r.rawBody, text: ctx.routingText, blocks: hashing?.(ctx) }, ac?.signal);
  } catch (e) {
    if (onClose) client!.removeListener('close', onClose);
    done(undefined);
    throw e;
  }
  if (!(got instanceof Promise)) {
    if (onClose) client!.removeListener('close', onClose);
    done(got);
    return got === undefined ? ctx : { ...ctx, tokenIds: got.ids, blockHashes: got.hashes };
  }
  return got.then(
    (t) => {
      if (onClose) client!.removeListener('close', onClose);
      done(t);
      return t === undefined ? ctx : { ...ctx, tokenIds: t.ids, blockHashes: t.hashes };
    },
    (e: unknown) => {
      if (onClose) client!.removeListener('close', onClose);
      done(undefined);
      throw e;
    },
  );
}

/** A TokenSource that can also parse, validate and tokenize whole bodies off the event loop (tokenize/request-tokens.ts). */
export interface PreparingSource extends TokenSource {
  offLoop(bytes: number): boolean;
  sameTokenizer(encodedFor: string | undefined, model: string): boolean;
  prepare(route: RouteName, raw: Uint8Array, blocks: BlockHashing | undefined, signal?: AbortSignal): Promise<PrepareResult | undefined>;
}

/**
 * The model and context of a request whose body the HTTP front left unparsed
 * (`RoutedRequest.unparsed`, a body over --parse-off-loop-bytes): a tokenizer thread parses,
 * validates and tokenizes it (the same functions as the event loop), and here the model is
 * resolved from its top-level fields and the context assembled from what the thread found, with
 * the errors raised in the event-loop path's order (not JSON → model → fields → tokenizing).
 * `r.body` becomes a lazy view (prompt fields parsed here only if something reads them: a model
 * or data-parallel-rank rewrite); the bytes forwarded are `r.rawBody`, as on the event-loop path.
 * Resolves 'aborted' when the client left first, or 'fallback' when the thread failed (then
 * `r.body` is the body parsed here and the caller takes the event-loop path).
 */
export async function preparedContext(
  r: RoutedRequest,
  types: readonly WorkerType[],
  deps: { registry: WorkerRegistry; clock: Clock; source: PreparingSource; strict?: boolean; maxJsonDepth: number; hashing?: (ctx: RequestContext) => BlockHashing | undefined },
): Promise<{ model: string; ctx: RequestContext } | 'aborted' | 'fallback'> {
  const { registry, clock, source } = deps;
  const span = r.trace?.child('tokenize', { 'kvgate.off_loop': true });
  const ac = new AbortController();
  const onClose = () => ac.abort();
  if (r.res.destroyed) ac.abort();
  else r.res.once('close', onClose);
  // Block hashing as asked for a request on the base model (a LoRA adapter's seed differs: the
  // policy then sees hashes of another seed and hashes itself, as it does for any mismatch).
  const before: RequestContext = { requestId: r.requestId, route: r.route, model: '', routingText: '', headers: r.req.headers, stream: false, arrivalMs: clock.now() };
  let got: PrepareResult | undefined;
  try {
    got = await source.prepare(r.route, r.rawBody, deps.hashing?.(before), ac.signal);
  } finally {
    r.res.removeListener('close', onClose);
    if (span) {
      span.setAttribute('kvgate.prompt_tokens', got?.ids?.length ?? 0);
      span.end();
    }
  }
  if (r.res.destroyed) return 'aborted';
  r.unparsed = false;
  if (!got) {
    r.body = parseJsonObject(r.rawBody, deps.maxJsonDepth);
    return 'fallback';
  }
  const p = got.prepared;
  r.body = lazyBody(p.head, p.omitted, r.rawBody, deps.maxJsonDepth);
  const model = routeModel(registry, r, types, deps.strict);
  if (p.fieldError) throw bodyErrorOf(p.fieldError);
  const view = p.view!;
  let ctx = contextOf(r, view, model, clock, registry, view.tokenIds);
  if (ctx.tokenIds !== undefined || p.tooLong) return { model, ctx };
  if (source.sameTokenizer(p.tokenModel, model)) {
    if (p.tokenError) throw bodyErrorOf(p.tokenError);
    if (got.ids) ctx = { ...ctx, tokenIds: got.ids, blockHashes: got.hashes };
    return { model, ctx };
  }
  // The model resolved to one whose tokenizer is not the one the thread used: tokenize again with it.
  const again = withTokens(r, ctx, model, source, r.res, r.trace, deps.hashing);
  return { model, ctx: again instanceof Promise ? await again : again };
}

function bodyErrorOf(e: BodyError): GatewayError {
  return new GatewayError(e.status, e.message, e.errType, e.code, e.param);
}

/** `tokenize` inside a `tokenize` span of the request's trace (as is without tracing). */
export function tracedTokenize(tokenize: Tokenize | undefined, trace: RequestTrace | undefined): Tokenize | undefined {
  if (!tokenize || !trace) return tokenize;
  return (route, model, body) => {
    const span = trace.child('tokenize', { 'kvgate.model': model });
    try {
      const ids = tokenize(route, model, body);
      span.setAttribute('kvgate.prompt_tokens', ids?.length ?? 0);
      return ids;
    } finally {
      span.end();
    }
  };
}
