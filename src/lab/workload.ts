/**
 * What the policy lab replays: requests with arrival times, prompt tokens and the routing
 * text the gateway would see for them. Workloads are produced in arrival order.
 *
 * Token and text prefixes are consistent: two requests share a token prefix of k tokens exactly
 * when their texts share the prefix made of those tokens' text (each token has a fixed text),
 * so the character tree (cache_aware) and the engine's block cache see the same sharing.
 */
export interface LabRequest {
  /** Stable id within the workload (e.g. "r123"). */
  id: string;
  /** Arrival time in ms from the start of the workload (non-decreasing across the list). */
  arrivalMs: number;
  /** Prompt token ids. */
  promptTokens: Uint32Array;
  /** Tokens to generate (>= 1). */
  outputTokens: number;
  /** Routing text as the gateway would extract it (lazily built: can be long). */
  text(): string;
  /** Optional grouping for reports (session, prefix group). */
  group?: string;
}

export interface Workload {
  /** Human-readable name including its parameters, for reports. */
  name: string;
  requests: LabRequest[];
  /** Notes for the report (e.g. what was spread, what was cut). */
  notes: string[];
}
