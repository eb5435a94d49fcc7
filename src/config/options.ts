import { readFileSync } from 'node:fs';
import { Command, Option } from 'commander';
import YAML from 'yaml';

/**
 * One table describes every flag of a command. From it come the commander options, the keys
 * accepted in a --config file (kebab-case or snake_case), and the environment variables
 * KVGATE_<FLAG_IN_UPPER_SNAKE>. Precedence: command line > environment > config file > default.
 */
export type OptionKind = 'string' | 'int' | 'number' | 'bool' | 'list' | 'enum';

export interface OptionSpec {
  flag: string; // kebab-case, without dashes
  kind: OptionKind;
  description: string;
  default?: unknown;
  min?: number;
  max?: number;
  /** For 'number': require strictly greater than min. */
  exclusiveMin?: boolean;
  choices?: readonly string[];
  /** Validation beyond the kind (return an error message or undefined). */
  check?: (value: never) => string | undefined;
  /** Only from a config file / programmatic use; no CLI flag. */
  fileOnly?: boolean;
  argName?: string;
}

export class ConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ConfigError';
  }
}

/** Environment variable of a flag: the command's prefix (KVGATE_ for serve) + UPPER_SNAKE flag. */
export function envName(flag: string, prefix = 'KVGATE_'): string {
  return `${prefix}${flag.replace(/-/g, '_').toUpperCase()}`;
}

export function camel(flag: string): string {
  return flag.replace(/-([a-z0-9])/g, (_, c: string) => c.toUpperCase());
}

export function addOptions(cmd: Command, specs: readonly OptionSpec[], envPrefix = 'KVGATE_'): Command {
  for (const s of specs) {
    if (s.fileOnly) continue;
    const arg = s.argName ?? (s.kind === 'list' ? 'values...' : 'value');
    const flags = s.kind === 'bool' ? `--${s.flag}` : `--${s.flag} <${arg}>`;
    const def = s.default === undefined || s.kind === 'bool' ? '' : ` (default: ${JSON.stringify(s.default)})`;
    const env = ` [env ${envName(s.flag, envPrefix)}]`;
    const opt = new Option(flags, `${s.description}${def}${env}`);
    if (s.choices) opt.choices(s.choices as string[]);
    cmd.addOption(opt);
    if (s.kind === 'bool') cmd.addOption(new Option(`--no-${s.flag}`).hideHelp());
  }
  return cmd;
}

function loadConfigFile(path: string): Record<string, unknown> {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (e) {
    throw new ConfigError(`--config: cannot read '${path}': ${(e as Error).message}`);
  }
  let parsed: unknown;
  try {
    parsed = /\.json$/i.test(path) ? JSON.parse(text) : YAML.parse(text);
  } catch (e) {
    throw new ConfigError(`--config: '${path}' is not valid ${/\.json$/i.test(path) ? 'JSON' : 'YAML'}: ${(e as Error).message}`);
  }
  if (parsed === null || parsed === undefined) return {};
  if (typeof parsed !== 'object' || Array.isArray(parsed)) throw new ConfigError(`--config: '${path}' must hold a mapping of option names to values`);
  return parsed as Record<string, unknown>;
}

function coerce(spec: OptionSpec, raw: unknown, source: string): unknown {
  const where = `--${spec.flag}${source === 'cli' ? '' : ` (from ${source})`}`;
  const fail = (why: string): never => {
    throw new ConfigError(`invalid value for ${where}: ${why} (got ${JSON.stringify(raw)})`);
  };
  switch (spec.kind) {
    case 'string': {
      if (typeof raw !== 'string' && typeof raw !== 'number') fail('expected a string');
      return String(raw);
    }
    case 'enum': {
      const v = String(raw);
      if (!spec.choices!.includes(v)) fail(`expected one of ${spec.choices!.join(', ')}`);
      return v;
    }
    case 'bool': {
      if (typeof raw === 'boolean') return raw;
      const v = String(raw).toLowerCase();
      if (['1', 'true', 'yes', 'on'].includes(v)) return true;
      if (['0', 'false', 'no', 'off', ''].includes(v)) return false;
      return fail('expected true or false');
    }
    case 'int':
    case 'number': {
      const n = typeof raw === 'number' ? raw : typeof raw === 'string' && raw.trim() !== '' ? Number(raw) : NaN;
      if (!Number.isFinite(n)) fail('expected a number');
      if (spec.kind === 'int' && !Number.isInteger(n)) fail('expected an integer');
      if (spec.min !== undefined && (spec.exclusiveMin ? n <= spec.min : n < spec.min))
        fail(`must be ${spec.exclusiveMin ? '>' : '>='} ${spec.min}`);
      if (spec.max !== undefined && n > spec.max) fail(`must be <= ${spec.max}`);
      return n;
    }
    case 'list': {
      // Lists may be given as separate words, comma-separated, or both ("a,b c").
      const items = Array.isArray(raw) ? raw : typeof raw === 'string' ? [raw] : fail('expected a list');
      return items.flatMap((x) => {
        if (typeof x !== 'string' && typeof x !== 'number') fail('list items must be strings');
        return String(x)
          .split(/[\s,]+/)
          .filter((y) => y.length > 0);
      });
    }
  }
}

/**
 * Merge command line, environment and --config file into one validated object keyed by
 * camelCase flag names.
 */
export function resolveOptions(
  specs: readonly OptionSpec[],
  cli: Record<string, unknown>,
  env: NodeJS.ProcessEnv = process.env,
  envPrefix = 'KVGATE_',
): Record<string, unknown> {
  const configPath = (cli.config as string | undefined) ?? env[envName('config', envPrefix)];
  const file = configPath ? loadConfigFile(configPath) : {};
  const known = new Map<string, OptionSpec>();
  for (const s of specs) {
    known.set(s.flag, s);
    known.set(s.flag.replace(/-/g, '_'), s);
    known.set(camel(s.flag), s);
  }
  const fromFile = new Map<string, unknown>();
  for (const [k, v] of Object.entries(file)) {
    const spec = known.get(k);
    if (!spec) throw new ConfigError(`--config: unknown option '${k}' in '${configPath}'`);
    fromFile.set(spec.flag, v);
  }
  const out: Record<string, unknown> = {};
  for (const s of specs) {
    const key = camel(s.flag);
    let raw: unknown;
    let source: string;
    if (!s.fileOnly && cli[key] !== undefined) {
      raw = cli[key];
      source = 'cli';
    } else if (env[envName(s.flag, envPrefix)] !== undefined) {
      raw = env[envName(s.flag, envPrefix)];
      source = `env ${envName(s.flag, envPrefix)}`;
    } else if (fromFile.has(s.flag)) {
      raw = fromFile.get(s.flag);
      source = `config file`;
    } else {
      out[key] = s.default;
      continue;
    }
    const value = coerce(s, raw, source);
    if (s.check) {
      const why = s.check(value as never);
      if (why) throw new ConfigError(`invalid value for --${s.flag}: ${why}`);
    }
    out[key] = value;
  }
  return out;
}
