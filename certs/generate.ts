/**
 * ECDSA P-256 certificates built with node-forge.
 *
 * node-forge lays out the X.509 structure (serial, validity, names, extensions) but can only hold and
 * sign RSA keys. So we let forge build the TBSCertificate around a placeholder RSA key, then patch the
 * ASN.1 tree ourselves (RFC 5280 §4.1, RFC 5480, RFC 5758 §3.2):
 *   - SubjectPublicKeyInfo  ← the real EC SPKI from node:crypto,
 *   - signature algorithm   ← ecdsa-with-SHA256 (no parameters), in the TBS and the outer certificate,
 *   - issuer                ← the CA certificate's own subject node (byte-identical name chaining),
 *   - signatureValue        ← node:crypto's DER ECDSA-Sig-Value over the TBS DER, as a BIT STRING.
 * Key identifiers are computed from the EC key (SHA-1 of the public point, RFC 5280 §4.2.1.2 method 1),
 * never from the placeholder.
 */
import { X509Certificate, createHash, createPrivateKey, generateKeyPairSync, randomBytes, sign, type KeyObject } from 'node:crypto';
import forge from 'node-forge';

const { asn1 } = forge;
type Asn1 = forge.asn1.Asn1;

/** ecdsa-with-SHA256 (RFC 5758 §3.2). */
const ECDSA_WITH_SHA256 = '1.2.840.10045.4.3.2';
/** Positions inside TBSCertificate (v3): version, serial, signature, issuer, validity, subject, spki, extensions. */
const TBS = { signature: 2, issuer: 3, spki: 6 } as const;

export const CA_COMMON_NAME = 'Xenon local CA';
export const CA_VALIDITY_DAYS = 3650;
export const SERVER_VALIDITY_DAYS = 397;

/** A PEM certificate and its PKCS#8 PEM private key. */
export interface PemPair {
  certPem: string;
  keyPem: string;
}

// forge helpers that exist at runtime but are missing from @types/node-forge.
const pki = forge.pki as typeof forge.pki & { getTBSCertificate(cert: forge.pki.Certificate): Asn1 };
const fromDer = asn1.fromDer as unknown as (der: string, opts: { decodeBitStrings: boolean }) => Asn1;

/** Placeholder so that forge can serialize a TBS; its SPKI node is replaced before signing. */
const PLACEHOLDER_KEY = forge.pki.setRsaPublicKey(new forge.jsbn.BigInteger('1'), new forge.jsbn.BigInteger('65537'));

const toBin = (b: Buffer): string => b.toString('binary');
const fromBin = (s: string): Buffer => Buffer.from(s, 'binary');
const children = (node: Asn1): Asn1[] => node.value as Asn1[];

function newEcKeyPair(): { publicKey: KeyObject; privateKey: KeyObject } {
  return generateKeyPairSync('ec', { namedCurve: 'prime256v1' });
}

/** The EC SubjectPublicKeyInfo as a forge ASN.1 node (BIT STRINGs kept opaque). */
function spkiNode(publicKey: KeyObject): Asn1 {
  return fromDer(toBin(publicKey.export({ type: 'spki', format: 'der' })), { decodeBitStrings: false });
}

/** SHA-1 of the subjectPublicKey BIT STRING contents (the EC point), without the unused-bits byte. */
function keyIdentifier(publicKey: KeyObject): string {
  const bits = children(spkiNode(publicKey))[1]!.value as string;
  return toBin(createHash('sha1').update(fromBin(bits.slice(1))).digest());
}

function ecdsaAlgorithm(): Asn1 {
  return asn1.create(asn1.Class.UNIVERSAL, asn1.Type.SEQUENCE, true, [
    asn1.create(asn1.Class.UNIVERSAL, asn1.Type.OID, false, asn1.oidToDer(ECDSA_WITH_SHA256).getBytes()),
  ]);
}

/** 128 random bits, positive, minimally encoded (first byte 0x01–0x7f). */
function randomSerialHex(): string {
  const b = randomBytes(16);
  b[0] = b[0]! & 0x7f || 1;
  return b.toString('hex');
}

function toPem(der: Buffer): string {
  const lines = der.toString('base64').match(/.{1,64}/g) ?? [];
  return `-----BEGIN CERTIFICATE-----\n${lines.join('\n')}\n-----END CERTIFICATE-----\n`;
}

interface BuildSpec {
  commonName: string;
  days: number;
  publicKey: KeyObject;
  /** Omit for a self-signed certificate. */
  issuer?: { certPem: string; key: KeyObject };
  /** forge extension objects; key identifiers are added here. */
  extensions: object[];
  /** Signing key when self-signed. */
  selfKey?: KeyObject;
}

function buildCertificate(spec: BuildSpec): string {
  const signer = spec.issuer?.key ?? spec.selfKey!;
  const issuerPublic = spec.issuer ? new X509Certificate(spec.issuer.certPem).publicKey : spec.publicKey;

  const cert = forge.pki.createCertificate();
  cert.publicKey = PLACEHOLDER_KEY;
  cert.siginfo.algorithmOid = ECDSA_WITH_SHA256; // forge emits it with a NULL parameter: replaced below
  cert.serialNumber = randomSerialHex();
  // Backdate a little for clock skew; the validity period itself is exactly `days` long.
  const notBefore = new Date(Date.now() - 5 * 60_000);
  cert.validity.notBefore = notBefore;
  cert.validity.notAfter = new Date(notBefore.getTime() + spec.days * 86_400_000);
  // UTF8String: PrintableString cannot hold the '*' of a wildcard name.
  const subject = [{ name: 'commonName', value: spec.commonName, valueTagClass: asn1.Type.UTF8 as number }];
  cert.setSubject(subject);
  cert.setIssuer(subject); // replaced below by the CA's subject node when not self-signed
  cert.setExtensions([
    ...spec.extensions,
    // Explicit values so forge does not hash the placeholder key.
    {
      name: 'subjectKeyIdentifier',
      value: asn1.create(asn1.Class.UNIVERSAL, asn1.Type.OCTETSTRING, false, keyIdentifier(spec.publicKey)),
    },
    { name: 'authorityKeyIdentifier', keyIdentifier: keyIdentifier(issuerPublic) },
  ]);

  // Patch forge's RSA-shaped TBSCertificate into an ECDSA one.
  const tbs = pki.getTBSCertificate(cert);
  const fields = children(tbs);
  fields[TBS.signature] = ecdsaAlgorithm();
  fields[TBS.spki] = spkiNode(spec.publicKey);
  if (spec.issuer) {
    const caTbs = children(fromDer(toBin(new X509Certificate(spec.issuer.certPem).raw), { decodeBitStrings: false }))[0]!;
    fields[TBS.issuer] = children(caTbs)[5]!; // the CA's subject (its TBS has the [0] version field)
  }
  const tbsDer = fromBin(asn1.toDer(tbs).getBytes());
  const signature = sign('sha256', tbsDer, signer); // DER ECDSA-Sig-Value

  const certificate = asn1.create(asn1.Class.UNIVERSAL, asn1.Type.SEQUENCE, true, [
    tbs,
    ecdsaAlgorithm(),
    asn1.create(asn1.Class.UNIVERSAL, asn1.Type.BITSTRING, false, '\x00' + toBin(signature)),
  ]);
  return toPem(fromBin(asn1.toDer(certificate).getBytes()));
}

const exportKey = (k: KeyObject): string => k.export({ type: 'pkcs8', format: 'pem' }) as string;

/** A self-signed root: CN "Xenon local CA", 10 years, CA:TRUE, keyCertSign + cRLSign. */
export function createCa(): PemPair {
  const { publicKey, privateKey } = newEcKeyPair();
  const certPem = buildCertificate({
    commonName: CA_COMMON_NAME,
    days: CA_VALIDITY_DAYS,
    publicKey,
    selfKey: privateKey,
    extensions: [
      { name: 'basicConstraints', cA: true, critical: true },
      { name: 'keyUsage', keyCertSign: true, cRLSign: true, critical: true },
    ],
  });
  return { certPem, keyPem: exportKey(privateKey) };
}

/** One subjectAltName entry: a DNS name (wildcards allowed) or an IP address. */
export type AltName = { dns: string } | { ip: string };

/** A TLS server certificate signed by `ca`: CN = `commonName`, 397 days, serverAuth, SAN = `altNames`. */
export function createServerCert(ca: PemPair, commonName: string, altNames: AltName[]): PemPair {
  const { publicKey, privateKey } = newEcKeyPair();
  const certPem = buildCertificate({
    commonName,
    days: SERVER_VALIDITY_DAYS,
    publicKey,
    issuer: { certPem: ca.certPem, key: createPrivateKey(ca.keyPem) },
    extensions: [
      { name: 'basicConstraints', cA: false, critical: true },
      { name: 'keyUsage', digitalSignature: true, critical: true },
      { name: 'extKeyUsage', serverAuth: true },
      {
        name: 'subjectAltName',
        altNames: altNames.map((n) => ('dns' in n ? { type: 2, value: n.dns } : { type: 7, ip: n.ip })),
      },
    ],
  });
  return { certPem, keyPem: exportKey(privateKey) };
}
