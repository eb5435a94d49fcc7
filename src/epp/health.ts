import * as grpc from '@grpc/grpc-js';

/** gRPC health services of an endpoint picker (GIE protocol: liveness, readiness, the ext_proc service). */
export const HEALTH_SERVICES = ['', 'liveness', 'readiness', 'envoy.service.ext_proc.v3.ExternalProcessor'] as const;

type Status = 'SERVING' | 'NOT_SERVING';

/**
 * grpc.health.v1.Health: `""` and `liveness` are SERVING while the process answers;
 * `readiness` and `envoy.service.ext_proc.v3.ExternalProcessor` are SERVING only when a healthy
 * endpoint exists and the picker is not shutting down. Watch streams each change.
 */
export function healthImplementation(isReady: () => boolean): grpc.UntypedServiceImplementation {
  const statusOf = (service: string): Status | undefined => {
    if (service === '' || service === 'liveness') return 'SERVING';
    if (service === 'readiness' || service === 'envoy.service.ext_proc.v3.ExternalProcessor') return isReady() ? 'SERVING' : 'NOT_SERVING';
    return undefined;
  };
  return {
    Check: (call: grpc.ServerUnaryCall<{ service?: string }, unknown>, cb: grpc.sendUnaryData<unknown>) => {
      const status = statusOf(call.request.service ?? '');
      if (!status) return cb({ code: grpc.status.NOT_FOUND, details: `unknown service '${call.request.service}'` });
      cb(null, { status });
    },
    Watch: (call: grpc.ServerWritableStream<{ service?: string }, unknown>) => {
      const service = call.request.service ?? '';
      let last: string | undefined;
      const tick = () => {
        const status = statusOf(service) ?? 'SERVICE_UNKNOWN';
        if (status !== last) {
          last = status;
          call.write({ status });
        }
      };
      tick();
      const t = setInterval(tick, 1000);
      t.unref();
      const stop = () => clearInterval(t);
      call.on('cancelled', stop);
      call.on('close', stop);
      call.on('error', stop);
    },
    List: (_call: grpc.ServerUnaryCall<unknown, unknown>, cb: grpc.sendUnaryData<unknown>) => {
      const statuses: Record<string, { status: Status }> = {};
      for (const s of HEALTH_SERVICES) statuses[s] = { status: statusOf(s)! };
      cb(null, { statuses });
    },
  };
}
