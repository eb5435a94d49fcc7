/**
 * Step-time model of the simulated engine: how long one scheduler step (one forward pass over
 * the batch) takes on the modelled GPU.
 *
 *   durationMs = slowFactor × ( overheadMs
 *                              + prefillTokenMs        × Σ prefill tokens in the step
 *                              + prefillAttentionMs    × Σ over prefill chunks of (query × key) pairs
 *                              + decodeSeqMs           × number of decode sequences
 *                              + decodeContextTokenMs  × Σ context length of the decode sequences )
 *
 * A prefill chunk of C new tokens on top of P tokens already in the KV cache (prefix-cache hit
 * or earlier chunks) attends to C·P + C·(C+1)/2 (query, key) pairs (causal attention).
 *
 * Defaults model Llama-3-8B (bf16; 32 layers, hidden 4096, 32 query heads / 8 KV heads of dim
 * 128, 8.03 B parameters) on one H100 SXM 80 GB (989 TFLOP/s dense bf16, 3.35 TB/s HBM3):
 *
 * - overheadMs 6.0: every forward pass streams the 16.06 GB of weights from HBM; at ~2.7 TB/s
 *   achieved (~80 % of peak) that is ~5.9 ms, plus kernel-launch/scheduler time. This is the
 *   batch-1 inter-token latency floor: vLLM bf16 decode of an 8B model on one H100 is reported
 *   at ~6-7 ms/token; NVIDIA's NIM benchmark page (docs.nvidia.com/nim/benchmarking/llm,
 *   Llama-3.1-8B-Instruct, 1×H100, concurrency 1) shows 4.4-4.6 ms with its optimised
 *   (TensorRT-LLM) profile, which bounds it from below.
 * - prefillTokenMs 0.05: 2 × 8.03 GFLOP per token through the linear layers; at ~32 % MFU of
 *   989 TFLOP/s (typical for vLLM chunked prefill mixed with decodes) → 0.05 ms/token, i.e.
 *   ~20 k prompt tokens/s before attention (an 8 k-token cold prefill ≈ 0.45 s).
 * - prefillAttentionMs 1.0e-6: per (query, key) pair, QKᵀ and PV cost 2·2·4096 FLOP per layer ×
 *   32 layers = 524 288 FLOP; at ~50 % of peak (FlashAttention on H100) ≈ 1.06e-9 s. Dynamo's
 *   mocker fits the quadratic prefill term at 4.2e-7·t² ms (ai-dynamo/dynamo
 *   lib/mocker perf_model.rs, "Polynomial"), i.e. 8.4e-7 ms per causal pair — same order.
 * - decodeSeqMs 0.03: per-sequence marginal cost of a decode token while decode is memory-bound
 *   (sampling, per-token activations); NIM's table above grows ITL by ~0.03 ms per extra
 *   concurrent request at short context.
 * - decodeContextTokenMs 5.0e-5: decode attention reads each context token's K and V,
 *   2 × 32 layers × 8 heads × 128 × 2 B = 128 KiB per token; at ~2.7 TB/s → 4.9e-5 ms.
 *   Cross-check: a full cache (27 251 blocks × 16 = 436 k tokens) attended by 256 decodes costs
 *   6 + 256·0.03 + 436 016·5e-5 ≈ 35.5 ms per step; Dynamo's mocker decode polynomial gives
 *   5.74 ms at an empty cache and ≈ 34 ms at a full one.
 * - hostLoadBlockMs 0.08: with the simulated CPU-offload tier (`--cpu-offload-blocks`), loading
 *   one block (16 tokens × 128 KiB = 2 MiB) back from pinned host memory over PCIe 5 at ~25 GB/s
 *   achieved. Recomputing the same block costs 16 × 0.05 = 0.8 ms plus attention, ~10× more.
 */
export interface CostModelConfig {
  /** Fixed cost of every step (ms). */
  overheadMs: number;
  /** Cost per prefill token (ms). */
  prefillTokenMs: number;
  /** Cost per causal (query token, key token) pair in prefill chunks (ms). */
  prefillAttentionMs: number;
  /** Cost per decode sequence in the step (ms). */
  decodeSeqMs: number;
  /** Cost per context token attended by a decode sequence (ms). */
  decodeContextTokenMs: number;
  /** Cost per KV block loaded from the host (CPU-offload) tier instead of recomputed (ms). */
  hostLoadBlockMs: number;
  /** Fault knob: multiplies every step's duration (1 = healthy). */
  slowFactor: number;
}

export const DEFAULT_COST_MODEL: Readonly<CostModelConfig> = Object.freeze({
  overheadMs: 6.0,
  prefillTokenMs: 0.05,
  prefillAttentionMs: 1.0e-6,
  decodeSeqMs: 0.03,
  decodeContextTokenMs: 5.0e-5,
  hostLoadBlockMs: 0.08,
  slowFactor: 1,
});

/** Work done in one step, accumulated by the scheduler and priced by {@link stepDurationMs}. */
export interface StepWork {
  prefillTokens: number;
  /** Σ over prefill chunks of C·P + C·(C+1)/2. */
  prefillPairs: number;
  decodeSeqs: number;
  /** Σ over decode sequences of their context length (tokens whose KV is read). */
  decodeContextTokens: number;
  /** Blocks loaded from the host (CPU-offload) tier (absent = 0). */
  hostLoadBlocks?: number;
}

/** Causal attention pairs of a prefill chunk of `chunk` new tokens after `past` cached tokens. */
export function prefillPairs(past: number, chunk: number): number {
  return chunk * past + (chunk * (chunk + 1)) / 2;
}

export function stepDurationMs(c: CostModelConfig, w: StepWork): number {
  return (
    c.slowFactor *
    (c.overheadMs +
      c.prefillTokenMs * w.prefillTokens +
      c.prefillAttentionMs * w.prefillPairs +
      c.decodeSeqMs * w.decodeSeqs +
      c.decodeContextTokenMs * w.decodeContextTokens +
      (c.hostLoadBlockMs ?? 0) * (w.hostLoadBlocks ?? 0))
  );
}

export function validateCostModel(c: CostModelConfig): void {
  for (const [k, v] of Object.entries(c)) {
    if (typeof v !== 'number' || !Number.isFinite(v) || v < 0) {
      throw new RangeError(`cost model: ${k} must be a finite number >= 0 (got ${String(v)})`);
    }
  }
  if (c.slowFactor <= 0) throw new RangeError(`cost model: slowFactor must be > 0 (got ${c.slowFactor})`);
}
