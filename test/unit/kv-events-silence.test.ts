// The KV-event hub's silence check: warn once per worker when requests complete there and its
// subscription delivers nothing; recover when events arrive.
import { describe, expect, it } from 'vitest';
import { ManualClock } from '../../src/core/clock.js';
import { KvEventHub, type WatchedWorker } from '../../src/events/hub.js';

function logger() {
  const warns: string[] = [];
  const infos: string[] = [];
  const log = { warn: (_o: unknown, m: string) => warns.push(m), info: (_o: unknown, m: string) => infos.push(m), error: () => undefined, debug: () => undefined, trace: () => undefined, child: () => log };
  return { log, warns, infos };
}

describe('KvEventHub.checkSilence', () => {
  it('warns once after N completions without events, clears when events arrive, and ignores unsubscribed workers', async () => {
    const clock = new ManualClock(0);
    const { log, warns, infos } = logger();
    const w: WatchedWorker & { processed: number } = { id: 'http://w1:8000', processed: 3 };
    const other: WatchedWorker & { processed: number } = { id: 'http://w2:8000', processed: 100 };
    const hub = new KvEventHub({ clock, logger: log as never, mediums: 'gpu-only', workers: () => [w, other], silenceCheckMs: 0, silentAfterCompletions: 5, staleAfterMs: 5000 });
    try {
      await hub.addSource(w.id, 'tcp://127.0.0.1:1');
      w.processed += 4;
      expect(hub.checkSilence()).toEqual([]);
      w.processed += 1; // 5 since subscribing
      expect(hub.checkSilence()).toEqual([w.id]);
      expect(hub.checkSilence()).toEqual([w.id]);
      expect(warns.length).toBe(1);
      expect(warns[0]).toMatch(/CONNECTS.*must BIND/);
      expect(w.kvEvents).toMatchObject({ subscribed: true, mode: 'connect', endpoint: 'tcp://127.0.0.1:1', last_event_age_ms: null, completions_without_events: 5, silent: true });
      expect(other.kvEvents).toBeUndefined();
      expect(hub.silentSources().get(w.id)).toBe(true);
      // An event batch arrives: no longer silent, and a later silence warns again.
      (hub as unknown as { apply(k: string, b: unknown): void }).apply(w.id, { seq: 0n, ts: 0, dpRank: null, events: [], malformed: 0 });
      expect(hub.checkSilence()).toEqual([]);
      expect(infos.some((m) => /arriving again/.test(m))).toBe(true);
      w.processed += 5;
      clock.advance(6000);
      expect(hub.checkSilence()).toEqual([w.id]);
      expect(warns.length).toBe(2);
      // Completions within the stale window after an event are not silence.
      (hub as unknown as { apply(k: string, b: unknown): void }).apply(w.id, { seq: 1n, ts: 0, dpRank: null, events: [], malformed: 0 });
      hub.checkSilence();
      w.processed += 10;
      clock.advance(1000);
      expect(hub.checkSilence()).toEqual([]);
    } finally {
      await hub.close();
    }
  });
});
