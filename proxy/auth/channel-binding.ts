/**
 * tls-server-end-point channel binding (RFC 5929 §4.1), as Postgres and libpq use it for
 * SCRAM-SHA-256-PLUS: the hash of the server's DER certificate, with the hash function of the
 * certificate's signature algorithm — SHA-256 when that is MD5 or SHA-1. Algorithms without a
 * single hash (RSASSA-PSS, EdDSA) have no binding, as in Postgres: PLUS is then not offered.
 */
import { createHash } from 'node:crypto';
import forge from 'node-forge';

/** Signature algorithm OID → the hash the binding uses. */
const SIGNATURE_HASH: Readonly<Record<string, 'sha256' | 'sha384' | 'sha512'>> = {
  '1.2.840.113549.1.1.4': 'sha256', // md5WithRSAEncryption
  '1.2.840.113549.1.1.5': 'sha256', // sha1WithRSAEncryption
  '1.2.840.113549.1.1.11': 'sha256',
  '1.2.840.113549.1.1.12': 'sha384',
  '1.2.840.113549.1.1.13': 'sha512',
  '1.2.840.10045.4.1': 'sha256', // ecdsa-with-SHA1
  '1.2.840.10045.4.3.2': 'sha256',
  '1.2.840.10045.4.3.3': 'sha384',
  '1.2.840.10045.4.3.4': 'sha512',
};

/** The hash function of a DER certificate's signature algorithm, or undefined when there is none. */
export function signatureHash(der: Buffer): 'sha256' | 'sha384' | 'sha512' | undefined {
  try {
    const cert = forge.asn1.fromDer(forge.util.createBuffer(der.toString('binary')));
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm AlgorithmIdentifier, signature }
    const algId = (cert.value as forge.asn1.Asn1[])[1]!;
    const oid = forge.asn1.derToOid((algId.value as forge.asn1.Asn1[])[0]!.value as string);
    return SIGNATURE_HASH[oid];
  } catch {
    return undefined;
  }
}

let last: { der: Buffer; binding: Buffer | undefined } | undefined;

/** The channel-binding data for a server certificate (DER), or undefined when it has none. */
export function tlsServerEndPoint(der: Buffer | undefined): Buffer | undefined {
  if (!der || der.length === 0) return undefined;
  // Every connection presents the same certificate until a reload: keep the last answer.
  if (last && last.der.equals(der)) return last.binding;
  const hash = signatureHash(der);
  const binding = hash ? createHash(hash).update(der).digest() : undefined;
  last = { der: Buffer.from(der), binding };
  return binding;
}
