/**
 * Errors of the wire codec. The codec is self-contained (no imports from `lib/`); callers map a
 * {@link PgWireError} onto the `XenonError` with the same `code`.
 */

/** Stable codes, the same strings as `lib/errors.ts`'s catalogue, with their SQLSTATEs. */
export const PGWIRE_ERROR_SQLSTATES = {
  PROXY_PROTOCOL_VIOLATION: '08P01',
  PROXY_STARTUP_TOO_LARGE: '08P01',
  PROXY_MESSAGE_TOO_LARGE: '08P01',
  PROXY_UNSUPPORTED_PROTOCOL: '0A000',
} as const;

export type PgWireErrorCode = keyof typeof PGWIRE_ERROR_SQLSTATES;

/**
 * Thrown for malformed input; `code` is one of 'PROXY_PROTOCOL_VIOLATION' |
 * 'PROXY_STARTUP_TOO_LARGE' | 'PROXY_MESSAGE_TOO_LARGE' | 'PROXY_UNSUPPORTED_PROTOCOL';
 * `message` is safe to show the client (it never echoes client bytes).
 */
export class PgWireError extends Error {
  readonly code: PgWireErrorCode;
  /** SQLSTATE for an ErrorResponse: 08P01, or 0A000 for an unsupported protocol version. */
  readonly sqlstate: string;

  constructor(code: PgWireErrorCode, message: string) {
    super(message);
    this.name = 'PgWireError';
    this.code = code;
    this.sqlstate = PGWIRE_ERROR_SQLSTATES[code];
  }
}

/** @internal */
export function violation(message: string): PgWireError {
  return new PgWireError('PROXY_PROTOCOL_VIOLATION', message);
}
