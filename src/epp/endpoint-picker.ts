import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import * as grpc from '@grpc/grpc-js';
import type { EppConfig } from '../config/epp-config.js';
import { errors, GatewayError } from '../core/errors.js';
import { isLoopback, KeySet } from '../server/auth.js';
import { isAdminRoute, PUBLIC_ROUTES, type ControlRoutes } from '../server/control.js';
import { sendError } from '../server/http-util.js';
import { RoutingCore, type RoutingCoreOptions } from '../server/routing-core.js';
import { ExtProcStream } from './ext-proc.js';
import { healthImplementation } from './health.js';
import { InferencePoolWatcher, type PoolSpec } from './inference-pool.js';
import { Picker } from './picker.js';
import { startPoolEndpoints } from './pool-endpoints.js';
import { loadProtos } from './protos.js';

/**
 * The composition root of `kvgate epp`: the same routing core as `kvgate serve` (registry,
 * policies, worker manager, KV events, metrics), answering Envoy's ext_proc stream instead of
 * proxying. Three listeners on --host: ext_proc (--grpc-port), gRPC health (--grpc-health-port)
 * and the HTTP admin/metrics routes (--port).
 */
export class EndpointPicker {
  readonly core: RoutingCore;
  readonly picker: Picker;
  private readonly extProc = new grpc.Server({ 'grpc.max_receive_message_length': 64 * 1024 * 1024 });
  private readonly health = new grpc.Server();
  private http: Server | undefined;
  private readonly control: ControlRoutes;
  private readonly adminKeys: KeySet;
  private readonly streams = new Set<grpc.ServerDuplexStream<never, never>>();
  private poolWatcher: InferencePoolWatcher | undefined;
  private stopPoolEndpoints: () => void = () => undefined;
  private draining = false;
  private readonly startedAt = Date.now();
  private ports = { grpc: 0, health: 0, http: 0 };

  constructor(
    readonly config: EppConfig,
    opts: RoutingCoreOptions = {},
  ) {
    this.core = new RoutingCore(config, opts);
    this.picker = new Picker(this.core, {
      fallbackEndpoints: config.fallbackEndpoints,
      conformanceTestHooks: config.conformanceTestHooks,
      maxPayloadSize: config.maxPayloadSize,
      maxJsonDepth: config.maxJsonDepth,
      holdTimeoutMs: config.requestTimeoutSecs * 1000,
    });
    this.control = this.core.controlRoutes({ pdMode: false, startedAt: this.startedAt, isDraining: () => this.draining });
    this.adminKeys = new KeySet(config.adminApiKey ? [config.adminApiKey] : []);
    const protos = loadProtos();
    this.extProc.addService(protos.extProc.service, {
      Process: ((call: grpc.ServerDuplexStream<never, never>) => {
        new ExtProcStream(call as never, {
          picker: this.picker,
          metrics: this.core.metrics,
          log: this.core.log,
          conformanceTestHooks: config.conformanceTestHooks,
          maxPayloadSize: config.maxPayloadSize,
          streams: this.streams as never,
        });
      }) as grpc.handleBidiStreamingCall<never, never>,
    });
    this.health.addService(protos.health.service, healthImplementation(() => this.isReady()));
  }

  get log() {
    return this.core.log;
  }

  /** Ready: not shutting down and at least one healthy endpoint. */
  isReady(): boolean {
    return !this.draining && this.core.registry.all().some((w) => w.isAvailable());
  }

  get grpcPort(): number {
    return this.ports.grpc;
  }
  get healthPort(): number {
    return this.ports.health;
  }
  get httpPort(): number {
    return this.ports.http;
  }
  /** ext_proc streams open now. */
  get activeStreams(): number {
    return this.streams.size;
  }

  async start(): Promise<void> {
    const c = this.config;
    await this.core.start();
    await this.core.registerConfiguredWorkers();
    if (c.poolName) {
      this.poolWatcher = new InferencePoolWatcher({
        name: c.poolName,
        namespace: c.poolNamespace,
        log: this.core.log,
        onChange: (pool: PoolSpec | undefined) => {
          this.stopPoolEndpoints();
          this.stopPoolEndpoints = startPoolEndpoints(pool, this.core, this.core.log);
        },
      });
      await this.poolWatcher.start();
    }
    this.core.startScraper();
    const host = c.host;
    const creds =
      c.tlsCertPath && c.tlsKeyPath
        ? grpc.ServerCredentials.createSsl(null, [{ cert_chain: readFileSync(c.tlsCertPath), private_key: readFileSync(c.tlsKeyPath) }], false)
        : grpc.ServerCredentials.createInsecure();
    this.ports.grpc = await bind(this.extProc, host, c.grpcPort, creds);
    this.ports.health = await bind(this.health, host, c.grpcHealthPort, grpc.ServerCredentials.createInsecure());
    const http = createServer({ keepAliveTimeout: 65_000 }, (req, res) => void this.dispatch(req, res));
    this.http = http;
    await new Promise<void>((resolve, reject) => {
      http.once('error', reject);
      http.listen(c.port, host, () => {
        http.removeListener('error', reject);
        this.ports.http = (http.address() as AddressInfo).port;
        resolve();
      });
    });
  }

  /** Address for clients on this host (0.0.0.0 / :: → loopback). */
  address(port: number): string {
    const h = this.config.host === '0.0.0.0' || this.config.host === '::' ? '127.0.0.1' : this.config.host;
    return `${h}:${port}`;
  }

  /**
   * Graceful shutdown: readiness turns NOT_SERVING (and /readiness 503) at once, open streams
   * may finish for up to graceMs, then the servers stop. Resolves with the streams cut.
   */
  async shutdown(graceMs: number): Promise<number> {
    this.draining = true;
    const deadline = Date.now() + graceMs;
    while (this.streams.size > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    const cut = this.streams.size;
    await this.close();
    return cut;
  }

  async close(): Promise<void> {
    this.draining = true;
    this.poolWatcher?.stop();
    this.stopPoolEndpoints();
    await this.core.stopBackground();
    this.extProc.forceShutdown();
    this.health.forceShutdown();
    const http = this.http;
    if (http) {
      await new Promise<void>((resolve) => {
        http.close(() => resolve());
        http.closeAllConnections();
      });
    }
    await this.core.closeWorkers();
  }

  /** HTTP admin and metrics: the control routes of serve; admin routes need the admin key or loopback. */
  private async dispatch(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const requestId = randomUUID();
    const q = req.url!.indexOf('?');
    const path = q < 0 ? req.url! : req.url!.slice(0, q);
    try {
      if (!PUBLIC_ROUTES.has(path) && isAdminRoute(path)) {
        if (this.adminKeys.size > 0) {
          if (this.adminKeys.check(req) === undefined) {
            this.core.metrics.authFailures.inc({ scope: 'admin' });
            throw errors.unauthorized('Admin routes need Authorization: Bearer <admin key>');
          }
        } else if (!this.config.allowRemoteAdmin && !isLoopback(req)) {
          this.core.metrics.authFailures.inc({ scope: 'admin' });
          throw new GatewayError(403, 'Admin routes answer only loopback clients unless --admin-api-key or --allow-remote-admin is set', 'permission_error', 'admin_loopback_only');
        }
      }
      await this.control.handle(req, res, path, requestId);
    } catch (e) {
      const err = e instanceof GatewayError ? e : errors.internal((e as Error)?.message ?? String(e));
      if (!(e instanceof GatewayError)) this.core.log.error({ err: e, path }, 'unexpected error');
      sendError(res, err, { 'x-request-id': requestId });
    }
  }
}

function bind(server: grpc.Server, host: string, port: number, creds: grpc.ServerCredentials): Promise<number> {
  const h = host.includes(':') ? `[${host}]` : host;
  return new Promise((resolve, reject) => server.bindAsync(`${h}:${port}`, creds, (err, bound) => (err ? reject(err) : resolve(bound))));
}
