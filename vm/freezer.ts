/**
 * Freezing a compute's processes. Preferred: the cgroup v1 freezer (one cgroup per compute,
 * `FROZEN` stops every task atomically, including ones forked meanwhile). Fallback where the
 * freezer is not writable: SIGSTOP/SIGCONT to each pid (Postgres children sit in their own
 * process groups, so a group signal would not reach them).
 */
import { mkdir, readFile, readdir, rmdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { delay } from '../lib/postgres.ts';

export const FREEZER_ROOT = '/sys/fs/cgroup/freezer';

/** Direct children of `pid`, found through /proc (Postgres forks every backend from the postmaster). */
export async function childPids(pid: number): Promise<number[]> {
  try {
    const text = await readFile(`/proc/${pid}/task/${pid}/children`, 'utf8');
    return text.split(/\s+/).filter(Boolean).map(Number);
  } catch {
    // kernels without CONFIG_PROC_CHILDREN: scan /proc/*/stat
  }
  const out: number[] = [];
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const stat = await readFile(`/proc/${name}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      if (ppid === pid) out.push(Number(name));
    } catch { /* exited meanwhile */ }
  }
  return out;
}

export interface Freezer {
  readonly kind: 'cgroup' | 'signal';
  /** Called right after spawn: puts the postmaster where its future children will be frozen with it. */
  adopt(id: string, pid: number): Promise<void>;
  freeze(id: string, pid: number): Promise<void>;
  thaw(id: string, pid: number): Promise<void>;
  /** After the compute exited. */
  release(id: string): Promise<void>;
}

class CgroupFreezer implements Freezer {
  readonly kind = 'cgroup' as const;
  constructor(private readonly base: string) {}

  private dir(id: string): string {
    return join(this.base, id);
  }

  async adopt(id: string, pid: number): Promise<void> {
    await mkdir(this.dir(id), { recursive: true });
    await writeFile(join(this.dir(id), 'cgroup.procs'), String(pid));
  }

  async freeze(id: string, pid: number): Promise<void> {
    // Children forked before adopt() ran are outside the cgroup: sweep them in first. After this
    // every process is inside, and anything forked later inherits the cgroup.
    for (const c of await childPids(pid)) {
      try { await writeFile(join(this.dir(id), 'cgroup.procs'), String(c)); } catch { /* exited */ }
    }
    await writeFile(join(this.dir(id), 'freezer.state'), 'FROZEN');
    for (let i = 0; i < 1000; i++) {
      const s = (await readFile(join(this.dir(id), 'freezer.state'), 'utf8')).trim();
      if (s === 'FROZEN') return;
      await delay(1);
    }
    // Stuck in FREEZING: leave it running rather than half-frozen while we report "not suspended".
    await writeFile(join(this.dir(id), 'freezer.state'), 'THAWED');
    throw new Error(`cgroup ${id} did not reach FROZEN`);
  }

  async thaw(id: string): Promise<void> {
    await writeFile(join(this.dir(id), 'freezer.state'), 'THAWED');
  }

  async release(id: string): Promise<void> {
    try { await writeFile(join(this.dir(id), 'freezer.state'), 'THAWED'); } catch { /* gone */ }
    for (let i = 0; i < 50; i++) {
      try { await rmdir(this.dir(id)); return; } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
        await delay(20); // tasks still leaving
      }
    }
  }
}

class SignalFreezer implements Freezer {
  readonly kind = 'signal' as const;
  async adopt(): Promise<void> {}
  async freeze(_id: string, pid: number): Promise<void> {
    // The postmaster first, so it forks nothing new while its children are being stopped.
    process.kill(pid, 'SIGSTOP');
    for (const c of await childPids(pid)) {
      try { process.kill(c, 'SIGSTOP'); } catch { /* exited */ }
    }
  }
  async thaw(_id: string, pid: number): Promise<void> {
    for (const c of await childPids(pid)) {
      try { process.kill(c, 'SIGCONT'); } catch { /* exited */ }
    }
    process.kill(pid, 'SIGCONT');
  }
  async release(): Promise<void> {}
}

/**
 * The cgroup freezer when `/sys/fs/cgroup/freezer` lets us create a group, else signals.
 * `scope` keeps concurrent control planes (and test runs) in separate parent groups.
 */
export async function createFreezer(scope: string, prefer: 'auto' | 'cgroup' | 'signal' = 'auto'): Promise<Freezer> {
  if (prefer !== 'signal') {
    const base = join(FREEZER_ROOT, 'xenon', scope);
    try {
      await mkdir(base, { recursive: true });
      await writeFile(join(base, 'freezer.state'), 'THAWED');
      // Thaw and drop groups a crashed predecessor left behind (their processes are stopped later).
      for (const name of await readdir(base, { withFileTypes: true })) {
        if (name.isDirectory()) {
          try { await writeFile(join(base, name.name, 'freezer.state'), 'THAWED'); } catch { /* ignore */ }
        }
      }
      return new CgroupFreezer(base);
    } catch (err) {
      if (prefer === 'cgroup') throw err;
    }
  }
  return new SignalFreezer();
}
