/**
 * The control plane's `/v1` HTTP contract: routes and the request/response shapes other
 * services (the proxy, the CLI, tests) rely on. Errors are `{ error: { code, message, retryable } }`.
 *
 * Console API (users, CLI):
 *   GET    /v1/projects                                   → { projects: Project[] }
 *   POST   /v1/projects               CreateProjectRequest → CreateProjectResponse
 *   GET    /v1/projects/:project                          → { project: Project }
 *   PATCH  /v1/projects/:project       UpdateProjectRequest → { project: Project }
 *   DELETE /v1/projects/:project                          → { project: Project }
 *   GET    /v1/projects/:project/branches                 → { branches: Branch[] }
 *   GET    /v1/projects/:project/branches/:branch         → { branch: Branch }
 *   POST   /v1/projects/:project/branches CreateBranchRequest → 201 CreateBranchResponse
 *   DELETE /v1/projects/:project/branches/:branch         → { branch: Branch } (409 with children / the default branch)
 *   GET    /v1/projects/:project/endpoints                → { endpoints: Endpoint[] }
 *   POST   /v1/projects/:project/endpoints CreateEndpointRequest → { endpoint: Endpoint }
 *   GET    /v1/endpoints/:endpoint                        → { endpoint: Endpoint }
 *   PATCH  /v1/endpoints/:endpoint     UpdateEndpointRequest → { endpoint: Endpoint }
 *   DELETE /v1/endpoints/:endpoint                        → { endpoint: Endpoint }
 *   POST   /v1/endpoints/:endpoint/(start|suspend|stop)   → { endpoint: Endpoint }
 *   GET    /v1/endpoints/:endpoint/events                 → { events: LifecycleEvent[] }
 *   GET    /v1/endpoints/:endpoint/wal                    → WalStatus (the branch's WAL on the safekeepers)
 *   GET    /v1/projects/:project/branches/:branch/roles   → { roles: Role[] }
 *   POST   /v1/projects/:project/branches/:branch/roles  CreateRoleRequest → { role: Role, password? }
 *   POST   /v1/projects/:project/branches/:branch/roles/:role/reset_password → { role, password }
 *   DELETE /v1/projects/:project/branches/:branch/roles/:role → { role: Role }
 *   GET    /v1/projects/:project/branches/:branch/databases → { databases: Database[] }
 *   POST   /v1/projects/:project/branches/:branch/databases CreateDatabaseRequest → { database }
 *   DELETE /v1/projects/:project/branches/:branch/databases/:database → { database }
 *
 * Proxy API:
 *   GET    /v1/proxy/endpoints/:endpoint/access?role=R    → EndpointAccess   (404 CP_ENDPOINT_NOT_FOUND)
 *   POST   /v1/proxy/endpoints/:endpoint/wake             → ComputeInfo
 *   POST   /v1/proxy/connections       ConnectionReport   → ConnectionReportResponse
 */

export const ENDPOINT_STATES = ['stopped', 'starting', 'active', 'suspended', 'stopping'] as const;
export type EndpointState = (typeof ENDPOINT_STATES)[number];

export interface Project {
  id: string;
  name: string;
  created_at: string;
  default_branch_id: string | null;
  /** IP allowlist for every endpoint of the project; empty = all allowed. */
  allowed_ips: string[];
}

export interface Branch {
  id: string;
  project_id: string;
  name: string;
  parent_id: string | null;
  /** Where in the parent's WAL this branch starts (null for a project's root branch). */
  parent_lsn: string | null;
  /** The point in time the branch was asked for (`parent_timestamp`), if it was made so. */
  parent_time: string | null;
  created_at: string;
}

export interface Endpoint {
  id: string;
  project_id: string;
  branch_id: string;
  /** `<id>.<domain>` */
  host: string;
  state: EndpointState;
  /** Seconds with no connections before the compute is suspended; 0 = never. */
  suspend_timeout_seconds: number;
  /** Seconds suspended before the compute is stopped; 0 = never. */
  stop_timeout_seconds: number;
  disabled: boolean;
  /** Overrides the proxies' default connection-attempt rate limit for this endpoint; null = default. */
  connection_rate_limit: ConnectionRateLimit | null;
  /** Server connections per (database, role) of the transaction pooler (`<id>-pooler`); null = the proxies' default (20). */
  pool_size: number | null;
  /**
   * Autoscaling bounds in compute units (1 CU = 1 vCPU + 4 GiB; fractions of a CPU as CPU time).
   * null: unsized — the driver's default size, no limits, no autoscaling.
   */
  min_cu: number | null;
  max_cu: number | null;
  /** A size pinned by hand (`xenon endpoint set --cu`); null = the autoscaler decides. */
  cu_override: number | null;
  /** The running compute's size now; null when it is not running. */
  cu: number | null;
  /** Live client connections reported by the proxies. */
  connections: number;
  last_active_at: string | null;
  created_at: string;
}

/** Where the WAL of an endpoint's branch stands on each safekeeper. */
export interface WalStatus {
  /** The branch id (the safekeepers' timeline id). */
  timeline_id: string;
  /** The compute generation of the latest start (0: never started with safekeepers). */
  generation: number;
  /** Safekeepers that must flush a commit before it is acknowledged (0: none configured). */
  quorum: number;
  safekeepers: {
    id: string;
    url: string;
    /** false: it did not answer (then only `error` is set). */
    reachable: boolean;
    flush_lsn?: string;
    generation?: number;
    streaming?: boolean;
    lag_bytes?: number;
    last_error?: string | null;
    error?: string;
  }[];
}

export interface Role {
  branch_id: string;
  name: string;
  created_at: string;
}

export interface Database {
  branch_id: string;
  name: string;
  owner_name: string;
  created_at: string;
}

export interface LifecycleEvent {
  id: number;
  endpoint_id: string;
  event: 'start' | 'started' | 'start_failed' | 'spec_failed' | 'suspend' | 'resume' | 'stop' | 'exit' | 'wal_quorum_missing' | 'resized';
  detail: string | null;
  at: string;
}

export interface CreateProjectRequest {
  name?: string;
  /** Role created with the project (default `neondb_owner`). */
  role_name?: string;
  /** Its password; generated when absent (returned once). */
  role_password?: string;
  database_name?: string;
  suspend_timeout_seconds?: number;
  stop_timeout_seconds?: number;
}

export interface CreateProjectResponse {
  project: Project;
  branch: Branch;
  endpoint: Endpoint;
  role: Role;
  database: Database;
  /** Shown once. */
  password: string;
  connection_uri: string;
}

/**
 * A branch of `parent` (id or name; default: the project's default branch) as of `parent_lsn`,
 * or as of `parent_timestamp` (ISO 8601: every transaction committed at or before it), or the
 * parent's latest committed state. Writes metadata only: instant at any database size. Roles,
 * databases and passwords are the parent's. Point-in-time restore = a branch at a timestamp.
 */
export interface CreateBranchRequest {
  name?: string;
  parent?: string;
  parent_lsn?: string;
  parent_timestamp?: string;
  /** Create a read-write endpoint for the branch (default true). */
  endpoint?: boolean;
  suspend_timeout_seconds?: number;
  stop_timeout_seconds?: number;
}

export interface CreateBranchResponse {
  branch: Branch;
  endpoint: Endpoint | null;
  /** Per database of the branch: a connection string without password (the parent's passwords apply). */
  connection_uris: { role: string; database: string; uri: string }[];
}

export interface CreateEndpointRequest {
  branch_id: string;
  suspend_timeout_seconds?: number;
  stop_timeout_seconds?: number;
}

/** A leaky bucket: `burst` attempts at once, refilled at `per_second`. */
export interface ConnectionRateLimit {
  per_second: number;
  burst: number;
}

export interface UpdateEndpointRequest {
  suspend_timeout_seconds?: number;
  stop_timeout_seconds?: number;
  disabled?: boolean;
  /** null resets to the proxies' default. */
  connection_rate_limit?: ConnectionRateLimit | null;
  /** Transaction pooler pool size, 1–10000; null resets to the proxies' default. */
  pool_size?: number | null;
  /** Autoscaling bounds, 0.25–16 CU in steps of 0.25 (set both the first time). */
  min_cu?: number;
  max_cu?: number;
  /** Pins the size (within the bounds; applied live to a running compute); null: autoscaling. */
  cu?: number | null;
}

export interface UpdateProjectRequest {
  name?: string;
  /** Addresses (`203.0.113.7`, `2001:db8::1`), ranges (`10.0.0.1-10.0.0.9`) and CIDR (`10.0.0.0/8`); empty = all allowed. At most 100. */
  allowed_ips?: string[];
}

export interface CreateRoleRequest {
  name: string;
  password?: string;
}

export interface CreateDatabaseRequest {
  name: string;
  owner_name: string;
}

/** What the proxy needs to authenticate a client of `endpoint` as `role`. */
export interface EndpointAccess {
  endpoint_id: string;
  project_id: string;
  branch_id: string;
  /** Postgres SCRAM secret string, or null when the role does not exist. */
  role_secret: string | null;
  /** Empty = every address allowed. */
  allowed_ips: string[];
  /** Per-endpoint override of the proxy's connection-attempt rate limit; null = the proxy's default. */
  connection_rate_limit: ConnectionRateLimit | null;
  /** Server connections per (database, role) of the endpoint's transaction pooler (`-pooler`); null (or absent) = the proxy's default. */
  pool_size?: number | null;
}

export interface ComputeInfo {
  endpoint_id: string;
  host: string;
  port: number;
  /** True when this wake had to start or resume the compute. */
  cold: boolean;
  /** How long the proxy may reuse this answer without asking again. */
  cache_ttl_ms: number;
}

export interface ConnectionReport {
  proxy_id: string;
  /** Live connections per endpoint id (endpoints with 0 may be omitted). */
  counts: Record<string, number>;
  /** How long this report stays valid if no newer one arrives. */
  ttl_seconds: number;
}

export interface ConnectionReportResponse {
  ok: true;
  /** Endpoints suspended, stopped or restarted since this proxy's last report: drop cached wake answers. */
  invalidate: string[];
  /** Endpoints whose roles (secrets) changed since this proxy's last report: drop cached access answers. */
  invalidate_access: string[];
}

/** The control plane as the proxy sees it (DESIGN §5). */
export interface ControlPlaneApi {
  /** null when the endpoint does not exist. */
  getEndpointAccess(endpoint: string, role: string): Promise<EndpointAccess | null>;
  wakeCompute(endpoint: string): Promise<ComputeInfo>;
  reportConnections(report: ConnectionReport): Promise<ConnectionReportResponse>;
}

export const ENDPOINT_ID_RE = /^ep-[a-z0-9]+(?:-[a-z0-9]+)*$/;
export const NAME_RE = /^[A-Za-z_][A-Za-z0-9_$-]{0,62}$/;
