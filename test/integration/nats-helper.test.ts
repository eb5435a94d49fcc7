// The nats-server test helper: a real server a real client talks through, killed and restarted.
import { connect } from '@nats-io/transport-node';
import { afterAll, describe, expect, it } from 'vitest';
import { startNats, type TestNats } from '../helpers/nats.js';

let nats: TestNats | undefined;
afterAll(async () => {
  await nats?.kill();
});

async function roundTrip(url: string, subject: string, payload: string): Promise<string> {
  const nc = await connect({ servers: url, reconnect: false });
  try {
    const sub = nc.subscribe(subject, { max: 1 });
    await nc.flush();
    nc.publish(subject, payload);
    for await (const m of sub) return m.string();
    throw new Error('subscription ended without a message');
  } finally {
    await nc.close();
  }
}

describe('test/helpers/nats.ts', () => {
  it('starts nats-server on a loopback port; publish/subscribe works; kill and restart keep the port', async () => {
    nats = await startNats();
    expect(nats.url).toBe(`nats://127.0.0.1:${nats.port}`);
    expect(await roundTrip(nats.url, 'kvgate.test', 'hello')).toBe('hello');

    await nats.kill('SIGKILL');
    await expect(connect({ servers: nats.url, reconnect: false })).rejects.toThrow();

    await nats.restart();
    expect(await roundTrip(nats.url, 'kvgate.test', 'again')).toBe('again');
  });

  it('a client with reconnect on gets its subscription back after the server restarts', async () => {
    const n = nats!;
    const nc = await connect({ servers: n.url, reconnectTimeWait: 50, maxReconnectAttempts: -1 });
    try {
      const sub = nc.subscribe('kvgate.after-restart', { max: 1 });
      await nc.flush();
      await n.kill('SIGTERM');
      await n.restart();
      // Publish from a second connection until the first, reconnected, receives it.
      const pub = await connect({ servers: n.url, reconnect: false });
      const got = (async () => {
        for await (const m of sub) return m.string();
      })();
      let received: string | undefined;
      void got.then((s) => (received = s));
      for (let i = 0; i < 400 && received === undefined; i++) {
        pub.publish('kvgate.after-restart', 'back');
        await pub.flush();
        await new Promise((r) => setTimeout(r, 25));
      }
      await pub.close();
      expect(await got).toBe('back');
    } finally {
      await nc.close();
    }
  });
});
