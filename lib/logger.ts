/**
 * Structured JSON logging: one line per record on a writable stream, child loggers carry fields.
 * Loggers are injected, never imported as globals. Never pass secrets in fields.
 */
export const LEVELS = { debug: 10, info: 20, warn: 30, error: 40, silent: 100 } as const;
export type LogLevel = keyof typeof LEVELS;
export type LogFields = Record<string, unknown>;

export interface Logger {
  debug(msg: string, fields?: LogFields): void;
  info(msg: string, fields?: LogFields): void;
  warn(msg: string, fields?: LogFields): void;
  error(msg: string, fields?: LogFields): void;
  child(fields: LogFields): Logger;
}

export interface LoggerOptions {
  level?: LogLevel;
  service?: string;
  stream?: { write(s: string): unknown };
}

function serialiseValue(v: unknown): unknown {
  if (v instanceof Error) {
    const out: Record<string, unknown> = { name: v.name, message: v.message };
    const code = (v as { code?: unknown }).code;
    if (code !== undefined) out.code = code;
    return out;
  }
  if (typeof v === 'bigint') return v.toString();
  return v;
}

export function createLogger(opts: LoggerOptions = {}): Logger {
  const min = LEVELS[opts.level ?? 'info'];
  const stream = opts.stream ?? process.stderr;
  const make = (base: LogFields): Logger => {
    const write = (level: Exclude<LogLevel, 'silent'>, msg: string, fields?: LogFields): void => {
      if (LEVELS[level] < min) return;
      const rec: LogFields = { ts: new Date().toISOString(), level, msg, ...base };
      if (fields) for (const [k, v] of Object.entries(fields)) rec[k] = serialiseValue(v);
      stream.write(JSON.stringify(rec) + '\n');
    };
    return {
      debug: (m, f) => write('debug', m, f),
      info: (m, f) => write('info', m, f),
      warn: (m, f) => write('warn', m, f),
      error: (m, f) => write('error', m, f),
      child: (fields) => make({ ...base, ...fields }),
    };
  };
  return make(opts.service ? { service: opts.service } : {});
}

/** A logger that drops everything (tests that do not care about logs). */
export const silentLogger: Logger = createLogger({ level: 'silent' });
