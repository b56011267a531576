/**
 * Guest-side client of vduse-daemon (test/kernel/vduse-daemon.c): the device's view of the
 * IOTLB. One request line per connection on the unix socket $VDUSE_CTL, one answer line.
 *
 * VDUSE learns of table changes only through set_map (one VDUSE_UPDATE_IOTLB per push), and in
 * 6.12 has no .reset_map: after the owner closes the vhost-vdpa fd the device keeps showing the
 * last table it was given until a new owner pushes again (see guest-smoke.c sync_device()).
 * /init runs that push after every step, so each step starts with an empty device table.
 */
import net from 'node:net';

export interface DeviceStats {
  /** VDUSE_UPDATE_IOTLB requests so far (one per set_map). */
  updates: number;
  setStatus: number;
  getVqState: number;
  /** Last virtio status byte the kernel set. */
  status: number;
}

export interface DeviceMapEntry {
  start: bigint;
  last: bigint;
  /** `0x<byte>` for a perm other than RO/WO/RW: the kernel stores whatever it is given. */
  perm: 'ro' | 'wo' | 'rw' | `0x${string}`;
  /** Offset of `start` in the backing file. */
  offset: bigint;
}

export class VduseClient {
  constructor(readonly socketPath = process.env.VDUSE_CTL ?? '/run/vduse-daemon.sock') {}

  async stats(): Promise<DeviceStats> {
    const fields = new Map(
      (await this.ask('stats')).split(' ').map((kv) => kv.split('=') as [string, string | undefined]),
    );
    const num = (k: string) => Number(fields.get(k));
    return {
      updates: num('updates'),
      setStatus: num('set_status'),
      getVqState: num('get_vq_state'),
      status: num('status'),
    };
  }

  /** The device's IOTLB, walked with VDUSE_IOTLB_GET_FD. */
  async map(): Promise<DeviceMapEntry[]> {
    const [, ...entries] = (await this.ask('map')).split(' ');
    return entries.map((e) => {
      const m = e.match(/^(0x[0-9a-f]+)-(0x[0-9a-f]+):(ro|wo|rw|0x[0-9a-f]+):(0x[0-9a-f]+)$/);
      if (!m) throw new Error(`vduse-daemon: bad map entry ${e}`);
      return {
        start: BigInt(m[1]!),
        last: BigInt(m[2]!),
        perm: m[3] as DeviceMapEntry['perm'],
        offset: BigInt(m[4]!),
      };
    });
  }

  /** What the device reads at `iova` (at most 4096 bytes; RO/RW entries only). */
  async read(iova: bigint, length: number): Promise<Buffer> {
    return Buffer.from(await this.ask(`read 0x${iova.toString(16)} ${length}`), 'hex');
  }

  /** The device writes `data` at `iova` (at most 4096 bytes; WO/RW entries only). */
  async write(iova: bigint, data: Uint8Array): Promise<void> {
    await this.ask(`write 0x${iova.toString(16)} ${Buffer.from(data).toString('hex')}`);
  }

  /**
   * Like `write` but without the daemon's own perm check: what the fd VDUSE_IOTLB_GET_FD hands
   * out allows (it is the owner's file, writable whatever the entry's perm).
   */
  async poke(iova: bigint, data: Uint8Array): Promise<void> {
    await this.ask(`poke 0x${iova.toString(16)} ${Buffer.from(data).toString('hex')}`);
  }

  /** Sends one request; resolves with the answer after "ok " or rejects with the daemon's error. */
  ask(request: string): Promise<string> {
    return new Promise((resolve, reject) => {
      let answer = '';
      const sock = net.createConnection(this.socketPath, () => sock.end(`${request}\n`));
      sock.setEncoding('utf8');
      sock.on('data', (d: string) => {
        answer += d;
      });
      sock.on('error', reject);
      sock.on('close', () => {
        const line = answer.trim();
        if (line === 'ok' || line.startsWith('ok ')) resolve(line.slice(3));
        else reject(new Error(`vduse-daemon: ${request}: ${line || 'no answer'}`));
      });
    });
  }
}
