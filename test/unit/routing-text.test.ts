import { describe, expect, it } from 'vitest';
import { GatewayError } from '../../src/core/errors.js';
import { routingTextOf } from '../../src/core/routing-text.js';

describe('routing text', () => {
  it('chat uses every message in order, roles included, multi-part text included', () => {
    const t = routingTextOf('chat', {
      messages: [
        { role: 'system', content: 'SYS' },
        { role: 'user', content: [{ type: 'text', text: 'part one ' }, { type: 'image_url', image_url: { url: 'http://img/1.png' } }, { type: 'text', text: 'part two' }] },
        { role: 'assistant', content: 'A1' },
        { role: 'user', content: 'U2' },
      ],
    }).text;
    expect(t.indexOf('SYS')).toBeLessThan(t.indexOf('part one'));
    expect(t).toContain('part one <image:http://img/1.png>part two');
    expect(t.indexOf('A1')).toBeLessThan(t.indexOf('U2'));
    // Two conversations with the same first message but different later turns differ.
    const a = routingTextOf('chat', { messages: [{ role: 'system', content: 'S' }, { role: 'user', content: 'x' }] }).text;
    const b = routingTextOf('chat', { messages: [{ role: 'system', content: 'S' }, { role: 'user', content: 'y' }] }).text;
    expect(a).not.toBe(b);
    // A later turn extends the earlier conversation's text (prefix-preserving).
    const turn2 = routingTextOf('chat', { messages: [{ role: 'system', content: 'S' }, { role: 'user', content: 'x' }, { role: 'assistant', content: 'z' }] }).text;
    expect(turn2.startsWith(a)).toBe(true);
  });

  it('completions, generate and embeddings use their prompt fields', () => {
    expect(routingTextOf('completions', { prompt: 'hello' }).text).toBe('hello');
    expect(routingTextOf('completions', { prompt: ['a', 'b'] }).text).toBe('a\nb');
    expect(routingTextOf('completions', { prompt: [1, 2, 3] }).tokenIds).toEqual([1, 2, 3]);
    expect(routingTextOf('generate', { text: 'gen' }).text).toBe('gen');
    expect(routingTextOf('generate', { input_ids: [5, 6] }).tokenIds).toEqual([5, 6]);
    expect(routingTextOf('embeddings', { input: 'emb' }).text).toBe('emb');
  });

  it.each([
    ['chat', { messages: 'hi' }, 'messages'],
    ['chat', { messages: [] }, 'messages'],
    ['chat', { messages: [{ content: 'no role' }] }, 'messages'],
    ['chat', { messages: [{ role: 'user', content: 5 }] }, 'messages[0].content'],
    ['completions', {}, 'prompt'],
    ['completions', { prompt: { a: 1 } }, 'prompt'],
    ['generate', {}, 'text'],
  ] as const)('%s rejects %j with a 400 naming %s', (route, body, param) => {
    try {
      routingTextOf(route, body as Record<string, unknown>);
      expect.unreachable();
    } catch (e) {
      expect(e).toBeInstanceOf(GatewayError);
      expect((e as GatewayError).status).toBe(400);
      expect((e as GatewayError).param).toBe(param);
    }
  });
});
