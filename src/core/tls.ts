import { readFileSync } from 'node:fs';

/**
 * TLS towards https:// workers (--ca-cert-paths, --client-cert-path, --client-key-path): the
 * `connect` options every undici dispatcher that talks to workers gets (proxying, health
 * checks, model discovery, metrics scraping, admin fan-outs), so all of them trust the same CAs
 * and present the same client certificate (mTLS).
 */
export interface WorkerTlsOptions {
  ca?: Buffer[];
  cert?: Buffer;
  key?: Buffer;
}

/** Reads the PEM files; undefined when none is configured (system CAs, no client certificate). */
export function loadWorkerTls(c: { caCertPaths: readonly string[]; clientCertPath?: string; clientKeyPath?: string }): WorkerTlsOptions | undefined {
  if (c.caCertPaths.length === 0 && !c.clientCertPath) return undefined;
  const read = (path: string, flag: string) => {
    try {
      return readFileSync(path);
    } catch (e) {
      throw new Error(`${flag}: cannot read '${path}': ${(e as Error).message}`);
    }
  };
  return {
    ...(c.caCertPaths.length > 0 ? { ca: c.caCertPaths.map((p) => read(p, '--ca-cert-paths')) } : {}),
    ...(c.clientCertPath ? { cert: read(c.clientCertPath, '--client-cert-path') } : {}),
    ...(c.clientKeyPath ? { key: read(c.clientKeyPath, '--client-key-path') } : {}),
  };
}
