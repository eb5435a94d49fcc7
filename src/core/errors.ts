/**
 * Errors that end a request. Every one carries its HTTP status and an OpenAI-style
 * `type` and `code`, so the HTTP front can answer `{"error":{"message","type","code"}}`.
 */
export class GatewayError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly type: string,
    readonly code: string,
    readonly param: string | null = null,
  ) {
    super(message);
    this.name = 'GatewayError';
  }

  toBody(): { error: { message: string; type: string; code: string; param: string | null } } {
    return { error: { message: this.message, type: this.type, code: this.code, param: this.param } };
  }
}

export const errors = {
  badRequest: (message: string, code = 'invalid_request', param: string | null = null) =>
    new GatewayError(400, message, 'invalid_request_error', code, param),
  unauthorized: (message = 'Missing or invalid API key') =>
    new GatewayError(401, message, 'authentication_error', 'invalid_api_key'),
  notFound: (message: string, code = 'not_found') => new GatewayError(404, message, 'invalid_request_error', code),
  modelNotFound: (model: string) =>
    new GatewayError(404, `The model '${model}' is not served by any worker`, 'invalid_request_error', 'model_not_found', 'model'),
  methodNotAllowed: (method: string, path: string) =>
    new GatewayError(405, `Method ${method} is not allowed on ${path}`, 'invalid_request_error', 'method_not_allowed'),
  requestTimeout: (message: string) => new GatewayError(408, message, 'timeout_error', 'queue_timeout'),
  payloadTooLarge: (limit: number) =>
    new GatewayError(413, `Request body exceeds the maximum payload size of ${limit} bytes`, 'invalid_request_error', 'payload_too_large'),
  tooManyRequests: (message: string) => new GatewayError(429, message, 'rate_limit_error', 'rate_limited'),
  internal: (message: string) => new GatewayError(500, message, 'server_error', 'internal_error'),
  badGateway: (message: string, code = 'worker_unreachable') => new GatewayError(502, message, 'server_error', code),
  noHealthyWorkers: (model: string | undefined) =>
    new GatewayError(
      503,
      model ? `No healthy worker is available for model '${model}'` : 'No healthy worker is available',
      'server_error',
      'no_available_workers',
    ),
  unavailable: (message: string, code = 'service_unavailable') => new GatewayError(503, message, 'server_error', code),
  gatewayTimeout: (message: string, code = 'worker_timeout') => new GatewayError(504, message, 'server_error', code),
};

/** Why a request was refused without being served (`x-kvgate-dropped-reason`). */
export type DroppedReason = 'predicted-slo-miss' | 'saturated' | 'no-endpoints';

/** A 429/503 that says why the request was dropped (the gateway adds `x-kvgate-dropped-reason`). */
export class DroppedError extends GatewayError {
  constructor(
    status: number,
    message: string,
    readonly reason: DroppedReason,
  ) {
    super(status, message, status === 429 ? 'rate_limit_error' : 'server_error', reason.replace(/-/g, '_'));
  }
}
