/**
 * The real transport: an open `/dev/vhost-vdpa-N`. ioctls go through koffi (src/sys/libc.ts);
 * each message is one `write()` of exactly 72 bytes (vhost_chr_write_iter reads one message per
 * call and returns its size), made on the device's own writer thread (fd-writer.ts): a write the
 * kernel blocks in (pinning, set_map) stalls this device only. ioctls (set-up, suspend, resume,
 * reset) stay on the calling thread.
 */
import fs from 'node:fs';
import { ioctlBuffer, ioctlNoArg, SysError } from '../sys/libc.ts';
import { VHOST_MSG_SIZE } from '../uapi/message.ts';
import { FdWriteError, FdWriter } from './fd-writer.ts';
import { TransportError, type VhostTransport } from './transport.ts';

/**
 * Opens `node` O_RDWR (libuv adds O_CLOEXEC). vhost_vdpa_open allows one opener at a time: a
 * second open gets EBUSY.
 */
export function openVhostVdpaFd(node: string): VhostTransport {
  let fd: number;
  try {
    fd = fs.openSync(node, fs.constants.O_RDWR);
  } catch (e) {
    throw asTransportError(e, `open ${node}`);
  }
  return new VhostVdpaFd(fd, node);
}

class VhostVdpaFd implements VhostTransport {
  private fd: number | undefined;
  /** Started on the first write: an fd used only for ioctls needs no thread. */
  private writer: FdWriter | undefined;

  constructor(
    fd: number,
    private readonly node: string,
  ) {
    this.fd = fd;
  }

  ioctl(request: number, arg?: Uint8Array): void {
    const fd = this.open();
    try {
      if (arg === undefined) ioctlNoArg(fd, request);
      else ioctlBuffer(fd, request, arg);
    } catch (e) {
      throw asTransportError(e, `${this.node}: ioctl 0x${request.toString(16)}`);
    }
  }

  async write(msg: Uint8Array): Promise<void> {
    const fd = this.open();
    this.writer ??= new FdWriter(fd);
    let n: number;
    try {
      n = await this.writer.write(msg);
    } catch (e) {
      throw asTransportError(e, `${this.node}: write`);
    }
    if (n !== VHOST_MSG_SIZE) {
      throw new TransportError(
        'EIO',
        `${this.node}: short write of a vhost message (${n} of ${msg.byteLength})`,
      );
    }
  }

  close(): void {
    const fd = this.fd;
    this.fd = undefined;
    this.writer?.stop();
    if (fd !== undefined) fs.closeSync(fd);
  }

  private open(): number {
    if (this.fd === undefined) throw new TransportError('EBADF', `${this.node} is closed`);
    return this.fd;
  }
}

/**
 * SysError (koffi) has the errno name in `.errno`; Node's fs errors have it in `.code`. libuv names
 * errno 95 ENOTSUP; the kernel returns it as EOPNOTSUPP (the same value on Linux), the name the
 * rest of src/device and the simulator use (seen on Linux 6.12: docs/kernel-notes.md).
 */
function asTransportError(e: unknown, what: string): TransportError {
  const kernelName = (name: string) => (name === 'ENOTSUP' ? 'EOPNOTSUPP' : name);
  if (e instanceof SysError) return new TransportError(kernelName(e.errno), `${what}: ${e.message}`);
  if (e instanceof FdWriteError) return new TransportError(kernelName(e.code), `${what}: ${e.code}`);
  const code = (e as NodeJS.ErrnoException | undefined)?.code;
  if (typeof code === 'string') return new TransportError(kernelName(code), `${what}: ${code}`);
  throw e;
}
