/**
 * Line channels to a QEMU process: the QMP monitor (JSON, one object per line) and the guest
 * agent's virtio-serial port (plain text lines). QEMU connects to us (`server=off` chardevs):
 * the driver listens first, so nothing the guest says is lost to a connect race.
 */
import { createServer, type Server, type Socket } from 'node:net';
import { rm } from 'node:fs/promises';
import { EventEmitter } from 'node:events';

/** A unix socket that accepts exactly one connection (QEMU's) and yields it as lines. */
export class LineChannel extends EventEmitter {
  private server: Server | undefined;
  private socket: Socket | undefined;
  private buf = '';
  private readonly connected: Promise<void>;
  private markConnected!: () => void;

  private constructor(readonly path: string) {
    super();
    this.connected = new Promise((resolve) => (this.markConnected = resolve));
  }

  static async listen(path: string): Promise<LineChannel> {
    await rm(path, { force: true });
    const ch = new LineChannel(path);
    await new Promise<void>((resolve, reject) => {
      ch.server = createServer((s) => ch.accept(s));
      ch.server.once('error', reject);
      ch.server.listen(path, () => resolve());
    });
    return ch;
  }

  private accept(s: Socket): void {
    if (this.socket) {
      s.destroy();
      return;
    }
    this.socket = s;
    s.setEncoding('utf8');
    s.on('data', (d: string) => {
      this.buf += d;
      let i: number;
      while ((i = this.buf.indexOf('\n')) >= 0) {
        const line = this.buf.slice(0, i).replace(/\r$/, '');
        this.buf = this.buf.slice(i + 1);
        if (line) this.emit('line', line);
      }
      if (this.buf.length > 1 << 20) this.buf = ''; // a guest flooding its port: drop, never grow
    });
    s.on('close', () => this.emit('close'));
    s.on('error', () => {});
    this.markConnected();
  }

  /** Resolves once QEMU connected (or rejects after `ms`). */
  waitConnected(ms: number): Promise<void> {
    return Promise.race([
      this.connected,
      new Promise<void>((_, reject) => setTimeout(() => reject(new Error(`QEMU did not connect to ${this.path} in ${ms} ms`)), ms).unref()),
    ]);
  }

  write(line: string): void {
    if (!this.socket || this.socket.destroyed) throw new Error(`${this.path} is not connected`);
    this.socket.write(line + '\n');
  }

  /** The next line that `match` accepts (rejects after `ms`, or when the channel closes). */
  next<T>(match: (line: string) => T | undefined, ms: number, what: string): Promise<T> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => done(new Error(`no ${what} in ${ms} ms`)), ms);
      timer.unref();
      const onLine = (line: string): void => {
        const v = match(line);
        if (v !== undefined) done(undefined, v);
      };
      const onClose = (): void => done(new Error(`the channel closed before ${what}`));
      const done = (err?: Error, v?: T): void => {
        clearTimeout(timer);
        this.off('line', onLine);
        this.off('close', onClose);
        if (err) reject(err);
        else resolve(v as T);
      };
      this.on('line', onLine);
      this.on('close', onClose);
    });
  }

  async close(): Promise<void> {
    this.socket?.destroy();
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
    await rm(this.path, { force: true });
  }
}

interface QmpReply {
  return?: unknown;
  error?: { class: string; desc: string };
  event?: string;
  data?: Record<string, unknown>;
  id?: number;
  QMP?: unknown;
}

/** QMP on a {@link LineChannel}: capabilities negotiation, then commands answered by id. */
export class Qmp extends EventEmitter {
  private nextId = 1;
  private readonly pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();

  constructor(private readonly ch: LineChannel) {
    super();
    ch.on('line', (line: string) => {
      let msg: QmpReply;
      try {
        msg = JSON.parse(line) as QmpReply;
      } catch {
        return;
      }
      if (msg.event) {
        this.emit('event', msg.event, msg.data ?? {});
        return;
      }
      if (typeof msg.id !== 'number') return;
      const p = this.pending.get(msg.id);
      if (!p) return;
      this.pending.delete(msg.id);
      if (msg.error) p.reject(new Error(`QMP: ${msg.error.class}: ${msg.error.desc}`));
      else p.resolve(msg.return);
    });
    ch.on('close', () => {
      for (const p of this.pending.values()) p.reject(new Error('QMP connection closed'));
      this.pending.clear();
    });
  }

  /** Waits for QEMU's greeting and leaves capabilities negotiation mode. */
  async handshake(ms: number): Promise<void> {
    await this.ch.waitConnected(ms);
    await this.ch.next((l) => (l.includes('"QMP"') ? true : undefined), ms, 'QMP greeting');
    await this.execute('qmp_capabilities', undefined, ms);
  }

  execute<T = unknown>(command: string, args?: Record<string, unknown>, ms = 10_000): Promise<T> {
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`QMP ${command}: no answer in ${ms} ms`));
      }, ms);
      timer.unref();
      this.pending.set(id, {
        resolve: (v) => { clearTimeout(timer); resolve(v as T); },
        reject: (e) => { clearTimeout(timer); reject(e); },
      });
      try {
        this.ch.write(JSON.stringify(args ? { execute: command, arguments: args, id } : { execute: command, id }));
      } catch (err) {
        this.pending.delete(id);
        clearTimeout(timer);
        reject(err as Error);
      }
    });
  }

  /** The next event named `name` whose data `match` accepts. */
  event(name: string, match: (data: Record<string, unknown>) => boolean, ms: number): Promise<Record<string, unknown>> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => { this.off('event', on); reject(new Error(`no QMP event ${name} in ${ms} ms`)); }, ms);
      timer.unref();
      const on = (ev: string, data: Record<string, unknown>): void => {
        if (ev !== name || !match(data)) return;
        clearTimeout(timer);
        this.off('event', on);
        resolve(data);
      };
      this.on('event', on);
    });
  }
}
