/**
 * vLLM's offset_endpoint_port: rank 0 (or an empty endpoint) is returned unchanged; `inproc://x`
 * becomes `inproc://x_dp<rank>`; `tcp://host:port` becomes `tcp://host:<port + rank>`.
 * Anything else (ipc://, tcp without a port) has no per-rank form and throws, as vLLM does; two
 * ranks on one ipc path would otherwise collide.
 */
export function endpointForRank(endpoint: string, rank: number): string {
  if (!Number.isInteger(rank) || rank < 0) throw new RangeError(`rank must be a non-negative integer, got ${rank}`);
  if (!endpoint || rank === 0) return endpoint;
  if (endpoint.includes('inproc')) return `${endpoint}_dp${rank}`;
  if (endpoint.includes('tcp')) {
    const colon = endpoint.lastIndexOf(':');
    const portText = endpoint.slice(colon + 1);
    if (colon > endpoint.indexOf('://') && /^\d+$/.test(portText)) {
      const port = Number(portText) + rank;
      if (port > 65535) throw new RangeError(`endpoint ${endpoint}: port for rank ${rank} exceeds 65535`);
      return `${endpoint.slice(0, colon)}:${port}`;
    }
  }
  throw new Error(`Invalid KV event endpoint ${JSON.stringify(endpoint)} for rank ${rank}: must be tcp://host:port or inproc://name`);
}
