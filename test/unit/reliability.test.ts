import { describe, expect, it } from 'vitest';
import { CircuitBreaker, defaultBreakerConfig } from '../../src/core/circuit-breaker.js';
import { ManualClock } from '../../src/core/clock.js';
import { backoffMs, defaultRetryConfig, RETRYABLE_STATUSES } from '../../src/core/retry.js';
import { SeededRng } from '../../src/core/rng.js';
import { Admission, KeyRateLimiter } from '../../src/server/admission.js';
import { KeySet } from '../../src/server/auth.js';
import { deeperThan, parseJsonObject } from '../../src/core/request-body.js';
import { GatewayError } from '../../src/core/errors.js';
import type { IncomingMessage } from 'node:http';

describe('circuit breaker', () => {
  const mk = () => {
    const clock = new ManualClock(0);
    const transitions: string[] = [];
    const b = new CircuitBreaker({ ...defaultBreakerConfig, failureThreshold: 3, successThreshold: 2, openMs: 1000 }, clock, (f, t) => transitions.push(`${f}>${t}`));
    return { clock, b, transitions };
  };

  it('opens after N consecutive failures, half-opens after the timeout, closes after M successes', () => {
    const { clock, b, transitions } = mk();
    b.recordFailure();
    b.recordFailure();
    b.recordSuccess(); // resets the count
    b.recordFailure();
    b.recordFailure();
    expect(b.canExecute()).toBe(true);
    b.recordFailure();
    expect(b.state).toBe('open');
    expect(b.canExecute()).toBe(false);
    clock.advance(999);
    expect(b.canExecute()).toBe(false);
    clock.advance(1);
    expect(b.state).toBe('half_open');
    expect(b.canExecute()).toBe(true);
    b.recordSuccess();
    expect(b.state).toBe('half_open');
    b.recordSuccess();
    expect(b.state).toBe('closed');
    expect(transitions).toEqual(['closed>open', 'open>half_open', 'half_open>closed']);
  });

  it('reopens on a failure while half-open, and never opens when disabled', () => {
    const { clock, b } = mk();
    for (let i = 0; i < 3; i++) b.recordFailure();
    clock.advance(1000);
    expect(b.state).toBe('half_open');
    b.recordFailure();
    expect(b.state).toBe('open');
    const off = new CircuitBreaker({ ...defaultBreakerConfig, failureThreshold: 1, disabled: true }, clock);
    for (let i = 0; i < 100; i++) off.recordFailure();
    expect(off.canExecute()).toBe(true);
  });
});

describe('retry backoff', () => {
  it('grows by the multiplier, is capped before jitter, and stays within the jitter band', () => {
    const rng = new SeededRng(1);
    const c = { ...defaultRetryConfig, initialBackoffMs: 100, multiplier: 2, maxBackoffMs: 1000, jitter: 0.2 };
    for (let a = 0; a < 8; a++) {
      const base = Math.min(100 * 2 ** a, 1000);
      for (let k = 0; k < 50; k++) {
        const d = backoffMs(c, a, rng);
        expect(d).toBeGreaterThanOrEqual(base * 0.8 - 1e-9);
        expect(d).toBeLessThanOrEqual(base * 1.2 + 1e-9);
      }
    }
    expect([...RETRYABLE_STATUSES].sort()).toEqual([408, 429, 500, 502, 503, 504]);
  });
});

describe('admission control', () => {
  it('admits up to the limit, queues FIFO, hands slots over, and frees every slot exactly once', async () => {
    const a = new Admission({ maxConcurrent: 2, queueSize: 2, queueTimeoutMs: 1000 });
    const r1 = await a.acquire();
    const r2 = await a.acquire();
    const order: number[] = [];
    const w3 = a.acquire().then((r) => (order.push(3), r));
    const w4 = a.acquire().then((r) => (order.push(4), r));
    await expect(a.acquire()).rejects.toMatchObject({ status: 429 });
    expect(a.waiting).toBe(2);
    r1();
    r1(); // released twice: must not free a second slot
    const r3 = await w3;
    expect(a.inUse).toBe(2);
    r2();
    const r4 = await w4;
    expect(order).toEqual([3, 4]);
    r3();
    r4();
    expect(a.inUse).toBe(0);
    expect(a.waiting).toBe(0);
  });

  it('answers 408 after the queue timeout and drops a waiter whose client left', async () => {
    const a = new Admission({ maxConcurrent: 1, queueSize: 5, queueTimeoutMs: 50 });
    const r = await a.acquire();
    await expect(a.acquire()).rejects.toMatchObject({ status: 408 });
    const ac = new AbortController();
    const p = a.acquire(ac.signal);
    expect(a.waiting).toBe(1);
    ac.abort();
    await expect(p).rejects.toBeInstanceOf(GatewayError);
    expect(a.waiting).toBe(0);
    r();
    expect(a.inUse).toBe(0);
  });

  it('is a no-op when disabled', async () => {
    const a = new Admission({ maxConcurrent: 0, queueSize: 0, queueTimeoutMs: 1 });
    for (let i = 0; i < 1000; i++) await a.acquire();
    expect(a.inUse).toBe(0);
  });

  it('rate-limits per key with a token bucket', () => {
    let t = 0;
    const l = new KeyRateLimiter(2, () => t);
    expect(l.take('a').ok).toBe(true);
    expect(l.take('a').ok).toBe(true);
    const third = l.take('a');
    expect(third.ok).toBe(false);
    expect(l.take('b').ok).toBe(true); // keys are independent
    t += 500;
    expect(l.take('a').ok).toBe(true);
  });
});

describe('API keys', () => {
  const req = (auth?: string) => ({ headers: auth === undefined ? {} : { authorization: auth } }) as IncomingMessage;
  it('accepts only the configured bearer keys', () => {
    const ks = new KeySet(['secret-1', 'other']);
    expect(ks.check(req('Bearer secret-1'))).toBe('secret-1');
    expect(ks.check(req('bearer other'))).toBe('other');
    expect(ks.check(req('Bearer secret-2'))).toBeUndefined();
    expect(ks.check(req('Bearer secret-1x'))).toBeUndefined();
    expect(ks.check(req('secret-1'))).toBeUndefined();
    expect(ks.check(req())).toBeUndefined();
    expect(new KeySet(['']).size).toBe(0);
  });
});

describe('JSON body limits', () => {
  it('measures nesting of containers only', () => {
    const v = JSON.parse('{"a":[1,{"b":2}],"s":"[[[[{{{{"}');
    expect(deeperThan(v, 3)).toBe(false);
    expect(deeperThan(v, 2)).toBe(true);
    expect(deeperThan(JSON.parse('['.repeat(5000) + ']'.repeat(5000)), 64)).toBe(true);
  });
  it.each([
    [Buffer.from('{"a":' + '['.repeat(100) + ']'.repeat(100) + '}'), 'json_too_deep'],
    [Buffer.from('['.repeat(100) + ']'.repeat(100)), 'invalid_json'],
    [Buffer.concat([Buffer.from('{"model":"'), Buffer.from([0xc3, 0x28]), Buffer.from('"}')]), 'invalid_utf8'],
    [Buffer.from(''), 'invalid_json'],
    [Buffer.from('{"a":'), 'invalid_json'],
    [Buffer.from('"just a string"'), 'invalid_json'],
  ])('rejects %s with %s', (buf, code) => {
    try {
      parseJsonObject(buf, 64);
      expect.unreachable();
    } catch (e) {
      expect((e as GatewayError).status).toBe(400);
      expect((e as GatewayError).code).toBe(code);
    }
  });
});
