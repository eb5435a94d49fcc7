import { Pool } from 'undici';
import type { WorkerTlsOptions } from '../core/tls.js';

/** One keep-alive connection pool per worker origin. */
export class UpstreamPools {
  private readonly pools = new Map<string, Pool>();

  constructor(
    private readonly connectTimeoutMs = 10_000,
    private readonly connections = 256,
    /** TLS to https:// workers (CAs, client certificate). */
    private readonly tls?: WorkerTlsOptions,
  ) {}

  get(origin: string): Pool {
    let pool = this.pools.get(origin);
    if (!pool) {
      pool = new Pool(origin, {
        connections: this.connections,
        pipelining: 1,
        keepAliveTimeout: 30_000,
        connectTimeout: this.connectTimeoutMs,
        ...(this.tls ? { connect: { ...this.tls } } : {}),
        // Timeouts are enforced by the gateway per request (total and, later, idle).
        headersTimeout: 0,
        bodyTimeout: 0,
      });
      this.pools.set(origin, pool);
    }
    return pool;
  }

  async drop(origin: string): Promise<void> {
    const pool = this.pools.get(origin);
    if (!pool) return;
    this.pools.delete(origin);
    await pool.close().catch(() => pool.destroy());
  }

  async closeAll(): Promise<void> {
    const all = [...this.pools.values()];
    this.pools.clear();
    await Promise.all(all.map((p) => p.destroy().catch(() => undefined)));
  }
}
