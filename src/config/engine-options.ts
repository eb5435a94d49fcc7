import { DEFAULT_COST_MODEL, type CostModelConfig } from '../engine/cost-model.js';
import { DEFAULT_ENGINE_CONFIG } from '../sim/engine.js';
import type { LabEngineConfig } from '../lab/cluster.js';
import type { OptionSpec } from './options.js';

/**
 * Flags of the simulated engine model, shared by `kvgate sim` (real time) and `kvgate bench`
 * (virtual time), so both run the same engine with the same defaults.
 */
export const engineOptionSpecs: readonly OptionSpec[] = [
  { flag: 'block-size', kind: 'int', description: 'Tokens per KV block', default: DEFAULT_ENGINE_CONFIG.blockSize, min: 1 },
  { flag: 'num-gpu-blocks', kind: 'int', description: 'KV cache capacity in blocks (default: Llama-3-8B on one H100 80 GB)', default: DEFAULT_ENGINE_CONFIG.numGpuBlocks, min: 1 },
  { flag: 'max-num-seqs', kind: 'int', description: 'Maximum running requests per engine', default: DEFAULT_ENGINE_CONFIG.maxNumSeqs, min: 1 },
  { flag: 'max-num-batched-tokens', kind: 'int', description: 'Token budget per scheduler step (chunked prefill)', default: DEFAULT_ENGINE_CONFIG.maxNumBatchedTokens, min: 1 },
  { flag: 'max-model-len', kind: 'int', description: 'Longest prompt + output accepted', default: DEFAULT_ENGINE_CONFIG.maxModelLen, min: 1 },
  { flag: 'cpu-offload-blocks', kind: 'int', description: 'Blocks of a simulated CPU-offload tier (vLLM OffloadingConnector: GPU blocks written through to a host LRU, events with medium "CPU"); 0 = none', default: DEFAULT_ENGINE_CONFIG.cpuOffloadBlocks, min: 0 },
  { flag: 'host-load-block-ms', kind: 'number', description: 'Step cost: per block loaded from the CPU-offload tier instead of recomputed (ms)', default: DEFAULT_COST_MODEL.hostLoadBlockMs, min: 0 },
  { flag: 'overhead-ms', kind: 'number', description: 'Step cost: fixed time per step (ms)', default: DEFAULT_COST_MODEL.overheadMs, min: 0 },
  { flag: 'prefill-token-ms', kind: 'number', description: 'Step cost: per prefill token (ms)', default: DEFAULT_COST_MODEL.prefillTokenMs, min: 0 },
  { flag: 'prefill-attention-ms', kind: 'number', description: 'Step cost: per causal (query, key) pair in prefill (ms)', default: DEFAULT_COST_MODEL.prefillAttentionMs, min: 0 },
  { flag: 'decode-seq-ms', kind: 'number', description: 'Step cost: per decoding sequence (ms)', default: DEFAULT_COST_MODEL.decodeSeqMs, min: 0 },
  { flag: 'decode-context-token-ms', kind: 'number', description: 'Step cost: per context token read by a decode (ms)', default: DEFAULT_COST_MODEL.decodeContextTokenMs, min: 0 },
];

export function engineConfigFrom(o: Record<string, unknown>): LabEngineConfig {
  const cost: Partial<CostModelConfig> = {
    overheadMs: o.overheadMs as number,
    prefillTokenMs: o.prefillTokenMs as number,
    prefillAttentionMs: o.prefillAttentionMs as number,
    decodeSeqMs: o.decodeSeqMs as number,
    decodeContextTokenMs: o.decodeContextTokenMs as number,
    hostLoadBlockMs: o.hostLoadBlockMs as number,
  };
  return {
    blockSize: o.blockSize as number,
    numGpuBlocks: o.numGpuBlocks as number,
    maxNumSeqs: o.maxNumSeqs as number,
    maxNumBatchedTokens: o.maxNumBatchedTokens as number,
    maxModelLen: o.maxModelLen as number,
    cpuOffloadBlocks: o.cpuOffloadBlocks as number,
    cost,
  };
}
