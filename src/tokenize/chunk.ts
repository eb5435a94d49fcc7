import { flattenContent } from './chat.js';
import type { ChatContentFormat, ChatMessage, ChatRenderOptions, EncodeOptions, Tokenizer } from './tokenizer.js';

const WORDS = (
  'the of and to in is was for on that with as by it at from this be are or an have not which ' +
  'one all were when there can more if out so what up about into than them some could time only ' +
  'new other then two may first any like now these its over such our also most many well way ' +
  'down should because each just those how much great where through long must before here same'
).split(' ');

/**
 * Deterministic stand-in for a real tokenizer, the simulator's default: the text is cut into
 * consecutive chunks of `chunkChars` code points (default 4, about what a BPE tokenizer averages on
 * English), and each chunk is hashed (FNV-1a) to an id in [256, vocabSize). Because the chunk grid
 * is anchored at the start of the text, two texts sharing a prefix of L code points share their
 * first floor(L / chunkChars) tokens — the property prefix caching needs.
 *
 * Generated token ids decode to words from a fixed list, so responses read as (nonsense) text.
 * It has no special tokens; `addSpecialTokens` is ignored.
 */
export class ChunkTokenizer implements Tokenizer {
  readonly name: string;
  readonly hasChatTemplate = true;

  constructor(
    readonly vocabSize = 128_256,
    readonly chunkChars = 4,
  ) {
    if (!Number.isInteger(chunkChars) || chunkChars < 1) throw new RangeError('chunkChars must be a positive integer');
    if (!Number.isInteger(vocabSize) || vocabSize <= 512) throw new RangeError('vocabSize must be an integer > 512');
    this.name = `chunk${chunkChars}`;
  }

  encode(text: string, _opts?: EncodeOptions): number[] {
    const ids: number[] = [];
    const span = this.vocabSize - 256;
    let h = 0x811c9dc5;
    let n = 0;
    for (const ch of text) {
      const cp = ch.codePointAt(0)!;
      // FNV-1a over the code point's (up to) 3 bytes.
      h = Math.imul(h ^ (cp & 0xff), 0x01000193);
      h = Math.imul(h ^ ((cp >>> 8) & 0xff), 0x01000193);
      h = Math.imul(h ^ (cp >>> 16), 0x01000193);
      if (++n === this.chunkChars) {
        ids.push(256 + ((h >>> 0) % span));
        h = 0x811c9dc5;
        n = 0;
      }
    }
    if (n > 0) ids.push(256 + ((h >>> 0) % span));
    return ids;
  }

  encodeIds(text: string, _opts?: EncodeOptions): Uint32Array {
    return Uint32Array.from(this.encode(text));
  }

  chatContentFormat(): ChatContentFormat {
    return 'string';
  }

  /**
   * `<|role|>\ncontent\n` per message, then `<|assistant|>\n` (the generation prompt). Multi-part
   * content is flattened as vLLM's "string" format does (text parts joined with "\n"). Tools,
   * documents and template kwargs are not part of this template. With `continueFinalMessage` the
   * final message is left open (no trailing newline, no generation prompt).
   */
  renderChat(messages: readonly ChatMessage[], opts?: ChatRenderOptions): string {
    let s = '';
    for (const m of messages) s += `<|${m.role}|>\n${flattenContent(m.content)}\n`;
    if (opts?.continueFinalMessage && messages.length > 0) return s.slice(0, -1);
    return opts?.addGenerationPrompt === false ? s : s + '<|assistant|>\n';
  }

  encodeChat(messages: readonly ChatMessage[], opts?: ChatRenderOptions): number[] {
    return this.encode(this.renderChat(messages, opts));
  }

  decodeToken(id: number): string {
    return WORDS[Math.abs(id) % WORDS.length]! + ' ';
  }
}
