/**
 * IP allowlists (a project's `allowed_ips`): single addresses, ranges `a-b` and CIDR subnets,
 * IPv4 and IPv6, matched with Node's own {@link BlockList}. The control plane validates entries
 * with {@link parseAllowlistEntry} when they are set; the proxy builds a matcher per answer.
 * IPv4-mapped IPv6 peers (`::ffff:10.0.0.1`, as a dual-stack listener reports them) match IPv4 rules.
 */
import { BlockList, isIP } from 'node:net';

export type AllowlistEntry =
  | { kind: 'address'; family: 'ipv4' | 'ipv6'; address: string }
  | { kind: 'range'; family: 'ipv4' | 'ipv6'; start: string; end: string }
  | { kind: 'subnet'; family: 'ipv4' | 'ipv6'; network: string; prefix: number };

const family = (ip: string): 'ipv4' | 'ipv6' | undefined => {
  const v = isIP(ip);
  return v === 4 ? 'ipv4' : v === 6 ? 'ipv6' : undefined;
};

/** One entry, or an Error saying what is wrong with it. */
export function parseAllowlistEntry(raw: string): AllowlistEntry | Error {
  const s = raw.trim();
  if (!s || s.length > 100) return new Error(`invalid IP allowlist entry ${JSON.stringify(raw.slice(0, 100))}`);
  const slash = s.indexOf('/');
  if (slash >= 0) {
    const network = s.slice(0, slash);
    const f = family(network);
    const bits = s.slice(slash + 1);
    const prefix = Number(bits);
    const max = f === 'ipv4' ? 32 : 128;
    if (!f || !/^\d{1,3}$/.test(bits) || prefix > max) return new Error(`invalid CIDR ${JSON.stringify(s)}: expected <address>/<0-${f === 'ipv4' ? 32 : 128}>`);
    return { kind: 'subnet', family: f, network, prefix };
  }
  const dash = s.indexOf('-');
  if (dash >= 0) {
    const start = s.slice(0, dash).trim();
    const end = s.slice(dash + 1).trim();
    const f = family(start);
    if (!f || family(end) !== f) return new Error(`invalid IP range ${JSON.stringify(s)}: expected <first>-<last> of one address family`);
    const probe = new BlockList();
    try {
      probe.addRange(start, end, f);
    } catch {
      return new Error(`invalid IP range ${JSON.stringify(s)}: the first address is after the last`);
    }
    return { kind: 'range', family: f, start, end };
  }
  const f = family(s);
  if (!f) return new Error(`invalid IP address ${JSON.stringify(s)}`);
  return { kind: 'address', family: f, address: s };
}

/** Throws on the first invalid entry; returns the entries trimmed. */
export function validateAllowlist(entries: readonly string[]): string[] {
  return entries.map((e) => {
    const p = parseAllowlistEntry(e);
    if (p instanceof Error) throw p;
    return e.trim();
  });
}

export class IpAllowlist {
  private readonly list = new BlockList();
  /** Entries that did not parse (skipped: they allow nothing). */
  readonly invalid: string[] = [];
  readonly size: number;

  constructor(entries: readonly string[]) {
    let n = 0;
    for (const raw of entries) {
      const e = parseAllowlistEntry(raw);
      if (e instanceof Error) {
        this.invalid.push(raw);
        continue;
      }
      n++;
      if (e.kind === 'address') this.list.addAddress(e.address, e.family);
      else if (e.kind === 'range') this.list.addRange(e.start, e.end, e.family);
      else this.list.addSubnet(e.network, e.prefix, e.family);
    }
    this.size = n;
  }

  /** True when `ip` is allowed. An empty list (no valid entries and no invalid ones) allows everyone. */
  allows(ip: string | undefined): boolean {
    if (this.size === 0 && this.invalid.length === 0) return true;
    if (!ip) return false;
    const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(ip);
    const addr = mapped ? mapped[1]! : ip;
    const f = family(addr);
    return f !== undefined && this.list.check(addr, f);
  }
}
