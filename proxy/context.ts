/** Per-connection context, passed first: session id, endpoint, peer, phase timings (DESIGN §6). */
import { randomUUID } from 'node:crypto';
import type { Logger } from '../lib/logger.ts';

export const PHASES = ['tls', 'auth', 'wake', 'connect'] as const;
export type Phase = (typeof PHASES)[number];

export class RequestContext {
  readonly sessionId = randomUUID();
  readonly startedAt = performance.now();
  readonly timings: Partial<Record<Phase, number>> = {};
  endpoint?: string;
  role?: string;
  database?: string;
  cold = false;
  logger: Logger;
  private phaseStart?: { phase: Phase; at: number };

  constructor(
    readonly peer: string,
    readonly protocol: 'tcp' | 'ws',
    logger: Logger,
  ) {
    this.logger = logger.child({ sessionId: this.sessionId, peer });
  }

  setEndpoint(endpoint: string, role: string, database: string): void {
    this.endpoint = endpoint;
    this.role = role;
    this.database = database;
    this.logger = this.logger.child({ endpoint, role });
  }

  begin(phase: Phase): void {
    this.end();
    this.phaseStart = { phase, at: performance.now() };
  }

  /** Ends the current phase (if any) and returns its milliseconds. */
  end(): number {
    if (!this.phaseStart) return 0;
    const ms = performance.now() - this.phaseStart.at;
    this.timings[this.phaseStart.phase] = (this.timings[this.phaseStart.phase] ?? 0) + ms;
    this.phaseStart = undefined;
    return ms;
  }

  get elapsedMs(): number {
    return performance.now() - this.startedAt;
  }
}
