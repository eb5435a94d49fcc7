// Keeps the serving processes' shares of client connections even (`kvgate serve --processes N`).
//
// The kernel hands each new connection to whichever process accepts first (SCHED_NONE, see
// supervisor.ts), and a keep-alive connection stays with that process. A client that opens its
// connections in a burst can land most of them on one process: measured under wrk's 64
// connections, the two processes of a 2-process kvgate ran at 0.93 and 0.65 core in every round
// of one run, and once every connection went to one of them; the busy one then limits the
// throughput of both. So each process reports how many connections it holds, the supervisor
// tells every process the total, and a process holding more than its share (beyond a small
// tolerance) answers its next requests with `Connection: close`, one per connection in excess.
// Those clients reconnect after their response, and the kernel gives the new connection to a
// process that is waiting in accept — usually the less busy one. Nothing is cut: each closing
// connection has finished its exchange.
import type { IncomingMessage, Server, ServerResponse } from 'node:http';

/** A serving process's open connections (process → supervisor). */
export interface ConnectionCountMessage {
  kvgate: 'connections';
  open: number;
}

/** Every serving process's connections together (supervisor → processes). */
export interface ConnectionShareMessage {
  kvgate: 'connection-share';
  total: number;
  processes: number;
}

export function isConnectionCountMessage(m: unknown): m is ConnectionCountMessage {
  return typeof m === 'object' && m !== null && (m as { kvgate?: unknown }).kvgate === 'connections' && typeof (m as { open?: unknown }).open === 'number';
}

export function isConnectionShareMessage(m: unknown): m is ConnectionShareMessage {
  const x = m as { kvgate?: unknown; total?: unknown; processes?: unknown };
  return typeof m === 'object' && m !== null && x.kvgate === 'connection-share' && typeof x.total === 'number' && typeof x.processes === 'number';
}

/** How often processes report and the supervisor answers (ms). */
export const CONNECTION_REPORT_MS = 250;

/**
 * Connections a process may hold above an even share before it asks clients to reconnect:
 * 10% of the share, at least 2 (so a handful of connections is never churned).
 */
export function connectionTolerance(share: number): number {
  return Math.max(2, Math.ceil(share * 0.1));
}

/** The serving process's side: counts its connections and sheds its excess, one response at a time. */
export class ConnectionBalancer {
  private openConnections = 0;
  private excess = 0;
  /** Responses sent with `Connection: close` to even out the spread. */
  closedForBalance = 0;

  attach(server: Server): void {
    server.on('connection', (socket) => {
      this.openConnections++;
      socket.once('close', () => this.openConnections--);
    });
    server.prependListener('request', (_req: IncomingMessage, res: ServerResponse) => {
      if (this.excess <= 0 || res.headersSent) return;
      this.excess--;
      this.closedForBalance++;
      res.setHeader('Connection', 'close');
    });
  }

  get open(): number {
    return this.openConnections;
  }

  report(): ConnectionCountMessage {
    return { kvgate: 'connections', open: this.openConnections };
  }

  /** Applies the supervisor's latest total: how many connections this process should let go. */
  onShare(m: ConnectionShareMessage): void {
    if (m.processes < 2 || m.total <= 0) {
      this.excess = 0;
      return;
    }
    const share = Math.ceil(m.total / m.processes);
    const over = this.openConnections - share;
    this.excess = over > connectionTolerance(share) ? over : 0;
  }
}
