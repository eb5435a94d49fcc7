import { once } from 'node:events';
import { Agent, createServer, request } from 'node:http';
import type { AddressInfo } from 'node:net';
import { describe, expect, it } from 'vitest';
import { ConnectionBalancer, connectionTolerance, isConnectionCountMessage, isConnectionShareMessage } from '../../src/processes/connection-balance.js';

function get(port: number, agent: Agent): Promise<{ connection: string | undefined }> {
  return new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port, path: '/', agent }, (res) => {
      res.resume();
      res.on('end', () => resolve({ connection: res.headers.connection }));
    });
    req.on('error', reject);
    req.end();
  });
}

describe('connection balancing between serving processes', () => {
  it('a process over its share answers exactly its excess with Connection: close, then stops', async () => {
    const server = createServer((_req, res) => setTimeout(() => res.end('ok'), 20));
    const balancer = new ConnectionBalancer();
    balancer.attach(server);
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    const port = (server.address() as AddressInfo).port;
    const agent = new Agent({ keepAlive: true, maxSockets: 10 });
    try {
      // Ten concurrent requests open ten keep-alive connections.
      await Promise.all(Array.from({ length: 10 }, () => get(port, agent)));
      expect(balancer.open).toBe(10);
      // Within tolerance of an even share (16 over 2 processes = 8, tolerance 2): nothing is shed.
      balancer.onShare({ kvgate: 'connection-share', total: 16, processes: 2 }); // 10 held: 2 over
      expect((await Promise.all(Array.from({ length: 10 }, () => get(port, agent)))).filter((r) => r.connection === 'close')).toHaveLength(0);
      // Over it: 10 against a share of 7 → three responses ask their clients to reconnect.
      balancer.onShare({ kvgate: 'connection-share', total: 14, processes: 2 });
      const answers = await Promise.all(Array.from({ length: 10 }, () => get(port, agent)));
      expect(answers.filter((r) => r.connection === 'close')).toHaveLength(3);
      expect(balancer.closedForBalance).toBe(3);
      await new Promise((r) => setTimeout(r, 50));
      expect(balancer.open).toBe(7);
      // A single process, or no total yet: never shed.
      balancer.onShare({ kvgate: 'connection-share', total: 7, processes: 1 });
      expect((await Promise.all(Array.from({ length: 7 }, () => get(port, agent)))).filter((r) => r.connection === 'close')).toHaveLength(0);
    } finally {
      agent.destroy();
      server.close();
    }
  });

  it('messages and tolerance', () => {
    expect(isConnectionCountMessage(new ConnectionBalancer().report())).toBe(true);
    expect(isConnectionShareMessage({ kvgate: 'connection-share', total: 3, processes: 2 })).toBe(true);
    expect(isConnectionShareMessage({ kvgate: 'shutdown', signal: 'SIGTERM' })).toBe(false);
    expect(connectionTolerance(4)).toBe(2);
    expect(connectionTolerance(32)).toBe(4);
  });
});
