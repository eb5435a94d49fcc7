import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import YAML from 'yaml';
import { z } from 'zod';
import { Command } from 'commander';
import { addOptions } from '../../src/config/options.js';
import { resolveServeConfig, serveOptionSpecs } from '../../src/config/serve-config.js';

/**
 * deploy/k8s renders offline (`kubectl kustomize`, kustomize 5 inside kubectl) and every object
 * validates: built-in kinds against the Kubernetes API schemas of kubernetes-models, the CRD kinds
 * (InferencePool, HTTPRoute, ServiceMonitor) against small strict schemas of the fields we use
 * (not the full CRD schemas). The kvgate container's flags must be flags its command lists in
 * --help, so the manifests cannot drift from the CLI.
 */

type Obj = { apiVersion: string; kind: string; metadata: { name: string; namespace?: string; labels?: Record<string, string> }; [k: string]: any };

const KUBECTL = ['/usr/bin/kubectl', '/usr/local/bin/kubectl'].find((p) => existsSync(p)) ?? 'kubectl';
const OVERLAYS = readdirSync('deploy/k8s/overlays').sort();

function render(dir: string): Obj[] {
  const r = spawnSync(KUBECTL, ['kustomize', dir], { encoding: 'utf8' });
  if (r.error) throw new Error(`cannot run ${KUBECTL} (kubectl is needed to render deploy/k8s): ${r.error.message}`);
  if (r.status !== 0) throw new Error(`kubectl kustomize ${dir} failed: ${r.stderr}`);
  return YAML.parseAllDocuments(r.stdout).map((d) => d.toJS() as Obj);
}

const name = z.string().min(1).max(253);
const meta = z.object({ name, namespace: z.string().optional(), labels: z.record(z.string()).optional(), annotations: z.record(z.string()).optional() }).strict();
const port = z.number().int().min(1).max(65535);
const labelMap = z.record(z.string().regex(/^([a-z0-9.-]+\/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$/), z.string().regex(/^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$/).max(63));

/** inference.networking.k8s.io/v1 InferencePool (api/v1/inferencepool_types.go): the fields we set. */
const inferencePool = z
  .object({
    apiVersion: z.literal('inference.networking.k8s.io/v1'),
    kind: z.literal('InferencePool'),
    metadata: meta,
    spec: z
      .object({
        selector: z.object({ matchLabels: labelMap.refine((m) => Object.keys(m).length >= 1 && Object.keys(m).length <= 64) }).strict(),
        targetPorts: z.array(z.object({ number: port }).strict()).min(1).max(1),
        endpointPickerRef: z
          .object({
            group: z.string().optional(),
            kind: z.string().optional(),
            name,
            portNumber: port.optional(),
            failureMode: z.enum(['FailOpen', 'FailClose']).optional(),
          })
          .strict(),
      })
      .strict(),
  })
  .strict();

/** gateway.networking.k8s.io/v1 HTTPRoute: parentRefs and rules with path matches and backendRefs. */
const httpRoute = z
  .object({
    apiVersion: z.literal('gateway.networking.k8s.io/v1'),
    kind: z.literal('HTTPRoute'),
    metadata: meta,
    spec: z
      .object({
        parentRefs: z.array(z.object({ group: z.string().optional(), kind: z.string().optional(), name, namespace: z.string().optional(), sectionName: z.string().optional() }).strict()).min(1),
        rules: z
          .array(
            z
              .object({
                matches: z.array(z.object({ path: z.object({ type: z.enum(['Exact', 'PathPrefix', 'RegularExpression']), value: z.string().startsWith('/') }).strict() }).strict()).optional(),
                backendRefs: z.array(z.object({ group: z.string(), kind: z.string(), name, port: port.optional(), weight: z.number().int().optional() }).strict()).min(1),
                timeouts: z.object({ request: z.string().regex(/^\d+(h|m|s|ms)$/).optional(), backendRequest: z.string().optional() }).strict().optional(),
              })
              .strict(),
          )
          .min(1),
      })
      .strict(),
  })
  .strict();

/** monitoring.coreos.com/v1 ServiceMonitor: selector and endpoints. */
const serviceMonitor = z
  .object({
    apiVersion: z.literal('monitoring.coreos.com/v1'),
    kind: z.literal('ServiceMonitor'),
    metadata: meta,
    spec: z
      .object({
        selector: z.object({ matchLabels: labelMap }).strict(),
        endpoints: z.array(z.object({ port: z.string(), path: z.string().startsWith('/'), interval: z.string().regex(/^\d+(s|m)$/) }).strict()).min(1),
      })
      .strict(),
  })
  .strict();

const CRDS: Record<string, z.ZodTypeAny> = { InferencePool: inferencePool, HTTPRoute: httpRoute, ServiceMonitor: serviceMonitor };

/** Validates a built-in kind with kubernetes-models (its module path is the apiVersion, then the kind). */
async function validateBuiltin(o: Obj): Promise<void> {
  const mod = await import(`kubernetes-models/${o.apiVersion}/${o.kind}`);
  const Model = mod[o.kind] ?? mod.default;
  expect(Model, `kubernetes-models has no ${o.apiVersion} ${o.kind}`).toBeTypeOf('function');
  new Model(o).validate();
}

/** Long flags a kvgate command lists in its --help (undefined if the command does not exist). */
function helpFlags(command: string): { flags: Set<string>; envs: Set<string> } | undefined {
  const r = spawnSync(process.execPath, ['dist/cli/main.js', command, '--help'], { encoding: 'utf8' });
  // An unknown command prints the top-level help instead.
  if (r.status !== 0 || !new RegExp(`^Usage: kvgate ${command} `, 'm').test(r.stdout)) return undefined;
  return { flags: new Set(r.stdout.match(/--[a-z0-9][a-z0-9-]*/g) ?? []), envs: new Set(r.stdout.match(/KVGATE_[A-Z0-9_]+/g) ?? []) };
}

function kvgateContainers(objs: Obj[]) {
  return objs.filter((o) => o.kind === 'Deployment').flatMap((d) => (d.spec.template.spec.containers as any[]).filter((c) => c.name === 'kvgate').map((c) => ({ deployment: d, container: c })));
}

const rendered = new Map<string, Obj[]>();
function get(dir: string): Obj[] {
  if (!rendered.has(dir)) rendered.set(dir, render(dir));
  return rendered.get(dir)!;
}

const hasEpp = helpFlags('epp') !== undefined;

describe('deploy/k8s kustomize overlays', () => {
  it('has the discovery, pd and epp overlays', () => {
    expect(OVERLAYS).toEqual(expect.arrayContaining(['discovery', 'epp', 'pd']));
  });

  for (const dir of ['deploy/k8s/base', ...OVERLAYS.map((o) => `deploy/k8s/overlays/${o}`)]) {
    describe(dir, () => {
      it('renders with kubectl kustomize and every object validates (kubernetes-models; CRDs: strict schemas of the fields used)', async () => {
        const objs = get(dir);
        expect(objs.length).toBeGreaterThan(0);
        for (const o of objs) {
          const crd = CRDS[o.kind];
          if (crd) {
            const r = crd.safeParse(o);
            expect(r.success, `${o.kind}/${o.metadata.name}: ${r.success ? '' : JSON.stringify(r.error.issues)}`).toBe(true);
          } else {
            await validateBuiltin(o);
          }
        }
        const names = objs.map((o) => `${o.kind}/${o.metadata.name}`);
        expect(new Set(names).size).toBe(names.length);
        if (dir.includes('overlays')) for (const o of objs) expect(o.metadata.namespace, `${o.kind}/${o.metadata.name} namespace`).toBeTruthy();
      });

      it('hardened pods, probes, resources; RBAC only reads pods (and InferencePools for the EPP)', () => {
        const objs = get(dir);
        const [{ deployment, container }] = kvgateContainers(objs);
        const pod = deployment.spec.template.spec;
        expect(pod.securityContext.runAsNonRoot).toBe(true);
        expect(container.securityContext).toMatchObject({ allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, privileged: false, capabilities: { drop: ['ALL'] } });
        expect(container.resources.requests).toBeDefined();
        expect(container.resources.limits.memory).toBeDefined();
        expect(container.livenessProbe).toBeDefined();
        expect(container.readinessProbe).toBeDefined();
        const epp = container.args[0] === 'epp';
        if (!epp) {
          expect(container.livenessProbe.httpGet.path).toBe('/liveness');
          expect(container.readinessProbe.httpGet.path).toBe('/readiness');
        } else {
          expect(container.livenessProbe.grpc).toEqual({ port: 9003, service: 'liveness' });
          expect(container.readinessProbe.grpc).toEqual({ port: 9003, service: 'readiness' });
        }
        // Service account → RoleBinding → Role with read-only rules.
        const sa = pod.serviceAccountName;
        const binding = objs.find((o) => o.kind === 'RoleBinding' && o.subjects.some((s: any) => s.kind === 'ServiceAccount' && s.name === sa))!;
        expect(binding).toBeDefined();
        const role = objs.find((o) => o.kind === 'Role' && o.metadata.name === binding.roleRef.name)!;
        const rules = role.rules.map((r: any) => ({ groups: r.apiGroups, resources: r.resources, verbs: [...r.verbs].sort() }));
        const read = ['get', 'list', 'watch'];
        expect(rules).toEqual([{ groups: [''], resources: ['pods'], verbs: read }, ...(epp ? [{ groups: ['inference.networking.k8s.io'], resources: ['inferencepools'], verbs: read }] : [])]);
        expect(objs.some((o) => o.kind === 'ClusterRole' || o.kind === 'ClusterRoleBinding')).toBe(false);
        // The Service selects the pods and names the ports the ServiceMonitor scrapes.
        const svc = objs.find((o) => o.kind === 'Service')!;
        const podLabels = deployment.spec.template.metadata.labels;
        for (const [k, v] of Object.entries(svc.spec.selector)) expect(podLabels[k]).toBe(v);
        const containerPorts = new Set(container.ports.map((p: any) => p.name));
        for (const p of svc.spec.ports) expect(containerPorts.has(p.targetPort)).toBe(true);
        const sm = objs.find((o) => o.kind === 'ServiceMonitor')!;
        for (const [k, v] of Object.entries(sm.spec.selector.matchLabels)) expect(svc.metadata.labels[k]).toBe(v);
        for (const ep of sm.spec.endpoints) expect(svc.spec.ports.map((p: any) => p.name)).toContain(ep.port);
      });

      it.skipIf(dir.endsWith('/epp') && !hasEpp)('the kvgate container only uses flags and KVGATE_ variables its command lists in --help', () => {
        for (const { container } of kvgateContainers(get(dir))) {
          const [command, ...args] = container.args as string[];
          const help = helpFlags(command);
          expect(help, `kvgate ${command} --help`).toBeDefined();
          const used = args.filter((a) => a.startsWith('--')).map((a) => a.split('=')[0]);
          expect(used.length).toBeGreaterThan(0);
          for (const f of used) expect(help!.flags.has(f), `${f} is not a flag of kvgate ${command}`).toBe(true);
          for (const e of (container.env ?? []) as Array<{ name: string }>) {
            if (e.name.startsWith('KVGATE_')) expect(help!.envs.has(e.name), `${e.name} is not a variable of kvgate ${command}`).toBe(true);
          }
          // $(VAR) references in args must name a variable of the container.
          const envNames = new Set(((container.env ?? []) as Array<{ name: string }>).map((e) => e.name));
          for (const a of args) for (const m of a.matchAll(/\$\(([A-Za-z_][A-Za-z0-9_]*)\)/g)) expect(envNames.has(m[1]), `${m[1]} in args`).toBe(true);
        }
      });
    });
  }

  it('epp: the InferencePool points at the picker Service on 9002 and the HTTPRoute at the InferencePool', () => {
    const objs = get('deploy/k8s/overlays/epp');
    const pool = objs.find((o) => o.kind === 'InferencePool')!;
    const svc = objs.find((o) => o.kind === 'Service' && o.metadata.name === pool.spec.endpointPickerRef.name)!;
    expect(svc).toBeDefined();
    expect(svc.spec.ports.map((p: any) => p.port)).toEqual(expect.arrayContaining([9002, 9003]));
    expect(pool.spec.endpointPickerRef.portNumber).toBe(9002);
    const route = objs.find((o) => o.kind === 'HTTPRoute')!;
    expect(route.spec.rules[0].backendRefs[0]).toMatchObject({ group: 'inference.networking.k8s.io', kind: 'InferencePool', name: pool.metadata.name });
    const [{ container }] = kvgateContainers(objs);
    const arg = (f: string) => container.args[container.args.indexOf(f) + 1];
    expect(container.args[0]).toBe('epp');
    expect([arg('--grpc-port'), arg('--grpc-health-port'), arg('--pool-name'), arg('--pool-namespace')]).toEqual(['9002', '9003', pool.metadata.name, '$(POD_NAMESPACE)']);
  });

  it('the serve args are a valid kvgate serve configuration (values and combinations, not only flag names)', () => {
    for (const dir of ['deploy/k8s/base', 'deploy/k8s/overlays/discovery', 'deploy/k8s/overlays/pd']) {
      const [{ container }] = kvgateContainers(get(dir));
      const [command, ...args] = (container.args as string[]).map((a) => a.replace('$(POD_NAMESPACE)', 'llm'));
      expect(command).toBe('serve');
      const cmd = addOptions(new Command('serve').exitOverride(), serveOptionSpecs);
      cmd.parse(args, { from: 'user' });
      const config = resolveServeConfig(cmd.opts(), {});
      expect(config.serviceDiscovery).toBe(true);
      expect(config.serviceDiscoveryNamespace).toBe('llm');
    }
  });

  it('pd: prefill and decode selectors; discovery: one selector', () => {
    const pd = kvgateContainers(get('deploy/k8s/overlays/pd'))[0].container.args as string[];
    expect(pd).toEqual(expect.arrayContaining(['--pd-disaggregation', '--service-discovery', '--prefill-selector', '--decode-selector']));
    expect(pd).not.toContain('--selector');
    const disc = kvgateContainers(get('deploy/k8s/overlays/discovery'))[0].container.args as string[];
    expect(disc).toEqual(expect.arrayContaining(['--service-discovery', '--selector']));
  });

  it('the Dockerfile runs node dist/cli/main.js as the non-root uid the manifests require', () => {
    const df = readFileSync('Dockerfile', 'utf8');
    expect(df).toMatch(/^ENTRYPOINT \["node", ?"dist\/cli\/main\.js"\]$/m);
    expect(df).toMatch(/npm ci --omit=dev/);
    expect((df.match(/^FROM /gm) ?? []).length).toBeGreaterThanOrEqual(2);
    const user = /^USER (\d+)(?::(\d+))?$/m.exec(df);
    expect(user).not.toBeNull();
    expect(Number(user![1])).toBeGreaterThan(0);
    const [{ deployment }] = kvgateContainers(get('deploy/k8s/base'));
    expect(deployment.spec.template.spec.securityContext.runAsUser).toBe(Number(user![1]));
  });
});
