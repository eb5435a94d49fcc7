// `kvgate serve --processes N` (N > 1): this process becomes a supervisor. It forks N serving
// processes with node:cluster, which all accept on one listening socket that the supervisor
// opened (cluster.SCHED_NONE: the kernel hands each connection to whichever process accepts
// first; this is not SO_REUSEPORT, which Node 20 lacks), and keeps their shares of connections
// even (connection-balance.ts: it relays each process's connection count). It restarts a process that dies,
// forwards SIGTERM/SIGINT for a graceful drain, and starts a nats-server for the processes'
// replica sync when no --replica-sync URL is configured.
import cluster, { type Worker as ClusterWorker } from 'node:cluster';
import { hostname } from 'node:os';
import type { Logger } from 'pino';
import type { ServeConfig } from '../config/serve-config.js';
import { CONNECTION_REPORT_MS, isConnectionCountMessage, type ConnectionShareMessage } from './connection-balance.js';
import { findNatsServer, NatsServer } from './nats-server.js';

/** The IPC message that tells a serving process to drain, as a first SIGTERM/SIGINT would. */
export interface ShutdownMessage {
  kvgate: 'shutdown';
  signal: NodeJS.Signals;
  /** A second signal reached the supervisor: exit at once instead of draining. */
  now?: boolean;
}

export function isShutdownMessage(m: unknown): m is ShutdownMessage {
  return typeof m === 'object' && m !== null && (m as { kvgate?: unknown }).kvgate === 'shutdown';
}

/** The replica sync URL from the configuration (`replicaSync`, --replica-sync), if any. */
function configuredReplicaSync(config: ServeConfig): string | undefined {
  return config.replicaSync && config.replicaSync.length > 0 ? config.replicaSync : undefined;
}

/**
 * This process's replica id: --replica-id if configured, else host:port:pid (the routing core
 * uses the same rule). The supervisor gives each child its own --replica-id (`<id>/<index>`)
 * when one is configured, so that the processes never share one.
 */
export function replicaIdOf(config: ServeConfig, pid = process.pid): string {
  if (config.replicaId) return config.replicaId;
  return `${hostname()}:${config.port}:${pid}`;
}

/** Restart delay after the n-th consecutive unexpected exit (n >= 1): 100 ms doubling to 10 s. */
export function restartDelayMs(consecutiveFailures: number): number {
  return Math.min(10_000, 100 * 2 ** Math.max(0, consecutiveFailures - 1));
}

/** A process that ran this long before dying starts the backoff again from the beginning. */
const STABLE_AFTER_MS = 10_000;

interface Slot {
  index: number;
  worker: ClusterWorker | undefined;
  startedAt: number;
  failures: number;
  restartTimer: NodeJS.Timeout | undefined;
  listened: boolean;
  /** Client connections the process last reported holding (connection-balance.ts). */
  connections: number;
}

/**
 * How connections reach the serving processes. By default the kernel gives each connection to
 * whichever process accepts it first (cluster.SCHED_NONE). Node's round-robin mode (the
 * supervisor accepts and hands each connection over IPC) loses a connection that is in transit
 * to a process killed at that moment: the client hangs without an error (seen in
 * test/integration/processes.test.ts after a SIGKILL), and it measured no faster under wrk
 * (`npm run bench:proxy:wrk`: 8,591–9,951 req/s round robin against 9,816–10,614 kernel). Node's
 * own NODE_CLUSTER_SCHED_POLICY=rr still selects it.
 */
export function schedulingPolicyFrom(env: string | undefined): number {
  return env === 'rr' ? cluster.SCHED_RR : cluster.SCHED_NONE;
}

/**
 * Runs the supervisor until every serving process has exited after SIGTERM/SIGINT, then stops
 * the nats-server it started and exits the process (0 if every serving process exited cleanly).
 */
export async function runSupervisor(config: ServeConfig, log: Logger): Promise<void> {
  const n = config.processes;
  // Must be set before the first fork. See schedulingPolicyFrom.
  cluster.schedulingPolicy = schedulingPolicyFrom(process.env.NODE_CLUSTER_SCHED_POLICY);

  // A configured URL is passed on as is; so is 'off' (--replica-sync off: the processes share
  // nothing, each keeps its own trees and load view, and no nats-server is started).
  let syncUrl = configuredReplicaSync(config);
  let nats: NatsServer | undefined;
  let stopping = false;
  if (syncUrl === undefined) {
    let bin: string;
    try {
      bin = findNatsServer(config.natsServerBin);
    } catch (e) {
      process.stderr.write(`kvgate serve: --processes ${n} needs a NATS server for replica sync: ${(e as Error).message}\n`);
      process.exit(1);
    }
    let natsFailures = 0;
    const restartNats = () => {
      if (stopping || !nats) return;
      natsFailures++;
      const delay = restartDelayMs(natsFailures);
      log.error({ nats: nats.url, restartInMs: delay }, 'nats-server exited unexpectedly; restarting it');
      setTimeout(() => {
        if (stopping || !nats) return;
        nats.restart().then(
          () => {
            natsFailures = 0;
            log.info({ nats: nats!.url, natsPid: nats!.pid }, 'nats-server restarted');
          },
          (e: Error) => {
            log.error({ err: e.message }, 'nats-server restart failed');
            restartNats();
          },
        );
      }, delay).unref();
    };
    try {
      nats = await NatsServer.start({ bin, host: '127.0.0.1', port: 0, onUnexpectedExit: restartNats });
    } catch (e) {
      process.stderr.write(`kvgate serve: cannot start nats-server for replica sync: ${(e as Error).message}\n`);
      process.exit(1);
    }
    syncUrl = nats.url;
    log.info({ nats: nats.url, bin, natsPid: nats.pid }, 'started nats-server for replica sync between the processes');
    process.once('exit', () => {
      // Last resort if the supervisor exits some other way: never leave nats-server behind.
      if (nats?.pid && nats.running) process.kill(nats.pid, 'SIGKILL');
    });
  }

  // Children re-read the same command line, environment and config file; only the sync URL is added.
  const childEnv = configuredReplicaSync(config) === undefined ? { KVGATE_REPLICA_SYNC: syncUrl } : {};
  const host = config.host === '0.0.0.0' || config.host === '::' ? '127.0.0.1' : config.host;
  const url = `${config.tlsCertPath ? 'https' : 'http'}://${host}:${config.port}`;
  const slots: Slot[] = Array.from({ length: n }, (_, index) => ({ index, worker: undefined, startedAt: 0, failures: 0, restartTimer: undefined, listened: false, connections: 0 }));
  let ready = false;
  let anyFailed = false;
  let killTimer: NodeJS.Timeout | undefined;
  let stopSignal: NodeJS.Signals | undefined;

  const fork = (slot: Slot) => {
    slot.restartTimer = undefined;
    slot.startedAt = Date.now();
    slot.listened = false;
    const ownId = config.replicaId ? { KVGATE_REPLICA_ID: `${config.replicaId}/${slot.index}` } : {};
    slot.worker = cluster.fork({ ...childEnv, ...ownId, KVGATE_PROCESS_INDEX: String(slot.index) });
  };
  const slotOf = (w: ClusterWorker) => slots.find((s) => s.worker === w);
  const live = () => slots.filter((s) => s.worker !== undefined);

  const finish = async () => {
    if (killTimer) clearTimeout(killTimer);
    if (nats) {
      await nats.kill('SIGTERM');
      log.info({ nats: nats.url }, 'nats-server stopped');
    }
    log.info({ exitCode: anyFailed ? 1 : 0 }, 'supervisor: every process has exited');
    process.exit(anyFailed ? 1 : 0);
  };

  const stop = (signal: NodeJS.Signals, why?: string) => {
    if (stopping) {
      log.warn({ signal }, 'second signal: telling every process to exit now');
      for (const s of live()) {
        const msg: ShutdownMessage = { kvgate: 'shutdown', signal, now: true };
        if (s.worker!.isConnected()) s.worker!.send(msg);
        else s.worker!.process.kill('SIGKILL');
      }
      return;
    }
    stopping = true;
    stopSignal = signal;
    for (const s of slots) {
      if (s.restartTimer) clearTimeout(s.restartTimer);
      s.restartTimer = undefined;
    }
    log.info({ signal, processes: live().length, reason: why }, 'supervisor: draining every process');
    for (const s of live()) {
      const msg: ShutdownMessage = { kvgate: 'shutdown', signal };
      if (s.worker!.isConnected()) s.worker!.send(msg);
      else s.worker!.process.kill(signal);
    }
    // Processes cut their own requests after the grace period; this only catches a stuck one.
    killTimer = setTimeout(() => {
      for (const s of live()) {
        log.error({ index: s.index, childPid: s.worker!.process.pid }, 'process still running long after the grace period: killing it');
        s.worker!.process.kill('SIGKILL');
      }
    }, (config.shutdownGracePeriodSecs + 15) * 1000);
    killTimer.unref();
    if (live().length === 0) void finish();
  };

  cluster.on('listening', (w, address) => {
    const slot = slotOf(w);
    // Only the shared HTTP port counts (a process may listen on other sockets too).
    if (!slot || slot.listened || address.port !== config.port) return;
    slot.listened = true;
    if (!ready && slots.every((s) => s.listened)) {
      ready = true;
      log.info({ url, processes: n, replicaSync: syncUrl, childPids: slots.map((s) => s.worker?.process.pid) }, 'kvgate supervisor listening');
    }
  });

  cluster.on('exit', (w, code, signal) => {
    const slot = slotOf(w);
    if (!slot) return;
    slot.worker = undefined;
    slot.connections = 0;
    if (stopping) {
      // Killed by the very signal being forwarded (it came before the process set up its handlers) is a clean stop too.
      if (code !== 0 && signal !== stopSignal) anyFailed = true;
      log.info({ index: slot.index, childPid: w.process.pid, code, signal }, 'process exited');
      if (live().length === 0) void finish();
      return;
    }
    if (!ready) {
      // A process that cannot start (port taken, bad worker URL...) would fail again: give up.
      anyFailed = true;
      log.error({ index: slot.index, childPid: w.process.pid, code, signal }, 'a process exited during start-up: stopping the others');
      stop('SIGTERM', 'start-up failed');
      return;
    }
    if (Date.now() - slot.startedAt >= STABLE_AFTER_MS) slot.failures = 0;
    slot.failures++;
    const delay = restartDelayMs(slot.failures);
    log.warn({ index: slot.index, childPid: w.process.pid, code, signal, restartInMs: delay, consecutiveFailures: slot.failures }, 'process exited unexpectedly; restarting it');
    slot.restartTimer = setTimeout(() => {
      if (stopping) return;
      fork(slot);
      log.info({ index: slot.index, childPid: slot.worker!.process.pid }, 'process restarted');
    }, delay);
  });

  // Connection balancing: each process reports its connections; every process hears the total.
  cluster.on('message', (w, m) => {
    const slot = slotOf(w);
    if (slot && isConnectionCountMessage(m)) slot.connections = m.open;
  });
  setInterval(() => {
    if (stopping) return;
    const running = live();
    const share: ConnectionShareMessage = { kvgate: 'connection-share', total: running.reduce((a, s) => a + s.connections, 0), processes: running.length };
    for (const s of running) if (s.worker!.isConnected()) s.worker!.send(share);
  }, CONNECTION_REPORT_MS).unref();

  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
  for (const slot of slots) fork(slot);
}
