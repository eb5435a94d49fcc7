/** Tokenizers shared by the simulator and the gateway. */
export type { ChatContentFormat, ChatContentPart, ChatMessage, ChatRenderOptions, EncodeOptions, Tokenizer } from './tokenizer.js';
export { EncodeCancelled } from './tokenizer.js';
export { ChunkTokenizer } from './chunk.js';
export { HfTokenizer, type HfTokenizerOptions } from './hf.js';
export { conversationOf, detectContentFormat, flattenContent, hasMediaContent, toolsOf } from './chat.js';
export { LruCache } from './lru.js';
export {
  loadTokenizer,
  TokenCache,
  tokenizeRequest,
  TokenizerRegistry,
  type TokenCacheOptions,
  type TokenizerRegistryOptions,
} from './registry.js';
