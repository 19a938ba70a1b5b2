/**
 * A `fetch` over node:https that trusts a given CA (Node's global fetch takes no CA option), for
 * pointing `neonConfig.fetchFunction` at the proxy's TLS port. String bodies only (what the
 * driver sends). With `keepAlive`, connections are reused (the bench).
 */
import { Agent, request } from 'node:https';

export function fetchWithCa(ca: string, o: { keepAlive?: boolean } = {}): typeof fetch {
  const agent = new Agent({ keepAlive: o.keepAlive ?? false, ca });
  return (async (input: string | URL | Request, init?: RequestInit) => {
    const body = typeof init?.body === 'string' ? init.body : '';
    const headers = Object.fromEntries(new Headers(init?.headers).entries());
    return new Promise<Response>((resolve, reject) => {
      const options = { method: init?.method ?? 'GET', agent, headers: { ...headers, 'content-length': Buffer.byteLength(body) }, servername: 'localtest.me' };
      const req = request(new URL(String(input)), options, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (d: Buffer) => chunks.push(d));
        res.on('end', () => resolve(new Response(Buffer.concat(chunks), { status: res.statusCode ?? 500, headers: res.headers as Record<string, string> })));
      });
      req.on('error', reject);
      req.end(body);
    });
  }) as typeof fetch;
}
