/**
 * The one error base of Xenon. Every error a user or another service can see is a {@link XenonError}
 * with a stable `code` from {@link ERROR_CATALOGUE}; `docs/errors.md` lists the same codes and
 * `test/lib/errors.test.ts` keeps the two in sync.
 *
 * `userMessage` is the only text that may leave the process (Postgres ErrorResponse or HTTP body);
 * `message` is for logs and may carry internal detail.
 */

export type ErrorKind =
  | 'user'
  | 'clientDisconnect'
  | 'rateLimit'
  | 'quota'
  | 'service'
  | 'controlPlane'
  | 'compute';

export interface ErrorDef {
  readonly sqlstate: string;
  readonly httpStatus: number;
  readonly kind: ErrorKind;
  readonly retryable: boolean;
  /** Default user-facing text; a throw site may pass a more specific one. */
  readonly userMessage: string;
}

/** Every error code Xenon emits. Keep `docs/errors.md` in sync (a test checks it). */
export const ERROR_CATALOGUE = {
  // ---- proxy: protocol and handshake
  PROXY_PROTOCOL_VIOLATION: { sqlstate: '08P01', httpStatus: 400, kind: 'user', retryable: false, userMessage: 'protocol violation' },
  PROXY_STARTUP_TOO_LARGE: { sqlstate: '08P01', httpStatus: 400, kind: 'user', retryable: false, userMessage: 'startup packet too large' },
  PROXY_MESSAGE_TOO_LARGE: { sqlstate: '08P01', httpStatus: 400, kind: 'user', retryable: false, userMessage: 'message too large' },
  PROXY_UNSUPPORTED_PROTOCOL: { sqlstate: '0A000', httpStatus: 400, kind: 'user', retryable: false, userMessage: 'unsupported frontend protocol' },
  PROXY_TLS_REQUIRED: { sqlstate: '28000', httpStatus: 400, kind: 'user', retryable: false, userMessage: 'connection is insecure (try using sslmode=require)' },
  PROXY_STARTUP_TIMEOUT: { sqlstate: '08006', httpStatus: 408, kind: 'clientDisconnect', retryable: false, userMessage: 'timed out waiting for the startup packet' },
  PROXY_AUTH_TIMEOUT: { sqlstate: '08006', httpStatus: 408, kind: 'clientDisconnect', retryable: false, userMessage: 'timed out during authentication' },
  PROXY_ENDPOINT_MISSING: { sqlstate: '08004', httpStatus: 400, kind: 'user', retryable: false, userMessage: 'endpoint ID is not specified: connect to <endpoint>.<domain> over TLS (libpq 14 or later sends the hostname as SNI; upgrade older clients), or add options=endpoint%3D<endpoint> to the connection string, or prefix the password: endpoint=<endpoint>;<password>' },
  PROXY_REPLICATION_REJECTED: { sqlstate: '0A000', httpStatus: 400, kind: 'user', retryable: false, userMessage: 'replication connections are not supported through the proxy' },
  PROXY_ENDPOINT_MISMATCH: { sqlstate: '08004', httpStatus: 400, kind: 'user', retryable: false, userMessage: 'the endpoint in the hostname and in the options differ' },
  PROXY_ALPN_REQUIRED: { sqlstate: '08P01', httpStatus: 400, kind: 'user', retryable: false, userMessage: 'direct TLS connections must negotiate the ALPN protocol "postgresql"' },
  PROXY_IP_NOT_ALLOWED: { sqlstate: '28000', httpStatus: 403, kind: 'user', retryable: false, userMessage: 'connections from this IP address are not allowed to this endpoint' },
  PROXY_RATE_LIMITED: { sqlstate: '53300', httpStatus: 429, kind: 'rateLimit', retryable: true, userMessage: 'too many connection attempts to this endpoint; slow down and retry' },
  PROXY_AUTH_RATE_LIMITED: { sqlstate: '53300', httpStatus: 429, kind: 'rateLimit', retryable: true, userMessage: 'too many failed authentication attempts from this address; try again later' },
  PROXY_TOO_MANY_CONNECTIONS: { sqlstate: '53300', httpStatus: 429, kind: 'rateLimit', retryable: true, userMessage: 'too many connections to the proxy' },
  // ---- proxy: transaction pooler (-pooler endpoints)
  PROXY_POOL_TIMEOUT: { sqlstate: '53300', httpStatus: 429, kind: 'rateLimit', retryable: true, userMessage: 'no server connection of the pool became free in time; try again' },
  PROXY_POOL_SERVER_LOST: { sqlstate: '08006', httpStatus: 502, kind: 'compute', retryable: true, userMessage: 'the connection to the compute was lost; the transaction was rolled back' },
  // ---- proxy: authentication
  AUTH_FAILED: { sqlstate: '28P01', httpStatus: 401, kind: 'user', retryable: false, userMessage: 'password authentication failed' },
  AUTH_METHOD_UNSUPPORTED: { sqlstate: '28000', httpStatus: 400, kind: 'user', retryable: false, userMessage: 'unsupported authentication method: SCRAM-SHA-256 is required' },
  // ---- proxy: compute connection
  PROXY_COMPUTE_UNAVAILABLE: { sqlstate: '57P03', httpStatus: 503, kind: 'compute', retryable: true, userMessage: 'could not connect to the compute node; please try again' },
  PROXY_QUERY_TIMEOUT: { sqlstate: '57014', httpStatus: 400, kind: 'user', retryable: false, userMessage: 'the request took too long and was cancelled' },
  PROXY_COMPUTE_AUTH_FAILED: { sqlstate: '08006', httpStatus: 502, kind: 'compute', retryable: false, userMessage: 'the compute rejected the proxy\'s credentials' },
  // ---- control plane
  CP_UNAVAILABLE: { sqlstate: '57P03', httpStatus: 503, kind: 'controlPlane', retryable: true, userMessage: 'the control plane is unavailable; please try again' },
  CP_NOT_FOUND: { sqlstate: '3D000', httpStatus: 404, kind: 'user', retryable: false, userMessage: 'not found' },
  CP_ENDPOINT_NOT_FOUND: { sqlstate: '3D000', httpStatus: 404, kind: 'user', retryable: false, userMessage: 'endpoint not found' },
  CP_CONFLICT: { sqlstate: '42710', httpStatus: 409, kind: 'user', retryable: false, userMessage: 'already exists' },
  CP_BAD_REQUEST: { sqlstate: '22023', httpStatus: 400, kind: 'user', retryable: false, userMessage: 'invalid request' },
  CP_PAYLOAD_TOO_LARGE: { sqlstate: '54000', httpStatus: 413, kind: 'user', retryable: false, userMessage: 'request body too large' },
  CP_ENDPOINT_DISABLED: { sqlstate: '57P03', httpStatus: 423, kind: 'user', retryable: false, userMessage: 'the endpoint is disabled' },
  CP_COMPUTE_START_FAILED: { sqlstate: '57P03', httpStatus: 503, kind: 'compute', retryable: true, userMessage: 'the compute failed to start; please try again' },
  CP_SHUTTING_DOWN: { sqlstate: '57P01', httpStatus: 503, kind: 'service', retryable: true, userMessage: 'the control plane is shutting down' },
  CP_SAFEKEEPERS_UNAVAILABLE: { sqlstate: '57P03', httpStatus: 503, kind: 'service', retryable: true, userMessage: 'not enough safekeepers are reachable to start the compute safely; please try again' },
  // ---- safekeepers
  SK_TIMELINE_NOT_FOUND: { sqlstate: '42704', httpStatus: 404, kind: 'user', retryable: false, userMessage: 'timeline not found on this safekeeper' },
  SK_WAL_NOT_FOUND: { sqlstate: '58P01', httpStatus: 404, kind: 'user', retryable: false, userMessage: 'no such WAL file' },
  SK_GENERATION_FENCED: { sqlstate: '40001', httpStatus: 409, kind: 'user', retryable: false, userMessage: 'a newer compute generation owns this timeline' },
  SK_UNAVAILABLE: { sqlstate: '57P03', httpStatus: 503, kind: 'service', retryable: true, userMessage: 'the safekeeper is unavailable' },
  SK_CONTROL_FILE_CORRUPT: { sqlstate: 'XX001', httpStatus: 500, kind: 'service', retryable: false, userMessage: 'the timeline\'s control file on this safekeeper is corrupted' },
  SK_RANGE_NOT_SATISFIABLE: { sqlstate: '22023', httpStatus: 416, kind: 'user', retryable: false, userMessage: 'the requested byte range is not satisfiable' },
  // ---- pageserver
  PS_TIMELINE_NOT_FOUND: { sqlstate: '42704', httpStatus: 404, kind: 'user', retryable: false, userMessage: 'timeline not found' },
  PS_ANCESTOR_NOT_FOUND: { sqlstate: '42704', httpStatus: 404, kind: 'user', retryable: false, userMessage: 'the parent branch was not found' },
  PS_TIMELINE_EXISTS: { sqlstate: '42710', httpStatus: 409, kind: 'user', retryable: false, userMessage: 'the timeline already exists' },
  PS_TIMELINE_HAS_CHILDREN: { sqlstate: '2BP01', httpStatus: 409, kind: 'user', retryable: false, userMessage: 'the branch has child branches; delete them first' },
  PS_LSN_BEFORE_GC_CUTOFF: { sqlstate: '22023', httpStatus: 409, kind: 'user', retryable: false, userMessage: 'that point is older than the branch\'s history retention' },
  PS_LSN_PAST_TIP: { sqlstate: '22023', httpStatus: 409, kind: 'user', retryable: false, userMessage: 'that point is after the branch\'s latest committed WAL' },
  PS_INDEX_CORRUPT: { sqlstate: 'XX001', httpStatus: 500, kind: 'service', retryable: false, userMessage: 'the branch\'s storage metadata is corrupted' },
  PS_IMAGE_MISSING: { sqlstate: 'XX001', httpStatus: 500, kind: 'service', retryable: false, userMessage: 'the branch\'s stored data is incomplete' },
  PS_WAL_MISSING: { sqlstate: 'XX001', httpStatus: 500, kind: 'service', retryable: false, userMessage: 'the branch\'s stored WAL is incomplete' },
  PS_WAL_NOT_FOUND: { sqlstate: '58P01', httpStatus: 404, kind: 'user', retryable: false, userMessage: 'no such WAL file on this branch' },
  PS_IMAGE_NOT_FOUND: { sqlstate: '42704', httpStatus: 404, kind: 'user', retryable: false, userMessage: 'no such image on this branch' },
  PS_NO_IMAGE: { sqlstate: '55000', httpStatus: 409, kind: 'user', retryable: false, userMessage: 'the branch has no stored data at or before that point yet' },
  PS_COMPUTE_NOT_ATTACHED: { sqlstate: '55000', httpStatus: 409, kind: 'user', retryable: false, userMessage: 'no running compute is attached to the branch' },
  PS_UNAVAILABLE: { sqlstate: '57P03', httpStatus: 503, kind: 'service', retryable: true, userMessage: 'the pageserver is unavailable; please try again' },
  // ---- vm drivers
  VM_START_TIMEOUT: { sqlstate: '57P03', httpStatus: 503, kind: 'compute', retryable: true, userMessage: 'the compute did not become ready in time' },
  VM_POSTGRES_NOT_FOUND: { sqlstate: 'XX000', httpStatus: 500, kind: 'service', retryable: false, userMessage: 'internal error' },
  // ---- generic
  INTERNAL: { sqlstate: 'XX000', httpStatus: 500, kind: 'service', retryable: false, userMessage: 'internal error' },
  HTTP_NOT_FOUND: { sqlstate: '42704', httpStatus: 404, kind: 'user', retryable: false, userMessage: 'no such route' },
  HTTP_METHOD_NOT_ALLOWED: { sqlstate: '42501', httpStatus: 405, kind: 'user', retryable: false, userMessage: 'method not allowed' },
} as const satisfies Record<string, ErrorDef>;

export type ErrorCode = keyof typeof ERROR_CATALOGUE;

export interface XenonErrorOptions {
  /** Overrides the catalogue's user-facing message. Must be safe to show a client. */
  userMessage?: string;
  cause?: unknown;
  /** Overrides the catalogue's retryable flag (e.g. a control-plane answer that says so). */
  retryable?: boolean;
}

export class XenonError extends Error {
  readonly code: ErrorCode;
  readonly sqlstate: string;
  readonly httpStatus: number;
  readonly kind: ErrorKind;
  readonly retryable: boolean;
  readonly userMessage: string;

  constructor(code: ErrorCode, message?: string, opts: XenonErrorOptions = {}) {
    const def: ErrorDef = ERROR_CATALOGUE[code];
    super(message ?? opts.userMessage ?? def.userMessage, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = 'XenonError';
    this.code = code;
    this.sqlstate = def.sqlstate;
    this.httpStatus = def.httpStatus;
    this.kind = def.kind;
    this.retryable = opts.retryable ?? def.retryable;
    this.userMessage = opts.userMessage ?? def.userMessage;
  }

  /** The JSON error body every `/v1` API returns. */
  toJSON(): ErrorBody {
    return { error: { code: this.code, message: this.userMessage, retryable: this.retryable } };
  }
}

export interface ErrorBody {
  error: { code: string; message: string; retryable: boolean; userMessage?: string };
}

/** Any thrown value as a XenonError: unknown errors become INTERNAL with generic text. */
export function asXenonError(err: unknown): XenonError {
  if (err instanceof XenonError) return err;
  return new XenonError('INTERNAL', err instanceof Error ? err.message : String(err), { cause: err });
}

export function isErrorCode(code: string): code is ErrorCode {
  return Object.hasOwn(ERROR_CATALOGUE, code);
}
