/**
 * Connecting to a compute as the client: TCP to the woken address, the client's startup
 * parameters, SCRAM with the client's recovered ClientKey, then collect ParameterStatus and
 * BackendKeyData until ReadyForQuery. Errors the compute sends (unknown database, too many
 * connections, …) come back as {@link ComputeError} so they reach the client with their own
 * SQLSTATE; network failures are retryable and make the caller re-wake.
 */
import type { Socket } from 'node:net';
import { XenonError } from '../lib/errors.ts';
import type { ScramSecret } from '../lib/scram.ts';
import { ScramKeyClient, SCRAM_SHA_256 } from './auth/scram.ts';
import { connectForPipe } from './passthrough.ts';
import {
  Parser,
  serialize,
  type AuthenticationSASLContinueMessage,
  type AuthenticationSASLFinalMessage,
  type AuthenticationSASLMessage,
  type BackendKeyDataMessage,
  type BackendMessage,
  type DatabaseError,
  type ParameterStatusMessage,
} from './pgwire/index.ts';

/** An ErrorResponse from the compute, to pass through to the client as is. */
export class ComputeError extends Error {
  constructor(readonly fields: { code: string; message: string; detail?: string; hint?: string; severity?: string }) {
    super(fields.message);
  }
}

export interface ComputeSession {
  /** Paused after ReadyForQuery. Hand it to pipeBoth (reads with a reused buffer); 'data' listeners get copies. */
  socket: Socket;
  parameters: [string, string][];
  processId: number;
  secretKey: number;
}

export interface ConnectComputeOptions {
  host: string;
  port: number;
  params: Record<string, string>;
  clientKey: Buffer;
  secret: ScramSecret;
  timeoutMs: number;
}

export function connectCompute(o: ConnectComputeOptions): Promise<ComputeSession> {
  return new Promise((resolve, reject) => {
    const parser = new Parser();
    // Read with a reused buffer once piped (passthrough.ts); until then reads arrive as copies:
    // handshake messages, then (for a user other than pipeBoth) ordinary 'data' events.
    const socket = connectForPipe({ host: o.host, port: o.port, noDelay: true }, (chunk) => {
      if (settled) socket.emit('data', chunk);
      else parser.parse(chunk, onMessage);
    });
    const scram = new ScramKeyClient(o.clientKey, o.secret);
    const parameters: [string, string][] = [];
    let key: BackendKeyDataMessage | undefined;
    let settled = false;
    const fail = (err: Error): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      socket.destroy();
      reject(err);
    };
    const timer = setTimeout(
      () => fail(new XenonError('PROXY_COMPUTE_UNAVAILABLE', `compute ${o.host}:${o.port} did not finish the handshake in ${o.timeoutMs} ms`)),
      o.timeoutMs,
    );
    socket.once('connect', () => socket.write(serialize.startup(o.params)));
    socket.on('error', (err) => fail(new XenonError('PROXY_COMPUTE_UNAVAILABLE', `compute ${o.host}:${o.port}: ${err.message}`, { cause: err })));
    socket.on('close', () => fail(new XenonError('PROXY_COMPUTE_UNAVAILABLE', `compute ${o.host}:${o.port} closed the connection during the handshake`)));
    const onMessage = (msg: BackendMessage): void => {
      if (settled) return;
      try {
        switch (msg.name) {
          case 'authenticationSASL': {
            if (!(msg as unknown as AuthenticationSASLMessage).mechanisms.includes(SCRAM_SHA_256)) throw new XenonError('PROXY_COMPUTE_AUTH_FAILED', 'compute does not offer SCRAM-SHA-256');
            socket.write(serialize.sendSASLInitialResponseMessage(SCRAM_SHA_256, scram.first()));
            break;
          }
          case 'authenticationSASLContinue':
            socket.write(serialize.sendSCRAMClientFinalMessage(scram.final((msg as unknown as AuthenticationSASLContinueMessage).data)));
            break;
          case 'authenticationSASLFinal':
            scram.verify((msg as unknown as AuthenticationSASLFinalMessage).data);
            break;
          case 'authenticationOk':
          case 'notice':
            break;
          case 'parameterStatus': {
            const p = msg as ParameterStatusMessage;
            parameters.push([p.parameterName, p.parameterValue]);
            break;
          }
          case 'backendKeyData':
            key = msg as BackendKeyDataMessage;
            break;
          case 'readyForQuery': {
            settled = true;
            clearTimeout(timer);
            socket.removeAllListeners('error');
            socket.removeAllListeners('close');
            socket.on('error', () => { /* until the pipe takes over; it closes both sides on error */ });
            socket.pause();
            resolve({ socket, parameters, processId: key?.processID ?? 0, secretKey: key?.secretKey ?? 0 });
            break;
          }
          case 'error': {
            const e = msg as DatabaseError;
            if (e.code === '28P01' || e.code === '28000') {
              throw new XenonError('PROXY_COMPUTE_AUTH_FAILED', `compute rejected the proxy's SCRAM exchange: ${e.message}`);
            }
            throw new ComputeError({ code: e.code ?? 'XX000', message: e.message, detail: e.detail, hint: e.hint, severity: e.severity });
          }
          default:
            if (msg.name.startsWith('authentication')) throw new XenonError('PROXY_COMPUTE_AUTH_FAILED', `compute asked for ${msg.name}; computes must use SCRAM-SHA-256`);
            throw new XenonError('PROXY_COMPUTE_UNAVAILABLE', `unexpected ${msg.name} from the compute during startup`);
        }
      } catch (err) {
        fail(err as Error);
      }
    };
  });
}
