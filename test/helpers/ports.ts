import { createServer } from 'node:net';

/** A TCP port free on 127.0.0.1 now, for another process to bind (see freePortRange). */
export function freePort(): Promise<number> {
  return freePortRange(1);
}

/**
 * A base port such that base … base+n−1 are all free on 127.0.0.1 now (for per-rank ports).
 * Drawn from 10000–30999, below Linux's ephemeral range (32768–60999), so the outgoing
 * connections of a busy test run cannot take it between this check and the bind.
 */
export async function freePortRange(n: number): Promise<number> {
  for (let attempt = 0; attempt < 50; attempt++) {
    const base = 10_000 + Math.floor(Math.random() * (21_000 - n));
    if (base + n - 1 > 65535) continue;
    const held: Array<import('node:net').Server> = [];
    let ok = true;
    for (let i = 0; i < n && ok; i++) {
      ok = await new Promise<boolean>((resolve) => {
        const s = createServer();
        s.once('error', () => resolve(false));
        s.listen(base + i, '127.0.0.1', () => {
          held.push(s);
          resolve(true);
        });
      });
    }
    await Promise.all(held.map((s) => new Promise((r) => s.close(r))));
    if (ok) return base;
  }
  throw new Error(`no ${n} consecutive free ports found`);
}
