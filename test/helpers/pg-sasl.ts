/** node-postgres' own client-side SCRAM (a real client implementation), typed for tests. */
import { createRequire } from 'node:module';

export interface PgSaslSession {
  mechanism: string;
  clientNonce: string;
  response: string;
  message: string;
  serverSignature?: string;
}

export interface PgSasl {
  startSession(mechanisms: string[], stream?: unknown): PgSaslSession;
  continueSession(session: PgSaslSession, password: string, serverData: string, stream?: unknown): Promise<void>;
  finalizeSession(session: PgSaslSession, serverData: string): void;
}

export const pgSasl = createRequire(import.meta.url)('pg/lib/crypto/sasl.js') as PgSasl;
