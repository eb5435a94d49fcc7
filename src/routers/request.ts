import type { IncomingHttpHeaders, IncomingMessage, ServerResponse } from 'node:http';
import type { Clock } from '../core/clock.js';
import type { BlockHashes, RequestContext, RouteName } from '../core/context.js';
import type { BlockHashing } from '../policies/policy.js';
import { errors } from '../core/errors.js';
import type { WorkerRegistry } from '../core/registry.js';
import type { WorkerType } from '../core/worker.js';
import type { RequestTrace } from '../observability/tracing.js';
import { routingTextOf } from '../server/routing-text.js';

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
  const routing = routingTextOf(r.route, r.body);
  if (r.body.stream !== undefined && r.body.stream !== null && typeof r.body.stream !== 'boolean') {
    throw errors.badRequest("'stream' must be a boolean", 'invalid_type', 'stream');
  }
  const tokenIds = routing.tokenIds ?? (needsTokens ? tokenize?.(r.route, model, r.body) : undefined);
  const lora = typeof r.body.model === 'string' && r.body.model !== model ? r.body.model : undefined;
  return {
    requestId: r.requestId,
    route: r.route,
    model,
    loraName: lora !== undefined && registry?.forModel(model).some((w) => w.loraAdapters.includes(lora)) ? lora : undefined,
    routingText: routing.text,
    tokenIds,
    headers: r.req.headers,
    stream: r.body.stream === true,
    maxOutputTokens: maxOutputTokens(r.body),
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

function maxOutputTokens(body: Record<string, unknown>): number | undefined {
  const sp = body.sampling_params as Record<string, unknown> | undefined;
  const v = body.max_completion_tokens ?? body.max_tokens ?? (sp && typeof sp === 'object' ? sp.max_new_tokens : undefined);
  return typeof v === 'number' && Number.isInteger(v) && v > 0 ? v : undefined;
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
