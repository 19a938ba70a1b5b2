/**
 * Postgres wire codec for the proxy's startup/auth phase (after auth the proxy pipes raw bytes).
 * Buffers in, buffers out; no sockets. The rest of the proxy imports only this file.
 *
 * - Client side, ours: {@link FrontendReader} frames startup packets and typed messages;
 *   {@link parsePasswordMessage}, {@link parseSaslInitialResponse} decode 'p' bodies;
 *   {@link backend} serializes what the proxy answers.
 * - Compute side, pg-protocol's: {@link serialize} builds frontend messages the proxy sends to a
 *   compute, {@link Parser} decodes the compute's backend messages.
 *
 * {@link https://www.postgresql.org/docs/current/protocol-message-formats.html}
 */
export { PgWireError, PGWIRE_ERROR_SQLSTATES } from './errors.ts';
export type { PgWireErrorCode } from './errors.ts';
export {
  STARTUP_CODES,
  MAX_STARTUP_PACKET,
  TLS_HANDSHAKE_RECORD,
  DEFAULT_MAX_MESSAGE,
  MESSAGE_TYPES,
  FrontendReader,
  parsePasswordMessage,
  parseSaslInitialResponse,
} from './frontend.ts';
export type { StartupPacket, FrontendMessage, FrontendReaderOptions } from './frontend.ts';
export { backend, parseErrorFields, BACKEND_MESSAGE_TYPES, AUTH_CODES } from './backend.ts';

// pg-protocol is CommonJS; Node's cjs-module-lexer exposes its `exports.X = …` as named ESM
// exports, and TypeScript (NodeNext) types them from the neighbouring .d.ts files.
/** Frontend message serializers (startup, password, SASL, query, cancel, …) from pg-protocol. */
export { serialize } from 'pg-protocol/dist/serializer';
/**
 * Incremental decoder of backend messages (from a compute) from pg-protocol: `parser.parse(chunk, cb)`.
 * Caution: `parse` may later write into a chunk it was given (it compacts leftover bytes into the
 * previous buffer when they fit), so never reuse or forward a chunk after passing it in — pass a
 * copy if the raw bytes are still needed.
 */
export { Parser } from 'pg-protocol/dist/parser';
export type { MessageCallback } from 'pg-protocol/dist/parser';
/** Message classes pg-protocol's Parser yields; `DatabaseError` is what an ErrorResponse becomes. */
export {
  DatabaseError,
  NoticeMessage,
  ParameterStatusMessage,
  BackendKeyDataMessage,
  ReadyForQueryMessage,
  AuthenticationMD5Password,
  CommandCompleteMessage,
  NotificationResponseMessage,
  RowDescriptionMessage,
  DataRowMessage,
} from 'pg-protocol/dist/messages';
export type { BackendMessage, MessageName } from 'pg-protocol/dist/messages';

/** Shapes of pg-protocol's SASL authentication messages (plain objects, no exported classes). */
export interface AuthenticationSASLMessage {
  name: 'authenticationSASL';
  length: number;
  mechanisms: string[];
}
/** `data` is decoded by pg-protocol as a UTF-8 string (SCRAM messages are ASCII). */
export interface AuthenticationSASLContinueMessage {
  name: 'authenticationSASLContinue';
  length: number;
  data: string;
}
export interface AuthenticationSASLFinalMessage {
  name: 'authenticationSASLFinal';
  length: number;
  data: string;
}

/** Message-level routing (the transaction pooler): type bytes, a zero-copy backend framer, builders. */
export {
  FRONTEND,
  BACKEND,
  SMALL_MESSAGE_LIMIT,
  frontendLimit,
  isRoutable,
  cstringEnd,
  cstring,
  frame,
  PARSE_COMPLETE,
  CLOSE_COMPLETE,
  SYNC,
  commandComplete,
  query,
  closeMessage,
  copyFail,
  BackendScanner,
} from './route.ts';
export type { BackendMessageSink } from './route.ts';
