// A nats-server child process on a loopback port: found on the machine, started, stopped and
// restarted on the same port. `kvgate serve --processes N` starts one for its processes' replica
// sync when no --replica-sync URL is given; the tests use the same code.
import { spawn, type ChildProcess } from 'node:child_process';
import { accessSync, constants, statSync } from 'node:fs';
import { connect } from 'node:net';
import { delimiter, join } from 'node:path';

/** Where Debian's `nats-server` package installs the binary (not on a non-root user's PATH). */
export const DEBIAN_NATS_SERVER = '/usr/sbin/nats-server';

function isExecutableFile(path: string): boolean {
  try {
    if (!statSync(path).isFile()) return false;
    accessSync(path, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

export class NatsServerNotFoundError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'NatsServerNotFoundError';
  }
}

/** The nats-server binary: `explicit` if given, else `nats-server` on PATH, else /usr/sbin/nats-server. */
export function findNatsServer(explicit?: string, env: NodeJS.ProcessEnv = process.env, fallback = DEBIAN_NATS_SERVER): string {
  if (explicit !== undefined) {
    if (isExecutableFile(explicit)) return explicit;
    throw new NatsServerNotFoundError(`--nats-server-bin '${explicit}' is not an executable file`);
  }
  for (const dir of (env.PATH ?? '').split(delimiter)) {
    if (dir && isExecutableFile(join(dir, 'nats-server'))) return join(dir, 'nats-server');
  }
  if (isExecutableFile(fallback)) return fallback;
  throw new NatsServerNotFoundError(
    `no nats-server binary found (not on PATH, not at ${fallback}): install the Debian package 'nats-server' ` +
      `(apt-get install nats-server), give --nats-server-bin PATH, or run a NATS server yourself and pass --replica-sync nats://HOST:PORT`,
  );
}

export interface NatsServerOptions {
  /** The binary (see findNatsServer). */
  bin: string;
  /** Listen address (default 127.0.0.1). */
  host?: string;
  /** Port; 0 (default) lets nats-server pick a free one, which is then kept across restarts. */
  port?: number;
  /** How long to wait for it to accept connections (default 10 s). */
  startTimeoutMs?: number;
  /** Called when the process exits without kill() having been asked for. */
  onUnexpectedExit?: (code: number | null, signal: NodeJS.Signals | null) => void;
}

const LISTENING = /Listening for client connections on ([^\s:]+|\[[^\]]+\]):(\d+)/;

function acceptsConnections(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect({ host, port });
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

export class NatsServer {
  readonly bin: string;
  readonly host: string;
  private boundPort: number;
  private child: ChildProcess | undefined;
  private exited: Promise<void> = Promise.resolve();
  private killing = false;
  private readonly startTimeoutMs: number;
  private readonly onUnexpectedExit: NatsServerOptions['onUnexpectedExit'];

  private constructor(opts: NatsServerOptions) {
    this.bin = opts.bin;
    this.host = opts.host ?? '127.0.0.1';
    this.boundPort = opts.port ?? 0;
    this.startTimeoutMs = opts.startTimeoutMs ?? 10_000;
    this.onUnexpectedExit = opts.onUnexpectedExit;
  }

  /** Starts nats-server and resolves once it accepts TCP connections. */
  static async start(opts: NatsServerOptions): Promise<NatsServer> {
    const server = new NatsServer(opts);
    await server.spawn();
    return server;
  }

  get port(): number {
    return this.boundPort;
  }

  get url(): string {
    return `nats://${this.host}:${this.boundPort}`;
  }

  get pid(): number | undefined {
    return this.child?.pid;
  }

  get running(): boolean {
    return this.child !== undefined && this.child.exitCode === null && this.child.signalCode === null;
  }

  private spawn(): Promise<void> {
    // -p -1: nats-server picks a free port and logs it; later starts reuse that port.
    const args = ['-a', this.host, '-p', this.boundPort === 0 ? '-1' : String(this.boundPort)];
    const child = spawn(this.bin, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    this.child = child;
    this.killing = false;
    let out = '';
    this.exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    return new Promise<void>((resolve, reject) => {
      let settled = false;
      const fail = (why: string) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
        reject(new Error(`nats-server (${this.bin} ${args.join(' ')}) ${why}; its output:\n${out.slice(-4000)}`));
      };
      const timer = setTimeout(() => fail(`did not accept connections within ${this.startTimeoutMs} ms`), this.startTimeoutMs);
      const onData = (d: Buffer) => {
        if (settled) return; // keep draining the pipes, but stop collecting
        out += d.toString();
        const m = out.match(LISTENING);
        if (!m) return;
        const port = Number(m[2]);
        void (async () => {
          for (let i = 0; i < 100 && !settled; i++) {
            if (await acceptsConnections(this.host, port)) {
              settled = true;
              clearTimeout(timer);
              this.boundPort = port;
              resolve();
              return;
            }
            await new Promise((r) => setTimeout(r, 20));
          }
          fail(`logged that it listens on port ${port} but refuses connections`);
        })();
      };
      child.stdout!.on('data', onData);
      child.stderr!.on('data', onData);
      child.once('error', (e) => fail(`could not be started: ${e.message}`));
      child.once('exit', (code, signal) => {
        if (!settled) return fail(`exited (code ${code}, signal ${signal}) before accepting connections`);
        if (!this.killing && this.child === child) this.onUnexpectedExit?.(code, signal);
      });
    });
  }

  /** Sends `signal` (default SIGTERM) and resolves once the process has exited. */
  async kill(signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
    const child = this.child;
    if (!child || !this.running) return;
    this.killing = true;
    child.kill(signal);
    await this.exited;
  }

  /** Starts it again on the same port (stopping it first if it still runs). */
  async restart(): Promise<void> {
    await this.kill('SIGTERM');
    await this.spawn();
  }
}
