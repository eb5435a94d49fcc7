import { readFile, stat } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { Template } from '@huggingface/jinja';
import { Tokenizer } from '@huggingface/tokenizers';

/** A chat message after the HTTP layer flattened its content to text. */
export interface ChatMessage {
  role: string;
  content: string;
}

/** What the simulator needs from a tokenizer. */
export interface SimTokenizer {
  readonly name: string;
  /** Ids of generated tokens are drawn from [0, vocabSize). */
  readonly vocabSize: number;
  /** Encode prompt text. `addSpecialTokens` (default true) is honoured by real tokenizers only. */
  encode(text: string, opts?: { addSpecialTokens?: boolean }): number[];
  /** Render a chat to the prompt text, with the assistant generation prompt appended. */
  renderChat(messages: readonly ChatMessage[]): string;
  /** Text of one generated token (streamed as a delta). */
  decodeToken(id: number): string;
}

// ---------------------------------------------------------------------------------------------
// Default: deterministic chunk tokenizer
// ---------------------------------------------------------------------------------------------

const WORDS = (
  'the of and to in is was for on that with as by it at from this be are or an have not which ' +
  'one all were when there can more if out so what up about into than them some could time only ' +
  'new other then two may first any like now these its over such our also most many well way ' +
  'down should because each just those how much great where through long must before here same'
).split(' ');

/**
 * Deterministic stand-in for a real tokenizer: the text is cut into consecutive chunks of
 * `chunkChars` code points (default 4, about what a BPE tokenizer averages on English), and each
 * chunk is hashed (FNV-1a) to an id in [256, vocabSize). Because the chunk grid is anchored at
 * the start of the text, two texts sharing a prefix of L code points share their first
 * floor(L / chunkChars) tokens — the property prefix caching needs.
 *
 * Generated token ids decode to words from a fixed list, so responses read as (nonsense) text.
 */
export class ChunkTokenizer implements SimTokenizer {
  readonly name: string;

  constructor(
    readonly vocabSize = 128_256,
    readonly chunkChars = 4,
  ) {
    if (!Number.isInteger(chunkChars) || chunkChars < 1) throw new RangeError('chunkChars must be a positive integer');
    if (!Number.isInteger(vocabSize) || vocabSize <= 512) throw new RangeError('vocabSize must be an integer > 512');
    this.name = `chunk${chunkChars}`;
  }

  encode(text: string): number[] {
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

  /** `<|role|>\ncontent\n` per message, then `<|assistant|>\n`. */
  renderChat(messages: readonly ChatMessage[]): string {
    let s = '';
    for (const m of messages) s += `<|${m.role}|>\n${m.content}\n`;
    return s + '<|assistant|>\n';
  }

  decodeToken(id: number): string {
    return WORDS[Math.abs(id) % WORDS.length]! + ' ';
  }
}

// ---------------------------------------------------------------------------------------------
// Hugging Face tokenizer.json (+ tokenizer_config.json chat template)
// ---------------------------------------------------------------------------------------------

type TokenValue = string | { content?: string } | null | undefined;

function tokenText(v: TokenValue): string | undefined {
  if (typeof v === 'string') return v;
  if (v && typeof v === 'object' && typeof v.content === 'string') return v.content;
  return undefined;
}

export class HfTokenizer implements SimTokenizer {
  readonly name: string;
  readonly vocabSize: number;
  private readonly template: Template | null;
  private readonly bosToken: string | undefined;
  private readonly eosToken: string | undefined;
  private readonly decodeCache = new Map<number, string>();

  constructor(
    private readonly tokenizer: Tokenizer,
    config: Record<string, unknown>,
    name: string,
  ) {
    this.name = name;
    this.vocabSize = tokenizer.get_vocab(true).size;
    this.bosToken = tokenText(config['bos_token'] as TokenValue);
    this.eosToken = tokenText(config['eos_token'] as TokenValue);
    let chat = config['chat_template'];
    if (Array.isArray(chat)) {
      const named = chat as { name?: string; template?: string }[];
      chat = (named.find((t) => t.name === 'default') ?? named[0])?.template;
    }
    this.template = typeof chat === 'string' ? new Template(chat) : null;
  }

  /**
   * Load from a tokenizer.json path, or a directory holding tokenizer.json; tokenizer_config.json
   * is read from the same directory when present (it carries the chat template).
   */
  static async load(path: string): Promise<HfTokenizer> {
    const isDir = (await stat(path)).isDirectory();
    const jsonPath = isDir ? join(path, 'tokenizer.json') : path;
    const dir = isDir ? path : dirname(path);
    const tokenizerJson = JSON.parse(await readFile(jsonPath, 'utf8')) as object;
    let config: Record<string, unknown> = {};
    try {
      config = JSON.parse(await readFile(join(dir, 'tokenizer_config.json'), 'utf8')) as Record<string, unknown>;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    }
    return new HfTokenizer(new Tokenizer(tokenizerJson, config), config, jsonPath);
  }

  encode(text: string, opts?: { addSpecialTokens?: boolean }): number[] {
    return this.tokenizer.encode(text, { add_special_tokens: opts?.addSpecialTokens ?? true }).ids;
  }

  /** Render with the chat_template (add_generation_prompt = true); role/content lines without one. */
  renderChat(messages: readonly ChatMessage[]): string {
    if (!this.template) {
      let s = '';
      for (const m of messages) s += `${m.role}: ${m.content}\n`;
      return s + 'assistant: ';
    }
    return this.template.render({
      messages: messages.map((m) => ({ role: m.role, content: m.content })),
      add_generation_prompt: true,
      bos_token: this.bosToken ?? '',
      eos_token: this.eosToken ?? '',
    });
  }

  decodeToken(id: number): string {
    const cached = this.decodeCache.get(id);
    if (cached !== undefined) return cached;
    const s = this.tokenizer.decode([id], { skip_special_tokens: true });
    this.decodeCache.set(id, s);
    return s;
  }
}

/** The tokenizer for `--tokenizer PATH`, or the default chunk tokenizer. */
export async function loadTokenizer(path?: string): Promise<SimTokenizer> {
  return path ? HfTokenizer.load(path) : new ChunkTokenizer();
}
