/** Certificates for TLS tests, made by openssl in a test's directory (EC P-256, valid one day). */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

/** Paths of PEM files. */
export interface Pki {
  ca: string;
  serverCert: string;
  serverKey: string;
  clientCert: string;
  clientKey: string;
  /** A CA that signed nothing the server trusts or presents. */
  rogueCa: string;
  /** A client certificate the rogue CA signed. */
  rogueCert: string;
  rogueKey: string;
}

/** A CA, a server certificate for 127.0.0.1 and localhost and a client one it signed; a client one it did not. */
export function makePki(dir: string): Pki {
  const run = (...args: string[]) => execFileSync('openssl', args, { cwd: dir, stdio: 'pipe' });
  const key = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
  const selfSigned = (name: string) =>
    run(
      'req',
      '-x509',
      ...key,
      '-keyout',
      `${name}.key`,
      '-out',
      `${name}.crt`,
      '-subj',
      `/CN=${name}`,
      '-days',
      '1',
    );
  const signed = (name: string, ca: string, ext: string) => {
    run('req', '-new', ...key, '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${name}`);
    fs.writeFileSync(path.join(dir, `${name}.ext`), ext);
    run(
      'x509',
      '-req',
      '-in',
      `${name}.csr`,
      '-CA',
      `${ca}.crt`,
      '-CAkey',
      `${ca}.key`,
      '-out',
      `${name}.crt`,
      '-days',
      '1',
      '-extfile',
      `${name}.ext`,
    );
  };
  selfSigned('ca');
  selfSigned('rogue-ca');
  signed('server', 'ca', 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n');
  signed('client', 'ca', 'extendedKeyUsage=clientAuth\n');
  signed('rogue', 'rogue-ca', 'extendedKeyUsage=clientAuth\n');
  const file = (f: string) => path.join(dir, f);
  return {
    ca: file('ca.crt'),
    serverCert: file('server.crt'),
    serverKey: file('server.key'),
    clientCert: file('client.crt'),
    clientKey: file('client.key'),
    rogueCa: file('rogue-ca.crt'),
    rogueCert: file('rogue.crt'),
    rogueKey: file('rogue.key'),
  };
}
