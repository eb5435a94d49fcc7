import { describe, expect, it } from 'vitest';
import { Admission, DroppedError, type Release } from '../../src/server/admission.js';

const settle = () => new Promise((r) => setImmediate(r));

describe('admission: priorities, fairness, shedding', () => {
  it('serves waiters by priority, then across fairness keys, then by deadline, then in arrival order', async () => {
    const a = new Admission({ maxConcurrent: 1, queueSize: 10, queueTimeoutMs: 60_000 });
    const first = await a.acquire(undefined, { key: 'x' }); // key x has been served once
    const order: string[] = [];
    const wait = (name: string, who: Parameters<Admission['acquire']>[1]) =>
      a.acquire(undefined, who).then((release: Release) => {
        order.push(name);
        release();
      });
    const all = [
      wait('x-late', { key: 'x', deadlineMs: 500 }),
      wait('x-early', { key: 'x', deadlineMs: 100 }),
      wait('y', { key: 'y', deadlineMs: 900 }), // y never served: goes before x's within priority 0
      wait('high', { priority: 5, key: 'x' }),
      wait('x-nodeadline', { key: 'x' }),
    ];
    expect(a.waiting).toBe(5);
    first();
    await Promise.all(all);
    expect(order).toEqual(['high', 'y', 'x-early', 'x-late', 'x-nodeadline']);
    expect(a.inUse).toBe(0);
  });

  it('shedsAtOnce answers from the priority and the slots alone, as acquire would', async () => {
    const off = new Admission({ maxConcurrent: 0, queueSize: 0, queueTimeoutMs: 1000 });
    expect(off.shedsAtOnce(-1)).toBe(false);
    const a = new Admission({ maxConcurrent: 1, queueSize: 4, queueTimeoutMs: 60_000 });
    expect(a.shedsAtOnce(-1)).toBe(false);
    const held = await a.acquire(undefined, { priority: -1 });
    expect(a.shedsAtOnce(-1)).toBe(true);
    expect(a.shedsAtOnce(0)).toBe(false); // waits instead
    await expect(a.acquire(undefined, { priority: -1 })).rejects.toMatchObject({ status: 429, reason: 'saturated' });
    expect(a.shedError(-3)).toBeInstanceOf(DroppedError);
    held();
    expect(a.shedsAtOnce(-1)).toBe(false);
    expect(a.inUse).toBe(0);
  });

  it('refuses a sheddable request at once when no slot is free, and admits it when one is', async () => {
    const a = new Admission({ maxConcurrent: 1, queueSize: 10, queueTimeoutMs: 60_000 });
    const r1 = await a.acquire(undefined, { priority: -1 }); // a free slot: sheddable is served
    const err = await a.acquire(undefined, { priority: -1 }).catch((e) => e);
    expect(err).toBeInstanceOf(DroppedError);
    expect(err).toMatchObject({ status: 429, reason: 'saturated', code: 'saturated' });
    expect(a.waiting).toBe(0);
    r1();
    r1(); // released exactly once
    expect(a.inUse).toBe(0);
  });

  it('a full queue refuses the newcomer unless it outranks a waiter, which is then refused in its place', async () => {
    const a = new Admission({ maxConcurrent: 1, queueSize: 2, queueTimeoutMs: 60_000 });
    const hold = await a.acquire();
    const low = a.acquire(undefined, { priority: 0 });
    const mid = a.acquire(undefined, { priority: 1 });
    const sameAsLowest = await a.acquire(undefined, { priority: 0 }).catch((e) => e);
    expect(sameAsLowest).toMatchObject({ status: 429, code: 'rate_limited' });
    const high = a.acquire(undefined, { priority: 2 });
    const lowErr = await low.catch((e) => e);
    expect(lowErr).toBeInstanceOf(DroppedError);
    expect(lowErr.reason).toBe('saturated');
    expect(a.waiting).toBe(2);
    hold();
    const h = await high;
    await settle();
    expect(a.waiting).toBe(1); // mid still waits for high's slot
    h();
    (await mid)();
    expect(a.inUse).toBe(0);
  });
});
