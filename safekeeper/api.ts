/**
 * The safekeeper's `/v1` HTTP contract (DESIGN §4 "WAL and durability"). A safekeeper keeps the
 * WAL of many timelines; for each it follows at most one compute — the one of the newest
 * generation the control plane told it about — over the physical replication protocol.
 *
 * LSNs travel as Postgres text (`"0/16B3748"`); inside the services they are `bigint`.
 * A timeline id is the branch id (`br-…`): `^[a-z0-9][a-z0-9-]{0,62}$`.
 */

/** Where and how to reach the compute to follow. */
export interface ComputeTarget {
  host: string;
  port: number;
  /** A role with REPLICATION (the compute's admin role). */
  user: string;
  password: string;
}

/**
 * One entry of a timeline's generation history (Raft's term history): the compute of
 * `generation` started from the WAL up to `start_lsn` and wrote its own WAL from there.
 * A history is ordered: generations strictly increasing, start LSNs non-decreasing.
 */
export interface GenerationEntry {
  generation: number;
  start_lsn: string;
}

/** The most entries a history may have (older ones are dropped by the control plane). */
export const MAX_GENERATION_HISTORY = 500;

/** `PUT /v1/timeline/:timeline_id/compute`: follow this compute from now on. */
export interface FollowRequest {
  /**
   * Compute generation (the control plane increments it at every compute start of the timeline).
   * Lower than the stored one → 409 `SK_GENERATION_FENCED`; equal → idempotent (address update);
   * higher → persisted first (control file), then WAL past `start_lsn` is truncated, then the
   * safekeeper disconnects from any older compute and connects to this one.
   */
  generation: number;
  compute: ComputeTarget;
  /**
   * Where the new compute's WAL is known to agree with the quorum: WAL this safekeeper holds
   * past it (never acknowledged to a client) is cut off. Omitted: nothing is truncated.
   */
  start_lsn?: string;
  /**
   * Base URLs of the other safekeepers of this timeline. A safekeeper that fell so far behind
   * that the compute no longer has the WAL it needs fetches the gap from a peer of the same
   * generation instead.
   */
  peers?: string[];
  /**
   * The generation history the new compute's WAL follows: the history of the safekeeper whose
   * WAL it was started with (up to that one's flush LSN), plus `{generation, start_lsn}` last.
   * On a generation change the safekeeper keeps its WAL only up to where its own history and this
   * one diverge (for their newest common entry, generation g: up to the start LSN of the entry
   * after g in this history, or of the entry after g in its own, whichever is lower), cuts the
   * rest, and adopts this history. Omitted (older control planes): WAL is cut at `start_lsn` only and the
   * new entry is appended to the safekeeper's own history.
   */
  history?: GenerationEntry[];
}

/** `POST /v1/timeline/:timeline_id/fence`: no compute older than `generation` may be followed. */
export interface FenceRequest {
  /**
   * Lower than the stored generation → 409 `SK_GENERATION_FENCED`; equal → nothing changes;
   * higher → stored (control file) and any older compute's stream is cut (its last batch synced
   * first) before the answer, so the answer's flush LSN is final for the older generations.
   * An unknown timeline is created (holding no WAL) so that the fence holds for it too.
   */
  generation: number;
}

/** `GET /v1/timeline/:timeline_id` (also the answer to PUT/DELETE …/compute). */
export interface TimelineStatus {
  timeline_id: string;
  /** Safekeeper id, e.g. `sk1` (also its replication slot and `application_name`). */
  safekeeper_id: string;
  generation: number;
  /** The generation history of the WAL held here (see {@link GenerationEntry}), oldest first. */
  history: GenerationEntry[];
  /**
   * The generation of the last history entry whose start LSN is at or below `flush_lsn` (0 when
   * none): whose WAL this safekeeper's WAL is. A new compute starts from the safekeeper of a
   * majority with the highest (last_generation, flush_lsn).
   */
  last_generation: number;
  /** Postgres system identifier of the compute's cluster (decimal text), once known. */
  system_id: string | null;
  /** The Postgres timeline (TLI) WAL is currently written on; 0 before the first connection. */
  pg_timeline: number;
  /** Everything below this LSN is fdatasync'ed here. `"0/0"` before any WAL. */
  flush_lsn: string;
  /** First LSN this safekeeper holds (the start of its oldest segment). */
  start_lsn: string;
  /** The compute's WAL end as last reported by it (XLogData / keepalive `walEnd`). */
  compute_lsn: string | null;
  /** compute_lsn − flush_lsn in bytes (0 when unknown). */
  lag_bytes: number;
  /** Whether a replication stream to the compute is up now. */
  streaming: boolean;
  /** The compute followed now (no password), or null. */
  compute: { host: string; port: number; user: string } | null;
  /** Last replication error, if the stream is down. */
  last_error: string | null;
}

/** One WAL segment file or history file, `GET /v1/timeline/:timeline_id/wal`. */
export interface WalFile {
  /** `%08X%08X%08X` (segment), with `.partial` for the one being written, or `<TLI>.history`. */
  name: string;
  kind: 'segment' | 'history';
  /** Segment only: its TLI and LSN range; for the partial one `end_lsn` is the flush LSN. */
  pg_timeline?: number;
  start_lsn?: string;
  end_lsn?: string;
  partial?: boolean;
  size: number;
}

export interface WalListing {
  timeline_id: string;
  flush_lsn: string;
  pg_timeline: number;
  files: WalFile[];
}

/**
 * Routes:
 * - `PUT    /v1/timeline/:timeline_id/compute` {@link FollowRequest} → {@link TimelineStatus}
 * - `DELETE /v1/timeline/:timeline_id/compute?generation=N` stop following (data kept) → status;
 *   a generation lower than the stored one → 409; a higher one is stored (fences older computes)
 * - `POST   /v1/timeline/:timeline_id/fence` {@link FenceRequest} → {@link TimelineStatus}
 * - `GET    /v1/timeline/:timeline_id` → {@link TimelineStatus} (404 when unknown)
 * - `GET    /v1/timelines` → `{ timelines: TimelineStatus[] }`
 * - `GET    /v1/timeline/:timeline_id/wal` → {@link WalListing}
 * - `GET    /v1/timeline/:timeline_id/wal/:file` → the bytes (`application/octet-stream`); HTTP
 *   `Range: bytes=a-b | a- | -n` is honoured (206, `Content-Range`; an end past the file is
 *   clamped); a malformed or multi-range header, or a start past the end → 416
 *   `SK_RANGE_NOT_SATISFIABLE`; a segment may be asked for with or without `.partial`. Of a
 *   partial segment only the durable part is served: bytes past the flush LSN read as zeros.
 *   Unknown or malformed file names → 404 `SK_WAL_NOT_FOUND`. Header `x-wal-file` names the file served.
 * - `DELETE /v1/timeline/:timeline_id` → `{}`; removes the timeline's WAL and control file
 *
 * Malformed timeline ids → 400 `CP_BAD_REQUEST`; a timeline whose control file is corrupted
 * answers status with `last_error` and PUT with 500 `SK_CONTROL_FILE_CORRUPT`.
 * - `/healthz`, `/metrics`
 */
export interface SafekeeperApi {
  follow(timelineId: string, req: FollowRequest): Promise<TimelineStatus>;
  unfollow(timelineId: string, generation: number): Promise<TimelineStatus>;
  fence(timelineId: string, generation: number): Promise<TimelineStatus>;
  status(timelineId: string): Promise<TimelineStatus | null>;
  listWal(timelineId: string): Promise<WalListing>;
  readWal(timelineId: string, file: string, range?: { start: number; end: number }): Promise<Buffer>;
  deleteTimeline(timelineId: string): Promise<void>;
}
