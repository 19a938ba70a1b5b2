/**
 * Test helpers of the pageserver's ingest / imager / LSN-by-time tests: the real `StoreTimelines`
 * over a `LocalObjectStore` in a temp dir (plus a setup shortcut to create a timeline), and a real
 * PG 15 compute streaming its WAL to three real in-process safekeepers.
 */
import { join } from 'node:path';
import pg from 'pg';
import type { TimelineIndex } from '../../pageserver/api.ts';
import { LocalObjectStore } from '../../pageserver/objectstore.ts';
import { newIndex, StoreTimelines } from '../../pageserver/timelines.ts';
import { SafekeeperClient } from '../../safekeeper/client.ts';
import type { SafekeeperHandle } from '../../safekeeper/index.ts';
import { startTestPostgres, type TestPostgres } from '../helpers/postgres.ts';
import { computeOf, REPL_SETTINGS, startTestSafekeeper, tempDir, waitFor } from '../safekeeper/helpers.ts';

type Teardown = { teardown(fn: () => unknown): void };

/** The real `StoreTimelines` over a `LocalObjectStore` in a temp dir, with a test-setup `create`. */
export class TestTimelines extends StoreTimelines {
  /** Creates the tenant (if new) and a timeline whose index is `newIndex(...)` with `extra` applied. */
  async create(tenantId: string, timelineId: string, extra: Partial<TimelineIndex> = {}): Promise<TimelineIndex> {
    await this.createTenant(tenantId);
    const ix: TimelineIndex = { ...newIndex(tenantId, timelineId, extra.ancestor ?? null), ...extra };
    await this.createTimeline(ix);
    return ix;
  }
}

/** A store + timelines in a temp dir. */
export function testTimelines(t: Teardown): TestTimelines {
  return new TestTimelines(new LocalObjectStore(join(tempDir(t, 'xenon-ps-store-'), 'store')));
}

export interface StreamingCompute {
  pgc: TestPostgres & { dataDir: string; root: string };
  sks: SafekeeperHandle[];
  skDirs: string[];
  /** `{ id, url }` of the three safekeepers, as ingest takes them. */
  members: { id: string; url: string }[];
  sql<T extends pg.QueryResultRow = pg.QueryResultRow>(text: string, params?: unknown[]): Promise<pg.QueryResult<T>>;
}

/**
 * A real PG 15 compute with `synchronous_standby_names = 'ANY 2 (sk1, sk2, sk3)'` streaming to three
 * in-process safekeepers that follow `timelineId` (generation 1). Everything stops at teardown.
 */
export async function streamingCompute(t: Teardown, timelineId: string, settings: Record<string, string | number> = {}): Promise<StreamingCompute> {
  const pgc = await startTestPostgres(t, 'xenon-ps-pg-', {
    ...REPL_SETTINGS, synchronous_commit: 'on', synchronous_standby_names: 'ANY 2 (sk1, sk2, sk3)', ...settings,
  });
  const root = tempDir(t, 'xenon-ps-sk-');
  const skDirs = ['sk1', 'sk2', 'sk3'].map((id) => join(root, id));
  const sks = await Promise.all(['sk1', 'sk2', 'sk3'].map((id, i) => startTestSafekeeper(t, id, skDirs[i]!)));
  for (const sk of sks) await new SafekeeperClient(sk.url).follow(timelineId, { generation: 1, compute: computeOf(pgc) });
  const db = new pg.Client(pgc.admin());
  await db.connect();
  t.teardown(() => db.end().catch(() => {}));
  db.on('error', () => {});
  await waitFor('three quorum standbys', async () => {
    const r = await db.query<{ n: string }>("SELECT count(*) AS n FROM pg_stat_replication WHERE sync_state = 'quorum' AND state = 'streaming'");
    return Number(r.rows[0]!.n) === 3;
  });
  return {
    pgc, sks, skDirs,
    members: sks.map((s, i) => ({ id: `sk${i + 1}`, url: s.url })),
    sql: (text, params) => db.query(text, params),
  };
}

/** The on-disk WAL dir of a safekeeper's timeline. */
export const skWalDir = (skDir: string, timelineId: string): string => join(skDir, 'timelines', timelineId, 'wal');
