import { createHash, timingSafeEqual } from 'node:crypto';
import { readFileSync } from 'node:fs';
import type { IncomingMessage } from 'node:http';

/**
 * A set of bearer keys compared in constant time: each key is stored as its SHA-256 digest, and
 * a presented key's digest is compared with every stored one with timingSafeEqual, so neither
 * the length nor the content of a key leaks through timing. Keys are never logged.
 */
export class KeySet {
  private readonly digests: Buffer[];

  constructor(keys: readonly string[]) {
    this.digests = keys.filter((k) => k.length > 0).map(digest);
  }

  get size(): number {
    return this.digests.length;
  }

  /** The key presented as `Authorization: Bearer <key>` if it is one of ours, else undefined. */
  check(req: IncomingMessage): string | undefined {
    const h = req.headers.authorization;
    if (typeof h !== 'string') return undefined;
    const m = /^Bearer\s+(.+)$/i.exec(h.trim());
    if (!m) return undefined;
    const d = digest(m[1]);
    let ok = false;
    for (const stored of this.digests) ok = timingSafeEqual(stored, d) || ok;
    return ok ? m[1] : undefined;
  }
}

function digest(key: string): Buffer {
  return createHash('sha256').update(key, 'utf8').digest();
}

/** Keys from a file: one per line; blank lines and lines starting with # are ignored. */
export function readKeyFile(path: string): string[] {
  return readFileSync(path, 'utf8')
    .split(/\r?\n/)
    .map((l) => l.trim())
    .filter((l) => l.length > 0 && !l.startsWith('#'));
}

export function isLoopback(req: IncomingMessage): boolean {
  const a = req.socket.remoteAddress ?? '';
  return a === '::1' || a.startsWith('127.') || a.startsWith('::ffff:127.');
}
