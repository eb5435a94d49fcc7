import { hostname } from 'node:os';
import { describe, expect, it } from 'vitest';
import { defaultServeConfig } from '../../src/config/serve-config.js';
import { isShutdownMessage, replicaIdOf, restartDelayMs } from '../../src/processes/supervisor.js';

describe('supervisor helpers', () => {
  it('restart backoff: 100 ms doubling per consecutive death, at most 10 s', () => {
    expect([1, 2, 3, 4, 7, 8, 20].map(restartDelayMs)).toEqual([100, 200, 400, 800, 6400, 10_000, 10_000]);
  });

  it('replica id: --replica-id when configured, else hostname:port:pid', () => {
    const c = defaultServeConfig({ port: 31000 });
    expect(replicaIdOf(c, 42)).toBe(`${hostname()}:31000:42`);
    expect(replicaIdOf({ ...c, replicaId: 'edge-a' } as typeof c, 42)).toBe('edge-a');
  });

  it('recognises only the supervisor shutdown message', () => {
    expect(isShutdownMessage({ kvgate: 'shutdown', signal: 'SIGTERM' })).toBe(true);
    expect(isShutdownMessage({ cmd: 'NODE_CLUSTER' })).toBe(false);
    expect(isShutdownMessage(null)).toBe(false);
    expect(isShutdownMessage('shutdown')).toBe(false);
  });
});
