/**
 * Control-plane metadata in Postgres (`pg`): projects, branches, endpoints, roles (SCRAM secrets
 * only), databases and lifecycle events. Migrations run in order at start, under an advisory lock
 * so several control-plane instances can start at once.
 */
import pg from 'pg';
import type { Branch, ConnectionRateLimit, Database, Endpoint, EndpointState, LifecycleEvent, Project, Role } from './api.ts';
import { XenonError } from '../lib/errors.ts';

const MIGRATIONS: readonly string[] = [
  `CREATE TABLE projects (
     id text PRIMARY KEY,
     name text NOT NULL,
     default_branch_id text,
     allowed_ips text[] NOT NULL DEFAULT '{}',
     created_at timestamptz NOT NULL DEFAULT now()
   );
   CREATE TABLE branches (
     id text PRIMARY KEY,
     project_id text NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
     name text NOT NULL,
     parent_id text REFERENCES branches(id),
     admin_password text NOT NULL,
     spec_applied text,
     created_at timestamptz NOT NULL DEFAULT now(),
     UNIQUE (project_id, name)
   );
   CREATE TABLE endpoints (
     id text PRIMARY KEY,
     project_id text NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
     branch_id text NOT NULL REFERENCES branches(id) ON DELETE CASCADE,
     suspend_timeout_seconds integer NOT NULL CHECK (suspend_timeout_seconds >= 0),
     stop_timeout_seconds integer NOT NULL CHECK (stop_timeout_seconds >= 0),
     disabled boolean NOT NULL DEFAULT false,
     state text NOT NULL DEFAULT 'stopped',
     last_active_at timestamptz,
     created_at timestamptz NOT NULL DEFAULT now(),
     UNIQUE (branch_id)
   );
   CREATE TABLE roles (
     branch_id text NOT NULL REFERENCES branches(id) ON DELETE CASCADE,
     name text NOT NULL,
     scram_secret text NOT NULL,
     created_at timestamptz NOT NULL DEFAULT now(),
     PRIMARY KEY (branch_id, name)
   );
   CREATE TABLE databases (
     branch_id text NOT NULL REFERENCES branches(id) ON DELETE CASCADE,
     name text NOT NULL,
     owner_name text NOT NULL,
     created_at timestamptz NOT NULL DEFAULT now(),
     PRIMARY KEY (branch_id, name),
     FOREIGN KEY (branch_id, owner_name) REFERENCES roles(branch_id, name)
   );
   CREATE TABLE lifecycle_events (
     id bigserial PRIMARY KEY,
     endpoint_id text NOT NULL REFERENCES endpoints(id) ON DELETE CASCADE,
     event text NOT NULL,
     detail text,
     at timestamptz NOT NULL DEFAULT now()
   );
   CREATE INDEX lifecycle_events_endpoint ON lifecycle_events (endpoint_id, id);`,
  // 2: per-endpoint override of the proxies' connection-attempt rate limit (NULL = proxy default).
  `ALTER TABLE endpoints
     ADD COLUMN connection_rate_per_second double precision CHECK (connection_rate_per_second > 0),
     ADD COLUMN connection_rate_burst integer CHECK (connection_rate_burst >= 1),
     ADD CONSTRAINT endpoints_connection_rate_both CHECK ((connection_rate_per_second IS NULL) = (connection_rate_burst IS NULL));`,
  // 3: compute generations (safekeeper fencing): incremented at every compute start of a branch.
  `ALTER TABLE branches ADD COLUMN generation bigint NOT NULL DEFAULT 0;`,
  // 4: per-endpoint size of the transaction pooler's pools (`-pooler`; NULL = the proxies' default).
  `ALTER TABLE endpoints ADD COLUMN pool_size integer CHECK (pool_size BETWEEN 1 AND 10000);`,
  // 5: branches made from a point of their parent's history (the pageserver's ancestor LSN, and
  // the time asked for when the branch was made "as of" a timestamp).
  `ALTER TABLE branches ADD COLUMN parent_lsn text, ADD COLUMN parent_time timestamptz;`,
  // 6: compute size in compute units (1 CU = 1 vCPU + 4 GiB): the autoscaler's bounds, and a
  // size pinned by hand (NULL = autoscaling between the bounds). No bounds (NULL): the driver's
  // default size, no limits and no autoscaling.
  `ALTER TABLE endpoints
     ADD COLUMN min_cu double precision CHECK (min_cu >= 0.25),
     ADD COLUMN max_cu double precision CHECK (max_cu <= 16),
     ADD COLUMN cu_override double precision,
     ADD CONSTRAINT endpoints_cu_bounds CHECK ((min_cu IS NULL) = (max_cu IS NULL) AND max_cu >= min_cu),
     ADD CONSTRAINT endpoints_cu_override CHECK (cu_override IS NULL OR (cu_override >= min_cu AND cu_override <= max_cu));`,
];

const iso = (d: Date | null): string | null => (d ? d.toISOString() : null);

export interface EndpointRow {
  id: string;
  project_id: string;
  branch_id: string;
  suspend_timeout_seconds: number;
  stop_timeout_seconds: number;
  disabled: boolean;
  state: EndpointState;
  last_active_at: Date | null;
  connection_rate_per_second: number | null;
  connection_rate_burst: number | null;
  /** Migration 4: null = the proxies' default. */
  pool_size: number | null;
  /** Migration 6: compute units (1 CU = 1 vCPU + 4 GiB); null bounds = unsized; `cu_override` null = autoscaling. */
  min_cu: number | null;
  max_cu: number | null;
  cu_override: number | null;
  created_at: Date;
}

export interface BranchRow {
  id: string;
  project_id: string;
  name: string;
  parent_id: string | null;
  admin_password: string;
  spec_applied: string | null;
  /** bigint: pg returns it as text. */
  generation: string;
  /** Migration 5: where in the parent's WAL the branch starts (null for a root branch). */
  parent_lsn: string | null;
  parent_time: Date | null;
  created_at: Date;
}

export class MetadataStore {
  /** `client`: a store whose queries run inside that client's transaction (see {@link atomically}). */
  constructor(
    readonly pool: pg.Pool,
    private readonly client?: pg.PoolClient,
  ) {}

  static async connect(databaseUrl: string): Promise<MetadataStore> {
    const pool = new pg.Pool({ connectionString: databaseUrl, max: 10, idleTimeoutMillis: 30_000 });
    pool.on('error', () => { /* an idle client died: the pool replaces it */ });
    const store = new MetadataStore(pool);
    await store.migrate();
    return store;
  }

  /**
   * A pooled client for several statements. `pg` emits 'error' on a checked-out client whose
   * server went away; without a listener that would crash the process. A client that failed is
   * released as broken, so the pool discards it.
   */
  private async withClient<T>(fn: (c: pg.PoolClient) => Promise<T>): Promise<T> {
    const c = await this.pool.connect();
    let broken: Error | undefined;
    const onError = (err: Error): void => { broken = err; };
    c.on('error', onError);
    try {
      return await fn(c);
    } finally {
      c.off('error', onError);
      c.release(broken);
    }
  }

  async migrate(): Promise<void> {
    await this.withClient(async (c) => {
    try {
      await c.query('SELECT pg_advisory_lock(7243001)');
      await c.query('CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())');
      const { rows } = await c.query<{ v: number | null }>('SELECT max(version) AS v FROM schema_migrations');
      for (let v = (rows[0]?.v ?? 0) + 1; v <= MIGRATIONS.length; v++) {
        await c.query('BEGIN');
        try {
          await c.query(MIGRATIONS[v - 1]!);
          await c.query('INSERT INTO schema_migrations (version) VALUES ($1)', [v]);
          await c.query('COMMIT');
        } catch (err) {
          await c.query('ROLLBACK');
          throw err;
        }
      }
    } finally {
      await c.query('SELECT pg_advisory_unlock(7243001)').catch(() => {});
    }
    });
  }

  async close(): Promise<void> {
    await this.pool.end();
  }

  /** Runs `fn` in a transaction. */
  async tx<T>(fn: (c: pg.PoolClient) => Promise<T>): Promise<T> {
    return this.withClient(async (c) => {
      try {
        await c.query('BEGIN');
        const out = await fn(c);
        await c.query('COMMIT');
        return out;
      } catch (err) {
        await c.query('ROLLBACK').catch(() => {});
        throw translatePgError(err);
      }
    });
  }

  /**
   * Runs `fn` with a store bound to one transaction: everything it does commits together, or
   * nothing does when it throws.
   */
  atomically<T>(fn: (store: MetadataStore) => Promise<T>): Promise<T> {
    return this.tx((c) => fn(new MetadataStore(this.pool, c)));
  }

  private async q<R extends pg.QueryResultRow>(text: string, values: unknown[] = []): Promise<R[]> {
    try {
      return (await (this.client ?? this.pool).query<R>(text, values)).rows;
    } catch (err) {
      throw translatePgError(err);
    }
  }

  // ---- projects
  async listProjects(): Promise<Project[]> {
    return (await this.q<ProjectRow>('SELECT * FROM projects ORDER BY created_at, id')).map(projectOut);
  }
  async getProject(id: string): Promise<Project> {
    const [row] = await this.q<ProjectRow>('SELECT * FROM projects WHERE id = $1', [id]);
    if (!row) throw new XenonError('CP_NOT_FOUND', `project ${id} not found`, { userMessage: `project ${id} not found` });
    return projectOut(row);
  }
  async updateProject(id: string, patch: { name?: string; allowed_ips?: string[] }): Promise<Project> {
    const [row] = await this.q<ProjectRow>(
      'UPDATE projects SET name = coalesce($2, name), allowed_ips = coalesce($3, allowed_ips) WHERE id = $1 RETURNING *',
      [id, patch.name ?? null, patch.allowed_ips ?? null],
    );
    if (!row) throw new XenonError('CP_NOT_FOUND', `project ${id} not found`, { userMessage: `project ${id} not found` });
    return projectOut(row);
  }
  async deleteProject(id: string): Promise<Project> {
    const [row] = await this.q<ProjectRow>('DELETE FROM projects WHERE id = $1 RETURNING *', [id]);
    if (!row) throw new XenonError('CP_NOT_FOUND', `project ${id} not found`, { userMessage: `project ${id} not found` });
    return projectOut(row);
  }

  // ---- branches
  async listBranches(projectId: string): Promise<Branch[]> {
    await this.getProject(projectId);
    return (await this.q<BranchRow>('SELECT * FROM branches WHERE project_id = $1 ORDER BY created_at, id', [projectId])).map(branchOut);
  }
  async getBranchRow(projectId: string, branchId: string): Promise<BranchRow> {
    const [row] = await this.q<BranchRow>('SELECT * FROM branches WHERE project_id = $1 AND (id = $2 OR name = $2)', [projectId, branchId]);
    if (!row) throw new XenonError('CP_NOT_FOUND', `branch ${branchId} not found`, { userMessage: `branch ${branchId} not found in project ${projectId}` });
    return row;
  }
  async branchById(branchId: string): Promise<BranchRow> {
    const [row] = await this.q<BranchRow>('SELECT * FROM branches WHERE id = $1', [branchId]);
    if (!row) throw new XenonError('CP_NOT_FOUND', `branch ${branchId} not found`, { userMessage: `branch ${branchId} not found` });
    return row;
  }
  /** The next compute generation of a branch (fencing for the safekeepers). */
  async nextGeneration(branchId: string): Promise<number> {
    const [row] = await this.q<{ generation: string }>('UPDATE branches SET generation = generation + 1 WHERE id = $1 RETURNING generation', [branchId]);
    if (!row) throw new XenonError('CP_NOT_FOUND', `branch ${branchId} not found`, { userMessage: `branch ${branchId} not found` });
    return Number(row.generation);
  }
  /**
   * A child of `parent`: same admin password, roles and databases (its data is a copy of the
   * parent's at `parentLsn`, so the compute already has them: the spec hash is copied too).
   */
  async createChildBranch(parent: BranchRow, child: { id: string; name: string; parentLsn: string; parentTime: Date | null }): Promise<BranchRow> {
    const [row] = await this.q<BranchRow>(
      `INSERT INTO branches (id, project_id, name, parent_id, admin_password, spec_applied, parent_lsn, parent_time)
       VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING *`,
      [child.id, parent.project_id, child.name, parent.id, parent.admin_password, parent.spec_applied, child.parentLsn, child.parentTime],
    );
    await this.q('INSERT INTO roles (branch_id, name, scram_secret) SELECT $1, name, scram_secret FROM roles WHERE branch_id = $2', [child.id, parent.id]);
    await this.q('INSERT INTO databases (branch_id, name, owner_name) SELECT $1, name, owner_name FROM databases WHERE branch_id = $2', [child.id, parent.id]);
    return row!;
  }
  async childBranches(branchId: string): Promise<BranchRow[]> {
    return this.q<BranchRow>('SELECT * FROM branches WHERE parent_id = $1 ORDER BY created_at, id', [branchId]);
  }
  async deleteBranch(branchId: string): Promise<void> {
    await this.q('DELETE FROM branches WHERE id = $1', [branchId]);
  }
  async setSpecApplied(branchId: string, hash: string): Promise<void> {
    await this.q('UPDATE branches SET spec_applied = $2 WHERE id = $1', [branchId, hash]);
  }

  // ---- endpoints
  async listEndpoints(projectId?: string): Promise<EndpointRow[]> {
    return projectId === undefined
      ? this.q<EndpointRow>('SELECT * FROM endpoints ORDER BY created_at, id')
      : this.q<EndpointRow>('SELECT * FROM endpoints WHERE project_id = $1 ORDER BY created_at, id', [projectId]);
  }
  async findEndpoint(id: string): Promise<EndpointRow | undefined> {
    const [row] = await this.q<EndpointRow>('SELECT * FROM endpoints WHERE id = $1', [id]);
    return row;
  }
  async getEndpoint(id: string): Promise<EndpointRow> {
    const row = await this.findEndpoint(id);
    if (!row) throw new XenonError('CP_ENDPOINT_NOT_FOUND', `endpoint ${id} not found`, { userMessage: `endpoint ${id} not found` });
    return row;
  }
  /** `connection_rate_limit`: undefined keeps it, null clears it (proxy default). */
  async updateEndpoint(
    id: string,
    patch: { suspend_timeout_seconds?: number; stop_timeout_seconds?: number; disabled?: boolean; connection_rate_limit?: ConnectionRateLimit | null },
  ): Promise<EndpointRow> {
    const rl = patch.connection_rate_limit;
    const [row] = await this.q<EndpointRow>(
      `UPDATE endpoints SET suspend_timeout_seconds = coalesce($2, suspend_timeout_seconds),
         stop_timeout_seconds = coalesce($3, stop_timeout_seconds), disabled = coalesce($4, disabled),
         connection_rate_per_second = CASE WHEN $5 THEN $6 ELSE connection_rate_per_second END,
         connection_rate_burst = CASE WHEN $5 THEN $7 ELSE connection_rate_burst END
       WHERE id = $1 RETURNING *`,
      [id, patch.suspend_timeout_seconds ?? null, patch.stop_timeout_seconds ?? null, patch.disabled ?? null, rl !== undefined, rl?.per_second ?? null, rl?.burst ?? null],
    );
    if (!row) throw new XenonError('CP_ENDPOINT_NOT_FOUND', `endpoint ${id} not found`, { userMessage: `endpoint ${id} not found` });
    return row;
  }
  /**
   * The compute size: bounds, and a pinned size (`cu`: a number pins it, null returns it to
   * autoscaling, undefined keeps it). A pin outside new bounds is refused (400).
   */
  async setEndpointSize(id: string, patch: { min_cu?: number; max_cu?: number; cu?: number | null }): Promise<EndpointRow> {
    const [row] = await this.q<EndpointRow>(
      `UPDATE endpoints SET min_cu = coalesce($2, min_cu), max_cu = coalesce($3, max_cu),
         cu_override = CASE WHEN $4 THEN $5 ELSE cu_override END
       WHERE id = $1 RETURNING *`,
      [id, patch.min_cu ?? null, patch.max_cu ?? null, patch.cu !== undefined, patch.cu ?? null],
    );
    if (!row) throw new XenonError('CP_ENDPOINT_NOT_FOUND', `endpoint ${id} not found`, { userMessage: `endpoint ${id} not found` });
    return row;
  }
  /** The transaction pooler's pool size for the endpoint; null = the proxies' default. */
  async setEndpointPoolSize(id: string, poolSize: number | null): Promise<EndpointRow> {
    const [row] = await this.q<EndpointRow>('UPDATE endpoints SET pool_size = $2 WHERE id = $1 RETURNING *', [id, poolSize]);
    if (!row) throw new XenonError('CP_ENDPOINT_NOT_FOUND', `endpoint ${id} not found`, { userMessage: `endpoint ${id} not found` });
    return row;
  }
  async insertEndpoint(e: { id: string; projectId: string; branchId: string; suspend: number; stop: number }): Promise<void> {
    await this.q(
      'INSERT INTO endpoints (id, project_id, branch_id, suspend_timeout_seconds, stop_timeout_seconds) VALUES ($1, $2, $3, $4, $5)',
      [e.id, e.projectId, e.branchId, e.suspend, e.stop],
    );
  }
  async deleteEndpoint(id: string): Promise<EndpointRow> {
    const [row] = await this.q<EndpointRow>('DELETE FROM endpoints WHERE id = $1 RETURNING *', [id]);
    if (!row) throw new XenonError('CP_ENDPOINT_NOT_FOUND', `endpoint ${id} not found`, { userMessage: `endpoint ${id} not found` });
    return row;
  }
  async setEndpointState(id: string, state: EndpointState, lastActive?: Date): Promise<void> {
    await this.q('UPDATE endpoints SET state = $2, last_active_at = coalesce($3, last_active_at) WHERE id = $1', [id, state, lastActive ?? null]);
  }
  async recordEvent(endpointId: string, event: LifecycleEvent['event'], detail?: string): Promise<void> {
    await this.q('INSERT INTO lifecycle_events (endpoint_id, event, detail) VALUES ($1, $2, $3)', [endpointId, event, detail ?? null]);
  }
  async listEvents(endpointId: string): Promise<LifecycleEvent[]> {
    await this.getEndpoint(endpointId);
    const rows = await this.q<{ id: string; endpoint_id: string; event: LifecycleEvent['event']; detail: string | null; at: Date }>(
      'SELECT * FROM lifecycle_events WHERE endpoint_id = $1 ORDER BY id', [endpointId],
    );
    return rows.map((r) => ({ id: Number(r.id), endpoint_id: r.endpoint_id, event: r.event, detail: r.detail, at: r.at.toISOString() }));
  }

  // ---- roles and databases
  async listRoles(branchId: string): Promise<(Role & { scram_secret: string })[]> {
    const rows = await this.q<{ branch_id: string; name: string; scram_secret: string; created_at: Date }>(
      'SELECT * FROM roles WHERE branch_id = $1 ORDER BY created_at, name', [branchId],
    );
    return rows.map((r) => ({ branch_id: r.branch_id, name: r.name, scram_secret: r.scram_secret, created_at: r.created_at.toISOString() }));
  }
  async roleSecret(branchId: string, name: string): Promise<string | null> {
    const [row] = await this.q<{ scram_secret: string }>('SELECT scram_secret FROM roles WHERE branch_id = $1 AND name = $2', [branchId, name]);
    return row?.scram_secret ?? null;
  }
  async upsertRole(branchId: string, name: string, secret: string, mustBeNew: boolean): Promise<Role> {
    const sql = mustBeNew
      ? 'INSERT INTO roles (branch_id, name, scram_secret) VALUES ($1, $2, $3) RETURNING *'
      : 'UPDATE roles SET scram_secret = $3 WHERE branch_id = $1 AND name = $2 RETURNING *';
    const [row] = await this.q<{ branch_id: string; name: string; created_at: Date }>(sql, [branchId, name, secret]);
    if (!row) throw new XenonError('CP_NOT_FOUND', `role ${name} not found`, { userMessage: `role ${name} not found` });
    return { branch_id: row.branch_id, name: row.name, created_at: row.created_at.toISOString() };
  }
  async deleteRole(branchId: string, name: string): Promise<Role> {
    const [row] = await this.q<{ branch_id: string; name: string; created_at: Date }>('DELETE FROM roles WHERE branch_id = $1 AND name = $2 RETURNING *', [branchId, name]);
    if (!row) throw new XenonError('CP_NOT_FOUND', `role ${name} not found`, { userMessage: `role ${name} not found` });
    return { branch_id: row.branch_id, name: row.name, created_at: row.created_at.toISOString() };
  }
  async listDatabases(branchId: string): Promise<Database[]> {
    const rows = await this.q<{ branch_id: string; name: string; owner_name: string; created_at: Date }>(
      'SELECT * FROM databases WHERE branch_id = $1 ORDER BY created_at, name', [branchId],
    );
    return rows.map((r) => ({ ...r, created_at: r.created_at.toISOString() }));
  }
  async createDatabase(branchId: string, name: string, owner: string): Promise<Database> {
    const [row] = await this.q<{ branch_id: string; name: string; owner_name: string; created_at: Date }>(
      'INSERT INTO databases (branch_id, name, owner_name) VALUES ($1, $2, $3) RETURNING *', [branchId, name, owner],
    );
    return { ...row!, created_at: row!.created_at.toISOString() };
  }
  async deleteDatabase(branchId: string, name: string): Promise<Database> {
    const [row] = await this.q<{ branch_id: string; name: string; owner_name: string; created_at: Date }>(
      'DELETE FROM databases WHERE branch_id = $1 AND name = $2 RETURNING *', [branchId, name],
    );
    if (!row) throw new XenonError('CP_NOT_FOUND', `database ${name} not found`, { userMessage: `database ${name} not found` });
    return { ...row, created_at: row.created_at.toISOString() };
  }
}

interface ProjectRow {
  id: string;
  name: string;
  default_branch_id: string | null;
  allowed_ips: string[];
  created_at: Date;
}

function projectOut(r: ProjectRow): Project {
  return { id: r.id, name: r.name, default_branch_id: r.default_branch_id, allowed_ips: r.allowed_ips, created_at: r.created_at.toISOString() };
}

export function branchOut(r: BranchRow): Branch {
  return {
    id: r.id,
    project_id: r.project_id,
    name: r.name,
    parent_id: r.parent_id,
    parent_lsn: r.parent_lsn,
    parent_time: iso(r.parent_time),
    created_at: r.created_at.toISOString(),
  };
}

export function endpointOut(r: EndpointRow, extra: { host: string; state: EndpointState; connections: number; lastActive: Date | null; cu?: number | null }): Endpoint {
  return {
    id: r.id,
    project_id: r.project_id,
    branch_id: r.branch_id,
    host: extra.host,
    state: extra.state,
    suspend_timeout_seconds: r.suspend_timeout_seconds,
    stop_timeout_seconds: r.stop_timeout_seconds,
    disabled: r.disabled,
    connection_rate_limit: rateLimitOut(r),
    pool_size: r.pool_size ?? null,
    min_cu: r.min_cu,
    max_cu: r.max_cu,
    cu_override: r.cu_override,
    cu: extra.cu ?? null,
    connections: extra.connections,
    last_active_at: iso(extra.lastActive ?? r.last_active_at),
    created_at: r.created_at.toISOString(),
  };
}

export function rateLimitOut(r: EndpointRow): ConnectionRateLimit | null {
  return r.connection_rate_per_second === null || r.connection_rate_burst === null
    ? null
    : { per_second: r.connection_rate_per_second, burst: r.connection_rate_burst };
}

/** Unique violations → 409, FK violations → 400; everything else passes through. */
export function translatePgError(err: unknown): unknown {
  const code = (err as { code?: string }).code;
  const detail = (err as { detail?: string }).detail;
  if (code === '23505') return new XenonError('CP_CONFLICT', detail ?? 'already exists', { userMessage: detail ?? 'already exists', cause: err });
  if (code === '23503') return new XenonError('CP_BAD_REQUEST', detail ?? 'reference not found', { userMessage: detail ?? 'a referenced object does not exist', cause: err });
  return err;
}
