/**
 * The qemu driver: each compute is a stock Postgres inside its own QEMU virtual machine (as in
 * NeonVM), booted from the compute image (vm/qemu-image.ts).
 *
 * - The guest sees the image's root disk (read-only, shared by every VM) and one 9p share: the
 *   compute's own `<dataRoot>/computes/<dataKey>/` (the data directory and its WAL fetched
 *   ahead), at /xenon/data — nothing else of the host.
 * - Network: QEMU user-mode networking with `restrict=on` (the guest reaches nothing) plus a
 *   host-side forward 127.0.0.1:<port> → guest :5432, and a guest-side forward to the
 *   pageserver for `restore_command` (10.0.2.100:80, one host helper process per connection).
 * - The guest agent (vm/guest/agent.sh) talks over a virtio-serial port: it reports the boot,
 *   starts and stops Postgres, says when it accepts connections, onlines hot-plugged CPUs.
 * - Suspend/resume: QMP `stop`/`cont` (memory kept, no CPU). Resize: CPU hot(un)plug and
 *   virtio-mem `requested-size`, on `-M q35`.
 * - A boot that does not report within the boot timeout is killed and tried again.
 * - Accelerator: KVM where /dev/kvm is usable and the CPU has vmx/svm, else TCG.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { constants, existsSync, readFileSync } from 'node:fs';
import { access, lstat, mkdir, mkdtemp, readdir, readFile, rm, rmdir, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { XenonError } from '../lib/errors.ts';
import type { Logger } from '../lib/logger.ts';
import { delay, findFreePort, runCommand, writeManagedHba, type RunAs } from '../lib/postgres.ts';
import type { ComputeAddress, ComputeDriver, ComputeExit, ComputeResources, ComputeSize, ComputeSpec, ComputeStatus, ComputeUsage, StartPlan } from './api.ts';
import { CgroupLimits } from './limits.ts';
import { LocalData, LocalDataDriver, replayAllowanceMs } from './local-data.ts';
import { preferPrefetched, shellArg, type MaterialiseResult } from './materialise.ts';
import { LineChannel, Qmp } from './qmp.ts';
import type { VmImage } from './qemu-image.ts';
import { restoreWal } from './wal-restore.ts';

/** Memory is plugged in blocks of this size (virtio-mem block and Linux memory block on x86). */
export const MEMORY_SLOT_MIB = 128;
/** The guest address whose port 80 the pageserver is forwarded to. */
const GUEST_PAGESERVER = '10.0.2.100';
/** Connections from the host forward come from slirp's gateway address. */
export const VM_PG_HBA =
  '# managed by xenon (qemu driver): the host forward only, SCRAM for every role\n' +
  'host all all 10.0.2.2/32 scram-sha-256\nhost replication all 10.0.2.2/32 scram-sha-256\n';
/** Settings the guest agent owns: the host's values would point at the host. */
const GUEST_OWNED = new Set(['port', 'listen_addresses', 'unix_socket_directories']);
const FORWARD_SCRIPT = fileURLToPath(new URL('./guest-forward.js', import.meta.url));

export type Accel = 'kvm' | 'tcg';

export interface QemuDriverOptions {
  /** The host's Postgres binaries: `initdb` for a new project's data (as the process driver). */
  pgBin: string;
  dataRoot: string;
  /** Guest consoles (the kernel, the agent, Postgres' log): `<logDir>/<computeId>.log`. */
  logDir: string;
  runAs: RunAs | undefined;
  /** Host ports for the forwards to the guests' Postgres. */
  portRange: readonly [number, number];
  image: VmImage;
  settings?: Record<string, string | number>;
  qemuBin?: string;
  accel?: 'auto' | Accel;
  /** Launch → the agent's `booted` (default 60 s under TCG, 20 s under KVM). */
  bootTimeoutMs?: number;
  /** Boots tried before a start fails (default 3). */
  bootAttempts?: number;
  readyTimeoutMs?: number;
  stopTimeoutMs?: number;
  /** Size of a compute whose spec names none (default 1 vCPU, 1 GiB, not resizable). */
  size?: ComputeSize;
  /** The pageserver, forwarded into every guest for `restore_command` (default: a start plan's). */
  pageserverUrl?: string;
  imageCache?: { maxBytes: number } | false;
  /**
   * VMs kept booted without a compute (default 0): a start takes one and starts only Postgres in
   * it. Needs root on the host (the compute's data is bind-mounted into the waiting VM's share).
   */
  warmPool?: number;
  /** Extra QEMU arguments for a boot attempt (1-based): diagnostics, fault injection in tests. */
  extraArgs?: (attempt: number) => string[];
  logger: Logger;
}

interface Vm {
  /** The compute's id (a warm VM's own name until it gets one). */
  computeId: string;
  dataKey: string;
  child: ChildProcess;
  port: number;
  agent: LineChannel;
  qmpChannel: LineChannel;
  qmp: Qmp;
  size: ComputeSize;
  /** vCPUs present (booted + hot-plugged) and their device ids. */
  hotCpus: string[];
  state: 'running' | 'suspended';
  stopping: boolean;
  exited: Promise<void>;
  /** Booted for the warm pool and not yet given a compute. */
  pooled: boolean;
  /** A warm VM's share (`<dataRoot>/vm-slots/<name>`): the compute's data is bind-mounted at `data`. */
  slot: string | undefined;
  /** The QEMU process' cgroup (CPU quota). */
  cgroup: string;
}

interface PoolEntry {
  vm: Vm;
  slot: string;
  booted: boolean;
}

/** KVM where the host can do hardware virtualisation, else TCG (software emulation). */
export function detectAccel(): Accel {
  try {
    const cpuinfo = readFileSync('/proc/cpuinfo', 'utf8');
    if (!/\b(vmx|svm)\b/.test(cpuinfo)) return 'tcg';
    const fd = existsSync('/dev/kvm');
    return fd ? 'kvm' : 'tcg';
  } catch {
    return 'tcg';
  }
}

/**
 * The host writes into a compute's directory before each start (pg_hba.conf, WAL from the
 * safekeepers, the settings file) as root, and a guest can write there too: the directories it
 * goes through must be real ones, not links a guest made to somewhere on the host.
 */
export async function assertNoGuestLinks(keyDir: string): Promise<void> {
  for (const rel of ['pgdata', 'pgdata/pg_wal', 'pgdata/pg_wal/archive_status', 'pgdata/global', 'wal-prefetch']) {
    const st = await lstat(join(keyDir, rel)).catch(() => undefined);
    if (st && !st.isDirectory()) {
      throw new XenonError('CP_COMPUTE_START_FAILED', `${join(keyDir, rel)} is not a directory (a link left by the compute?): refusing to start on it`);
    }
  }
}

const roundSlots = (mib: number): number => Math.max(MEMORY_SLOT_MIB, Math.ceil(mib / MEMORY_SLOT_MIB) * MEMORY_SLOT_MIB);
const vcpus = (cpu: number): number => Math.max(1, Math.ceil(cpu));

export class QemuDriver extends LocalDataDriver implements ComputeDriver {
  readonly kind = 'qemu';
  private readonly vms = new Map<string, Vm>();
  private readonly exitListeners: ((e: ComputeExit) => void)[] = [];
  private seq = 0;
  private readonly pool: PoolEntry[] = [];
  private filling: Promise<void> | undefined;
  private closed = false;

  private constructor(
    private readonly opts: QemuDriverOptions,
    data: LocalData,
    readonly accel: Accel,
    private readonly sockDir: string,
    private readonly limits: CgroupLimits,
  ) {
    super(data);
  }

  static async create(opts: QemuDriverOptions): Promise<QemuDriver> {
    const data = await LocalData.open({ dataRoot: opts.dataRoot, runAs: opts.runAs, pgBin: opts.pgBin, imageCache: opts.imageCache ?? false, logger: opts.logger });
    await mkdir(opts.logDir, { recursive: true });
    await mkdir(join(opts.dataRoot, 'vms'), { recursive: true, mode: 0o700 });
    for (const f of [opts.image.kernel, opts.image.initrd, opts.image.root]) {
      await access(f, constants.R_OK).catch(() => {
        throw new XenonError('CP_COMPUTE_START_FAILED', `compute image file ${f} is missing: run \`xenon vm build-image\``);
      });
    }
    const accel = opts.accel && opts.accel !== 'auto' ? opts.accel : detectAccel();
    await mkdir(join(opts.dataRoot, 'vm-slots'), { recursive: true, mode: 0o700 });
    // Unix socket paths are limited to 107 bytes: keep them short, whatever the data root.
    const sockDir = await mkdtemp(join(tmpdir(), 'xenon-qsock-'));
    opts.logger.info('qemu driver ready', { accel, image: opts.image.dir, dataRoot: opts.dataRoot, imageCache: data.cachesImages, warmPool: opts.warmPool ?? 0 });
    // Fractions of a CPU (0.25 CU) are CPU time of the QEMU process; its memory is sized inside the guest.
    const limits = await CgroupLimits.create(createHash('sha256').update(opts.dataRoot).digest('hex').slice(0, 12), opts.logger, { cpu: true, memory: false });
    const driver = new QemuDriver(opts, data, accel, sockDir, limits);
    await driver.reclaimPool();
    void driver.fillPool();
    return driver;
  }

  private defaultSize(): ComputeSize {
    const one = { cpu: 1, memoryMiB: 1024 };
    return this.opts.size ?? { min: one, max: one, use: one };
  }

  /** Where `plan` wants its WAL from, as the guest reaches it. */
  private pageserverTarget(plan: StartPlan | undefined): URL | undefined {
    const url = this.opts.pageserverUrl ?? (plan?.mode === 'archive' ? plan.restore_url : undefined);
    return url ? new URL(url) : undefined;
  }

  async start(spec: ComputeSpec): Promise<ComputeAddress> {
    if (this.vms.has(spec.computeId)) throw new XenonError('CP_CONFLICT', `compute ${spec.computeId} is already running`);
    const log = this.opts.logger.child({ computeId: spec.computeId, dataKey: spec.dataKey });
    const target = this.pageserverTarget(spec.plan);
    const materialised = await this.data.materialiseFor(spec, log, {
      restoreCommand: (restoreUrl, lsn) => {
        const u = new URL(restoreUrl);
        if (!target || u.host !== target.host) throw new XenonError('CP_COMPUTE_START_FAILED', `the start plan's WAL is at ${u.origin}, but compute VMs reach only ${target?.origin ?? 'no pageserver'}`);
        const guestUrl = `http://${GUEST_PAGESERVER}${u.pathname}${u.search}`;
        return preferPrefetched(`/usr/local/bin/xenon-restore-wal ${shellArg(guestUrl)} %f %p ${shellArg(lsn)}`, '/xenon/data/wal-prefetch');
      },
    });
    const logFile = join(this.opts.logDir, `${spec.computeId}.log`);
    try {
      return await this.boot(spec, log, logFile, materialised, target);
    } catch (err) {
      if (materialised) {
        await this.data.discardMaterialised(spec.dataKey);
        log.warn('compute VM failed to start from materialised data: removed the data directory', { err, logFile });
      }
      if (err instanceof XenonError) throw new XenonError(err.code, `${err.message} (compute log: ${logFile})`, { cause: err, userMessage: err.userMessage, retryable: err.retryable });
      throw new XenonError('CP_COMPUTE_START_FAILED', `compute VM ${spec.computeId} failed to start: ${(err as Error).message} (compute log: ${logFile})`, { cause: err });
    } finally {
      if (materialised && spec.plan?.mode === 'archive') await this.data.dropPrefetch(spec.dataKey);
    }
  }

  private async boot(spec: ComputeSpec, log: Logger, logFile: string, materialised: MaterialiseResult | undefined, target: URL | undefined): Promise<ComputeAddress> {
    const dataDir = this.data.dataDir(spec.dataKey);
    await assertNoGuestLinks(this.data.keyDir(spec.dataKey));
    await writeManagedHba(dataDir, this.opts.runAs, VM_PG_HBA);
    let recovery: Record<string, string> = {};
    if (spec.wal && !(materialised && spec.plan?.mode === 'archive')) {
      const r = await restoreWal(dataDir, spec.wal, this.opts.runAs, this.opts.logger);
      if (r.restored.length) log.warn('WAL restored from the safekeepers before start', { files: r.restored });
      recovery = r.settings;
    }
    const settings: Record<string, string | number> = { password_encryption: 'scram-sha-256', lc_messages: 'C', ...this.opts.settings, ...spec.settings, ...recovery, ...materialised?.settings };
    const lines: string[] = [];
    for (const [k, v] of Object.entries(settings)) {
      if (GUEST_OWNED.has(k)) continue;
      const line = `${k}=${v}`;
      if (/[\n\r\0]/.test(line)) throw new XenonError('CP_BAD_REQUEST', `setting ${k} has a line break in its value`);
      lines.push(line);
    }
    const conf = join(this.data.keyDir(spec.dataKey), 'xenon-start.conf');
    await rm(conf, { force: true }); // never written through a link the guest left
    await writeFile(conf, lines.join('\n') + '\n', { mode: 0o644, flag: 'wx' });

    const size = spec.size ?? this.defaultSize();
    const readyTimeoutMs = spec.readyTimeoutMs ?? (this.opts.readyTimeoutMs ?? (this.accel === 'kvm' ? 30_000 : 120_000)) + (materialised && spec.plan ? replayAllowanceMs(spec.plan.image.lsn, spec.plan.lsn) * (this.accel === 'kvm' ? 1 : 10) : 0);
    const t0 = Date.now();
    const pooled = await this.takePooled(spec, size, log);
    const vm = pooled ?? (await this.bootWithRetries(spec, size, logFile, target, log));
    // Postgres inside: `ready`, or `exited` when it failed to start.
    const startedAt = Date.now();
    const answer = vm.agent.next((l) => (l === 'ready' || l.startsWith('exited') ? l : undefined), readyTimeoutMs, 'Postgres readiness from the guest agent');
    vm.agent.write(pooled ? 'start data' : 'start');
    let reply: string;
    try {
      reply = await answer;
    } catch (err) {
      await this.kill(vm);
      throw err;
    }
    if (reply !== 'ready') {
      await this.kill(vm);
      throw new XenonError('CP_COMPUTE_START_FAILED', `Postgres in compute VM ${spec.computeId} did not start (agent: ${reply})`);
    }
    log.info('compute VM ready', { port: vm.port, warm: Boolean(pooled), startMs: Date.now() - startedAt, totalMs: Date.now() - t0 });
    vm.agent.on('line', (l: string) => {
      if (l.startsWith('exited') && !vm.stopping) {
        log.warn('Postgres exited inside the compute VM: powering it off', { agent: l });
        void this.kill(vm);
      }
    });
    if (pooled && (size.use.cpu !== pooled.size.use.cpu || size.use.memoryMiB !== pooled.size.use.memoryMiB)) {
      await this.resize(spec.computeId, size.use).catch((err: Error) => log.warn('could not resize the warm VM to the compute\'s size', { err: err.message }));
    }
    void this.fillPool();
    return { host: '127.0.0.1', port: vm.port };
  }

  /** A new VM for the compute, booted (agent up); hung boots are killed and tried again. */
  private async bootWithRetries(spec: ComputeSpec, size: ComputeSize, logFile: string, target: URL | undefined, log: Logger): Promise<Vm> {
    const attempts = this.opts.bootAttempts ?? 3;
    let lastErr: unknown;
    for (let attempt = 1; attempt <= attempts; attempt++) {
      const vm = await this.bootOne(spec.computeId, spec.dataKey, this.data.keyDir(spec.dataKey), size, logFile, target, attempt, log).catch((err: unknown) => {
        lastErr = err;
        return undefined;
      });
      if (vm) {
        this.vms.set(spec.computeId, vm);
        return vm;
      }
    }
    throw new XenonError('CP_COMPUTE_START_FAILED', `compute VM ${spec.computeId} did not boot in ${attempts} attempts: ${(lastErr as Error)?.message}`, { retryable: true });
  }

  /** Launches a VM and waits for its agent's boot report (killing it on failure). */
  private async bootOne(name: string, dataKey: string | undefined, share: string, size: ComputeSize, logFile: string, target: URL | undefined, attempt: number, log: Logger): Promise<Vm> {
    const inUse = new Set([...this.vms.values(), ...this.pool.map((p) => p.vm)].map((v) => v.port));
    const port = await findFreePort(this.opts.portRange[0], this.opts.portRange[1], inUse);
    const t0 = Date.now();
    let vm: Vm | undefined;
    try {
      vm = await this.launch(name, dataKey, share, size, port, logFile, target, attempt);
      const booted = await vm.agent.next((l) => (l.startsWith('booted') ? l : undefined), this.bootTimeoutMs, 'boot report from the guest agent');
      log.info('compute VM booted', { vm: name, attempt, ms: Date.now() - t0, accel: this.accel, guest: booted });
      return vm;
    } catch (err) {
      log.warn('compute VM boot failed: killing it', { vm: name, attempt, err: (err as Error).message, ms: Date.now() - t0 });
      if (vm) await this.kill(vm);
      throw err;
    }
  }

  private get bootTimeoutMs(): number {
    return this.opts.bootTimeoutMs ?? (this.accel === 'kvm' ? 20_000 : 60_000);
  }

  /**
   * A booted VM of the warm pool, given the compute's data (a bind mount into the VM's share:
   * QEMU holds the share's directory open, so the mount goes on a directory inside it), or
   * undefined when none is ready or fits.
   */
  private async takePooled(spec: ComputeSpec, size: ComputeSize, log: Logger): Promise<Vm | undefined> {
    const d = this.defaultSize();
    const fits = size.min.cpu === d.min.cpu && size.min.memoryMiB === d.min.memoryMiB && size.max.cpu === d.max.cpu && size.max.memoryMiB === d.max.memoryMiB;
    if (!fits) return undefined;
    const i = this.pool.findIndex((p) => p.booted);
    if (i < 0) return undefined;
    const [p] = this.pool.splice(i, 1);
    const vm = p!.vm;
    try {
      await runCommand('mount', ['--bind', this.data.keyDir(spec.dataKey), join(p!.slot, 'data')], undefined);
    } catch (err) {
      log.warn('could not give a warm VM the compute\'s data: booting a new one', { err: (err as Error).message });
      await this.kill(vm);
      return undefined;
    }
    vm.computeId = spec.computeId;
    vm.dataKey = spec.dataKey;
    vm.pooled = false;
    this.vms.set(spec.computeId, vm);
    await writeFile(this.pidFile(spec.dataKey), `${vm.child.pid}\n`).catch(() => {});
    log.info('compute VM taken from the warm pool', { port: vm.port, waiting: this.pool.length });
    return vm;
  }

  /** Boots VMs until the warm pool has its size (one at a time: booting is CPU-heavy). */
  fillPool(): Promise<void> {
    if (this.filling) return this.filling;
    const want = this.opts.warmPool ?? 0;
    if (!want || this.closed) return Promise.resolve();
    this.filling = (async () => {
      while (!this.closed && this.pool.length < want) {
        const name = `pool-${++this.seq}`;
        const slot = join(this.opts.dataRoot, 'vm-slots', name);
        await mkdir(join(slot, 'data'), { recursive: true, mode: 0o755 });
        const entry: PoolEntry = { slot, booted: false, vm: undefined as unknown as Vm };
        try {
          const vm = await this.bootOne(name, undefined, slot, this.defaultSize(), join(this.opts.logDir, `${name}.log`), this.pageserverTarget(undefined), 1, this.opts.logger);
          vm.pooled = true;
          vm.slot = slot;
          entry.vm = vm;
          entry.booted = true;
          if (this.closed) await this.kill(vm);
          else this.pool.push(entry);
        } catch (err) {
          await rm(slot, { recursive: true, force: true }).catch(() => {});
          this.opts.logger.warn('could not boot a VM for the warm pool', { err: (err as Error).message });
          await delay(5_000);
        }
      }
    })().finally(() => { this.filling = undefined; });
    return this.filling;
  }

  /** Boots the warm pool (`warmPool` VMs) and resolves when it is full. */
  async warmPool(): Promise<void> {
    await this.fillPool();
  }

  /** Warm VMs booted and waiting for a compute. */
  get pooled(): number {
    return this.pool.filter((p) => p.booted).length;
  }

  private async launch(name: string, dataKey: string | undefined, share: string, size: ComputeSize, port: number, logFile: string, target: URL | undefined, attempt: number): Promise<Vm> {
    const n = ++this.seq;
    const agent = await LineChannel.listen(join(this.sockDir, `${n}.agent`));
    const qmpCh = await LineChannel.listen(join(this.sockDir, `${n}.qmp`));
    const cpus = vcpus(size.use.cpu);
    const maxCpus = Math.max(cpus, vcpus(size.max.cpu));
    const baseMiB = roundSlots(size.min.memoryMiB);
    const maxMiB = Math.max(baseMiB, roundSlots(size.max.memoryMiB));
    const useMiB = Math.min(maxMiB, Math.max(baseMiB, roundSlots(size.use.memoryMiB)));
    const append = ['console=ttyS0', ...(process.env.XENON_VM_VERBOSE ? [] : ['quiet']), 'panic=-1', 'memhp_default_state=online_movable'];
    // TCG executes no speculation: the mitigations only cost time there.
    if (this.accel === 'tcg') append.push('mitigations=off');
    let netdev = `user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:${port}-:5432`;
    if (target) {
      const tport = target.port || (target.protocol === 'https:' ? '443' : '80');
      const cmd = `${process.execPath} ${FORWARD_SCRIPT} ${target.hostname} ${tport}`;
      if (/[\s,]/.test(process.execPath + FORWARD_SCRIPT)) this.opts.logger.warn('no pageserver forward into compute VMs: the Node.js or script path has a space or comma', { cmd });
      else netdev += `,guestfwd=tcp:${GUEST_PAGESERVER}:80-cmd:${cmd}`;
    }
    const qboot = '/usr/share/qemu/qboot.rom';
    const args = [
      '-name', `xenon-compute-${name}`,
      '-M', 'q35', '-accel', this.accel, '-cpu', this.accel === 'kvm' ? 'host' : 'max',
      ...(existsSync(qboot) ? ['-bios', qboot] : []),
      '-smp', `${cpus},maxcpus=${maxCpus}`,
      '-m', maxMiB > baseMiB ? `${baseMiB}M,maxmem=${maxMiB}M` : `${baseMiB}M`,
      ...(maxMiB > baseMiB
        ? ['-object', `memory-backend-ram,id=vmem0,size=${maxMiB - baseMiB}M`, '-device', `virtio-mem-pci,id=vmem0dev,memdev=vmem0,block-size=${MEMORY_SLOT_MIB}M,requested-size=${useMiB - baseMiB}M`]
        : []),
      '-nodefaults', '-no-user-config', '-display', 'none', '-no-reboot',
      '-kernel', this.opts.image.kernel, '-initrd', this.opts.image.initrd, '-append', append.join(' '),
      '-chardev', `file,id=con,path=${logFile},append=on`, '-serial', 'chardev:con',
      '-drive', `file=${this.opts.image.root},if=none,id=root,format=raw,readonly=on`, '-device', 'virtio-blk-pci,drive=root',
      '-fsdev', `local,id=data,path=${share},security_model=passthrough`, '-device', 'virtio-9p-pci,fsdev=data,mount_tag=xenon.data',
      '-netdev', netdev, '-device', 'virtio-net-pci,netdev=net0,romfile=',
      '-chardev', `socket,id=agent,path=${agent.path},server=off`, '-device', 'virtio-serial-pci', '-device', 'virtserialport,chardev=agent,name=xenon.agent',
      '-chardev', `socket,id=qmp,path=${qmpCh.path},server=off`, '-mon', 'chardev=qmp,mode=control',
      '-pidfile', dataKey ? this.pidFile(dataKey) : join(this.opts.dataRoot, 'vms', `${name}.pid`),
      ...(this.opts.extraArgs?.(attempt) ?? []),
    ];
    const child = spawn(this.opts.qemuBin ?? 'qemu-system-x86_64', args, { stdio: ['ignore', 'ignore', 'pipe'], detached: true });
    let stderr = '';
    child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr = (stderr + d).slice(-4000)));
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    child.once('error', () => {});
    const qmp = new Qmp(qmpCh);
    const vm: Vm = {
      computeId: name, dataKey: dataKey ?? '', child, port, agent, qmpChannel: qmpCh, qmp, size: { ...size, use: { cpu: cpus, memoryMiB: useMiB } },
      hotCpus: [], state: 'running', stopping: false, exited, pooled: false, slot: undefined, cgroup: `vm-${n}`,
    };
    void exited.then(() => this.onExit(vm, stderr));
    try {
      await Promise.race([
        qmp.handshake(15_000),
        exited.then(() => { throw new Error(`qemu exited at launch: ${stderr.trim() || 'no output'}`); }),
      ]);
    } catch (err) {
      await this.kill(vm);
      throw err;
    }
    await this.applyCpuQuota(vm, size.use.cpu);
    return vm;
  }

  /** A CPU share below the vCPUs (0.25 CU: one vCPU, a quarter of its time) as a cgroup quota. */
  private async applyCpuQuota(vm: Vm, cpu: number): Promise<void> {
    // Under TCG one vCPU's emulation needs a whole host CPU: a quota would only slow it further.
    if (this.accel !== 'kvm' || !this.limits.enabled.cpu || !vm.child.pid) return;
    const problems = await this.limits.set(vm.cgroup, vm.child.pid, { cpu, memoryMiB: 0 }).catch((err: Error) => [err.message]);
    if (problems.length) this.opts.logger.warn('compute VM CPU quota not applied', { vm: vm.computeId, problems });
  }

  private onExit(vm: Vm, stderr: string): void {
    const wasCurrent = this.vms.get(vm.computeId) === vm;
    if (wasCurrent) this.vms.delete(vm.computeId);
    const inPool = this.pool.findIndex((p) => p.vm === vm);
    if (inPool >= 0) {
      this.pool.splice(inPool, 1);
      this.opts.logger.warn('a warm VM exited', { vm: vm.computeId, stderr: stderr.trim().slice(-500) });
      void this.fillPool();
    }
    void vm.agent.close();
    void vm.qmpChannel.close();
    if (vm.slot) void this.releaseSlot(vm.slot);
    void this.limits.release(vm.cgroup);
    if (wasCurrent && !vm.stopping) {
      this.opts.logger.warn('compute VM exited unexpectedly', { computeId: vm.computeId, code: vm.child.exitCode, signal: vm.child.signalCode, stderr: stderr.trim().slice(-500) });
      for (const l of this.exitListeners) l({ computeId: vm.computeId, code: vm.child.exitCode, expected: false });
    }
  }

  /**
   * Unmounts a warm VM's data (its QEMU is gone) and removes its slot — never recursively: were
   * the unmount to fail, the compute's data would still be mounted there.
   */
  private async releaseSlot(slot: string): Promise<void> {
    await runCommand('umount', ['-l', join(slot, 'data')], undefined).catch(() => {});
    try {
      await rmdir(join(slot, 'data'));
      await rmdir(slot);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') this.opts.logger.warn('could not remove a warm VM\'s slot', { slot, err: (err as Error).message });
    }
  }

  /** Powers a VM off at once (no clean shutdown) and waits for QEMU to exit. */
  private async kill(vm: Vm): Promise<void> {
    if (vm.child.exitCode === null && vm.child.signalCode === null) vm.child.kill('SIGKILL');
    await vm.exited;
    await Promise.all([vm.agent.close(), vm.qmpChannel.close()]);
  }

  async stop(computeId: string): Promise<void> {
    const vm = this.vms.get(computeId);
    if (!vm) return;
    vm.stopping = true;
    const log = this.opts.logger.child({ computeId });
    try {
      if (vm.state === 'suspended') await vm.qmp.execute('cont');
      const exited = vm.agent.next((l) => (l.startsWith('exited') ? l : undefined), this.opts.stopTimeoutMs ?? 60_000, 'Postgres shutdown');
      vm.agent.write('stop');
      const reply = await exited;
      log.info('Postgres inside the compute VM shut down', { agent: reply });
      await vm.qmp.execute('quit').catch(() => {});
      await Promise.race([vm.exited, delay(10_000)]);
    } catch (err) {
      log.warn('compute VM did not shut down cleanly: killing it', { err: (err as Error).message });
    }
    await this.kill(vm);
    if (this.vms.get(computeId) === vm) this.vms.delete(computeId);
  }

  async suspend(computeId: string): Promise<void> {
    const vm = this.vms.get(computeId);
    if (!vm) throw new XenonError('CP_CONFLICT', `compute ${computeId} is not running`);
    if (vm.state === 'suspended') return;
    await vm.qmp.execute('stop');
    vm.state = 'suspended';
  }

  async resume(computeId: string): Promise<void> {
    const vm = this.vms.get(computeId);
    if (!vm) throw new XenonError('CP_CONFLICT', `compute ${computeId} is not running`);
    if (vm.state === 'running') return;
    await vm.qmp.execute('cont');
    vm.state = 'running';
  }

  status(computeId: string): ComputeStatus {
    const vm = this.vms.get(computeId);
    if (!vm) return 'stopped';
    return vm.state;
  }

  address(computeId: string): ComputeAddress | undefined {
    const vm = this.vms.get(computeId);
    return vm ? { host: '127.0.0.1', port: vm.port } : undefined;
  }

  async pids(computeId: string): Promise<number[]> {
    const pid = this.vms.get(computeId)?.child.pid;
    return pid ? [pid] : [];
  }

  /** The size a running compute has now. */
  size(computeId: string): ComputeSize | undefined {
    return this.vms.get(computeId)?.size;
  }

  /**
   * CPU hot(un)plug and virtio-mem resize. CPUs: `device_add` of the next free slot, then the
   * agent onlines it; unplug ejects the newest hot-plugged CPU (the guest acknowledges).
   * Memory: virtio-mem's `requested-size`, in {@link MEMORY_SLOT_MIB} blocks; resolves once the
   * device's plugged size reached it.
   */
  async resize(computeId: string, use: ComputeResources): Promise<ComputeResources> {
    const vm = this.vms.get(computeId);
    if (!vm) throw new XenonError('CP_CONFLICT', `compute ${computeId} is not running`);
    if (vm.state === 'suspended') throw new XenonError('CP_CONFLICT', `compute ${computeId} is suspended`);
    const { min, max } = vm.size;
    const wantCpus = Math.min(vcpus(max.cpu), Math.max(vcpus(min.cpu), vcpus(use.cpu)));
    const baseMiB = roundSlots(min.memoryMiB);
    const wantMiB = Math.min(roundSlots(max.memoryMiB), Math.max(baseMiB, roundSlots(use.memoryMiB)));
    const log = this.opts.logger.child({ computeId });

    type HotCpu = { type: string; props: Record<string, number>; 'qom-path'?: string };
    const slots = await vm.qmp.execute<HotCpu[]>('query-hotpluggable-cpus');
    let present = slots.filter((s) => s['qom-path']).length;
    while (present < wantCpus) {
      const free = slots.find((s) => !s['qom-path']);
      if (!free) break;
      const id = `hotcpu${free.props['socket-id'] ?? 0}-${free.props['core-id'] ?? 0}-${free.props['thread-id'] ?? 0}`;
      await vm.qmp.execute('device_add', { driver: free.type, id, ...free.props });
      free['qom-path'] = id;
      vm.hotCpus.push(id);
      present++;
    }
    while (present > wantCpus && vm.hotCpus.length) {
      const id = vm.hotCpus[vm.hotCpus.length - 1]!;
      // The guest offlines the CPU and acknowledges the eject; QEMU then drops it (its
      // DEVICE_DELETED event names only the CPU's lapic in QEMU 7.2: count CPUs instead).
      await vm.qmp.execute('device_del', { id });
      const deadline = Date.now() + 30_000;
      while ((await vm.qmp.execute<unknown[]>('query-cpus-fast')).length >= present) {
        if (Date.now() > deadline) throw new XenonError('CP_CONFLICT', `compute ${computeId}: the guest did not release CPU ${id} in 30 s`);
        await delay(100);
      }
      vm.hotCpus.pop();
      present--;
    }
    // The Debian kernel onlines no hot-plugged CPU by itself (no uevent helper): the agent does.
    const online = Number((await this.agentRequest(computeId, `online ${present}`, 'cpus ', 30_000)).slice(5));
    if (online !== present) log.warn('the guest has another number of CPUs online than are plugged', { online, plugged: present });

    if (roundSlots(max.memoryMiB) > baseMiB) {
      const path = '/machine/peripheral/vmem0dev';
      const want = (wantMiB - baseMiB) * 2 ** 20;
      await vm.qmp.execute('qom-set', { path, property: 'requested-size', value: want });
      const deadline = Date.now() + 60_000;
      for (;;) {
        const plugged = await vm.qmp.execute<number>('qom-get', { path, property: 'size' });
        if (plugged === want) break;
        if (Date.now() > deadline) throw new XenonError('CP_COMPUTE_START_FAILED', `compute ${computeId}: the guest plugged ${plugged / 2 ** 20} MiB of ${want / 2 ** 20} MiB in 60 s`);
        await delay(100);
      }
    }
    const cpu = Math.min(max.cpu, Math.max(min.cpu, use.cpu, 0.01));
    await this.applyCpuQuota(vm, cpu);
    vm.size = { ...vm.size, use: { cpu, memoryMiB: wantMiB } };
    log.info('compute VM resized', { cpu, vcpus: present, memoryMiB: wantMiB });
    return vm.size.use;
  }

  /**
   * Load as the guest sees it (its agent reads /proc/stat and /proc/meminfo): CPU seconds busy on
   * all vCPUs, memory in use. Not QEMU's own CPU time: under TCG an idle guest's emulation alone
   * costs a tenth of a host CPU, which would read as load.
   */
  async usage(computeId: string): Promise<ComputeUsage | undefined> {
    const vm = this.vms.get(computeId);
    if (!vm || vm.state !== 'running') return undefined;
    const reply = await this.agentRequest(computeId, 'stat', 'stat ', 5_000).catch(() => undefined);
    const [busy, , memTotal, memAvailable] = (reply ?? '').slice(5).split(' ').map(Number);
    if (busy === undefined || !Number.isFinite(busy)) return undefined;
    return {
      cpuSeconds: busy / 100, // USER_HZ
      size: vm.size.use,
      ...(memTotal && memAvailable !== undefined && Number.isFinite(memAvailable) ? { memoryUsedMiB: (memTotal - memAvailable) / 1024 } : {}),
    };
  }

  /** Sends a line to a compute's guest agent and returns its first answer line (tests, diagnostics). */
  async agentRequest(computeId: string, line: string, answerPrefix: string, ms = 10_000): Promise<string> {
    const vm = this.vms.get(computeId);
    if (!vm) throw new XenonError('CP_CONFLICT', `compute ${computeId} is not running`);
    const answer = vm.agent.next((l) => (l.startsWith(answerPrefix) ? l : undefined), ms, `${answerPrefix} from the guest agent`);
    vm.agent.write(line);
    return answer;
  }

  onUnexpectedExit(cb: (e: ComputeExit) => void): void {
    this.exitListeners.push(cb);
  }

  /**
   * Stops a VM a crashed predecessor left running on `dataKey`: its pid file names it, and its
   * command line must be a compute VM's for this very data (a reused pid is left alone).
   */
  async reclaim(dataKey: string): Promise<void> {
    if (this.inUse(dataKey)) return;
    const keyDir = this.data.keyDir(dataKey);
    const pid = await this.killLeftover(this.pidFile(dataKey), (cmd) => cmd.includes('xenon-compute-') && (cmd.includes(`path=${keyDir},`) || cmd.includes(join(this.opts.dataRoot, 'vm-slots'))));
    if (pid) this.opts.logger.warn('stopped a compute VM a previous control plane left running', { dataKey, pid });
  }

  /** Warm VMs and slots a crashed predecessor left: their QEMUs stopped, the slots released. */
  async reclaimPool(): Promise<void> {
    const vmsDir = join(this.opts.dataRoot, 'vms');
    for (const f of await readdir(vmsDir).catch(() => [] as string[])) {
      if (/^pool-\d+\.pid$/.test(f)) await this.killLeftover(join(vmsDir, f), (cmd) => cmd.includes('xenon-compute-pool-') && cmd.includes(join(this.opts.dataRoot, 'vm-slots')));
    }
    const slots = join(this.opts.dataRoot, 'vm-slots');
    for (const name of await readdir(slots).catch(() => [] as string[])) await this.releaseSlot(join(slots, name));
  }

  /**
   * Kills the QEMU `pidFile` names when its command line passes `isOurs` (a reused pid is left
   * alone), waits for it to go, and removes the pid file; the pid killed, if any.
   */
  private async killLeftover(pidFile: string, isOurs: (cmdline: string) => boolean): Promise<number | undefined> {
    const pid = Number((await readFile(pidFile, 'utf8').catch(() => '')).trim());
    const cmdline = pid ? await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '') : '';
    let killed: number | undefined;
    if (cmdline && isOurs(cmdline)) {
      try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ }
      for (let i = 0; i < 100 && existsSync(`/proc/${pid}`); i++) await delay(50);
      killed = pid;
    }
    await rm(pidFile, { force: true });
    return killed;
  }

  /** QEMU's pid file: outside the share (the guest must not write what the host acts on). */
  private pidFile(dataKey: string): string {
    this.data.keyDir(dataKey); // validates the key
    return join(this.opts.dataRoot, 'vms', `${dataKey}.pid`);
  }

  protected inUse(dataKey: string): boolean {
    return [...this.vms.values()].some((v) => v.dataKey === dataKey);
  }

  async close(): Promise<void> {
    this.closed = true;
    await this.filling;
    await Promise.all(this.pool.splice(0).map((p) => this.kill(p.vm)));
    await Promise.all([...this.vms.keys()].map((id) => this.stop(id).catch(() => {})));
    await this.data.close();
    await rm(this.sockDir, { recursive: true, force: true });
  }
}
