/** Typed client of the control plane's `/v1` API (used by the proxy, the CLI and tests). */
import { callJson } from '../lib/http.ts';
import type * as api from './api.ts';
import { XenonError } from '../lib/errors.ts';

export class ControlPlaneClient implements api.ControlPlaneApi {
  constructor(
    readonly baseUrl: string,
    private readonly opts: { timeoutMs?: number; wakeTimeoutMs?: number } = {},
  ) {}

  private call<T>(method: string, path: string, body?: unknown, timeoutMs?: number): Promise<T> {
    return callJson<T>(this.baseUrl, method, path, body, { timeoutMs: timeoutMs ?? this.opts.timeoutMs ?? 10_000 });
  }

  async getEndpointAccess(endpoint: string, role: string): Promise<api.EndpointAccess | null> {
    try {
      return await this.call<api.EndpointAccess>('GET', `/v1/proxy/endpoints/${encodeURIComponent(endpoint)}/access?role=${encodeURIComponent(role)}`);
    } catch (err) {
      if (err instanceof XenonError && err.code === 'CP_ENDPOINT_NOT_FOUND') return null;
      throw err;
    }
  }

  wakeCompute(endpoint: string): Promise<api.ComputeInfo> {
    return this.call('POST', `/v1/proxy/endpoints/${encodeURIComponent(endpoint)}/wake`, {}, this.opts.wakeTimeoutMs ?? 60_000);
  }

  reportConnections(report: api.ConnectionReport): Promise<api.ConnectionReportResponse> {
    return this.call('POST', '/v1/proxy/connections', report);
  }

  // ---- console API
  listProjects(): Promise<{ projects: api.Project[] }> {
    return this.call('GET', '/v1/projects');
  }
  createProject(req: api.CreateProjectRequest = {}): Promise<api.CreateProjectResponse> {
    return this.call('POST', '/v1/projects', req, 120_000);
  }
  getProject(id: string): Promise<{ project: api.Project }> {
    return this.call('GET', `/v1/projects/${encodeURIComponent(id)}`);
  }
  updateProject(id: string, req: api.UpdateProjectRequest): Promise<{ project: api.Project }> {
    return this.call('PATCH', `/v1/projects/${encodeURIComponent(id)}`, req);
  }
  deleteProject(id: string): Promise<{ project: api.Project }> {
    return this.call('DELETE', `/v1/projects/${encodeURIComponent(id)}`, undefined, 120_000);
  }
  listBranches(project: string): Promise<{ branches: api.Branch[] }> {
    return this.call('GET', `/v1/projects/${encodeURIComponent(project)}/branches`);
  }
  createBranch(project: string, req: api.CreateBranchRequest = {}): Promise<api.CreateBranchResponse> {
    return this.call('POST', `/v1/projects/${encodeURIComponent(project)}/branches`, req, 60_000);
  }
  deleteBranch(project: string, branch: string): Promise<{ branch: api.Branch }> {
    return this.call('DELETE', `/v1/projects/${encodeURIComponent(project)}/branches/${encodeURIComponent(branch)}`, undefined, 120_000);
  }
  listEndpoints(project: string): Promise<{ endpoints: api.Endpoint[] }> {
    return this.call('GET', `/v1/projects/${encodeURIComponent(project)}/endpoints`);
  }
  createEndpoint(project: string, req: api.CreateEndpointRequest): Promise<{ endpoint: api.Endpoint }> {
    return this.call('POST', `/v1/projects/${encodeURIComponent(project)}/endpoints`, req);
  }
  getEndpoint(id: string): Promise<{ endpoint: api.Endpoint }> {
    return this.call('GET', `/v1/endpoints/${encodeURIComponent(id)}`);
  }
  updateEndpoint(id: string, req: api.UpdateEndpointRequest): Promise<{ endpoint: api.Endpoint }> {
    return this.call('PATCH', `/v1/endpoints/${encodeURIComponent(id)}`, req);
  }
  endpointAction(id: string, action: 'start' | 'suspend' | 'stop'): Promise<{ endpoint: api.Endpoint }> {
    return this.call('POST', `/v1/endpoints/${encodeURIComponent(id)}/${action}`, {}, 120_000);
  }
  endpointWal(id: string): Promise<api.WalStatus> {
    return this.call('GET', `/v1/endpoints/${encodeURIComponent(id)}/wal`);
  }
  endpointEvents(id: string): Promise<{ events: api.LifecycleEvent[] }> {
    return this.call('GET', `/v1/endpoints/${encodeURIComponent(id)}/events`);
  }
  createRole(project: string, branch: string, req: api.CreateRoleRequest): Promise<{ role: api.Role; password: string }> {
    return this.call('POST', `/v1/projects/${encodeURIComponent(project)}/branches/${encodeURIComponent(branch)}/roles`, req, 60_000);
  }
  listRoles(project: string, branch: string): Promise<{ roles: api.Role[] }> {
    return this.call('GET', `/v1/projects/${encodeURIComponent(project)}/branches/${encodeURIComponent(branch)}/roles`);
  }
  createDatabase(project: string, branch: string, req: api.CreateDatabaseRequest): Promise<{ database: api.Database }> {
    return this.call('POST', `/v1/projects/${encodeURIComponent(project)}/branches/${encodeURIComponent(branch)}/databases`, req, 60_000);
  }
  listDatabases(project: string, branch: string): Promise<{ databases: api.Database[] }> {
    return this.call('GET', `/v1/projects/${encodeURIComponent(project)}/branches/${encodeURIComponent(branch)}/databases`);
  }
}
