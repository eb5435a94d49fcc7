import { Pool } from 'undici';
import type { WorkerTlsOptions } from '../core/tls.js';

/**
 * One keep-alive connection pool per worker origin. By default a pool opens as many connections
 * as there are concurrent requests (null: undici's no-limit), so requests wait in the engine's
 * own queue, which the engine reports and kv_aware sees, not in a hidden one here;
 * --max-connections-per-worker sets a cap (`capped`), and time waiting for a connection is then
 * measured by the router.
 */
export class UpstreamPools {
  private readonly pools = new Map<string, Pool>();

  constructor(
    private readonly connectTimeoutMs = 10_000,
    private readonly connections: number | null = null,
    /** TLS to https:// workers (CAs, client certificate). */
    private readonly tls?: WorkerTlsOptions,
  ) {}

  /** Whether requests may wait for a connection (a cap is set). */
  get capped(): boolean {
    return this.connections !== null;
  }

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
