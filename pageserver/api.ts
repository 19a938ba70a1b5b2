/**
 * The pageserver's `/v1` HTTP contract (DESIGN §4 "Compute start (stateless)", "Branching",
 * "Images and GC"). The pageserver keeps, per timeline (= a control-plane branch), **images**
 * (tarballs of a whole Postgres data directory at a known LSN) and the timeline's **WAL** (16 MiB
 * segment files and `<TLI>.history` files, as the safekeepers hold them), in an object store. A
 * branch is a timeline with an ancestor and an ancestor LSN: metadata only. Any (timeline, LSN)
 * resolves to the newest image at or before it on the ancestor chain plus the WAL after that
 * image's redo point.
 *
 * Ids: tenant = project id, timeline = branch id, both `^[a-z0-9][a-z0-9-]{0,62}$`.
 * LSNs travel as Postgres text (`"0/16B3748"`); inside the services they are `bigint`.
 *
 * Object-store layout (keys, `/`-separated):
 * - `tenants/<t>/timelines/<tl>/index.json`     {@link TimelineIndex}, replaced atomically
 * - `tenants/<t>/timelines/<tl>/images/<id>.tar` an image (uncompressed tar of a data directory)
 * - `tenants/<t>/timelines/<tl>/wal/<file>`      a complete WAL segment or a history file
 *
 * Routes:
 * - `POST   /v1/tenant` {@link CreateTenantRequest} → 201 `{ tenant_id }` (200 when it exists)
 * - `DELETE /v1/tenant/:t` → `{}` (every timeline and object of the tenant)
 * - `GET    /v1/tenant/:t/timeline` → `{ timelines: TimelineStatus[] }`
 * - `POST   /v1/tenant/:t/timeline` {@link CreateTimelineRequest} → 201 {@link TimelineStatus}
 * - `GET    /v1/tenant/:t/timeline/:tl` → {@link TimelineStatus}
 * - `DELETE /v1/tenant/:t/timeline/:tl` → `{}`; 409 `PS_TIMELINE_HAS_CHILDREN` while branches of it exist
 * - `PUT    /v1/tenant/:t/timeline/:tl/image?lsn=&end_lsn=&pg_timeline=&kind=` body: the tar
 *   → 201 {@link ImageInfo} (the control plane uploads the initdb image of a new root timeline)
 * - `POST   /v1/tenant/:t/timeline/:tl/image` → 201 {@link ImageInfo}: make an image now
 *   (`BASE_BACKUP` from the attached compute, or recovery of the last image in a scratch Postgres)
 * - `GET    /v1/tenant/:t/timeline/:tl/image/:id` → the tar (`application/x-tar`)
 * - `PUT    /v1/tenant/:t/timeline/:tl/compute` {@link AttachComputeRequest} → `{}`;
 *   `DELETE …/compute` → `{}` (the running compute, for `BASE_BACKUP` images)
 * - `GET    /v1/tenant/:t/timeline/:tl/start?lsn=X` → {@link StartPlan} (no `lsn`: the tip)
 * - `GET    /v1/tenant/:t/timeline/:tl/wal/:file?upto=X` → the file's bytes as this timeline
 *   sees them at `upto` (the WAL resolver behind `restore_command`, see {@link StartPlan})
 * - `POST   /v1/tenant/:t/timeline/:tl/lease` `{ lsn, ttl_seconds }` → `{ lsn, until }` (GC keeps it)
 * - `POST   /v1/tenant/:t/timeline/:tl/gc` → {@link GcResult}; also run periodically
 * - `GET    /v1/lsn_by_time?tenant=&timeline=&time=` → `{ lsn }` (see {@link CreateTimelineRequest})
 * - `/healthz`, `/metrics`
 *
 * Errors (`{ error: { code, message, retryable } }`): malformed ids/LSNs 400 `CP_BAD_REQUEST`;
 * unknown tenant/timeline 404 `PS_TIMELINE_NOT_FOUND`; unknown ancestor 404
 * `PS_ANCESTOR_NOT_FOUND`; LSN before the ancestor's GC cutoff 409 `PS_LSN_BEFORE_GC_CUTOFF`;
 * past its tip 409 `PS_LSN_PAST_TIP`; a timeline that exists 409 `PS_TIMELINE_EXISTS`; an
 * `index.json` that does not parse or validate 500 `PS_INDEX_CORRUPT` (nothing is deleted or
 * rewritten on that timeline until an operator repairs it); an image or WAL file the plan needs
 * and the store lacks 500 `PS_IMAGE_MISSING` / `PS_WAL_MISSING` (never a substitute).
 */

export interface CreateTenantRequest {
  tenant_id: string;
}

/**
 * A new timeline: a root (no ancestor: it can start only after an image is uploaded) or a branch.
 * A branch starts at `ancestor_start_lsn` — the branch holds exactly the ancestor's WAL records
 * that begin before that LSN — or at `ancestor_start_time` (ISO 8601): the LSN of the first
 * commit record of the ancestor with a commit timestamp after that time (so the branch holds
 * every transaction committed at or before it). Neither: the ancestor's tip. Creation writes
 * metadata only, whatever the database's size, and pins the branch point against the
 * ancestor's GC.
 */
export interface CreateTimelineRequest {
  new_timeline_id: string;
  ancestor_timeline_id?: string;
  ancestor_start_lsn?: string;
  ancestor_start_time?: string;
}

export const IMAGE_KINDS = ['shutdown', 'backup'] as const;
export type ImageKind = (typeof IMAGE_KINDS)[number];

/**
 * An image: a tar of a data directory. `shutdown`: a cleanly shut down cluster (initdb, or a
 * scratch recovery — a standby stopped at a checkpoint of the timeline's WAL, pg_control "shut
 * down in recovery"), whose `pg_wal` holds its checkpoint record; `backup`: a `BASE_BACKUP`
 * (holds `backup_label`, empty `pg_wal`), consistent once WAL up to `end_lsn` is replayed.
 */
export interface ImageInfo {
  id: string;
  /** The redo LSN of the checkpoint recovery starts from: WAL from here on is needed. */
  lsn: string;
  /** Consistent from here: the image serves targets at or after this LSN. */
  end_lsn: string;
  /** The Postgres timeline (TLI) the image's checkpoint is on. */
  pg_timeline: number;
  kind: ImageKind;
  size: number;
  created_at: string;
}

/** A WAL file the pageserver holds for a timeline. */
export interface WalFileInfo {
  name: string;
  kind: 'segment' | 'history';
  pg_timeline: number;
  /** Segments: the LSN range the file covers. */
  start_lsn?: string;
  end_lsn?: string;
  size: number;
}

/** One stretch of a timeline's WAL on one Postgres timeline: from `begin_lsn` (a switch point). */
export interface PgTimelinePiece {
  pg_timeline: number;
  begin_lsn: string;
}

/** What `index.json` holds (version 1). Written to a temporary key and renamed: never torn. */
export interface TimelineIndex {
  version: 1;
  tenant_id: string;
  timeline_id: string;
  created_at: string;
  ancestor: { timeline_id: string; lsn: string } | null;
  /** The Postgres timelines of this timeline's own WAL, oldest first. */
  pg_history: PgTimelinePiece[];
  images: ImageInfo[];
  wal: WalFileInfo[];
  /** The quorum-committed end of WAL last seen (the tip). */
  last_record_lsn: string;
  /** Targets before this LSN can no longer be started or branched from. */
  gc_cutoff_lsn: string;
  /** `[ISO time, LSN]` samples of the tip, for LSN-by-time and the PITR window. */
  lsn_samples: [string, string][];
  leases: { lsn: string; until: string }[];
}

export interface TimelineStatus {
  tenant_id: string;
  timeline_id: string;
  ancestor_timeline_id: string | null;
  ancestor_lsn: string | null;
  last_record_lsn: string;
  gc_cutoff_lsn: string;
  pg_timeline: number | null;
  images: ImageInfo[];
  /** The LSN range of the WAL this timeline holds itself (null when none yet). */
  wal_range: { start_lsn: string; end_lsn: string } | null;
  wal_files: number;
  /** Bytes in the object store (images + WAL) of this timeline alone. */
  size_bytes: number;
  /** LSNs GC must keep serving: child branch points and leases. */
  retained_lsns: string[];
  created_at: string;
  compute_attached: boolean;
}

/** `PUT …/compute`: the running compute of the timeline (a role with REPLICATION). */
export interface AttachComputeRequest {
  host: string;
  port: number;
  user: string;
  password: string;
}

/**
 * How to bring up a compute of (timeline, lsn).
 *
 * `crash` (restart of the timeline at its tip on the same Postgres timeline): extract the image,
 * put every `wal` file into `pg_wal`, mark a `shutdown` image as not cleanly shut down
 * (`pg_control` state → in production) so that Postgres replays all of `pg_wal` in crash
 * recovery; no timeline switch.
 *
 * `archive` (a branch's first start, or a timeline whose WAL is on another Postgres timeline than
 * its newest usable image): extract the image, write `recovery.signal`, `restore_command` that
 * fetches `restore_url + <file> + ?upto=<lsn>`, `recovery_target_timeline=latest` and
 * `synchronous_standby_names=''`; recovery ends where the served WAL ends (the resolver serves
 * nothing at or after `lsn`) and Postgres promotes onto a new timeline.
 *
 * The WAL resolver never serves an ancestor's segment in place of a missing one of the timeline
 * itself: a file the chain needs and nobody has is an error (HTTP 500 `PS_WAL_MISSING`; the
 * restore command then exits so that Postgres aborts recovery instead of ending it early).
 */
/** One WAL file of a {@link StartPlan}. */
export interface StartPlanWal {
  name: string;
  url: string;
  /**
   * The timeline whose stored copy is served, and (segments) the LSN the bytes are valid to
   * (zeros after). The same `(owner, name, valid_to)` always serves the same bytes: a compute
   * host may keep and reuse them.
   */
  owner?: string;
  valid_to?: string;
}

export interface StartPlan {
  tenant_id: string;
  timeline_id: string;
  /** The target: WAL records beginning before it are replayed. */
  lsn: string;
  mode: 'crash' | 'archive';
  image: ImageInfo & { timeline_id: string; url: string };
  /**
   * The WAL the start needs, in order (history files first): `crash` puts them into `pg_wal`;
   * `archive` may fetch them ahead (the same resolver URLs) so that `restore_command` finds
   * them locally instead of one HTTP fetch per call.
   */
  wal: StartPlanWal[];
  /** `archive`: prefix of the resolver URL for `restore_command` (`<restore_url><file>?upto=<lsn>`). */
  restore_url: string;
}

export interface GcResult {
  timeline_id: string;
  gc_cutoff_lsn: string;
  removed_images: string[];
  removed_wal: string[];
  kept_images: string[];
}
