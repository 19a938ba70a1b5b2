/**
 * The control plane's side of the pageserver (DESIGN §4 "Compute start (stateless)",
 * "Branching"): a project is a pageserver tenant, a branch a timeline. A new project's initdb
 * image is uploaded once; every later compute start without a usable local data directory
 * is planned by the pageserver; the running compute is attached so the pageserver can take
 * images from it.
 */
import { XenonError } from '../lib/errors.ts';
import type { Logger } from '../lib/logger.ts';
import { formatLsn } from '../lib/lsn.ts';
import type { ImageInfo, StartPlan, TimelineStatus } from '../pageserver/api.ts';
import { PageserverClient } from '../pageserver/client.ts';
import { checkpointRecordEnd, type ComputeDriver } from '../vm/index.ts';

export class Storage {
  readonly client: PageserverClient;

  constructor(
    readonly url: string,
    private readonly driver: ComputeDriver,
    private readonly logger: Logger,
  ) {
    this.client = new PageserverClient(url);
  }

  /** Maps "cannot reach the pageserver" onto one clear, retryable error. */
  private async call<T>(what: string, fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (err) {
      if (err instanceof XenonError) throw err;
      throw new XenonError('PS_UNAVAILABLE', `pageserver ${this.url}: ${what}: ${(err as Error).message}`, { cause: err });
    }
  }

  /**
   * A new project: its tenant, the root timeline of its first branch, and the branch's freshly
   * initdb'd (cleanly shut down) data directory as the timeline's first image.
   */
  async createRoot(projectId: string, branchId: string): Promise<ImageInfo> {
    await this.call('create tenant', () => this.client.createTenant(projectId));
    await this.call('create timeline', () => this.client.createTimeline(projectId, { new_timeline_id: branchId }));
    const ctl = await this.driver.controlData(branchId);
    if (!ctl || ctl.state !== 'shut down') throw new Error(`the data of ${branchId} is not a cleanly shut down cluster (${ctl?.state ?? 'none'}): cannot make its first image`);
    const tar = await this.driver.exportImage(branchId);
    const t0 = Date.now();
    const image = await this.call('upload the first image', () => this.client.uploadImage(projectId, branchId, tar, {
      lsn: formatLsn(ctl.redo),
      end_lsn: formatLsn(checkpointRecordEnd(ctl.checkpoint)),
      pg_timeline: ctl.timeline,
      kind: 'shutdown',
    }));
    this.logger.info('first image uploaded', { project: projectId, branch: branchId, bytes: image.size, ms: Date.now() - t0 });
    return image;
  }

  /** Whether the pageserver has the branch's timeline (false also when it lacks the tenant). */
  async hasTimeline(projectId: string, branchId: string): Promise<boolean> {
    return (await this.call('read the branch', () => this.client.timeline(projectId, branchId))) !== null;
  }

  branch(projectId: string, req: { id: string; parentId: string; lsn?: string; time?: string }): Promise<TimelineStatus> {
    return this.call('create branch', () => this.client.createTimeline(projectId, {
      new_timeline_id: req.id,
      ancestor_timeline_id: req.parentId,
      ...(req.lsn ? { ancestor_start_lsn: req.lsn } : {}),
      ...(req.time ? { ancestor_start_time: req.time } : {}),
    }));
  }

  startPlan(projectId: string, branchId: string): Promise<StartPlan> {
    return this.call('plan the compute start', () => this.client.startPlan(projectId, branchId));
  }

  /**
   * The plan of a start at the end of the WAL the pageserver holds for the branch (its own, else
   * its branch point): the image a start or a child branch at the tip will use, asked without
   * the safekeepers' newer tip (whose WAL may not be ingested yet). Undefined for a branch with
   * no WAL anywhere yet.
   */
  async storedTipPlan(projectId: string, branchId: string): Promise<StartPlan | undefined> {
    const status = await this.call('read the branch', () => this.client.timeline(projectId, branchId));
    const lsn = status?.wal_range?.end_lsn ?? status?.ancestor_lsn ?? undefined;
    if (!lsn) return undefined;
    return this.call('plan the compute start', () => this.client.startPlan(projectId, branchId, lsn));
  }

  /** Best effort: images are an optimisation of later starts, never a reason to fail this one. */
  async attach(projectId: string, branchId: string, compute: { host: string; port: number; user: string; password: string }): Promise<void> {
    await this.client.attachCompute(projectId, branchId, compute).catch((err: Error) =>
      this.logger.warn('could not attach the compute to the pageserver (no images from it)', { branch: branchId, err: err.message }));
  }

  async detach(projectId: string, branchId: string): Promise<void> {
    await this.client.detachCompute(projectId, branchId).catch((err: Error) =>
      this.logger.warn('could not detach the compute from the pageserver', { branch: branchId, err: err.message }));
  }

  async deleteTimeline(projectId: string, branchId: string): Promise<void> {
    await this.call('delete timeline', () => this.client.deleteTimeline(projectId, branchId));
  }

  async deleteTenant(projectId: string): Promise<void> {
    await this.client.deleteTenant(projectId).catch((err: Error) =>
      this.logger.warn('could not delete the project\'s pageserver data (delete it by hand)', { project: projectId, err: err.message }));
  }
}
