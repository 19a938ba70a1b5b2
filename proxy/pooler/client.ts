/**
 * One client of a `-pooler` endpoint after authentication: its messages are framed with
 * {@link FrontendReader}, answered locally when no server is needed (a lone Sync, Flush, Close,
 * DEALLOCATE of a statement it prepared, stray CopyData), otherwise routed to the server connection
 * the pool lends it for one transaction. Named prepared statements live here, per client, and are
 * prepared on whichever server connection a transaction lands on, under a server-wide name derived
 * from their text and parameter types (so clients preparing the same SQL share it).
 */
import { createHash } from 'node:crypto';
import type { Duplex } from 'node:stream';
import { XenonError, type ErrorCode } from '../../lib/errors.ts';
import {
  backend,
  CLOSE_COMPLETE,
  commandComplete,
  PARSE_COMPLETE,
  cstring,
  cstringEnd,
  frame,
  FRONTEND,
  frontendLimit,
  FrontendReader,
  isRoutable,
  PgWireError,
  query,
} from '../pgwire/index.ts';
import { DEALLOCATE_PROBE, K, ServerConn, type Statement } from './server.ts';
import type { Pool } from './pool.ts';

/** Stop reading a waiting client once this much is buffered. */
const PAUSE_WAITING_AT = 1024 * 1024;
/** Named statements one client may hold (their texts are kept in the proxy). */
export const MAX_CLIENT_STATEMENTS = 10_000;
/** Bytes of statement text (and parameter types) one client may hold. */
export const MAX_CLIENT_STATEMENT_BYTES = 64 * 1024 * 1024;

const READY_IDLE = backend.readyForQuery('I');
/**
 * A Parse that always fails (its error is replaced by ours), under a name no statement ever has
 * (server names are `xenon_` and base64url): a failing Parse of the unnamed statement would
 * destroy the client's unnamed statement.
 */
const FAILING_PARSE = frame(FRONTEND.PARSE, cstring('xenon:never'), cstring('xenon: this statement must fail'), Buffer.from([0, 0]));

/**
 * Statements that leave state in the session (PgBouncer's transaction-mode caveats): SET (not
 * LOCAL), RESET, LISTEN, PREPARE, DISCARD, DEALLOCATE, LOAD, cursors WITH HOLD, temporary tables,
 * session advisory locks, set_config(). A server connection that ran one is reset (DISCARD ALL)
 * before another client gets it.
 */
const SESSION_RE =
  /(?:^|;)\s*(?:set\s+(?!local\b|transaction\b|constraints\b)|reset\b|listen\b|prepare\b|discard\b|deallocate\b|load\b)|\bwith\s+hold\b|\btemp(?:orary)?\b|pg_temp|pg_advisory_lock|pg_try_advisory_lock|set_config\s*\(/i;
// Temporary tables: any `temp`/`temporary` word or `pg_temp` anywhere (SELECT … INTO TEMP,
// CREATE TABLE pg_temp.x, CREATE TEMP …); a false positive only costs a DISCARD ALL.
/** Statements that drop every prepared statement of the session (the compute's cache too). */
const DROP_ALL_RE = /(?:^|;)\s*(?:discard\s+all|deallocate\s+(?:prepare\s+)?all)\b/i;
/** Comments (one linear pass: an unterminated one runs to the end). */
const COMMENT_RE = /--[^\n]*|\/\*[\s\S]*?(?:\*\/|$)/g;

/**
 * `re` matches `sql` as written or with its comments blanked out (a statement after a leading
 * comment; the text as written too, in case a quoted `--` hid the rest of a line).
 */
function matches(re: RegExp, sql: string): boolean {
  if (re.test(sql)) return true;
  if (sql.indexOf('--') < 0 && sql.indexOf('/*') < 0) return false;
  return re.test(sql.replace(COMMENT_RE, ' '));
}

/**
 * Queries that may be batched (written to a busy server connection behind another client's, see
 * docs/pooler.md): one SELECT, no comments, no second statement (no `;` but a final one), nothing
 * that changes the session or the transaction state, takes row locks or sleeps. None of these can
 * leave a transaction open: after each the session is idle again, as it was before.
 */
const PIPE_RE = /^\s*select\s[^;]*;?\s*$/i;
const PIPE_NOT_RE = /--|\/\*|\bfor\s+(?:update|share|no\s+key|key\s+share)\b|\binto\b|pg_sleep|pg_advisory|dblink/i;
/** Longest query text considered for batching. */
const PIPE_MAX_BYTES = 4096;

/** `f` (a Query message) may be batched behind other clients' queries. */
export function pipelinable(f: Buffer): boolean {
  if (f[0] !== FRONTEND.QUERY || f.length > PIPE_MAX_BYTES) return false;
  const sql = f.toString('latin1', 5, f.length - 1);
  return PIPE_RE.test(sql) && !PIPE_NOT_RE.test(sql) && !SESSION_RE.test(sql);
}

const DEALLOCATE_RE = /^\s*deallocate\s+(?:prepare\s+)?(?:"((?:[^"]|"")+)"|([a-z_][a-z0-9_$]*))\s*;?\s*$/i;

export interface PooledClientOptions {
  /** Startup parameters to apply on every server connection it gets (name → value). */
  params: Map<string, string>;
  /** How long a server connection may take to finish what a departed client started. */
  orphanDrainMs: number;
  maxMessageBytes: number;
  /** Called once when the client is gone. */
  onClose: (c: PooledClient) => void;
}

let nextClientId = 1;

export class PooledClient {
  readonly id = nextClientId++;
  readonly reader: FrontendReader;
  /** Its named prepared statements (client name → statement); changed only through add/removeStatement. */
  readonly stmts = new Map<string, Statement>();
  /** Bytes of `rest` of its statements (bounded by MAX_CLIENT_STATEMENT_BYTES). */
  stmtBytes = 0;
  server: ServerConn | null = null;
  /** Its query waits on this server connection behind other clients' (a batch); it gets the connection when its answer is due. */
  following: ServerConn | null = null;
  /** Extended-protocol messages sent since the last Sync: the server stays linked until it. */
  inBatch = false;
  /** Waiting in the pool's queue since `waitStart` (ms). */
  waiting = false;
  waitStart = 0;
  closed = false;
  /** Signature of `params` (servers that applied the same need nothing). */
  readonly sig: string;
  /** A message read while no server was free. */
  private held: Buffer | null = null;
  /** After a local error in an extended batch: drop messages until Sync (as Postgres does). */
  private localSkipping = false;
  private out: Buffer[] = [];
  private outBytes = 0;
  private readonly onData = (chunk: Buffer): void => {
    this.reader.push(chunk);
    this.pump();
  };
  private readonly onGone = (): void => this.close();

  constructor(
    readonly socket: Duplex,
    readonly pool: Pool,
    private readonly opts: PooledClientOptions,
  ) {
    const large = opts.maxMessageBytes;
    this.reader = new FrontendReader({ maxMessage: large, limitFor: (t) => frontendLimit(t, large) });
    this.sig = opts.params.size ? JSON.stringify([...opts.params].sort((a, b) => (a[0] < b[0] ? -1 : 1))) : '';
  }

  /** Starts routing; `early` holds bytes the client pipelined during authentication. */
  start(early: Buffer): void {
    const s = this.socket;
    s.on('data', this.onData);
    s.on('end', this.onGone);
    s.on('close', this.onGone);
    s.on('error', this.onGone);
    s.on('drain', () => {
      this.server?.resume();
      this.resumeReading();
    });
    if (early.length) this.reader.push(early);
    this.pump();
    if (!this.closed) s.resume();
  }

  // ---- reading

  private pump(): void {
    if (this.closed) return;
    try {
      for (;;) {
        let f = this.held;
        this.held = null;
        if (!f) f = this.reader.readFrame();
        if (!f) break;
        // In a batch: what it sends next waits until its query is answered (nothing may follow the
        // batch's queries on the wire but more of them).
        if (this.following || (this.server && this.server.followers.length)) {
          this.held = f;
          if (this.reader.buffered > PAUSE_WAITING_AT) this.socket.pause();
          break;
        }
        const type = f[0]!;
        if (!isRoutable(type)) throw new PgWireError('PROXY_PROTOCOL_VIOLATION', `invalid frontend message type ${type}`);
        if (!this.server) {
          if (this.local(f)) {
            if (this.closed) return;
            continue;
          }
          if (this.waiting) {
            this.held = f;
            if (this.reader.buffered > PAUSE_WAITING_AT) this.socket.pause();
            break;
          }
          const got = this.pool.acquire(this);
          if (!got) {
            this.held = f;
            if (this.reader.buffered > PAUSE_WAITING_AT) this.socket.pause();
            break;
          }
          this.attach(got);
        }
        this.route(f);
        if (this.closed) return;
      }
    } catch (err) {
      if (err instanceof PgWireError) {
        this.pool.logger.info('pooler: client protocol violation', { code: err.code, err: err.message, client: this.id });
        this.fatal(err.code, err.message);
        return;
      }
      // A bug of ours must not take the proxy down: this session ends, its server is cleaned up.
      this.pool.logger.error('pooler: internal error while routing', { err, client: this.id });
      this.fatal('INTERNAL');
      return;
    }
    // Waiting, but what it waited with got answered here (a Parse the pool came to know): it needs no connection.
    if (this.waiting && this.held === null) {
      this.waiting = false;
      this.pool.forgetWaiter(this);
    }
    const s = this.server;
    if (s && !s.flush()) this.socket.pause();
    // Answers given here (a flood of lone Syncs, say) respect the client's backpressure too.
    if (!this.flushOut()) this.socket.pause();
  }

  /** The pool hands over a server connection after a wait. */
  granted(s: ServerConn): void {
    this.waiting = false;
    if (this.closed) {
      this.pool.release(s);
      return;
    }
    this.attach(s);
    this.pump();
    if (this.closed) return;
    // What it waited with may have been answered here meanwhile (a Parse the pool came to know).
    if (this.server === s) s.releaseIfIdle();
    this.resumeReading();
  }

  /** Its answers in a batch are complete or it became the batch's head: it goes on with what it held back. */
  batchMoved(): void {
    if (this.closed) return;
    this.pump();
    if (!this.closed) this.resumeReading();
  }

  /** The message it waits with, if it may join a batch (see {@link pipelinable}); taken when it does. */
  pipelinableHeld(): Buffer | null {
    const f = this.held;
    return f && !this.inBatch && !this.localSkipping && pipelinable(f) ? f : null;
  }

  /** Joins a batch: its held query is written by the server connection. */
  takeHeld(): void {
    this.held = null;
    this.waiting = false;
  }

  /** A cancel request while waiting: the request it waits with fails with 57014; what follows runs. */
  cancelWait(): void {
    if (this.closed) return;
    const f = this.held;
    this.held = null;
    if (f) {
      const t = f[0]!;
      this.queueOut(backend.errorResponse({ severity: 'ERROR', code: '57014', message: 'canceling statement due to user request' }));
      if (t === FRONTEND.QUERY || t === FRONTEND.FUNCTION_CALL) this.queueOut(READY_IDLE);
      else this.localSkipping = true;
    }
    this.pump();
    if (!this.closed) this.resumeReading();
  }

  /** Waiting took too long: every request buffered so far gets `message` (53300), as Postgres would answer a failing one. */
  waitFailed(code: string, message: string): void {
    this.waiting = false;
    if (this.closed) return;
    const err = backend.errorResponse({ severity: 'ERROR', code, message });
    let f = this.held;
    this.held = null;
    try {
      if (!f) f = this.reader.readFrame();
      while (f) {
        const t = f[0]!;
        if (t === FRONTEND.TERMINATE) {
          this.close();
          return;
        }
        if (this.localSkipping) {
          if (t === FRONTEND.SYNC) {
            this.queueOut(READY_IDLE);
            this.localSkipping = false;
          }
        } else if (t === FRONTEND.QUERY || t === FRONTEND.FUNCTION_CALL) {
          this.queueOut(err);
          this.queueOut(READY_IDLE);
        } else if (t === FRONTEND.SYNC) {
          this.queueOut(READY_IDLE);
        } else if (t === FRONTEND.PARSE || t === FRONTEND.BIND || t === FRONTEND.DESCRIBE || t === FRONTEND.EXECUTE || t === FRONTEND.CLOSE) {
          this.queueOut(err);
          this.localSkipping = true;
        }
        f = this.reader.readFrame();
      }
    } catch (e) {
      if (e instanceof PgWireError) {
        this.fatal(e.code, e.message);
        return;
      }
      throw e;
    }
    if (this.flushOut()) this.resumeReading();
    else this.socket.pause();
  }

  /** Messages answered without a server connection (the client is idle, between transactions). */
  private local(f: Buffer): boolean {
    const t = f[0]!;
    if (t === FRONTEND.TERMINATE) {
      this.close();
      return true;
    }
    if (this.localSkipping) {
      if (t === FRONTEND.SYNC) {
        this.localSkipping = false;
        this.queueOut(READY_IDLE);
      }
      return true;
    }
    switch (t) {
      case FRONTEND.SYNC:
        this.queueOut(READY_IDLE);
        return true;
      case FRONTEND.FLUSH:
      case FRONTEND.COPY_DATA:
      case FRONTEND.COPY_DONE:
      case FRONTEND.COPY_FAIL:
        // Outside COPY, Postgres ignores copy messages too.
        return true;
      case FRONTEND.CLOSE: {
        // No portal outlives a transaction; a statement is only forgotten (it stays cached on servers).
        const end = cstringEnd(f, 6);
        if (f[5] === 0x53 && end > 6) this.removeStatement(f.toString('utf8', 6, end));
        this.queueOut(CLOSE_COMPLETE);
        return true;
      }
      case FRONTEND.QUERY: {
        const d = this.deallocate(f);
        if (d === undefined) return false;
        this.queueOut(commandComplete(d.tag));
        this.queueOut(READY_IDLE);
        return true;
      }
      case FRONTEND.PARSE: {
        // A named statement the pool already prepared successfully somewhere: register it and answer
        // (it is prepared on the server connection its Bind lands on).
        const nameEnd = cstringEnd(f, 5);
        if (nameEnd === 5) return false;
        const name = f.toString('utf8', 5, nameEnd);
        if (this.stmts.has(name) || this.stmts.size >= MAX_CLIENT_STATEMENTS || this.stmtBytes + f.length > MAX_CLIENT_STATEMENT_BYTES) return false;
        const stmt = this.statement(f, nameEnd);
        if (!this.pool.known.get(stmt.serverName)) return false;
        this.addStatement(name, stmt);
        this.queueOut(PARSE_COMPLETE);
        this.pool.counters.localParses++;
        return true;
      }
      default:
        return false;
    }
  }

  /** A client statement from a named Parse (`nameEnd`: the NUL after its name). */
  private statement(f: Buffer, nameEnd: number): Statement {
    // A copy: the frame may be a view of a large read that must not be kept alive.
    const rest = Buffer.from(f.subarray(nameEnd + 1));
    // Startup parameters (search_path, say) are part of the name: the same text may mean something else.
    const h = createHash('sha1');
    if (this.sig) h.update(this.sig).update('\0');
    const serverName = `xenon_${h.update(rest).digest('base64url').slice(0, 24)}`;
    const textEnd = cstringEnd(f, nameEnd + 1);
    return { serverName, nameBuf: cstring(serverName), rest, session: matches(SESSION_RE, f.toString('latin1', nameEnd + 1, textEnd)) };
  }

  addStatement(name: string, st: Statement): void {
    const old = this.stmts.get(name);
    if (old) this.stmtBytes -= old.rest.length;
    this.stmts.set(name, st);
    this.stmtBytes += st.rest.length;
  }

  removeStatement(name: string): boolean {
    const old = this.stmts.get(name);
    if (!old) return false;
    this.stmtBytes -= old.rest.length;
    return this.stmts.delete(name);
  }

  /** Forgets every statement; returns them (to restore if the DEALLOCATE ALL fails). */
  clearStatements(): Map<string, Statement> {
    const saved = new Map(this.stmts);
    this.stmts.clear();
    this.stmtBytes = 0;
    return saved;
  }

  restoreStatements(saved: Map<string, Statement>): void {
    for (const [name, st] of saved) if (!this.stmts.has(name)) this.addStatement(name, st);
  }

  /**
   * DEALLOCATE of statements this client prepared: forgets them and returns the command tag (and
   * what was forgotten, to restore if the compute refuses it); undefined when not one.
   */
  private deallocate(f: Buffer): { tag: string; name?: string; stmt?: Statement; saved?: Map<string, Statement> } | undefined {
    if (f.length > 300) return undefined;
    // Cheap test first: the first non-blank byte must be a 'd'.
    let i = 5;
    while (i < f.length && (f[i] === 0x20 || (f[i]! >= 0x09 && f[i]! <= 0x0d))) i++;
    if ((f[i]! | 0x20) !== 0x64) return undefined;
    const m = DEALLOCATE_RE.exec(f.toString('utf8', 5, f.length - 1));
    if (!m) return undefined;
    if (m[2] !== undefined && m[2].toLowerCase() === 'all') return { tag: 'DEALLOCATE ALL', saved: this.clearStatements() };
    const name = m[1] !== undefined ? m[1].replaceAll('""', '"') : m[2]!.toLowerCase();
    const stmt = this.stmts.get(name);
    if (!stmt) return undefined;
    this.removeStatement(name);
    return { tag: 'DEALLOCATE', name, stmt };
  }

  // ---- routing to the linked server

  private attach(s: ServerConn): void {
    this.server = s;
    s.client = this;
    s.tailIdle = !s.dirty;
    if (s.sig !== this.sig) this.applyParams(s);
  }

  /** Brings the server's session parameters to what this client asked for at startup. */
  private applyParams(s: ServerConn): void {
    const want = this.opts.params;
    const stmts: string[] = [];
    for (const name of s.applied.keys()) if (!want.has(name)) stmts.push(`RESET ${ident(name)}`);
    const sets: string[] = [];
    for (const [name, value] of want) if (s.applied.get(name) !== value) sets.push(`pg_catalog.set_config(${literal(name)}, ${literal(value)}, false)`);
    if (sets.length) stmts.push(`SELECT ${sets.join(', ')}`);
    s.sig = this.sig;
    s.applied = new Map(want);
    if (!stmts.length) return;
    s.send(query(stmts.join('; ')));
    s.expect(K.QUERY_SKIP, {
      done: (error) => {
        if (!error) return;
        // The server keeps whatever it had: reset it after this transaction; this client goes on with defaults.
        s.dirty = true;
        s.sig = '\0unknown';
        this.opts.params.clear();
        this.pool.logger.info('pooler: startup parameters could not be applied', { error, client: this.id });
        this.queueOut(backend.noticeResponse({ severity: 'WARNING', code: '01000', message: `the pooler could not apply this connection's startup parameters (${error}); server defaults are in effect` }));
      },
    });
  }

  private route(f: Buffer): void {
    const s = this.server!;
    const t = f[0]!;
    if (s.tailIdle && !pipelinable(f)) s.tailIdle = false;
    if (s.skipping && t !== FRONTEND.SYNC && t !== FRONTEND.TERMINATE) {
      // After an error the server ignores everything up to Sync: nothing will be answered.
      s.send(f);
      return;
    }
    switch (t) {
      case FRONTEND.QUERY: {
        const d = this.deallocate(f);
        if (d !== undefined) {
          // A probe that fails as DEALLOCATE would in an aborted transaction (25P02); the statements are then restored.
          s.send(DEALLOCATE_PROBE);
          s.expect(K.QUERY_DEALLOCATE, { tag: d.tag, client: this, clientName: d.name, stmt: d.stmt, removed: true, saved: d.saved });
          return;
        }
        this.sessionCheck(s, f.toString('latin1', 5, f.length - 1));
        s.send(f);
        s.expect(K.QUERY);
        return;
      }
      case FRONTEND.PARSE:
        this.inBatch = true;
        this.parse(s, f);
        return;
      case FRONTEND.BIND:
        this.inBatch = true;
        this.bind(s, f);
        return;
      case FRONTEND.DESCRIBE: {
        this.inBatch = true;
        const end = cstringEnd(f, 6);
        if (f[5] === 0x53) {
          const st = end > 6 ? this.stmts.get(f.toString('utf8', 6, end)) : undefined;
          if (st) {
            this.ensurePrepared(s, st);
            s.send(frame(FRONTEND.DESCRIBE, 'S', st.nameBuf));
          } else {
            s.send(f);
          }
          s.expect(K.DESCRIBE_STATEMENT);
        } else {
          s.send(f);
          s.expect(K.DESCRIBE_PORTAL);
        }
        return;
      }
      case FRONTEND.EXECUTE:
        this.inBatch = true;
        s.send(f);
        s.expect(K.EXECUTE);
        return;
      case FRONTEND.CLOSE: {
        this.inBatch = true;
        const end = cstringEnd(f, 6);
        if (f[5] === 0x53 && end > 6) {
          const name = f.toString('utf8', 6, end);
          const stmt = this.stmts.get(name);
          this.removeStatement(name);
          s.expect(K.CLOSE_FAKE, { client: this, clientName: name, stmt, removed: true });
        } else {
          s.send(f);
          s.expect(K.CLOSE);
        }
        return;
      }
      case FRONTEND.SYNC:
        s.send(f);
        // In COPY FROM STDIN the compute ignores Sync (and Flush): nothing will answer it.
        if (s.copyOpen) return;
        this.inBatch = false;
        s.skipping = false;
        s.expect(K.SYNC);
        return;
      case FRONTEND.FLUSH:
        if (!s.copyOpen) this.inBatch = true;
        s.send(f);
        return;
      case FRONTEND.FUNCTION_CALL:
        // A function called by OID may be anything (pg_advisory_lock, set_config): reset afterwards.
        s.dirty = true;
        s.send(f);
        s.expect(K.QUERY);
        return;
      case FRONTEND.COPY_DATA:
        s.send(f);
        return;
      case FRONTEND.COPY_DONE:
      case FRONTEND.COPY_FAIL:
        s.send(f);
        s.copyEnded();
        return;
      case FRONTEND.TERMINATE:
        this.close();
        return;
    }
  }

  private sessionCheck(s: ServerConn, sql: string): void {
    if (!matches(SESSION_RE, sql)) return;
    // Reset (DISCARD ALL, which also empties the statement cache) before anyone else gets it.
    s.dirty = true;
    // DISCARD ALL / DEALLOCATE ALL drop the client's statements and the compute's, from when they are sent
    // (what follows in the same pipeline must prepare again).
    if (matches(DROP_ALL_RE, sql)) {
      this.clearStatements();
      s.forgetStatements();
    }
  }

  private parse(s: ServerConn, f: Buffer): void {
    const nameEnd = cstringEnd(f, 5);
    const textEnd = cstringEnd(f, nameEnd + 1);
    this.sessionCheck(s, f.toString('latin1', nameEnd + 1, textEnd));
    if (nameEnd === 5) {
      s.send(f);
      s.expect(K.PARSE);
      return;
    }
    const name = f.toString('utf8', 5, nameEnd);
    if (this.stmts.has(name)) {
      s.send(FAILING_PARSE);
      s.expect(K.PARSE_ERROR, { error: ServerConn.duplicateError(name) });
      return;
    }
    if (this.stmts.size >= MAX_CLIENT_STATEMENTS || this.stmtBytes + f.length > MAX_CLIENT_STATEMENT_BYTES) {
      const what = this.stmts.size >= MAX_CLIENT_STATEMENTS ? `${MAX_CLIENT_STATEMENTS} statements` : `${MAX_CLIENT_STATEMENT_BYTES / 1024 / 1024} MiB of statement text`;
      s.send(FAILING_PARSE);
      s.expect(K.PARSE_ERROR, {
        error: backend.errorResponse({ severity: 'ERROR', code: '54000', message: `too many prepared statements on this pooled connection (${what}); close or deallocate some` }),
      });
      return;
    }
    const stmt = this.statement(f, nameEnd);
    const { serverName } = stmt;
    this.addStatement(name, stmt);
    if (s.stmts.get(serverName)) {
      s.expect(K.PARSE_FAKE, { client: this, clientName: name, stmt });
      return;
    }
    s.prepare(stmt, K.PARSE, { serverName, client: this, clientName: name, stmt });
    this.pool.counters.parses++;
  }

  private ensurePrepared(s: ServerConn, st: Statement): void {
    if (s.stmts.get(st.serverName)) return;
    s.prepare(st, K.PARSE_SKIP, { serverName: st.serverName });
    this.pool.counters.injectedParses++;
  }

  private bind(s: ServerConn, f: Buffer): void {
    const portalEnd = cstringEnd(f, 5);
    const nameEnd = cstringEnd(f, portalEnd + 1);
    const st = nameEnd > portalEnd + 1 ? this.stmts.get(f.toString('utf8', portalEnd + 1, nameEnd)) : undefined;
    if (!st) {
      // Unnamed, or a name this client never prepared: the server answers (26000 names it).
      s.send(f);
      s.expect(K.BIND);
      return;
    }
    this.ensurePrepared(s, st);
    if (st.session) s.dirty = true;
    const portal = portalEnd + 1 - 5;
    const tail = f.length - (nameEnd + 1);
    const len = 4 + portal + st.nameBuf.length + tail;
    const b = Buffer.allocUnsafe(len + 1);
    b[0] = FRONTEND.BIND;
    b.writeInt32BE(len, 1);
    f.copy(b, 5, 5, portalEnd + 1);
    st.nameBuf.copy(b, 5 + portal);
    f.copy(b, 5 + portal + st.nameBuf.length, nameEnd + 1);
    s.send(b);
    s.expect(K.BIND);
  }

  // ---- writing

  queueOut(buf: Buffer): void {
    this.out.push(buf);
    this.outBytes += buf.length;
  }

  /** Writes what is queued for the client; false when its socket is full. */
  flushOut(): boolean {
    const n = this.out.length;
    if (n === 0) return true;
    const buf = n === 1 ? this.out[0]! : Buffer.concat(this.out, this.outBytes);
    this.out.length = 0;
    this.outBytes = 0;
    if (this.closed || this.socket.destroyed) return true;
    return this.socket.write(buf);
  }

  /**
   * Reads from the client again unless something still holds it back: a long wait with much
   * buffered, its own socket full (it does not read its answers), or the server's socket full.
   */
  resumeReading(): void {
    const sock = this.socket;
    if (this.closed || !sock.isPaused()) return;
    if (this.waiting && this.reader.buffered > PAUSE_WAITING_AT) return;
    if (sock.writableNeedDrain) return;
    if (this.server && this.server.socket.writableNeedDrain) return;
    sock.resume();
  }

  // ---- ending

  /** The server connection handed back to the pool (the transaction ended). */
  detachServer(): void {
    this.server = null;
    this.inBatch = false;
  }

  /** The server connection died under this client. */
  serverLost(busy: boolean): void {
    this.server = null;
    this.inBatch = false;
    if (busy) this.fatal('PROXY_POOL_SERVER_LOST', 'the connection to the compute was lost; the transaction was rolled back');
  }

  /** Sends a FATAL error and closes. */
  fatal(code: ErrorCode, message?: string): void {
    if (this.closed) return;
    const xe = new XenonError(code, message, message ? { userMessage: message } : {});
    this.pool.metrics.errors.inc({ kind: xe.kind, code: xe.code });
    this.queueOut(backend.errorResponse({ severity: 'FATAL', code: xe.sqlstate, message: xe.userMessage }));
    this.flushOut();
    this.socket.end();
    setTimeout(() => this.socket.destroy(), 1_000).unref();
    this.close();
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.held = null;
    this.out = [];
    this.socket.off('data', this.onData);
    this.socket.on('error', () => {});
    if (this.waiting) {
      this.waiting = false;
      this.pool.forgetWaiter(this);
    }
    const s = this.server;
    this.server = null;
    // Heading a batch, the server goes on to the others' answers; its own are dropped (no transaction to end).
    if (s && !s.followers.length) s.orphaned(this.inBatch, this.opts.orphanDrainMs);
    if (!this.socket.destroyed && !this.socket.writableEnded) this.socket.end();
    this.opts.onClose(this);
  }
}

function ident(name: string): string {
  return `"${name.replaceAll('"', '""')}"`;
}

function literal(value: string): string {
  return `'${value.replaceAll("'", "''")}'`;
}
