// `kvgate serve --processes 2` end to end through the CLI: a supervisor, two serving processes on
// one shared port, the nats-server it starts for them, restart of a killed process, and a clean
// SIGTERM. Needs the Debian package nats-server (scripts/setup-test-deps.sh).
import { request as httpRequest, Agent } from 'node:http';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { findNatsServer } from '../../src/processes/nats-server.js';
import { runKvgate, spawnKvgate, type Spawned } from '../helpers/processes.js';
import { freePort } from '../helpers/ports.js';

const running: Spawned[] = [];
let sim: string;

beforeAll(async () => {
  const s = await spawnKvgate(['sim', '--host', '127.0.0.1', '--port', '0', '--speed', '50', '--seed', '7'], /listening on (http:\/\/\S+)/);
  running.push(s);
  sim = s.match[1];
});
afterAll(async () => {
  await Promise.all(running.map((p) => p.stop()));
});


// A new TCP connection per request, so the kernel picks the accepting process each time.
const noKeepAlive = new Agent({ keepAlive: false });
function post(port: number, body: unknown): Promise<number> {
  const data = JSON.stringify(body);
  return new Promise((resolve, reject) => {
    const req = httpRequest(
      { host: '127.0.0.1', port, path: '/v1/chat/completions', method: 'POST', agent: noKeepAlive, headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(data) } },
      (res) => {
        res.resume();
        res.on('end', () => resolve(res.statusCode!));
      },
    );
    req.once('error', reject);
    req.end(data);
  });
}

let refusedRetries = 0;
/** One request; retried only if the connection is refused (never expected: the supervisor holds the socket). */
async function chat(port: number, i: number): Promise<number> {
  const body = { model: 'kvgate-sim', messages: [{ role: 'system', content: 'You answer in one word. '.repeat(20) }, { role: 'user', content: `question ${i}` }], max_tokens: 2 };
  for (let attempt = 0; ; attempt++) {
    try {
      return await post(port, body);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ECONNREFUSED' || attempt >= 20) throw e;
      refusedRetries++;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

type LogLine = Record<string, unknown> & { msg?: string };
const lines = (out: string): LogLine[] =>
  out
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => {
      try {
        return JSON.parse(l) as LogLine;
      } catch {
        return {};
      }
    });
const servedBy = (out: string) => new Set(lines(out).filter((l) => l.msg === 'request').map((l) => String(l.replicaId)));
const alive = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

describe('kvgate serve --processes 2', () => {
  it('serves one port from two processes, restarts a killed one, and drains and exits 0 on SIGTERM', async () => {
    const port = await freePort();
    const sup = await spawnKvgate(
      ['serve', '--host', '127.0.0.1', '--port', String(port), '--processes', '2', '--worker-urls', sim, '--log-level', 'debug', '--health-check-interval-secs', '0.5'],
      /"msg":"kvgate supervisor listening"/,
      30_000,
    );
    running.push(sup);
    // The supervisor reports ready when the sockets listen; the children log their own line just after.
    for (let i = 0; i < 200 && lines(sup.output()).filter((l) => l.msg === 'kvgate listening').length < 2; i++) await new Promise((r) => setTimeout(r, 25));
    const head = lines(sup.output());
    const ready = head.find((l) => l.msg === 'kvgate supervisor listening')!;
    expect(ready.url).toBe(`http://127.0.0.1:${port}`);
    expect(ready.processes).toBe(2);
    expect(ready.replicaSync).toMatch(/^nats:\/\/127\.0\.0\.1:\d+$/);
    const natsPid = Number(head.find((l) => l.msg?.startsWith('started nats-server'))!.natsPid);
    expect(alive(natsPid)).toBe(true);
    const childPids = ready.childPids as number[];
    expect(new Set(childPids).size).toBe(2);
    // Each child logs its replica id (host:port:pid) when it listens.
    const listening = head.filter((l) => l.msg === 'kvgate listening');
    expect(listening.map((l) => l.pid).sort()).toEqual([...childPids].sort());
    for (const l of listening) expect(l.replicaId).toBe(`${l.hostname}:${port}:${l.pid}`);

    // Both processes take connections: 40 requests (8 at a time), more only if one process has not been seen yet.
    let sent = 0;
    const batch = async () => {
      const statuses = await Promise.all(Array.from({ length: 8 }, () => chat(port, sent++)));
      expect(statuses.every((s) => s === 200)).toBe(true);
    };
    while (sent < 40 || (servedBy(sup.output()).size < 2 && sent < 800)) await batch();
    const before = servedBy(sup.output());
    expect(before.size).toBe(2);
    // The two processes are peers through the bundled nats-server: whichever answers /replicas
    // has heard from the other.
    const replicas = (await (await fetch(`http://127.0.0.1:${port}/replicas`)).json()) as { state: string; connected: boolean; peers: Array<{ id: string }> };
    expect(replicas.connected).toBe(true);
    expect(replicas.peers).toHaveLength(1);
    expect(listening.map((l) => l.replicaId)).toContain(replicas.peers[0].id);

    // SIGKILL one child: the supervisor restarts it, and requests keep succeeding meanwhile.
    const victim = childPids[0];
    process.kill(victim, 'SIGKILL');
    let restartedPid: number | undefined;
    for (let i = 0; i < 200 && restartedPid === undefined; i++) {
      await batch();
      const restarted = lines(sup.output()).find((l) => l.msg === 'process restarted');
      if (restarted && lines(sup.output()).some((l) => l.msg === 'kvgate listening' && l.pid === restarted.childPid)) restartedPid = Number(restarted.childPid);
      else await new Promise((r) => setTimeout(r, 25));
    }
    expect(restartedPid).toBeDefined();
    expect(alive(victim)).toBe(false);
    const exitLine = lines(sup.output()).find((l) => l.msg === 'process exited unexpectedly; restarting it')!;
    expect(exitLine).toMatchObject({ childPid: victim, signal: 'SIGKILL' });
    // The restarted process serves too.
    const newId = `${listening[0].hostname}:${port}:${restartedPid}`;
    for (let i = 0; i < 50 && !servedBy(sup.output()).has(newId); i++) await batch();
    expect(servedBy(sup.output()).has(newId)).toBe(true);

    // SIGTERM: every process drains and exits, then the nats-server, then the supervisor with 0.
    const code = await sup.stop();
    expect(code).toBe(0);
    for (const pid of [childPids[1], restartedPid!, natsPid]) expect(alive(pid)).toBe(false);
    expect(lines(sup.output()).filter((l) => l.msg === 'all requests finished')).toHaveLength(2);
    console.log(`processes test: ${sent} requests, all 200; connection-refused retries: ${refusedRetries}`);
  });

  it('--replica-sync off: two processes that share nothing, and no nats-server', async () => {
    const port = await freePort();
    const sup = await spawnKvgate(
      ['serve', '--host', '127.0.0.1', '--port', String(port), '--processes', '2', '--replica-sync', 'off', '--worker-urls', sim, '--log-level', 'debug'],
      /"msg":"kvgate supervisor listening"/,
      30_000,
    );
    running.push(sup);
    for (let i = 0; i < 200 && lines(sup.output()).filter((l) => l.msg === 'kvgate listening').length < 2; i++) await new Promise((r) => setTimeout(r, 25));
    const out = lines(sup.output());
    expect(out.find((l) => l.msg === 'kvgate supervisor listening')!.replicaSync).toBe('off');
    expect(out.some((l) => l.msg?.startsWith('started nats-server'))).toBe(false);
    let sent = 0;
    while (sent < 16 || (servedBy(sup.output()).size < 2 && sent < 400)) {
      const statuses = await Promise.all(Array.from({ length: 8 }, () => chat(port, sent++)));
      expect(statuses.every((s) => s === 200)).toBe(true);
    }
    expect(servedBy(sup.output()).size).toBe(2);
    // Whichever process answers says replica sync is off.
    const res = await fetch(`http://127.0.0.1:${port}/replicas`);
    expect(await res.json()).toEqual({ state: 'off' });
    expect(await sup.stop()).toBe(0);
  });

  it('refuses --port 0, and names the package when no nats-server binary is found', async () => {
    const p = await runKvgate(['serve', '--port', '0', '--processes', '2']);
    expect(p.code).toBe(2);
    expect(p.out).toMatch(/--port: 0 \(any free port\) cannot be used with --processes above 1/);
    const port = await freePort();
    const n = await runKvgate(['serve', '--host', '127.0.0.1', '--port', String(port), '--processes', '2', '--worker-urls', sim, '--nats-server-bin', '/nonexistent/nats-server']);
    expect(n.code).toBe(1);
    expect(n.out).toMatch(/--nats-server-bin '\/nonexistent\/nats-server' is not an executable file/);
    // The search order: --nats-server-bin, then PATH, then the Debian location; else the message names the package.
    expect(() => findNatsServer(undefined, { PATH: '/nonexistent' }, '/nonexistent/sbin/nats-server')).toThrow(
      /no nats-server binary found \(not on PATH, not at \/nonexistent\/sbin\/nats-server\): install the Debian package 'nats-server'/,
    );
    const onPath = findNatsServer(undefined, { PATH: `/nonexistent:${process.env.PATH}` });
    expect(onPath).toMatch(/\/nats-server$/);
  });
});
