/**
 * certs/: the local certificate authority (node-forge X.509, ECDSA P-256 keys) and the hot-reloading
 * certificate store the proxy serves TLS from. See DESIGN §3 (state dir, `sslrootcert=<state>/certs/ca.pem`)
 * and §4 (why ECDSA P-256).
 */
export { certPaths, ensureCerts, type CertPaths, type EnsureCertsOptions } from './ensure.ts';
export { CertStore, type CertStoreOptions } from './store.ts';
