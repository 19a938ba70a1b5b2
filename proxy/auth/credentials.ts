/**
 * Which endpoint a client wants (DESIGN §4): the first label of the TLS SNI when it is under our
 * domain; else `endpoint=<id>` in the startup `options` (also `--endpoint=<id>`).
 */
import { XenonError } from '../../lib/errors.ts';

export interface EndpointRef {
  /** Endpoint id without the `-pooler` suffix. */
  endpoint: string;
  pooled: boolean;
  source: 'sni' | 'options';
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

export function resolveEndpoint(sniLabel: string | undefined, optionsEndpoint: string | undefined): EndpointRef {
  if (sniLabel && optionsEndpoint && sniLabel !== optionsEndpoint) {
    const msg = `endpoint in the hostname (${sniLabel}) and in options (${optionsEndpoint}) differ`;
    throw new XenonError('PROXY_ENDPOINT_MISSING', msg, { userMessage: msg });
  }
  const raw = sniLabel ?? optionsEndpoint;
  if (!raw || !LABEL.test(raw)) throw new XenonError('PROXY_ENDPOINT_MISSING');
  const pooled = raw.endsWith('-pooler');
  return { endpoint: pooled ? raw.slice(0, -'-pooler'.length) : raw, pooled, source: sniLabel ? 'sni' : 'options' };
}
