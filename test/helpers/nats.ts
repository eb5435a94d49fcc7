// A real nats-server on a free loopback port, for replica-sync tests. Needs the Debian package
// `nats-server` (scripts/setup-test-deps.sh installs it; `npm test` runs that first).
import { findNatsServer, NatsServer } from '../../src/processes/nats-server.js';

export interface TestNats {
  url: string;
  port: number;
  /** Sends `signal` (default SIGTERM) and resolves once the server has exited. */
  kill: (signal?: NodeJS.Signals) => Promise<void>;
  /** Starts it again on the same port; resolves once it accepts connections. */
  restart: () => Promise<void>;
}

/** Starts nats-server on 127.0.0.1 and a free port (binary on PATH or at /usr/sbin/nats-server). */
export async function startNats(): Promise<TestNats> {
  const server = await NatsServer.start({ bin: findNatsServer(), host: '127.0.0.1', port: 0 });
  return {
    url: server.url,
    port: server.port,
    kill: (signal) => server.kill(signal),
    restart: () => server.restart(),
  };
}
