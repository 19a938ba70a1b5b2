/**
 * Which endpoint a client wants (DESIGN §4), in order: the first label of the TLS SNI when it is
 * under our domain; `endpoint=<id>` in the startup `options` (also `--endpoint=<id>`); else the
 * "password hack" — the proxy asks for a cleartext password (over TLS only) and the client sends
 * `endpoint=<id>;<password>` or `endpoint=<id>$<password>`. A `-pooler` suffix asks for the
 * transaction pooler.
 */
import { XenonError } from '../../lib/errors.ts';

export interface EndpointRef {
  /** Endpoint id without the `-pooler` suffix. */
  endpoint: string;
  pooled: boolean;
  source: 'sni' | 'options' | 'password';
}

const LABEL = /^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$/;

/** The endpoint label of `sni` when it is `<label>.<domain>`, else undefined. */
export function endpointFromSni(sni: string | undefined | false | null, domain: string): string | undefined {
  if (!sni) return undefined;
  const host = sni.toLowerCase().replace(/\.$/, '');
  const suffix = '.' + domain.toLowerCase();
  if (!host.endsWith(suffix)) return undefined;
  const label = host.slice(0, -suffix.length);
  return LABEL.test(label) ? label : undefined;
}

/** Splits libpq `options` on unescaped ASCII whitespace, with backslash escapes, as the server does (pg_split_opts). */
export function splitOptions(options: string): string[] {
  const out: string[] = [];
  let cur = '';
  let any = false;
  for (let i = 0; i < options.length; i++) {
    const ch = options[i]!;
    if (ch === '\\') { if (i + 1 < options.length) cur += options[++i]; any = true; }
    else if (/[ \t\n\v\f\r]/.test(ch)) { if (any) out.push(cur); cur = ''; any = false; }
    else { cur += ch; any = true; }
  }
  if (any) out.push(cur);
  return out;
}

/** `endpoint=<id>` / `--endpoint=<id>` from options, and the options without it (to forward). */
export function endpointFromOptions(options: string | undefined): { endpoint?: string; rest: string } {
  if (!options) return { rest: '' };
  let endpoint: string | undefined;
  const keep: string[] = [];
  for (const opt of splitOptions(options)) {
    const m = /^(?:--)?endpoint=(.*)$/.exec(opt);
    if (m) endpoint = m[1]!.toLowerCase();
    else keep.push(opt.replace(/([\\ \t\n\v\f\r])/g, '\\$1'));
  }
  return { endpoint, rest: keep.join(' ') };
}

/** An endpoint label as a reference; throws PROXY_ENDPOINT_MISSING naming a malformed one. */
export function endpointRef(raw: string, source: EndpointRef['source']): EndpointRef {
  if (!LABEL.test(raw)) {
    const msg = `invalid endpoint ID ${JSON.stringify(raw.slice(0, 70))}: expected a DNS label such as ep-cool-lake-123456`;
    throw new XenonError('PROXY_ENDPOINT_MISSING', msg, { userMessage: msg });
  }
  const pooled = raw.endsWith('-pooler') && raw.length > '-pooler'.length;
  return { endpoint: pooled ? raw.slice(0, -'-pooler'.length) : raw, pooled, source };
}

/**
 * The endpoint from SNI and options; undefined when neither names one (the caller may then try
 * the password hack). Both present and different is an error that names both.
 */
export function resolveEndpoint(sniLabel: string | undefined, optionsEndpoint: string | undefined): EndpointRef | undefined {
  if (sniLabel && optionsEndpoint && sniLabel !== optionsEndpoint) {
    const msg = `the endpoint in the hostname (${sniLabel}) and in options (${optionsEndpoint.slice(0, 70)}) differ`;
    throw new XenonError('PROXY_ENDPOINT_MISMATCH', msg, { userMessage: msg });
  }
  if (sniLabel) return endpointRef(sniLabel, 'sni');
  if (optionsEndpoint !== undefined) return endpointRef(optionsEndpoint, 'options');
  return undefined;
}

/** `endpoint=<id>;<password>` or `endpoint=<id>$<password>` → its parts; undefined when not in that form. */
export function parsePasswordHack(password: string): { endpoint: string; password: string } | undefined {
  const m = /^endpoint=([^;$]*)[;$]([\s\S]*)$/.exec(password);
  if (!m) return undefined;
  return { endpoint: m[1]!.toLowerCase(), password: m[2]! };
}
