/** Moved to core/routing-text.ts (read by the event loop and the tokenizer threads alike). */
export { routingTextOf } from '../core/routing-text.js';
