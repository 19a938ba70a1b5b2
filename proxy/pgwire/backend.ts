/**
 * Backend (proxy → client) side of the codec: serializers for the messages the proxy itself sends
 * during startup/auth, built on pg-protocol's `Writer`, and a parser for ErrorResponse /
 * NoticeResponse field lists.
 *
 * Formats: {@link https://www.postgresql.org/docs/current/protocol-message-formats.html}.
 * Error fields: {@link https://www.postgresql.org/docs/current/protocol-error-fields.html}.
 *
 * The serializers take trusted input from proxy code. Identifiers that would corrupt framing (a
 * NUL inside a parameter name or mechanism, an out-of-range integer) throw a TypeError/RangeError —
 * a programming error; free text in ErrorResponse/NoticeResponse has NULs removed instead, so an
 * error path never throws.
 */
import { Writer } from 'pg-protocol/dist/buffer-writer';
import { violation } from './errors.ts';

/**
 * Type bytes of the backend messages the proxy sends.
 * {@link https://www.postgresql.org/docs/current/protocol-message-formats.html}
 */
export const BACKEND_MESSAGE_TYPES = {
  /** 'R': Authentication* */
  AUTHENTICATION: 0x52,
  /** 'S': ParameterStatus */
  PARAMETER_STATUS: 0x53,
  /** 'K': BackendKeyData */
  BACKEND_KEY_DATA: 0x4b,
  /** 'Z': ReadyForQuery */
  READY_FOR_QUERY: 0x5a,
  /** 'E': ErrorResponse */
  ERROR_RESPONSE: 0x45,
  /** 'N': NoticeResponse */
  NOTICE_RESPONSE: 0x4e,
  /** 'v': NegotiateProtocolVersion */
  NEGOTIATE_PROTOCOL_VERSION: 0x76,
} as const;

/**
 * Int32 codes that follow an 'R' message's length word.
 * {@link https://www.postgresql.org/docs/current/protocol-message-formats.html#PROTOCOL-MESSAGE-FORMATS-AUTHENTICATIONOK}
 */
export const AUTH_CODES = {
  OK: 0,
  CLEARTEXT_PASSWORD: 3,
  MD5_PASSWORD: 5,
  SASL: 10,
  SASL_CONTINUE: 11,
  SASL_FINAL: 12,
} as const;

const T = BACKEND_MESSAGE_TYPES;

function cstr(s: string, what: string): string {
  if (s.includes('\0')) throw new TypeError(`${what} must not contain a NUL character`);
  return s;
}

function text(s: string): string {
  return s.includes('\0') ? s.replaceAll('\0', '') : s;
}

function int32(n: number, what: string): number {
  if (!Number.isInteger(n) || n < -0x8000_0000 || n > 0xffff_ffff) {
    throw new RangeError(`${what} must be a 32-bit integer, got ${String(n)}`);
  }
  return n;
}

function auth(code: number, data?: Buffer | string): Buffer {
  const w = new Writer(32).addInt32(code);
  if (typeof data === 'string') w.addString(data);
  else if (data) w.add(data);
  return w.flush(T.AUTHENTICATION);
}

type ErrorFields = { severity: string; code: string; message: string; detail?: string | undefined; hint?: string | undefined };

function fields(type: number, e: ErrorFields): Buffer {
  if (!/^[0-9A-Z]{5}$/.test(e.code)) throw new RangeError(`invalid SQLSTATE ${JSON.stringify(e.code)}`);
  const w = new Writer(128);
  w.addString('S').addCString(e.severity);
  w.addString('V').addCString(e.severity);
  w.addString('C').addCString(e.code);
  w.addString('M').addCString(text(e.message));
  if (e.detail !== undefined) w.addString('D').addCString(text(e.detail));
  if (e.hint !== undefined) w.addString('H').addCString(text(e.hint));
  w.addCString(''); // terminator: a single zero byte
  return w.flush(type);
}

/** Backend message serializers; each returns one complete message (type byte, length, body). */
export const backend = {
  /** AuthenticationOk: 'R', int32 8, int32 0. */
  authenticationOk(): Buffer {
    return auth(AUTH_CODES.OK);
  },

  /** AuthenticationCleartextPassword: 'R', int32 8, int32 3. */
  authenticationCleartextPassword(): Buffer {
    return auth(AUTH_CODES.CLEARTEXT_PASSWORD);
  },

  /**
   * AuthenticationSASL: 'R', int32 len, int32 10, mechanism names as C strings, then a zero byte.
   * {@link https://www.postgresql.org/docs/current/protocol-message-formats.html#PROTOCOL-MESSAGE-FORMATS-AUTHENTICATIONSASL}
   */
  authenticationSASL(mechanisms: readonly string[]): Buffer {
    if (mechanisms.length === 0) throw new RangeError('authenticationSASL needs at least one mechanism');
    const w = new Writer(64).addInt32(AUTH_CODES.SASL);
    for (const m of mechanisms) {
      if (m === '') throw new RangeError('SASL mechanism name must not be empty');
      w.addCString(cstr(m, 'SASL mechanism name'));
    }
    w.addCString('');
    return w.flush(T.AUTHENTICATION);
  },

  /** AuthenticationSASLContinue: 'R', int32 len, int32 11, raw SASL data (a string is written as UTF-8). */
  authenticationSASLContinue(data: Buffer | string): Buffer {
    return auth(AUTH_CODES.SASL_CONTINUE, data);
  },

  /** AuthenticationSASLFinal: 'R', int32 len, int32 12, raw SASL outcome data. */
  authenticationSASLFinal(data: Buffer | string): Buffer {
    return auth(AUTH_CODES.SASL_FINAL, data);
  },

  /**
   * ParameterStatus: 'S', int32 len, name, value (C strings).
   * {@link https://www.postgresql.org/docs/current/protocol-message-formats.html#PROTOCOL-MESSAGE-FORMATS-PARAMETERSTATUS}
   */
  parameterStatus(name: string, value: string): Buffer {
    return new Writer(64)
      .addCString(cstr(name, 'parameter name'))
      .addCString(cstr(value, 'parameter value'))
      .flush(T.PARAMETER_STATUS);
  },

  /**
   * BackendKeyData: 'K', int32 12, int32 process id, int32 secret key. Signed or unsigned 32-bit
   * values are accepted; their two's-complement bits are written (pg-protocol and
   * {@link FrontendReader.readStartup} read them back as signed).
   * {@link https://www.postgresql.org/docs/current/protocol-message-formats.html#PROTOCOL-MESSAGE-FORMATS-BACKENDKEYDATA}
   */
  backendKeyData(processId: number, secretKey: number): Buffer {
    return new Writer(16)
      .addInt32(int32(processId, 'processId'))
      .addInt32(int32(secretKey, 'secretKey'))
      .flush(T.BACKEND_KEY_DATA);
  },

  /**
   * ReadyForQuery: 'Z', int32 5, status byte ('I' idle, 'T' in transaction, 'E' failed transaction).
   * {@link https://www.postgresql.org/docs/current/protocol-message-formats.html#PROTOCOL-MESSAGE-FORMATS-READYFORQUERY}
   */
  readyForQuery(status: 'I' | 'T' | 'E'): Buffer {
    if (status !== 'I' && status !== 'T' && status !== 'E') throw new RangeError(`invalid transaction status ${String(status)}`);
    return new Writer(8).addString(status).flush(T.READY_FOR_QUERY);
  },

  /**
   * ErrorResponse: 'E', int32 len, fields S and V (severity, default 'FATAL' — the proxy's own
   * errors end the connection), C (SQLSTATE), M (message), optional D (detail) and H (hint), then
   * a zero byte. NULs in the text fields are removed.
   * {@link https://www.postgresql.org/docs/current/protocol-message-formats.html#PROTOCOL-MESSAGE-FORMATS-ERRORRESPONSE}
   */
  errorResponse(e: {
    severity?: 'ERROR' | 'FATAL' | 'PANIC';
    code: string;
    message: string;
    detail?: string;
    hint?: string;
  }): Buffer {
    return fields(T.ERROR_RESPONSE, { ...e, severity: e.severity ?? 'FATAL' });
  },

  /**
   * NoticeResponse: 'N', int32 len, fields S and V (severity, default 'NOTICE'), C, M, then a
   * zero byte.
   * {@link https://www.postgresql.org/docs/current/protocol-message-formats.html#PROTOCOL-MESSAGE-FORMATS-NOTICERESPONSE}
   */
  noticeResponse(e: { severity?: 'NOTICE' | 'WARNING' | 'INFO'; code: string; message: string }): Buffer {
    return fields(T.NOTICE_RESPONSE, { code: e.code, message: e.message, severity: e.severity ?? 'NOTICE' });
  },

  /**
   * NegotiateProtocolVersion: 'v', int32 len, int32 newest supported version, int32 count of
   * unrecognized `_pq_.` options, their names as C strings. The version word is written the way
   * Postgres and libpq use it: the full protocol code `3 << 16 | newestMinor` (e.g. 196608 for 3.0).
   * {@link https://www.postgresql.org/docs/current/protocol-message-formats.html#PROTOCOL-MESSAGE-FORMATS-NEGOTIATEPROTOCOLVERSION}
   */
  negotiateProtocolVersion(newestMinor: number, unrecognized: readonly string[]): Buffer {
    if (!Number.isInteger(newestMinor) || newestMinor < 0 || newestMinor > 0xffff) {
      throw new RangeError(`newestMinor must be in [0, 65535], got ${String(newestMinor)}`);
    }
    const w = new Writer(64).addInt32((3 << 16) | newestMinor).addInt32(unrecognized.length);
    for (const name of unrecognized) w.addCString(cstr(name, 'protocol option name'));
    return w.flush(T.NEGOTIATE_PROTOCOL_VERSION);
  },
} as const;

/**
 * Field map of an ErrorResponse/NoticeResponse body (type byte and length word excluded): each
 * field is a one-byte code followed by a C string; a zero byte ends the list and must be the last
 * byte. Values are decoded as UTF-8 (lossy). Throws {@link PgWireError} when malformed.
 * {@link https://www.postgresql.org/docs/current/protocol-error-fields.html}
 */
export function parseErrorFields(body: Buffer): Record<string, string> {
  const out: Record<string, string> = {};
  let off = 0;
  for (;;) {
    if (off >= body.length) throw violation('invalid error fields: missing terminator');
    const code = body[off]!;
    if (code === 0) {
      if (off !== body.length - 1) throw violation('invalid error fields: trailing bytes');
      return out;
    }
    const end = body.indexOf(0, off + 1);
    if (end < 0) throw violation('invalid error fields: unterminated string');
    out[String.fromCharCode(code)] = body.toString('utf8', off + 1, end);
    off = end + 1;
  }
}
