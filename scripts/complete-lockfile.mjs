// Works around npm/cli#4828 on registries that lack other platforms' binary packages: npm then
// leaves those optional dependencies out of package-lock.json, and `npm ci` refuses the lock as
// "out of sync". This adds an entry for every missing platform-specific optional dependency,
// with the os/cpu/libc its name declares, so `npm ci` accepts the lock and skips the package on
// every other platform. Run after `npm install` changes the lock: `node scripts/complete-lockfile.mjs`.
import { readFileSync, writeFileSync } from 'node:fs';

const OS = { android: 'android', darwin: 'darwin', freebsd: 'freebsd', linux: 'linux', openbsd: 'openbsd', openharmony: 'openharmony', win32: 'win32', sunos: 'sunos', aix: 'aix', netbsd: 'netbsd' };
const CPU = new Set(['arm', 'arm64', 'x64', 'ia32', 'loong64', 'ppc64', 's390x', 'riscv64', 'mips64el']);

function platformOf(name) {
  const parts = name.split('/').pop().split('-');
  const i = parts.findIndex((p) => p in OS);
  if (i < 0 || !CPU.has(parts[i + 1])) return undefined;
  const meta = { os: [OS[parts[i]]], cpu: [parts[i + 1]] };
  const rest = parts.slice(i + 2).join('-');
  if (meta.os[0] === 'linux') {
    if (/musl/.test(rest)) meta.libc = ['musl'];
    else if (/gnu/.test(rest)) meta.libc = ['glibc'];
  }
  return meta;
}

const path = new URL('../package-lock.json', import.meta.url);
const lock = JSON.parse(readFileSync(path, 'utf8'));
const pkgs = lock.packages;
let added = 0;
for (const [key, entry] of Object.entries(pkgs)) {
  for (const [dep, version] of Object.entries(entry.optionalDependencies ?? {})) {
    const nested = `${key}/node_modules/${dep}`;
    const top = `node_modules/${dep}`;
    if (pkgs[nested] || pkgs[top]) continue;
    const meta = platformOf(dep);
    if (!meta || !/^\d+\.\d+\.\d+/.test(version)) {
      console.warn(`complete-lockfile: cannot place ${dep}@${version} (needed by ${key || 'root'})`);
      continue;
    }
    pkgs[top] = { version, ...(entry.dev ? { dev: true } : {}), optional: true, ...meta };
    added++;
  }
}
const sorted = Object.fromEntries(Object.entries(pkgs).sort(([a], [b]) => (a === '' ? -1 : b === '' ? 1 : a < b ? -1 : 1)));
lock.packages = sorted;
writeFileSync(path, JSON.stringify(lock, null, 2) + '\n');
console.log(`complete-lockfile: added ${added} missing platform entries`);
