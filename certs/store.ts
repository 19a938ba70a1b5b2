/**
 * The proxy's current TLS certificate, swapped in place when the files on disk change.
 *
 * Use it as `tls.createServer({ SNICallback: (_name, cb) => cb(null, store.context) })` (or
 * `server.setSecureContext` from `onReload`): new handshakes get the new certificate, open
 * connections keep theirs.
 */
import { X509Certificate, createPrivateKey } from 'node:crypto';
import { unwatchFile, watch, watchFile, type Stats } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { basename, dirname, resolve } from 'node:path';
import { createSecureContext, type SecureContext } from 'node:tls';
import type { CertPaths } from './ensure.ts';

export interface CertStoreOptions {
  /** poll/watch the files and reload on change; default true */
  watch?: boolean;
  onReload?: (ok: boolean, err?: Error) => void;
}

/** Not part of the public surface (`certs/index.ts` does not export it): knobs for tests. */
export interface CertStoreInternalOptions extends CertStoreOptions {
  /** Skip fs.watch and use the fs.watchFile fallback. */
  forcePoll?: boolean;
  /** fs.watchFile interval; default 1000 ms. */
  pollIntervalMs?: number;
  /** Quiet time after the last change before reloading; default 100 ms. */
  debounceMs?: number;
}

type Paths = Pick<CertPaths, 'cert' | 'key'>;

/** Reads and checks the pair; throws on bad PEM or a key that does not match the certificate. */
async function buildContext(paths: Paths): Promise<SecureContext> {
  const [cert, key] = await Promise.all([readFile(paths.cert), readFile(paths.key)]);
  // Check explicitly: OpenSSL may otherwise accept a mismatched pair and fail only at handshake time.
  if (!new X509Certificate(cert).checkPrivateKey(createPrivateKey(key))) {
    throw new Error(`certs: ${paths.key} does not match the certificate in ${paths.cert}`);
  }
  return createSecureContext({ cert, key }); // `cert` may carry the chain after the leaf
}

/**
 * Holds the current tls.SecureContext built from cert+key (+ CA chain appended to the cert). Watches the
 * two files (fs.watch on the directory with a fs.watchFile fallback, debounced ~100 ms) and swaps in a new
 * context when they change; if the new files are invalid (bad PEM, key not matching cert), keeps the old
 * context and reports onReload(false, err).
 */
export class CertStore {
  #context: SecureContext;
  readonly #paths: Paths;
  readonly #opts: CertStoreInternalOptions;
  #closers: Array<() => void> = [];
  #polling = false;
  #closed = false;
  #timer: NodeJS.Timeout | undefined;
  /** Reloads run one at a time, in order. */
  #queue: Promise<unknown> = Promise.resolve();

  private constructor(paths: Paths, context: SecureContext, opts: CertStoreInternalOptions) {
    this.#paths = { cert: resolve(paths.cert), key: resolve(paths.key) };
    this.#context = context;
    this.#opts = opts;
  }

  /** Rejects if the files cannot be loaded now. */
  static async load(paths: Pick<CertPaths, 'cert' | 'key'>, opts: CertStoreOptions = {}): Promise<CertStore> {
    const store = new CertStore(paths, await buildContext(paths), opts);
    if (opts.watch ?? true) store.#watch();
    return store;
  }

  get context(): SecureContext {
    return this.#context;
  }

  /** force a reload now (also used by the watcher) */
  reload(): Promise<boolean> {
    const run = this.#queue.then(async () => {
      let result: [boolean, Error?];
      try {
        this.#context = await buildContext(this.#paths);
        result = [true];
      } catch (err) {
        result = [false, err instanceof Error ? err : new Error(String(err))];
      }
      this.#opts.onReload?.(...result);
      return result[0];
    });
    this.#queue = run.catch(() => undefined); // a throwing onReload must not wedge later reloads
    return run;
  }

  close(): void {
    this.#closed = true;
    clearTimeout(this.#timer);
    this.#stopWatching();
  }

  #schedule(): void {
    if (this.#closed) return;
    clearTimeout(this.#timer);
    this.#timer = setTimeout(() => void this.reload().catch(() => undefined), this.#opts.debounceMs ?? 100);
    this.#timer.unref();
  }

  #stopWatching(): void {
    for (const close of this.#closers.splice(0)) close();
  }

  /** fs.watch on each file's directory (catches rename-into-place), filtered by file name. */
  #watch(): void {
    if (this.#opts.forcePoll) return this.#poll();
    const byDir = new Map<string, Set<string>>();
    for (const file of [this.#paths.cert, this.#paths.key]) {
      const names = byDir.get(dirname(file)) ?? new Set<string>();
      byDir.set(dirname(file), names.add(basename(file)));
    }
    try {
      for (const [dir, names] of byDir) {
        const watcher = watch(dir, { persistent: false }, (_event, name) => {
          if (name === null || names.has(name.toString())) this.#schedule();
        });
        watcher.on('error', () => this.#poll());
        this.#closers.push(() => watcher.close());
      }
    } catch {
      this.#poll(); // e.g. the platform or file system does not support fs.watch
    }
  }

  /** Fallback: stat polling of the two files. */
  #poll(): void {
    if (this.#polling || this.#closed) return;
    this.#polling = true;
    this.#stopWatching();
    const onStat = (cur: Stats, prev: Stats): void => {
      if (cur.mtimeMs !== prev.mtimeMs || cur.ino !== prev.ino || cur.size !== prev.size) this.#schedule();
    };
    for (const file of [this.#paths.cert, this.#paths.key]) {
      watchFile(file, { persistent: false, interval: this.#opts.pollIntervalMs ?? 1000 }, onStat);
      this.#closers.push(() => unwatchFile(file, onStat));
    }
  }
}
