import { readFileSync } from 'node:fs';
import { connect, credsAuthenticator, type NatsConnection, type ConnectionOptions } from '@nats-io/transport-node';
import type { SyncTransport } from './transport.js';

export interface NatsTransportOptions {
  /** nats://host:port (several, comma-separated, for a NATS cluster). */
  servers: string;
  /** Connection name shown by the NATS server (the replica id). */
  name: string;
  user?: string;
  pass?: string;
  token?: string;
  /** A NATS credentials file (JWT + nkey seed). */
  credsFile?: string;
  tlsCaFile?: string;
  tlsCertFile?: string;
  tlsKeyFile?: string;
}

/**
 * Replica sync over NATS core (plain publish/subscribe; JetStream is not needed). The client
 * connects in the background and reconnects forever: kvgate never waits for NATS to route.
 */
export class NatsTransport implements SyncTransport {
  private nc: NatsConnection | undefined;
  private isConnected = false;
  private closed = false;
  private readonly listeners: Array<(connected: boolean) => void> = [];
  private readonly subs: Array<{ subject: string; handler: (data: Uint8Array) => void; queue?: string; unsub?: () => void }> = [];
  /** Why the last connection attempt failed (for logs and readiness). */
  lastError: string | undefined;

  private constructor(private readonly opts: NatsTransportOptions) {}

  /** Starts connecting; resolves at once (the first connection may come later). */
  static start(opts: NatsTransportOptions): NatsTransport {
    const t = new NatsTransport(opts);
    void t.run();
    return t;
  }

  get connected(): boolean {
    return this.isConnected;
  }

  get maxPayload(): number {
    return this.nc?.info?.max_payload ?? 1024 * 1024;
  }

  publish(subject: string, data: Uint8Array): boolean {
    if (!this.nc || !this.isConnected) return false;
    try {
      this.nc.publish(subject, data);
      return true;
    } catch (e) {
      this.lastError = (e as Error).message;
      return false;
    }
  }

  subscribe(subject: string, handler: (data: Uint8Array) => void, queue?: string): () => void {
    const entry: (typeof this.subs)[number] = { subject, handler, queue };
    this.subs.push(entry);
    if (this.nc) this.attach(this.nc, entry);
    return () => {
      entry.unsub?.();
      const i = this.subs.indexOf(entry);
      if (i >= 0) this.subs.splice(i, 1);
    };
  }

  onStatus(listener: (connected: boolean) => void): void {
    this.listeners.push(listener);
  }

  async close(): Promise<void> {
    this.closed = true;
    const nc = this.nc;
    this.setConnected(false);
    if (nc) {
      try {
        await nc.drain();
      } catch {
        await nc.close().catch(() => undefined);
      }
    }
  }

  private attach(nc: NatsConnection, entry: (typeof this.subs)[number]): void {
    const sub = nc.subscribe(entry.subject, {
      queue: entry.queue,
      callback: (err, msg) => {
        if (!err) entry.handler(msg.data);
      },
    });
    entry.unsub = () => sub.unsubscribe();
  }

  private connectionOptions(): ConnectionOptions {
    const o = this.opts;
    const options: ConnectionOptions = {
      servers: o.servers.split(',').map((s) => s.trim()).filter(Boolean),
      name: o.name,
      reconnect: true,
      maxReconnectAttempts: -1,
      reconnectTimeWait: 500,
      waitOnFirstConnect: true,
      pingInterval: 2000,
      maxPingOut: 2,
      // A replica ignores its own batches; without this the server sends each one back, and it
      // was decoded only to be dropped (a measurable share of a busy process's CPU).
      noEcho: true,
    };
    if (o.user !== undefined) options.user = o.user;
    if (o.pass !== undefined) options.pass = o.pass;
    if (o.token !== undefined) options.token = o.token;
    if (o.credsFile) options.authenticator = credsAuthenticator(readFileSync(o.credsFile));
    if (o.tlsCaFile || o.tlsCertFile || o.tlsKeyFile) {
      options.tls = { caFile: o.tlsCaFile, certFile: o.tlsCertFile, keyFile: o.tlsKeyFile };
    }
    return options;
  }

  private async run(): Promise<void> {
    while (!this.closed) {
      let nc: NatsConnection;
      try {
        nc = await connect(this.connectionOptions());
      } catch (e) {
        // waitOnFirstConnect retries on its own; this is a configuration error (bad creds, TLS).
        this.lastError = (e as Error).message;
        await new Promise((r) => setTimeout(r, 1000).unref());
        continue;
      }
      if (this.closed) {
        await nc.close().catch(() => undefined);
        return;
      }
      this.nc = nc;
      for (const entry of this.subs) this.attach(nc, entry);
      this.setConnected(true);
      void (async () => {
        for await (const s of nc.status()) {
          if (s.type === 'disconnect') this.setConnected(false);
          else if (s.type === 'reconnect') this.setConnected(true);
        }
      })();
      const err = await nc.closed();
      this.setConnected(false);
      if (err) this.lastError = err.message;
      this.nc = undefined;
    }
  }

  private setConnected(up: boolean): void {
    if (up === this.isConnected) return;
    this.isConnected = up;
    for (const l of this.listeners) l(up);
  }
}
