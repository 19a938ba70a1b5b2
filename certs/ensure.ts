/**
 * The local CA and server certificate on disk: `<stateDir>/certs/{ca.pem, ca-key.pem, server.pem, server-key.pem}`.
 *
 * The CA is created once and then kept forever (clients trust `ca.pem`, see DESIGN §3). The server
 * certificate is reused while it is valid for 30 more days, signed by that CA, matches its key and
 * covers the requested names; otherwise it is regenerated. `server.pem` holds the leaf followed by the
 * CA certificate, so a TLS server presents the whole chain.
 */
import { X509Certificate, createPrivateKey, randomBytes, type KeyObject } from 'node:crypto';
import { chmod, mkdir, open, readFile, rename, rm } from 'node:fs/promises';
import { isIP } from 'node:net';
import { join } from 'node:path';
import { createCa, createServerCert, type AltName, type PemPair } from './generate.ts';

export interface CertPaths {
  dir: string;
  caCert: string;
  caKey: string;
  cert: string;
  key: string;
}

/** <stateDir>/certs/{ca.pem, ca-key.pem, server.pem, server-key.pem} */
export function certPaths(stateDir: string): CertPaths {
  const dir = join(stateDir, 'certs');
  return {
    dir,
    caCert: join(dir, 'ca.pem'),
    caKey: join(dir, 'ca-key.pem'),
    cert: join(dir, 'server.pem'),
    key: join(dir, 'server-key.pem'),
  };
}

export interface EnsureCertsOptions {
  stateDir: string;
  domain: string;
  /** extra SANs */
  extraNames?: string[];
}

/** A server certificate is replaced when it expires within this window. */
const RENEW_BEFORE_MS = 30 * 86_400_000;

/** Concurrent calls for one directory in this process run one after the other. */
const queues = new Map<string, Promise<unknown>>();

/**
 * Creates the CA on first call (kept forever after), and a server certificate for `*.<domain>`, `<domain>`,
 * `api.<domain>`, `localhost`, IP 127.0.0.1 and ::1, signed by the CA. Reuses existing files; regenerates
 * only the server cert (never the CA) when it is missing, unparsable, expires within 30 days, or does not
 * cover the requested domain. Key files mode 0600, dir 0700. Writes atomically (tmp + rename).
 *
 * Throws (never replaces the CA) when only one of `ca.pem`/`ca-key.pem` exists or they are unusable.
 */
export function ensureCerts(opts: EnsureCertsOptions): Promise<CertPaths & { created: { ca: boolean; server: boolean } }> {
  const paths = certPaths(opts.stateDir);
  const run = (queues.get(paths.dir) ?? Promise.resolve()).catch(() => undefined).then(() => ensure(paths, opts));
  queues.set(paths.dir, run);
  void run.finally(() => queues.get(paths.dir) === run && queues.delete(paths.dir)).catch(() => undefined);
  return run;
}

async function ensure(paths: CertPaths, opts: EnsureCertsOptions): Promise<CertPaths & { created: { ca: boolean; server: boolean } }> {
  const names = serverNames(opts.domain, opts.extraNames ?? []);
  await mkdir(paths.dir, { recursive: true, mode: 0o700 });
  await chmod(paths.dir, 0o700);

  let ca = await loadCa(paths);
  const createdCa = ca === null;
  if (ca === null) {
    ca = createCa();
    // Key first: a ca.pem without its key is treated as an error by the next call.
    await writeAtomic([{ file: paths.caKey, data: ca.keyPem, mode: 0o600 }, { file: paths.caCert, data: ca.certPem, mode: 0o644 }]);
  }

  const reuse = !createdCa && (await serverCertUsable(paths, ca, names));
  if (!reuse) {
    const server = createServerCert(ca, `*.${names.domain}`, names.altNames);
    await writeAtomic([
      { file: paths.key, data: server.keyPem, mode: 0o600 },
      { file: paths.cert, data: server.certPem + ca.certPem, mode: 0o644 },
    ]);
  }
  return { ...paths, created: { ca: createdCa, server: !reuse } };
}

/** The SANs of the server certificate, normalised (lower case, no trailing dot), without duplicates. */
function serverNames(rawDomain: string, extra: string[]): { domain: string; altNames: AltName[] } {
  const norm = (n: string): string => n.trim().toLowerCase().replace(/\.$/, '');
  const domain = norm(rawDomain);
  if (!/^[a-z0-9-]+(\.[a-z0-9-]+)*$/.test(domain)) throw new Error(`certs: invalid domain ${JSON.stringify(rawDomain)}`);
  const all = [`*.${domain}`, domain, `api.${domain}`, 'localhost', '127.0.0.1', '::1', ...extra.map(norm)];
  const altNames = [...new Set(all)].filter(Boolean).map((n): AltName => (isIP(n) ? { ip: n } : { dns: n }));
  return { domain, altNames };
}

/** The CA pair, or null when neither file exists. */
async function loadCa(paths: CertPaths): Promise<PemPair | null> {
  const [certPem, keyPem] = await Promise.all([readOptional(paths.caCert), readOptional(paths.caKey)]);
  if (certPem === null && keyPem === null) return null;
  const advice = `restore it, or delete both ${paths.caCert} and ${paths.caKey} to create a new CA (clients must then trust the new ca.pem)`;
  if (certPem === null || keyPem === null) {
    throw new Error(`certs: ${certPem === null ? paths.caCert : paths.caKey} is missing; ${advice}`);
  }
  try {
    if (!new X509Certificate(certPem).checkPrivateKey(createPrivateKey(keyPem))) throw new Error('key does not match');
  } catch (err) {
    throw new Error(`certs: the CA in ${paths.dir} is unusable (${(err as Error).message}); ${advice}`, { cause: err });
  }
  return { certPem, keyPem };
}

async function serverCertUsable(paths: CertPaths, ca: PemPair, names: { altNames: AltName[] }): Promise<boolean> {
  const [certPem, keyPem] = await Promise.all([readOptional(paths.cert), readOptional(paths.key)]);
  if (certPem === null || keyPem === null) return false;
  try {
    const cert = new X509Certificate(certPem);
    const key: KeyObject = createPrivateKey(keyPem);
    if (!cert.checkPrivateKey(key) || !cert.verify(new X509Certificate(ca.certPem).publicKey)) return false;
    if (Date.parse(cert.validTo) - Date.now() < RENEW_BEFORE_MS) return false;
    const dns = new Set(
      (cert.subjectAltName ?? '')
        .split(', ')
        .filter((e) => e.startsWith('DNS:'))
        .map((e) => e.slice(4).toLowerCase()),
    );
    return names.altNames.every((n) => ('dns' in n ? dns.has(n.dns) : cert.checkIP(n.ip) !== undefined));
  } catch {
    return false; // unparsable
  }
}

async function readOptional(file: string): Promise<string | null> {
  try {
    return await readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
}

/**
 * Write each file to a temp file in the same directory and fsync it, then rename them all into place,
 * in order and back to back, so a watcher (CertStore) rarely sees a new key next to an old certificate.
 */
async function writeAtomic(files: Array<{ file: string; data: string; mode: number }>): Promise<void> {
  const tmps: string[] = [];
  try {
    for (const { file, data, mode } of files) {
      const tmp = `${file}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`;
      const fh = await open(tmp, 'wx', mode);
      tmps.push(tmp);
      try {
        await fh.writeFile(data);
        await fh.chmod(mode); // in case the umask removed bits we asked for
        await fh.sync();
      } finally {
        await fh.close();
      }
    }
    for (const [i, { file }] of files.entries()) await rename(tmps[i]!, file);
  } catch (err) {
    await Promise.all(tmps.map((tmp) => rm(tmp, { force: true })));
    throw err;
  }
}
