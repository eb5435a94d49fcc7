import { mkdtempSync, writeFileSync } from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ConfigError } from '../../src/config/options.js';
import { resolveServeConfig } from '../../src/config/serve-config.js';

const dir = mkdtempSync(join(tmpdir(), 'kvgate-config-'));
const file = (name: string, text: string) => {
  const p = join(dir, name);
  writeFileSync(p, text);
  return p;
};

describe('serve configuration', () => {
  it('has the documented defaults', () => {
    const c = resolveServeConfig({}, {});
    expect(c).toMatchObject({
      host: '0.0.0.0',
      port: 30000,
      policy: 'cache_aware',
      cacheThreshold: 0.3,
      balanceAbsThreshold: 64,
      balanceRelThreshold: 1.5,
      evictionIntervalSecs: 120,
      maxTreeSize: 67108864,
      healthCheckIntervalSecs: 10,
      healthFailureThreshold: 3,
      healthSuccessThreshold: 2,
      healthCheckTimeoutSecs: 5,
      healthCheckEndpoint: '/health',
      requestTimeoutSecs: 1800,
      maxPayloadSize: 536870912,
      logFormat: 'json',
      workerUrls: [],
    });
  });

  it('takes command line over environment over config file', () => {
    const yaml = file('c.yaml', 'port: 1111\npolicy: round_robin\nworker-urls:\n  - http://a:1/\n  - http://b:2\ncache_threshold: 0.5\n');
    let c = resolveServeConfig({ config: yaml }, {});
    expect(c).toMatchObject({ port: 1111, policy: 'round_robin', cacheThreshold: 0.5, workerUrls: ['http://a:1', 'http://b:2'] });
    c = resolveServeConfig({ config: yaml }, { KVGATE_PORT: '2222', KVGATE_WORKER_URLS: 'http://c:3 http://d:4' });
    expect(c.port).toBe(2222);
    expect(c.workerUrls).toEqual(['http://c:3', 'http://d:4']);
    c = resolveServeConfig({ workerUrls: ['http://e:5,http://f:6', 'http://g:7'] }, {});
    expect(c.workerUrls).toEqual(['http://e:5', 'http://f:6', 'http://g:7']);
    c = resolveServeConfig({ config: yaml, port: '3333' }, { KVGATE_PORT: '2222' });
    expect(c.port).toBe(3333);
    const json = file('c.json', JSON.stringify({ policy: 'least_load', maxPayloadSize: 1000 }));
    expect(resolveServeConfig({ config: json }, {})).toMatchObject({ policy: 'least_load', maxPayloadSize: 1000 });
    expect(resolveServeConfig({}, { KVGATE_CONFIG: json }).policy).toBe('least_load');
  });

  it.each([
    [{ port: 'abc' }, {}, /--port.*expected a number/],
    [{ port: '70000' }, {}, /--port.*<= 65535/],
    [{ policy: 'fastest' }, {}, /--policy.*expected one of/],
    [{ cacheThreshold: '1.5' }, {}, /--cache-threshold/],
    [{}, { KVGATE_BALANCE_REL_THRESHOLD: 'x' }, /--balance-rel-threshold \(from env KVGATE_BALANCE_REL_THRESHOLD\)/],
    [{ workerUrls: ['ftp://x'] }, {}, /--worker-urls.*http/],
    [{ workerUrls: ['http://a:1', 'http://a:1/'] }, {}, /--worker-urls.*twice/],
    [{ healthCheckEndpoint: 'health' }, {}, /--health-check-endpoint.*start with \//],
    [{ maxPayloadSize: '0' }, {}, /--max-payload-size/],
    [{ processes: '0' }, {}, /--processes.*whole number from 1/],
    [{ processes: 'two' }, {}, /--processes.*or auto/],
    [{ processes: '1.5' }, {}, /--processes/],
    [{ processes: '2', port: '0' }, {}, /--port: 0 .*cannot be used with --processes/],
    [{ processes: '2', kvEventsBind: 'tcp://*:5557' }, {}, /--kv-events-bind: with --processes/],
  ])('rejects %j %j naming the flag', (cli, env, re) => {
    expect(() => resolveServeConfig(cli as Record<string, unknown>, env as NodeJS.ProcessEnv)).toThrow(re);
  });

  it('--processes: a number, auto (one per core), from flag, environment or config file', () => {
    expect(resolveServeConfig({}, {}).processes).toBe(1);
    expect(resolveServeConfig({ processes: '3' }, {}).processes).toBe(3);
    expect(resolveServeConfig({ processes: 'auto' }, {}).processes).toBe(availableParallelism());
    expect(resolveServeConfig({}, { KVGATE_PROCESSES: '2' }).processes).toBe(2);
    expect(resolveServeConfig({ config: file('p.yaml', 'processes: 4\nnats-server-bin: /opt/nats\n') }, {})).toMatchObject({ processes: 4, natsServerBin: '/opt/nats' });
    expect(resolveServeConfig({ port: '0' }, {}).processes).toBe(1);
  });

  it('names the config file problem', () => {
    expect(() => resolveServeConfig({ config: file('bad.yaml', 'porty: 1') }, {})).toThrow(/unknown option 'porty'/);
    expect(() => resolveServeConfig({ config: file('bad.json', '{') }, {})).toThrow(ConfigError);
    expect(() => resolveServeConfig({ config: join(dir, 'missing.yaml') }, {})).toThrow(/--config: cannot read/);
    expect(() => resolveServeConfig({ config: file('t.yaml', 'port: "x"') }, {})).toThrow(/--port \(from config file\)/);
  });
});

describe('PD configuration', () => {
  it('parses --prefill URL [PORT] repeated, --decode, and checks the combination', () => {
    const c = resolveServeConfig({ pdDisaggregation: true, prefill: ['http://p1:8000', '9000', 'http://p2:8000', 'none', 'http://p3:8000'], decode: ['http://d1:8000/'] }, {});
    expect(c.prefill).toEqual([
      { url: 'http://p1:8000', bootstrapPort: 9000 },
      { url: 'http://p2:8000', bootstrapPort: null },
      { url: 'http://p3:8000', bootstrapPort: null },
    ]);
    expect(c.decode).toEqual(['http://d1:8000']);
    expect(c.pdProtocol).toBe('sglang');
    expect(() => resolveServeConfig({ pdDisaggregation: true, prefill: ['9000'], decode: ['http://d:1'] }, {})).toThrow(/--prefill: bootstrap port '9000' must follow a prefill URL/);
    expect(() => resolveServeConfig({ pdDisaggregation: true, prefill: ['http://p:1'] }, {})).toThrow(/at least one --prefill and one --decode/);
    expect(() => resolveServeConfig({ prefill: ['http://p:1'], decode: ['http://d:1'] }, {})).toThrow(/need --pd-disaggregation/);
    expect(() => resolveServeConfig({ pdDisaggregation: true, prefill: ['http://p:1', '70000'], decode: ['http://d:1'] }, {})).toThrow(/out of range/);
    expect(() => resolveServeConfig({ pdDisaggregation: true, prefill: ['http://p:1'], decode: ['http://d:1'], pdProtocol: 'nixl' }, {})).toThrow(/--pd-protocol/);
  });
});
