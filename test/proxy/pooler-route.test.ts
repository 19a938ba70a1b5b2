// The pooler's codec pieces: the zero-copy backend framer (split at every byte offset, byte by
// byte, bad lengths), FrontendReader.readFrame with per-type limits, the message builders, and
// how startup parameters and options become per-client settings.
import t from 'tap';
import { BackendScanner, frame, FRONTEND, frontendLimit, FrontendReader, isRoutable, PgWireError, SMALL_MESSAGE_LIMIT, commandComplete, closeMessage, query } from '../../proxy/pgwire/index.ts';
import { startupSettings } from '../../proxy/pooler/index.ts';

const msgs = [
  frame(0x31), // ParseComplete, empty body
  frame(0x54, Buffer.alloc(40, 7)), // RowDescription-ish
  frame(0x44, Buffer.from('data row body')),
  frame(0x44, Buffer.alloc(70_000, 1)), // larger than one read
  frame(0x43, 'SELECT 1\0'),
  frame(0x5a, 'I'),
];
const stream = Buffer.concat(msgs);

/** The messages framed from `chunks`, and nothing left over (an incomplete tail shows as 'partial'). */
function scan(chunks: Buffer[]): string[] {
  const s = new BackendScanner();
  const out: string[] = [];
  for (const c of chunks) s.push(c, (type, buf, start, end) => out.push(`${type}:${buf.subarray(start, end).toString('base64')}`));
  if (s.buffered) out.push('partial');
  return out;
}
const expected = msgs.map((m) => `${m[0]}:${m.toString('base64')}`);

t.test('backend framer: whole, split at every offset, byte by byte', async (t) => {
  t.same(scan([stream]), expected);
  let bad = 0;
  for (let i = 1; i < stream.length; i += i < 200 || i > stream.length - 200 ? 1 : 97) {
    const got = scan([stream.subarray(0, i), stream.subarray(i)]);
    if (JSON.stringify(got) !== JSON.stringify(expected)) bad++;
  }
  t.equal(bad, 0, 'every two-way split frames the same messages');
  const small = Buffer.concat(msgs.filter((m) => m.length < 1000));
  const bytes = [...small].map((b) => Buffer.from([b]));
  t.same(scan(bytes), msgs.filter((m) => m.length < 1000).map((m) => `${m[0]}:${m.toString('base64')}`), 'one byte at a time');
  t.throws(() => new BackendScanner().push(Buffer.from([0x5a, 0, 0, 0, 3, 0x49]), () => {}), PgWireError, 'a length below 4');
});

t.test('readFrame: views, per-type limits', async (t) => {
  const r = new FrontendReader({ maxMessage: 100_000, limitFor: (ty) => frontendLimit(ty, 100_000) });
  const q = query('SELECT 1');
  r.push(Buffer.concat([q, frame(FRONTEND.SYNC)]));
  t.same(r.readFrame(), q);
  t.same(r.readFrame(), frame(FRONTEND.SYNC));
  t.equal(r.readFrame(), null);
  // A Query may be large; a Sync may not.
  r.push(frame(FRONTEND.QUERY, Buffer.alloc(50_000, 0x20), '\0'));
  t.equal(r.readFrame()!.length, 50_006);
  const big = Buffer.alloc(5);
  big[0] = FRONTEND.SYNC;
  big.writeInt32BE(SMALL_MESSAGE_LIMIT + 5, 1);
  r.push(big);
  t.throws(() => r.readFrame(), { code: 'PROXY_MESSAGE_TOO_LARGE' }, 'detected from the header alone');
  t.ok(isRoutable(FRONTEND.PARSE) && isRoutable(FRONTEND.COPY_FAIL));
  t.notOk(isRoutable(0x70), "'p' (password) is not a message after startup");
});

t.test('builders', async (t) => {
  t.same(commandComplete('DEALLOCATE'), Buffer.from('C\0\0\0\x0fDEALLOCATE\0', 'latin1'));
  t.same(closeMessage('S', 'x'), Buffer.from('C\0\0\0\x07Sx\0', 'latin1'));
});

t.test('startup settings', async (t) => {
  const s = startupSettings({ user: 'u', database: 'd', application_name: 'app', options: '-c search_path=a,b --statement-timeout=5s -cwork_mem=1MB -d 2 -c x\\ y=z\\ w' });
  t.same([...s], [['application_name', 'app'], ['search_path', 'a,b'], ['statement_timeout', '5s'], ['work_mem', '1MB'], ['x y', 'z w']]);
  t.same([...startupSettings({ user: 'u', database: 'd' })], []);
});
