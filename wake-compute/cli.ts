/**
 * `xenon`: the local Xenon CLI (lives with the control plane, as neon_local does in Neon).
 *
 *   xenon up [--json] [--verbose]     start everything; print the default connection string
 *   xenon certs                       create (if needed) and print the certificate paths
 *   xenon status                      projects and endpoints with their state
 *   xenon project create [--name N]   a new project (branch main, endpoint, role, database)
 *   xenon endpoint list|start|suspend|stop|get <endpoint> [--project P]
 *   xenon endpoint set <endpoint> [--min-cu X] [--max-cu Y] [--cu N|auto]
 *   xenon branch create [--parent main] [--name N] [--lsn X | --at <time>] [--project P]
 *   xenon branch list [--project P]   the branch tree
 *   xenon branch delete <branch> [--project P]
 *   xenon connstr                     the default endpoint's connection string and psql line
 *   xenon vm build-image [--dir D]    build the qemu driver's compute image (root)
 *
 * State lives in $XENON_STATE_DIR (default ~/.xenon). Other commands find the running stack
 * through <state>/stack.json, or $XENON_API_URL.
 */
import { join } from 'node:path';
import { certPaths, ensureCerts } from '../certs/index.ts';
import { ConfigError, parseFlags, stateDirFrom } from '../lib/config.ts';
import { XenonError } from '../lib/errors.ts';
import { ControlPlaneClient } from './client.ts';
import { readJson, startStack, writeJsonAtomic } from './stack.ts';

interface Credentials {
  project_id: string;
  endpoint_id: string;
  role: string;
  password: string;
  database: string;
}

interface StackFile {
  api_url: string;
  proxy_port: number;
  metrics_url: string;
  domain: string;
  pid: number;
}

const env = process.env;
const [command = 'help', ...rest] = process.argv.slice(2);
const sub = rest[0] && !rest[0].startsWith('--') ? rest[0] : undefined;
const positional = rest.filter((a) => !a.startsWith('--'));
const flags = parseFlags(rest);
const stateDir = stateDirFrom(env);
const domain = (flags.get('domain') ?? env.XENON_DOMAIN ?? 'localtest.me').toLowerCase();
const credentialsPath = join(stateDir, 'credentials.json');
const stackPath = join(stateDir, 'stack.json');

export function connectionStrings(c: Credentials, d: string, port: number, caCert: string): { uri: string; psql: string } {
  const host = `${c.endpoint_id}.${d}`;
  const uri = `postgresql://${encodeURIComponent(c.role)}:${encodeURIComponent(c.password)}@${host}:${port}/${encodeURIComponent(c.database)}?sslmode=verify-full&sslrootcert=${caCert}`;
  const psql = `psql "host=${host} hostaddr=127.0.0.1 port=${port} user=${c.role} password=${c.password} dbname=${c.database} sslmode=verify-full sslrootcert=${caCert}"`;
  return { uri, psql };
}

async function api(): Promise<ControlPlaneClient> {
  const url = env.XENON_API_URL ?? (await readJson<StackFile>(stackPath))?.api_url;
  if (!url) throw new Error(`no running stack found (${stackPath} is missing): run 'xenon up' first, or set XENON_API_URL`);
  return new ControlPlaneClient(url);
}

async function up(): Promise<void> {
  const json = flags.has('json');
  const say = (m: string): void => { if (!json) process.stderr.write(`xenon: ${m}\n`); };
  say(`state in ${stateDir}`);
  const stack = await startStack({ stateDir, domain, env, echoLogs: flags.has('verbose'), log: say });
  const client = new ControlPlaneClient(stack.apiUrl);
  let creds = await readJson<Credentials>(credentialsPath);
  if (creds) {
    try {
      await client.getEndpoint(creds.endpoint_id);
    } catch (err) {
      if (!(err instanceof XenonError && err.code === 'CP_ENDPOINT_NOT_FOUND')) throw err;
      say(`the saved endpoint ${creds.endpoint_id} no longer exists; creating a new default project`);
      creds = undefined;
    }
  }
  if (!creds) {
    const p = await client.createProject({ name: 'default' });
    creds = { project_id: p.project.id, endpoint_id: p.endpoint.id, role: p.role.name, password: p.password, database: p.database.name };
    await writeJsonAtomic(credentialsPath, creds);
    say(`created project ${p.project.id} with endpoint ${p.endpoint.id}`);
  }
  await writeJsonAtomic(stackPath, { api_url: stack.apiUrl, proxy_port: stack.proxyPort, metrics_url: stack.metricsUrl, domain, pid: process.pid } satisfies StackFile);
  const { uri, psql } = connectionStrings(creds, domain, stack.proxyPort, stack.caCert);
  if (json) {
    process.stdout.write(JSON.stringify({ ready: 'xenon', connection_string: uri, psql, api_url: stack.apiUrl, proxy_port: stack.proxyPort, http_port: stack.httpPort, metrics_url: stack.metricsUrl, ca_cert: stack.caCert, safekeepers: stack.safekeepers, pageserver_url: stack.pageserverUrl, state_dir: stateDir, ...creds }) + '\n');
  } else {
    process.stdout.write(
      `\nXenon is up.\n\n  Connection string:\n    ${uri}\n\n  psql (no DNS needed):\n    ${psql}\n\n` +
      `  Edge runtimes (@neondatabase/serverless): WebSocket and SQL over HTTP on port ${stack.httpPort}\n` +
      `    neonConfig.wsProxy = (host) => \`\${host}:${stack.httpPort}/v2\`; fetchEndpoint: (host) => \`https://\${host}:${stack.httpPort}/sql\`\n\n` +
      `  Control plane API: ${stack.apiUrl}   Proxy metrics: ${stack.metricsUrl}\n` +
      (stack.safekeepers.length ? `  Safekeepers (WAL quorum ${Math.floor(stack.safekeepers.length / 2) + 1} of ${stack.safekeepers.length}): ${stack.safekeepers.map((k) => `${k.id} ${k.url}`).join(', ')}\n` : '  Safekeepers: none (XENON_SAFEKEEPER_COUNT=0): commits are only as durable as the compute\'s disk\n') +
      `  Pageserver (images, branches, point-in-time restore): ${stack.pageserverUrl}   xenon branch create --help\n` +
      `  Logs: ${join(stateDir, 'logs')}\n\nPress Ctrl-C to stop.\n`,
    );
  }
  let stopping = false;
  const shutdown = async (why: string, code: number): Promise<void> => {
    if (stopping) return;
    stopping = true;
    say(`${why}: stopping…`);
    await stack.stop().catch((err: Error) => say(`stop failed: ${err.message}`));
    say('stopped');
    process.exit(code);
  };
  process.on('SIGINT', () => void shutdown('interrupted', 0));
  process.on('SIGTERM', () => void shutdown('terminated', 0));
  // Run by another program (tests, a supervisor) that may die without a signal to us: stop
  // when our stdin closes, rather than leave the stack and its computes behind.
  if (env.XENON_EXIT_WITH_PARENT === '1') {
    process.stdin.on('end', () => void shutdown('parent exited', 0));
    process.stdin.on('error', () => void shutdown('parent exited', 0));
    process.stdin.resume();
  }
  void stack.died.then((name) => shutdown(`${name} exited unexpectedly (see ${join(stateDir, 'logs', `${name}.log`)})`, 1));
}

async function main(): Promise<void> {
  switch (command) {
    case 'up':
      return up();
    case 'certs': {
      const p = await ensureCerts({ stateDir, domain });
      process.stdout.write(`CA certificate:      ${p.caCert}\nServer certificate:  ${p.cert}\nServer key:          ${p.key}\nDomain:              *.${domain}\n`);
      return;
    }
    case 'connstr': {
      const creds = await readJson<Credentials>(credentialsPath);
      const s = await readJson<StackFile>(stackPath);
      if (!creds) throw new Error(`no default project yet (${credentialsPath}): run 'xenon up' first`);
      const { uri, psql } = connectionStrings(creds, s?.domain ?? domain, s?.proxy_port ?? 4432, certPaths(stateDir).caCert);
      process.stdout.write(`${uri}\n${psql}\n`);
      return;
    }
    case 'status': {
      const c = await api();
      for (const p of (await c.listProjects()).projects) {
        process.stdout.write(`project ${p.id} (${p.name})\n`);
        for (const e of (await c.listEndpoints(p.id)).endpoints) {
          process.stdout.write(`  ${e.id}  ${e.state.padEnd(9)}  connections=${e.connections}  suspend=${e.suspend_timeout_seconds}s stop=${e.stop_timeout_seconds}s  ${e.host}\n`);
        }
      }
      return;
    }
    case 'project': {
      if (sub !== 'create') break;
      const c = await api();
      const p = await c.createProject({ name: flags.get('name') });
      const s = await readJson<StackFile>(stackPath);
      const { uri, psql } = connectionStrings(
        { project_id: p.project.id, endpoint_id: p.endpoint.id, role: p.role.name, password: p.password, database: p.database.name },
        s?.domain ?? domain, s?.proxy_port ?? 4432, certPaths(stateDir).caCert,
      );
      process.stdout.write(`project ${p.project.id}, endpoint ${p.endpoint.id}\n${uri}\n${psql}\n`);
      return;
    }
    case 'endpoint': {
      const c = await api();
      const id = positional[1];
      if (sub === 'list') {
        const projects = flags.get('project') ? [flags.get('project')!] : (await c.listProjects()).projects.map((p) => p.id);
        for (const p of projects) for (const e of (await c.listEndpoints(p)).endpoints) process.stdout.write(`${e.id}\t${e.state}\t${e.connections}\t${e.host}\n`);
        return;
      }
      if (!id) break;
      if (sub === 'get') { process.stdout.write(JSON.stringify((await c.getEndpoint(id)).endpoint, null, 2) + '\n'); return; }
      if (sub === 'wal') {
        const w = await c.endpointWal(id);
        process.stdout.write(`timeline ${w.timeline_id}, generation ${w.generation}, quorum ${w.quorum} of ${w.safekeepers.length}\n`);
        for (const k of w.safekeepers) {
          process.stdout.write(k.reachable
            ? `${k.id}\t${k.url}\tflush ${k.flush_lsn}\tgeneration ${k.generation}\t${k.streaming ? 'streaming' : 'not streaming'}\tlag ${k.lag_bytes} B${k.last_error ? `\t${k.last_error}` : ''}\n`
            : `${k.id}\t${k.url}\tunreachable: ${k.error}\n`);
        }
        return;
      }
      if (sub === 'set') {
        // --cu N pins the size (applied live), --cu auto hands it back to the autoscaler.
        const num = (name: string): number | undefined => {
          const v = flags.get(name);
          if (v === undefined) return undefined;
          const n = Number(v);
          if (!Number.isFinite(n)) throw new Error(`--${name} must be a number of compute units (e.g. 0.25, 1, 2)`);
          return n;
        };
        const cuFlag = flags.get('cu');
        const req = {
          ...(num('min-cu') !== undefined ? { min_cu: num('min-cu')! } : {}),
          ...(num('max-cu') !== undefined ? { max_cu: num('max-cu')! } : {}),
          ...(cuFlag === 'auto' ? { cu: null } : cuFlag !== undefined ? { cu: num('cu')! } : {}),
        };
        if (!Object.keys(req).length) throw new Error('xenon endpoint set <endpoint> [--min-cu X] [--max-cu Y] [--cu N|auto]');
        const e = (await c.updateEndpoint(id, req)).endpoint;
        process.stdout.write(`${e.id} ${e.state} cu=${e.cu ?? '-'} (min ${e.min_cu ?? '-'}, max ${e.max_cu ?? '-'}, ${e.cu_override === null ? 'autoscaled' : `pinned at ${e.cu_override}`})\n`);
        return;
      }
      if (sub === 'start' || sub === 'suspend' || sub === 'stop') {
        const e = (await c.endpointAction(id, sub)).endpoint;
        process.stdout.write(`${e.id} ${e.state}\n`);
        return;
      }
      break;
    }
    case 'branch': {
      const c = await api();
      const project = flags.get('project') ?? (await readJson<Credentials>(credentialsPath))?.project_id;
      if (!project) throw new Error('which project? pass --project P (no default project yet: run \'xenon up\')');
      if (sub === 'create') {
        const lsn = flags.get('lsn');
        const at = flags.get('at');
        const t0 = Date.now();
        const r = await c.createBranch(project, {
          ...(flags.get('parent') ? { parent: flags.get('parent') } : {}),
          ...(flags.get('name') ? { name: flags.get('name') } : {}),
          ...(lsn ? { parent_lsn: lsn } : {}),
          ...(at ? { parent_timestamp: at } : {}),
        });
        const s = await readJson<StackFile>(stackPath);
        process.stdout.write(`branch ${r.branch.name} (${r.branch.id}) from ${r.branch.parent_id} at ${r.branch.parent_lsn}${r.branch.parent_time ? ` (as of ${r.branch.parent_time})` : ''} in ${Date.now() - t0} ms\n`);
        if (r.endpoint) {
          process.stdout.write(`endpoint ${r.endpoint.id}; the parent's roles and passwords apply:\n`);
          for (const u of r.connection_uris) {
            const host = r.endpoint.host;
            process.stdout.write(`${u.uri}&sslrootcert=${certPaths(stateDir).caCert}\n`);
            process.stdout.write(`psql "host=${host} hostaddr=127.0.0.1 port=${s?.proxy_port ?? 4432} user=${u.role} dbname=${u.database} sslmode=verify-full sslrootcert=${certPaths(stateDir).caCert}"\n`);
          }
        }
        return;
      }
      if (sub === 'list') {
        const branches = (await c.listBranches(project)).branches;
        const endpoints = (await c.listEndpoints(project)).endpoints;
        const print = (parent: string | null, depth: number): void => {
          for (const b of branches.filter((x) => x.parent_id === parent)) {
            const eps = endpoints.filter((e) => e.branch_id === b.id).map((e) => `${e.id} ${e.state}`).join(', ');
            process.stdout.write(`${'  '.repeat(depth)}${depth ? '└ ' : ''}${b.name} (${b.id})${b.parent_lsn ? ` at ${b.parent_lsn}` : ''}${eps ? `  [${eps}]` : ''}\n`);
            print(b.id, depth + 1);
          }
        };
        print(null, 0);
        return;
      }
      if (sub === 'delete' && positional[1]) {
        const r = await c.deleteBranch(project, positional[1]);
        process.stdout.write(`deleted branch ${r.branch.name} (${r.branch.id})\n`);
        return;
      }
      break;
    }
    case 'vm': {
      if (sub === 'build-image') {
        const { ensureImage, defaultImageDir } = await import('../vm/index.ts');
        const { createLogger } = await import('../lib/logger.ts');
        const dir = flags.get('dir') ?? defaultImageDir(env, stateDir);
        const image = await ensureImage({ dir, logger: createLogger({ service: 'xenon', level: flags.has('verbose') ? 'debug' : 'info' }), ...(env.XENON_VM_MIRROR ? { mirror: env.XENON_VM_MIRROR } : {}) });
        process.stdout.write(`compute image: ${image.dir}
${JSON.stringify(image.manifest, null, 2)}
`);
        return;
      }
      break;
    }
    case 'help':
    case '--help':
    case '-h':
      process.stdout.write(USAGE);
      return;
  }
  process.stderr.write(`xenon: unknown command '${[command, sub].filter(Boolean).join(' ')}'\n\n${USAGE}`);
  process.exit(2);
}

const USAGE = `usage: xenon <command>
  up [--json] [--verbose]            start the local stack; print the default connection string
  certs                              create (if needed) and print the TLS certificate paths
  connstr                            print the default endpoint's connection string and psql line
  status                             projects and endpoints with their state
  project create [--name N]          create a project (branch main, endpoint, role, database)
  endpoint list [--project P]        list endpoints
  endpoint get|start|suspend|stop <endpoint>
  endpoint wal <endpoint>            where the endpoint's WAL stands on each safekeeper
  endpoint set <endpoint> [--min-cu X] [--max-cu Y] [--cu N|auto]
                                     compute size in CU (1 CU = 1 vCPU + 4 GiB): autoscaling
                                     bounds, or a size pinned by hand (live), or back to auto
  branch create [--parent B] [--name N] [--lsn X | --at TIME] [--project P]
                                     a branch (with an endpoint) of B as of an LSN or a time
                                     (point-in-time restore), or of B's latest state
  branch list [--project P]          the branch tree with endpoints
  branch delete <branch> [--project P]
  vm build-image [--dir D]           build the qemu driver's compute image (needs root, debootstrap;
                                     default dir: $XENON_VM_IMAGE_DIR or <state>/vm-image)
State: $XENON_STATE_DIR (default ~/.xenon).
`;

main().catch((err: Error) => {
  const msg = err instanceof XenonError ? err.userMessage : err instanceof ConfigError ? `configuration: ${err.message}` : err.message;
  process.stderr.write(`xenon: ${msg}\n`);
  process.exit(1);
});
