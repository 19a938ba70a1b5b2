/**
 * One pooled server connection: a compute session the pooler hands to one client for one
 * transaction. It keeps, in order, what each message sent to the compute will be answered with
 * (the "expectation queue"), so the answers can be forwarded, swallowed (what the pooler itself
 * sent: a Parse of a statement the client prepared on another connection, a parameter SET, a
 * reset) or replaced by synthetic ones (a ParseComplete for a statement already prepared here).
 *
 * Hot path: a read from the compute is framed in place ({@link BackendScanner}); runs of forwarded
 * messages are written to the client as one slice of the read, so a read answering a simple query
 * costs one write and no copy.
 *
 * {@link https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-EXT-QUERY}
 */
import type { Socket } from 'node:net';
import { LRUCache } from 'lru-cache';
import { sendCancel } from '../cancellation.ts';
import { readReused } from '../passthrough.ts';
import {
  BACKEND,
  BackendScanner,
  closeMessage,
  CLOSE_COMPLETE,
  commandComplete,
  parseErrorFields,
  PARSE_COMPLETE,
  backend,
  query,
  copyFail,
  frame,
  FRONTEND,
  SYNC,
} from '../pgwire/index.ts';
import type { PooledClient } from './client.ts';
import type { Pool } from './pool.ts';

/** What the next answer(s) from the compute belong to. */
export const K = {
  /** A client's Parse: forward ParseComplete. */
  PARSE: 1,
  /** A Parse the pooler injected (statement missing here): swallow ParseComplete. */
  PARSE_SKIP: 2,
  /** A client's Parse of a statement already here: synthesize ParseComplete (nothing was sent). */
  PARSE_FAKE: 3,
  BIND: 4,
  DESCRIBE_STATEMENT: 5,
  DESCRIBE_PORTAL: 6,
  EXECUTE: 7,
  CLOSE: 8,
  /** A client's Close of a statement: synthesize CloseComplete (statements stay cached here). */
  CLOSE_FAKE: 9,
  /** A Close the pooler sent (LRU eviction): swallow CloseComplete. */
  CLOSE_SKIP: 10,
  SYNC: 11,
  /** A simple Query or FunctionCall: everything up to ReadyForQuery. */
  QUERY: 12,
  /** A Query the pooler sent (parameters, ROLLBACK, DISCARD ALL): swallow everything up to ReadyForQuery. */
  QUERY_SKIP: 13,
  /** A client's DEALLOCATE answered by an empty query: EmptyQueryResponse becomes CommandComplete. */
  QUERY_DEALLOCATE: 14,
  /** A Parse that must fail (duplicate statement name): the compute's error is replaced by ours. */
  PARSE_ERROR: 15,
  /** A Sync the compute ignores (sent while it was in COPY FROM STDIN): nothing comes back. */
  IGNORED: 16,
  /** Marks where the client's CopyDone/CopyFail went (nothing comes back for it). */
  COPY_END: 17,
} as const;

/** Kinds answered by nothing from the compute: due as soon as they reach the head of the queue. */
const FAKE_KINDS = new Set<number>([K.PARSE_FAKE, K.CLOSE_FAKE, K.IGNORED, K.COPY_END]);
/** The reply to a client's DEALLOCATE: fails with 25P02 in an aborted transaction, as DEALLOCATE would. */
export const DEALLOCATE_PROBE = query('SELECT');
const XENON_NAME = /xenon_[A-Za-z0-9_-]{24}/g;
const NUL = Buffer.from([0]);
/** Kinds that end at ReadyForQuery (an ErrorResponse does not end them). */
const UNTIL_READY = new Set<number>([K.SYNC, K.QUERY, K.QUERY_SKIP, K.QUERY_DEALLOCATE]);

/** A client statement: its name on the compute (a hash of text and types) and how to prepare it there. */
export interface Statement {
  serverName: string;
  /** `serverName` as a C string. */
  nameBuf: Buffer;
  /** The Parse body after the name: query text, parameter count and types. */
  rest: Buffer;
  /** Its text uses a session feature: a server connection that executes it must be reset afterwards. */
  session: boolean;
}

/** Bookkeeping carried by an expectation, undone when the compute skips the message after an error. */
export interface Undo {
  /** The statement name added to this connection's cache when the message was sent. */
  serverName?: string;
  /** A client statement registered (Parse) or removed (Close) when the message was sent. */
  client?: PooledClient;
  clientName?: string;
  stmt?: Statement;
  removed?: boolean;
  /** QUERY_SKIP: runs when ReadyForQuery arrives with the first error's message, if one came. */
  done?: (error: string | undefined) => void;
  failed?: string;
  /** QUERY_DEALLOCATE: the tag. PARSE_ERROR: the ErrorResponse to send instead. */
  tag?: string;
  error?: Buffer;
  /** QUERY_DEALLOCATE of ALL: the client's statements before it (restored if it fails). */
  saved?: Map<string, Statement>;
}

/**
 * A client whose single autocommit query was written behind another client's on this connection
 * (see {@link ServerConn.addFollower}).
 */
interface Follower {
  client: PooledClient;
  /** Position of its query's expectation in the queue (counted over the connection's life). */
  seq: number;
  /** The Query message, kept to send it again after a cancel meant for another query hit it. */
  query: Buffer;
  /** A cancel for another client's query was sent while this query was on the wire. */
  atRisk: boolean;
}

let nextServerId = 1;

/**
 * A query in a batch that held others up longer than this pauses batching on its pool (measured
 * from one answer's end to the next: the compute's time for the query, plus the proxy's own delay
 * when it is loaded).
 */
const PIPELINE_SLOW_MS = 200;

function errorCode(body: Buffer): string | undefined {
  try {
    return parseErrorFields(body).C;
  } catch {
    return undefined;
  }
}

function errorMessage(body: Buffer): string {
  try {
    const f = parseErrorFields(body);
    return `${f.C ?? 'XX000'}: ${f.M ?? 'error'}`;
  } catch {
    return 'malformed error';
  }
}

export class ServerConn {
  readonly id = nextServerId++;
  readonly scanner = new BackendScanner();
  /** The client this connection serves now. */
  client: PooledClient | null = null;
  /** The client left while linked: the connection is being drained and reset. */
  orphan = false;
  /** A session feature was used (SET, LISTEN, advisory lock, temp table, …): DISCARD ALL before reuse. */
  dirty = false;
  /** Close instead of reusing (compute suspended/stopped, or the pool shrank). */
  doomed = false;
  dead = false;
  /** Transaction status of the last ReadyForQuery. */
  status = 0x49; // 'I'
  /** After an ErrorResponse in an extended batch with no Sync sent yet: the compute ignores messages until Sync. */
  skipping = false;
  /** The compute is in COPY FROM STDIN. */
  copyIn = false;
  /** In COPY FROM STDIN and the client has not sent CopyDone/CopyFail yet: a Sync it sends now is ignored by the compute. */
  copyOpen = false;
  /** Cancel requests on their way to the compute: the connection goes to no other client before they arrived. */
  cancels = 0;
  /** It became free while cancels were in flight: released when the last one completes. */
  releaseAfterCancel = false;
  /** Statements prepared here (server names), least recently used evicted with a Close. */
  readonly stmts: LRUCache<string, true>;
  private readonly evicted: string[] = [];
  /** Startup parameters applied for the current kind of client (their signature) and their values. */
  sig = '';
  applied = new Map<string, string>();
  lastUsed = Date.now();
  /** Transactions served. */
  uses = 0;
  /**
   * Everything written so far leaves the session idle with no session state: the current client
   * sent nothing but pipelinable autocommit queries since it got the connection. Only then may
   * other clients' queries be written behind (a batch).
   */
  tailIdle = false;
  /** Clients whose queries wait on the wire behind the current client's, in order. */
  readonly followers: Follower[] = [];
  /** The current client's query is exposed to a cancel meant for another query of the batch. */
  headAtRisk = false;
  /** The head query failed with 57014 because of a cancel meant for another: sent again at its ReadyForQuery. */
  private retryHead = false;
  /** Followers that asked to cancel their query: sent when it is the one running. */
  private readonly cancelAtHead = new Set<PooledClient>();
  /** The current client's query when it came as a follower (to send again, see {@link headAtRisk}). */
  private headQuery: Buffer | null = null;
  /** While set, {@link flush} writes nothing (the pool gathers a batch into one write). */
  corked = false;
  /** Clients handed on during a read (their own answers done): flushed and resumed after it. */
  private moved: PooledClient[] = [];
  /** Absolute position of the queue head (pops over the connection's life). */
  private seqHead = 0;
  /** When the query now at the head started (for the pool's pipelinable-query duration average). */
  private headSince = 0;
  /** Messages for the compute, written as one buffer by {@link flush}. */
  private out: Buffer[] = [];
  private outBytes = 0;
  // The expectation queue: kinds and their bookkeeping, from qHead.
  private qk: number[] = [];
  private qx: (Undo | undefined)[] = [];
  private qHead = 0;
  // A run of forwarded bytes of the current read, not yet handed to the client.
  private runBuf: Buffer | null = null;
  private runStart = 0;
  private runEnd = 0;
  private orphanTimer?: NodeJS.Timeout;
  /** The socket's reused read buffer during a read (forwarded bytes from it are copied). */
  private reused: Buffer | null = null;
  private readonly onData = (chunk: Buffer): void => this.receive(chunk);

  constructor(
    readonly pool: Pool,
    readonly socket: Socket,
    readonly processId: number,
    readonly secretKey: number,
    maxPrepared: number,
  ) {
    this.stmts = new LRUCache<string, true>({
      max: maxPrepared,
      dispose: (_v, key, reason) => {
        if (reason === 'evict') this.evicted.push(key);
      },
    });
    socket.setNoDelay(true);
    // Reads into one reused buffer, without the stream machinery (see passthrough.ts).
    if (!readReused(socket, (n, buf) => {
      this.reused = buf;
      this.receive(n === buf.length ? buf : buf.subarray(0, n));
      this.reused = null;
      return !this.paused;
    })) socket.on('data', this.onData);
    socket.on('drain', () => this.client?.resumeReading());
    socket.on('error', (err) => this.lost(err.message));
    socket.on('close', () => this.lost('closed'));
    socket.resume();
  }

  get host(): string {
    return this.socket.remoteAddress ?? '127.0.0.1';
  }

  get port(): number {
    return this.socket.remotePort ?? 0;
  }

  /** Answers outstanding. */
  get pending(): number {
    return this.qk.length - this.qHead;
  }

  // ---- the client side puts messages and expectations here

  send(buf: Buffer): void {
    this.out.push(buf);
    this.outBytes += buf.length;
  }

  expect(kind: number, x?: Undo): void {
    this.qk.push(kind);
    this.qx.push(x);
    // A synthetic answer with nothing outstanding before it is due now.
    if (this.qHead === this.qk.length - 1 && FAKE_KINDS.has(kind)) this.drainFakes();
  }

  /** Writes what was queued for the compute. Returns false when the socket is full (backpressure). */
  flush(): boolean {
    const n = this.out.length;
    if (n === 0 || this.corked) return true;
    const buf = n === 1 ? this.out[0]! : Buffer.concat(this.out, this.outBytes);
    this.out.length = 0;
    this.outBytes = 0;
    if (this.dead) return true;
    return this.socket.write(buf);
  }

  /** Caches `serverName` as prepared here; Closes for statements it evicts are queued. */
  addStatement(serverName: string): void {
    this.stmts.set(serverName, true);
    if (this.evicted.length) {
      for (const name of this.evicted.splice(0)) {
        this.send(closeMessage('S', name));
        // If the compute skips it (an error earlier in the batch), the Close is sent again later.
        this.expect(K.CLOSE_SKIP, { serverName: name });
      }
    }
  }

  /**
   * Prepares `st` here: a Close of its name first (answered CloseComplete whether or not it exists),
   * so a statement the compute kept while this side forgot it (a DISCARD ALL or DEALLOCATE ALL in a
   * transaction that then failed, say) never fails with 42P05; then the Parse.
   */
  prepare(st: Statement, kind: number, x: Undo): void {
    this.addStatement(st.serverName);
    this.send(closeMessage('S', st.serverName));
    this.expect(K.CLOSE_SKIP);
    this.send(frame(FRONTEND.PARSE, st.nameBuf, st.rest));
    this.expect(kind, x);
  }

  /** Forgets every statement prepared here (a DISCARD ALL or DEALLOCATE ALL went to the compute). */
  forgetStatements(): void {
    this.stmts.clear();
    this.evicted.length = 0;
  }

  /** A cancel request for this connection's current query is on its way. */
  cancelStarted(): void {
    this.cancels++;
    // It may land on a later query of the batch: those are sent again if it does (their implicit transaction rolled back).
    for (const f of this.followers) f.atRisk = true;
    this.headAtRisk = false;
  }

  // ---- batches: other clients' autocommit queries written behind the current one

  /**
   * May `c`'s pipelinable query be written behind what this connection runs now? Only when all of
   * it leaves the session idle and clean (see {@link tailIdle}), `c` expects the same startup
   * parameters, and nothing special is going on (a cancel, a drain, COPY, an error skip).
   */
  canTakeFollower(c: PooledClient, depth: number): boolean {
    const o = this.client;
    return (
      this.tailIdle && o !== null && !o.inBatch && !o.closed && this.followers.length + 1 < depth && c.sig === this.sig &&
      !this.dirty && !this.doomed && !this.dead && !this.orphan && this.cancels === 0 && !this.skipping && !this.copyIn && !this.copyOpen
    );
  }

  /** Writes `c`'s query behind the others; `c` gets the connection when its answer is due. */
  addFollower(c: PooledClient, q: Buffer): void {
    if (this.followers.length === 0) this.headSince = performance.now();
    this.send(q);
    this.expect(K.QUERY);
    this.followers.push({ client: c, seq: this.seqHead + this.pending - 1, query: q, atRisk: false });
    c.following = this;
  }

  /** `c` (a follower) asked to cancel its query: done when its query is the one running. */
  cancelWhenHead(c: PooledClient): void {
    this.cancelAtHead.add(c);
  }

  /** The head's query finished (ReadyForQuery): the next follower's answers come next. */
  private handOn(): void {
    const now = performance.now();
    // A slow query held others up: no more batches on this pool for a while.
    if (now - this.headSince > PIPELINE_SLOW_MS) this.pool.pipelineSlow();
    this.headSince = now;
    if (this.status !== 0x49) {
      // A pipelinable query cannot open a transaction; if one did, the queries behind ran in it.
      this.pool.logger.error('pooler: a batched query left a transaction open; closing the server connection', { server: this.id });
      this.destroy('batched query left a transaction open');
      return;
    }
    this.flushRun();
    const old = this.client;
    const next = this.followers.shift()!;
    this.client = next.client;
    this.headQuery = next.query;
    this.headAtRisk = next.atRisk;
    next.client.following = null;
    if (!next.client.closed) next.client.server = this;
    if (old) {
      old.detachServer();
      // Sent again after a cancel hit it: it follows once more.
      if (this.followers.some((f) => f.client === old)) old.following = this;
      this.moved.push(old);
    }
    this.moved.push(next.client);
    this.uses++;
    this.pool.counters.transactions++;
    if (this.cancelAtHead.size && this.cancelAtHead.delete(next.client)) void this.pool.cancel(next.client);
  }

  /** The head's query was cancelled by a cancel meant for another query: it runs again, at the end. */
  private requeueHead(): void {
    const c = this.client;
    const q = this.headQuery;
    if (!c || !q || c.closed) return;
    this.pool.counters.pipelineRetries++;
    this.send(q);
    this.expect(K.QUERY);
    if (this.followers.length) this.followers.push({ client: c, seq: this.seqHead + this.pending - 1, query: q, atRisk: this.cancels > 0 });
    else this.headAtRisk = this.cancels > 0;
    this.flush();
  }

  /** That cancel request was delivered (or failed): the connection may now go to another client. */
  cancelDone(): void {
    this.cancels--;
    if (this.cancels === 0 && this.releaseAfterCancel) {
      this.releaseAfterCancel = false;
      this.pool.release(this);
    }
  }

  /** Hands the connection back if its client has nothing outstanding (it was granted to a client that no longer needs it). */
  releaseIfIdle(): void {
    if (this.pending === 0) this.idleCheck();
  }

  // ---- answers from the compute

  private receive(chunk: Buffer): void {
    try {
      this.scanner.push(chunk, this.onMessage);
    } catch (err) {
      this.pool.logger.error('pooler: bad data from the compute', { err, server: this.id });
      this.destroy('protocol error from the compute');
      return;
    }
    this.flushRun();
    const c = this.client;
    // A transaction that ended frees this connection first: the next waiting client's query goes
    // to the compute before this client's answer goes out, so the compute does not sit idle.
    if (this.pending === 0) this.idleCheck();
    if (this.moved.length) {
      // Clients of a batch whose answers are complete get them, and go on with what they held back.
      for (const m of this.moved.splice(0)) {
        if (m !== c) m.flushOut();
        m.batchMoved();
      }
    }
    if (c && !c.flushOut() && this.client === c) this.pause();
  }

  /** Backpressure from the client: stop reading until it drains. */
  paused = false;
  pause(): void {
    this.paused = true;
    this.socket.pause();
  }
  resume(): void {
    if (!this.paused || this.dead) return;
    this.paused = false;
    this.socket.resume();
  }

  private readonly onMessage = (type: number, buf: Buffer, start: number, end: number): void => {
    if (this.dead) return;
    // Asynchronous messages may come at any time.
    if (type === BACKEND.NOTICE || type === BACKEND.NOTIFICATION || type === BACKEND.PARAMETER_STATUS) {
      if (this.qHead < this.qk.length && this.qk[this.qHead] === K.QUERY_SKIP) return;
      this.forward(buf, start, end);
      return;
    }
    if (this.qHead >= this.qk.length) {
      // Nothing expected: an ErrorResponse before the compute closes (FATAL), or a protocol error.
      if (type === BACKEND.ERROR) {
        this.forward(buf, start, end);
        return;
      }
      this.pool.logger.warn('pooler: unexpected message from the compute', { type: String.fromCharCode(type), server: this.id });
      this.destroy('unexpected message from the compute');
      return;
    }
    const kind = this.qk[this.qHead]!;
    const x = this.qx[this.qHead];
    if (type === BACKEND.READY_FOR_QUERY) {
      this.status = buf[start + 5]!;
      this.copyIn = false;
      this.copyOpen = false;
      if (!UNTIL_READY.has(kind)) {
        this.desync(kind, type);
        return;
      }
      this.pop();
      if (kind === K.QUERY_SKIP) x?.done?.(x.failed);
      else if (this.retryHead) {
        this.retryHead = false;
        this.requeueHead();
      } else {
        this.forward(buf, start, end);
        // Its query is done: what this client sends next is its own, exposed to no one's cancel.
        this.headAtRisk = false;
      }
      if (this.followers.length && this.followers[0]!.seq === this.seqHead) this.handOn();
      this.drainFakes();
      return;
    }
    if (type === BACKEND.ERROR) {
      this.copyIn = false;
      this.copyOpen = false;
      if (UNTIL_READY.has(kind)) {
        // Simple query (or a Sync's commit): the error is part of the answer; ReadyForQuery follows.
        if (kind === K.QUERY_SKIP) {
          if (x && x.failed === undefined) x.failed = errorMessage(buf.subarray(start + 5, end));
          return;
        }
        // A cancel meant for another query of the batch landed on this one: it runs again.
        if (kind === K.QUERY && this.headAtRisk && this.headQuery && this.client && !this.client.closed && errorCode(buf.subarray(start + 5, end)) === '57014') {
          this.retryHead = true;
          return;
        }
        // A DEALLOCATE that failed (aborted transaction): the statements stay, as in Postgres.
        if (kind === K.QUERY_DEALLOCATE) this.undo(kind, x);
        this.forwardError(buf, start, end);
        return;
      }
      // Extended protocol: the compute skips everything up to the next Sync.
      if (kind === K.PARSE_ERROR && x?.error) this.emit(x.error);
      else this.forwardError(buf, start, end);
      // Undo what the skipped messages recorded, last first (a Close then a Parse of one name).
      let j = this.qHead + 1;
      while (j < this.qk.length && this.qk[j] !== K.SYNC) j++;
      for (let i = j - 1; i >= this.qHead; i--) this.undo(this.qk[i]!, this.qx[i]);
      for (let n = j - this.qHead; n > 0; n--) this.pop();
      if (this.qHead >= this.qk.length) this.skipping = true;
      return;
    }
    if (type === BACKEND.COPY_IN) this.copyStarted(kind);
    switch (kind) {
      case K.QUERY:
        if (type === BACKEND.COMMAND_COMPLETE) this.copyIn = false;
        this.forward(buf, start, end);
        return;
      case K.QUERY_DEALLOCATE:
        // The probe's row is swallowed; its CommandComplete becomes DEALLOCATE's.
        if (type === BACKEND.COMMAND_COMPLETE) this.emit(commandComplete(x!.tag!));
        else if (type !== BACKEND.ROW_DESCRIPTION && type !== BACKEND.DATA_ROW) this.forward(buf, start, end);
        return;
      case K.QUERY_SKIP:
        return;
      case K.SYNC:
        this.desync(kind, type);
        return;
      case K.PARSE:
      case K.PARSE_SKIP:
      case K.PARSE_ERROR:
        if (type !== BACKEND.PARSE_COMPLETE) return this.desync(kind, type);
        this.pop();
        if (x?.serverName) this.pool.known.set(x.serverName, true);
        if (kind !== K.PARSE_SKIP) this.forward(buf, start, end);
        this.drainFakes();
        return;
      case K.BIND:
        if (type !== BACKEND.BIND_COMPLETE) return this.desync(kind, type);
        this.pop();
        this.forward(buf, start, end);
        this.drainFakes();
        return;
      case K.DESCRIBE_STATEMENT:
      case K.DESCRIBE_PORTAL:
        this.forward(buf, start, end);
        if (type === BACKEND.ROW_DESCRIPTION || type === BACKEND.NO_DATA) {
          this.pop();
          this.drainFakes();
        } else if (!(type === BACKEND.PARAMETER_DESCRIPTION && kind === K.DESCRIBE_STATEMENT)) {
          this.desync(kind, type);
        }
        return;
      case K.EXECUTE:
        this.forward(buf, start, end);
        if (type === BACKEND.COMMAND_COMPLETE || type === BACKEND.EMPTY_QUERY || type === BACKEND.PORTAL_SUSPENDED) {
          this.copyIn = false;
          this.pop();
          this.drainFakes();
        }
        return;
      case K.CLOSE:
      case K.CLOSE_SKIP:
        if (type !== BACKEND.CLOSE_COMPLETE) return this.desync(kind, type);
        this.pop();
        if (kind === K.CLOSE) this.forward(buf, start, end);
        this.drainFakes();
        return;
      default:
        this.desync(kind, type);
    }
  };

  private pop(): void {
    this.qx[this.qHead] = undefined;
    this.qHead++;
    this.seqHead++;
    if (this.qHead === this.qk.length) {
      this.qk.length = 0;
      this.qx.length = 0;
      this.qHead = 0;
    } else if (this.qHead > 1024 && this.qHead * 2 > this.qk.length) {
      this.qk = this.qk.slice(this.qHead);
      this.qx = this.qx.slice(this.qHead);
      this.qHead = 0;
    }
  }

  /** Synthetic answers at the head of the queue are due now. */
  private drainFakes(): void {
    while (this.qHead < this.qk.length) {
      const kind = this.qk[this.qHead]!;
      if (kind === K.PARSE_FAKE) this.emit(PARSE_COMPLETE);
      else if (kind === K.CLOSE_FAKE) this.emit(CLOSE_COMPLETE);
      else if (kind !== K.IGNORED && kind !== K.COPY_END) return;
      this.pop();
    }
  }

  /**
   * The compute entered COPY FROM STDIN (CopyInResponse to the request at the head). It ignores
   * Sync and Flush until the copy ends, so the Syncs sent after that request and before the
   * client's CopyDone/CopyFail will not be answered. In the extended protocol a Sync must follow
   * the copy: the client keeps the connection until it sends one.
   */
  private copyStarted(kind: number): void {
    this.copyIn = true;
    let i = this.qHead + 1;
    for (; i < this.qk.length && this.qk[i] !== K.COPY_END; i++) if (this.qk[i] === K.SYNC) this.qk[i] = K.IGNORED;
    if (i >= this.qk.length) this.copyOpen = true;
    if (this.orphan && this.copyOpen) {
      // Its client left before the copy started: end it (the Sync sent with the orphan was ignored).
      this.send(copyFail('client disconnected'));
      this.copyEnded();
      this.send(SYNC);
      this.expect(K.SYNC);
      this.flush();
      return;
    }
    if (kind !== K.EXECUTE) return;
    let synced = false;
    for (let k = i; k < this.qk.length; k++) if (this.qk[k] === K.SYNC) synced = true;
    if (!synced && this.client) this.client.inBatch = true;
  }

  /** The client sent CopyDone or CopyFail. */
  copyEnded(): void {
    this.copyOpen = false;
    this.expect(K.COPY_END);
  }

  /** The compute will not act on a message (skipped after an error): undo what sending it recorded. */
  private undo(kind: number, x: Undo | undefined): void {
    if (!x) return;
    if (x.serverName && (kind === K.PARSE || kind === K.PARSE_SKIP)) this.stmts.delete(x.serverName);
    // A skipped eviction: the statement is still on the compute; close it with the next eviction.
    if (x.serverName && kind === K.CLOSE_SKIP && !this.stmts.has(x.serverName)) this.evicted.push(x.serverName);
    if (x.client && x.saved) x.client.restoreStatements(x.saved);
    if (x.client && x.clientName !== undefined) {
      if (x.removed) {
        if (x.stmt && !x.client.stmts.has(x.clientName)) x.client.addStatement(x.clientName, x.stmt);
      } else if (x.client.stmts.get(x.clientName) === x.stmt) {
        x.client.removeStatement(x.clientName);
      }
    }
  }

  private desync(kind: number, type: number): void {
    this.pool.logger.error('pooler: answer out of step with the requests', { expected: kind, got: String.fromCharCode(type), server: this.id });
    this.client?.fatal('PROXY_PROTOCOL_VIOLATION', 'the pooler lost track of the protocol state; reconnect');
    this.destroy('protocol state lost');
  }

  // ---- output to the client

  private forward(buf: Buffer, start: number, end: number): void {
    if (!this.client || this.client.closed) return;
    if (this.runBuf === buf && this.runEnd === start) {
      this.runEnd = end;
      return;
    }
    this.flushRun();
    this.runBuf = buf;
    this.runStart = start;
    this.runEnd = end;
  }

  /**
   * Forwards an ErrorResponse; one that names a server-side statement (`xenon_…`, the compute lost
   * one this side thought it had) names the client's statement instead, and the name is forgotten
   * here so it is prepared again next time.
   */
  private forwardError(buf: Buffer, start: number, end: number): void {
    if (buf.subarray(start, end).indexOf('xenon_', 0, 'latin1') < 0) {
      this.forward(buf, start, end);
      return;
    }
    let fields: Record<string, string>;
    try {
      fields = parseErrorFields(buf.subarray(start + 5, end));
    } catch {
      this.forward(buf, start, end);
      return;
    }
    // Only "prepared statement … does not exist / already exists" name statements.
    if (fields.C !== '26000' && fields.C !== '42P05') {
      this.forward(buf, start, end);
      return;
    }
    const c = this.client;
    const rename = (serverName: string): string => {
      this.stmts.delete(serverName);
      if (c) for (const [name, st] of c.stmts) if (st.serverName === serverName) return name;
      return 'pooled statement';
    };
    const parts: Buffer[] = [];
    for (const [k, v] of Object.entries(fields)) parts.push(Buffer.from(k, 'latin1'), Buffer.from(v.replace(XENON_NAME, rename)), NUL);
    parts.push(NUL);
    this.emit(frame(BACKEND.ERROR, ...parts));
  }

  private flushRun(): void {
    const b = this.runBuf;
    if (!b) return;
    this.runBuf = null;
    const c = this.client;
    if (!c || c.closed) return;
    if (b === this.reused) c.queueOut(Buffer.from(b.subarray(this.runStart, this.runEnd)));
    else c.queueOut(this.runStart === 0 && this.runEnd === b.length ? b : b.subarray(this.runStart, this.runEnd));
  }

  private emit(msg: Buffer): void {
    if (!this.client || this.client.closed) return;
    this.flushRun();
    this.client.queueOut(msg);
  }

  // ---- lifecycle

  /**
   * Nothing outstanding: a transaction ended (ReadyForQuery 'I' and the client between batches)
   * or an orphan finished draining. Hands the connection back to the pool.
   */
  private idleCheck(): void {
    if (this.orphan) {
      this.finishOrphan();
      return;
    }
    const c = this.client;
    if (c && this.status === 0x49 && !c.inBatch && !this.copyIn) {
      this.uses++;
      c.detachServer();
      this.client = null;
      this.pool.release(this);
    }
  }

  /** Runs `sql` on the compute for the pooler's own purposes; `done` gets the error message, if any. */
  runInternal(sql: string, done: (error: string | undefined) => void): void {
    this.send(query(sql));
    this.expect(K.QUERY_SKIP, { done });
    this.flush();
  }

  /** Clears session state (DISCARD ALL), then `done(ok)`. */
  reset(done: (ok: boolean) => void): void {
    this.runInternal('DISCARD ALL', (error) => {
      if (error) {
        this.pool.logger.warn('pooler: reset failed; closing the server connection', { error, server: this.id });
        done(false);
        return;
      }
      this.stmts.clear();
      this.evicted.length = 0;
      this.applied = new Map();
      this.sig = '';
      this.dirty = false;
      done(true);
    });
  }

  /**
   * The client left while this connection served it: end what it started (Sync for a batch,
   * CopyFail for a COPY), wait for the answers, roll back an open transaction, reset if needed,
   * and return to the pool. A compute that does not answer in time gets a cancel and is closed.
   */
  orphaned(inBatch: boolean, drainMs: number): void {
    this.flushRun();
    this.client = null;
    this.orphan = true;
    if (this.dead) return;
    // It may be paused for the departed client's backpressure: its answers must still be read.
    this.resume();
    if (this.copyIn || this.copyOpen) {
      this.send(copyFail('client disconnected'));
      this.copyEnded();
    }
    if (inBatch) {
      this.send(SYNC);
      this.expect(K.SYNC);
    }
    this.skipping = false;
    this.flush();
    this.orphanTimer = setTimeout(() => {
      this.pool.logger.info('pooler: an abandoned transaction did not finish in time; cancelling and closing', { server: this.id });
      void sendCancel({ host: this.host, port: this.port, processId: this.processId, secretKey: this.secretKey }, 2_000)
        .catch(() => {})
        .finally(() => this.destroy('abandoned by its client'));
    }, drainMs);
    this.orphanTimer.unref();
    if (this.pending === 0) this.finishOrphan();
  }

  private finishOrphan(): void {
    if (this.dead || this.pending > 0) return;
    if (this.status !== 0x49) {
      this.runInternal('ROLLBACK', (error) => {
        if (error) this.destroy(`rollback failed: ${error}`);
        else this.finishOrphan();
      });
      return;
    }
    clearTimeout(this.orphanTimer);
    this.orphan = false;
    this.pool.release(this);
  }

  /** The compute connection ended or failed. */
  private lost(reason: string): void {
    if (this.dead) return;
    this.dead = true;
    clearTimeout(this.orphanTimer);
    const c = this.client;
    this.client = null;
    // Busy: a request outstanding, a transaction open, or an extended batch not yet synced (its Parse may have been answered).
    if (c) c.serverLost(this.pending > 0 || this.status !== 0x49 || c.inBatch);
    for (const f of this.followers.splice(0)) {
      f.client.following = null;
      f.client.serverLost(true);
    }
    this.pool.removed(this, reason);
  }

  destroy(reason: string): void {
    if (this.dead) return;
    this.socket.destroy();
    this.lost(reason);
  }

  /** The ErrorResponse sent when a client's Parse reuses a name (42P05, as Postgres answers). */
  static duplicateError(name: string): Buffer {
    return backend.errorResponse({ severity: 'ERROR', code: '42P05', message: `prepared statement "${name}" already exists` });
  }
}
