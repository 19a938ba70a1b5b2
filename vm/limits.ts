/**
 * CPU and memory limits of a compute through cgroup v1 (the hierarchies this host mounts at
 * /sys/fs/cgroup/cpu and /sys/fs/cgroup/memory): `cpu.cfs_quota_us` gives a fraction of CPU time
 * (0.25 CU = a quarter of one CPU), `memory.limit_in_bytes` bounds memory. One group per compute
 * under `xenon/<scope>`. Where the hierarchies are missing or not writable (no root, cgroup v2
 * only) limits are a documented no-op: {@link CgroupLimits.enabled} is false and a warning says so.
 */
import { mkdir, readFile, readdir, rmdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from '../lib/logger.ts';
import { delay } from '../lib/postgres.ts';
import type { ComputeResources } from './api.ts';
import { childPids } from './freezer.ts';

export const CGROUP_ROOT = '/sys/fs/cgroup';
const PERIOD_US = 100_000;

export class CgroupLimits {
  private constructor(
    private readonly cpuBase: string | undefined,
    private readonly memBase: string | undefined,
  ) {}

  /** `controllers`: which limits this driver uses (a VM's memory is sized inside the guest). */
  static async create(scope: string, logger: Logger, controllers: { cpu: boolean; memory: boolean }, root = CGROUP_ROOT): Promise<CgroupLimits> {
    const open = async (ctl: string, probe: string): Promise<string | undefined> => {
      const base = join(root, ctl, 'xenon', scope);
      try {
        await mkdir(base, { recursive: true });
        await readFile(join(base, probe), 'utf8');
        // Groups a crashed predecessor left: empty ones go (their tasks were stopped since).
        for (const d of await readdir(base, { withFileTypes: true })) if (d.isDirectory()) await rmdir(join(base, d.name)).catch(() => {});
        return base;
      } catch (err) {
        logger.warn(`no ${ctl} limits for computes: cgroup v1 ${ctl} controller not writable here (resizing is a no-op)`, { path: base, err: (err as Error).message });
        return undefined;
      }
    };
    return new CgroupLimits(controllers.cpu ? await open('cpu', 'cpu.cfs_quota_us') : undefined, controllers.memory ? await open('memory', 'memory.limit_in_bytes') : undefined);
  }

  get enabled(): { cpu: boolean; memory: boolean } {
    return { cpu: Boolean(this.cpuBase), memory: Boolean(this.memBase) };
  }

  private groups(id: string): string[] {
    return [this.cpuBase, this.memBase].filter((b): b is string => Boolean(b)).map((b) => join(b, id));
  }

  /** Puts `pid` (and its children now: later ones inherit the groups) into the compute's groups. */
  async adopt(id: string, pid: number): Promise<void> {
    for (const g of this.groups(id)) {
      await mkdir(g, { recursive: true });
      for (const p of [pid, ...(await childPids(pid))]) {
        try { await writeFile(join(g, 'cgroup.procs'), String(p)); } catch { /* exited */ }
      }
    }
  }

  /** Applies `r`; what could not be applied is returned as warnings (e.g. memory above the new bound). */
  async set(id: string, pid: number, r: ComputeResources): Promise<string[]> {
    await this.adopt(id, pid); // sweeps in children forked before the first adopt
    const problems: string[] = [];
    if (this.cpuBase) {
      const g = join(this.cpuBase, id);
      await writeFile(join(g, 'cpu.cfs_period_us'), String(PERIOD_US));
      await writeFile(join(g, 'cpu.cfs_quota_us'), String(Math.max(1000, Math.round(r.cpu * PERIOD_US))));
    }
    if (this.memBase) {
      try {
        await writeFile(join(this.memBase, id, 'memory.limit_in_bytes'), String(r.memoryMiB * 2 ** 20));
      } catch (err) {
        problems.push(`memory limit ${r.memoryMiB} MiB: ${(err as Error).message}`);
      }
    }
    return problems;
  }

  /** What the group's limits are now (undefined where that controller is off). */
  async current(id: string): Promise<{ cpu?: number; memoryMiB?: number; memoryUsedMiB?: number }> {
    const out: { cpu?: number; memoryMiB?: number; memoryUsedMiB?: number } = {};
    if (this.cpuBase) {
      const q = Number(await readFile(join(this.cpuBase, id, 'cpu.cfs_quota_us'), 'utf8').catch(() => '-1'));
      const p = Number(await readFile(join(this.cpuBase, id, 'cpu.cfs_period_us'), 'utf8').catch(() => String(PERIOD_US)));
      if (q > 0) out.cpu = q / p;
    }
    if (this.memBase) {
      const l = Number(await readFile(join(this.memBase, id, 'memory.limit_in_bytes'), 'utf8').catch(() => '0'));
      const u = Number(await readFile(join(this.memBase, id, 'memory.usage_in_bytes'), 'utf8').catch(() => '0'));
      if (l > 0 && l < 2 ** 60) out.memoryMiB = l / 2 ** 20;
      if (u > 0) out.memoryUsedMiB = u / 2 ** 20;
    }
    return out;
  }

  /** After the compute exited. */
  async release(id: string): Promise<void> {
    for (const g of this.groups(id)) {
      for (let i = 0; i < 50; i++) {
        try { await rmdir(g); break; } catch (err) {
          if ((err as NodeJS.ErrnoException).code === 'ENOENT') break;
          await delay(20); // tasks still leaving
        }
      }
    }
  }
}

/** CPU time (user + system, seconds) of a process and, for a postmaster, of its children alive and gone. */
export async function cpuSeconds(pid: number, withChildren: boolean): Promise<number> {
  const ticks = async (p: number, reaped: boolean): Promise<number> => {
    try {
      const stat = await readFile(`/proc/${p}/stat`, 'utf8');
      const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      return Number(f[11]) + Number(f[12]) + (reaped ? Number(f[13]) + Number(f[14]) : 0);
    } catch {
      return 0;
    }
  };
  let t = await ticks(pid, withChildren);
  if (withChildren) for (const c of await childPids(pid)) t += await ticks(c, false);
  return t / 100; // USER_HZ
}
