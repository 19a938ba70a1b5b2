/**
 * Typed, validated config helpers. Each service's `config.ts` is the only place that reads
 * `process.env`; it passes env and argv here and freezes the result.
 */
import { homedir } from 'node:os';
import { join, resolve } from 'node:path';
import type { LogLevel } from './logger.ts';
import { LEVELS } from './logger.ts';

export type Env = Readonly<Record<string, string | undefined>>;

export class ConfigError extends Error {
  override name = 'ConfigError';
}

/** Parses `--name value` / `--name=value` / `--flag` into a map (flags win over env). */
export function parseFlags(argv: readonly string[]): Map<string, string> {
  const out = new Map<string, string>();
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (!a.startsWith('--')) continue;
    const eq = a.indexOf('=');
    if (eq > 0) {
      out.set(a.slice(2, eq), a.slice(eq + 1));
    } else {
      const next = argv[i + 1];
      if (next !== undefined && !next.startsWith('--')) {
        out.set(a.slice(2), next);
        i++;
      } else out.set(a.slice(2), 'true');
    }
  }
  return out;
}

export class ConfigSource {
  constructor(
    private readonly env: Env,
    private readonly flags: Map<string, string> = new Map(),
  ) {}

  private raw(flag: string | undefined, envName: string): string | undefined {
    if (flag !== undefined && this.flags.has(flag)) return this.flags.get(flag);
    const v = this.env[envName];
    return v === undefined || v === '' ? undefined : v;
  }

  string(envName: string, def: string, flag?: string): string {
    return this.raw(flag, envName) ?? def;
  }

  optionalString(envName: string, flag?: string): string | undefined {
    return this.raw(flag, envName);
  }

  int(envName: string, def: number, opts: { min?: number; max?: number; flag?: string } = {}): number {
    const v = this.raw(opts.flag, envName);
    if (v === undefined) return def;
    if (!/^-?\d+$/.test(v)) throw new ConfigError(`${envName} must be an integer, got ${JSON.stringify(v)}`);
    const n = Number(v);
    if (opts.min !== undefined && n < opts.min) throw new ConfigError(`${envName} must be >= ${opts.min}, got ${n}`);
    if (opts.max !== undefined && n > opts.max) throw new ConfigError(`${envName} must be <= ${opts.max}, got ${n}`);
    return n;
  }

  number(envName: string, def: number, opts: { min?: number; flag?: string } = {}): number {
    const v = this.raw(opts.flag, envName);
    if (v === undefined) return def;
    const n = Number(v);
    if (v.trim() === '' || !Number.isFinite(n)) throw new ConfigError(`${envName} must be a number, got ${JSON.stringify(v)}`);
    if (opts.min !== undefined && n < opts.min) throw new ConfigError(`${envName} must be >= ${opts.min}, got ${n}`);
    return n;
  }

  bool(envName: string, def: boolean, flag?: string): boolean {
    const v = this.raw(flag, envName);
    if (v === undefined) return def;
    if (/^(1|true|yes|on)$/i.test(v)) return true;
    if (/^(0|false|no|off)$/i.test(v)) return false;
    throw new ConfigError(`${envName} must be a boolean, got ${JSON.stringify(v)}`);
  }

  logLevel(envName = 'XENON_LOG_LEVEL', def: LogLevel = 'info'): LogLevel {
    const v = this.raw('log-level', envName) ?? def;
    if (!Object.hasOwn(LEVELS, v)) throw new ConfigError(`${envName} must be one of ${Object.keys(LEVELS).join(', ')}`);
    return v as LogLevel;
  }
}

/** `$XENON_STATE_DIR`, default `~/.xenon`. */
export function stateDirFrom(env: Env): string {
  return resolve(env.XENON_STATE_DIR || join(homedir(), '.xenon'));
}

/** A safekeeper as the services name it: its id (replication slot, `application_name`) and URL. */
export interface SafekeeperRef {
  id: string;
  url: string;
}

/** `XENON_SAFEKEEPERS`: `sk1=http://127.0.0.1:7676,sk2=…` → refs (ids unique, URLs http(s)). */
export function parseSafekeepers(text: string | undefined): SafekeeperRef[] {
  if (!text) return [];
  const out: SafekeeperRef[] = [];
  for (const part of text.split(',').map((p) => p.trim()).filter(Boolean)) {
    const eq = part.indexOf('=');
    const id = part.slice(0, eq);
    const url = part.slice(eq + 1).replace(/\/+$/, '');
    if (eq <= 0 || !/^[a-z][a-z0-9_]{0,30}$/.test(id) || !/^https?:\/\/[^\s]+$/.test(url)) {
      throw new ConfigError(`bad safekeeper ${JSON.stringify(part)} in XENON_SAFEKEEPERS: use id=http://host:port (id of lower-case letters, digits, _)`);
    }
    if (out.some((r) => r.id === id)) throw new ConfigError(`safekeeper id ${id} appears twice in XENON_SAFEKEEPERS`);
    out.push({ id, url });
  }
  return out;
}
