/**
 * What /proc/self tells about this process's memory: its vmas (/proc/self/maps) and the pages
 * pinned for long-term DMA (`VmPin` in /proc/self/status, which is mm->pinned_vm: what
 * vhost_vdpa_pa_map charges and RLIMIT_MEMLOCK limits).
 */
import fs from 'node:fs';

/** One line of /proc/<pid>/maps: `[start, end)` and its permissions. */
export interface Vma {
  start: bigint;
  end: bigint;
  read: boolean;
  write: boolean;
  shared: boolean;
}

const MAPS_LINE = /^([0-9a-f]+)-([0-9a-f]+) ([r-])([w-])[x-]([ps])/;

/** Parses the text of /proc/<pid>/maps; lines it does not understand are skipped. */
export function parseMaps(text: string): Vma[] {
  const vmas: Vma[] = [];
  for (const line of text.split('\n')) {
    const m = MAPS_LINE.exec(line);
    if (!m) continue;
    vmas.push({
      start: BigInt(`0x${m[1]}`),
      end: BigInt(`0x${m[2]}`),
      read: m[3] === 'r',
      write: m[4] === 'w',
      shared: m[5] === 's',
    });
  }
  return vmas;
}

/** This process's vmas, in address order. */
export function ownVmas(): Vma[] {
  return parseMaps(fs.readFileSync('/proc/self/maps', 'utf8'));
}

/**
 * `VmPin:` of /proc/<pid>/status in bytes (the kernel prints kB), or undefined when the line is
 * missing (kernels before 4.9).
 */
export function parseVmPin(status: string): bigint | undefined {
  const m = /^VmPin:\s+(\d+) kB$/m.exec(status);
  return m ? BigInt(m[1]!) * 1024n : undefined;
}

/** This process's pinned bytes (VmPin), or undefined when the kernel does not report it. */
export function ownVmPin(statusFile = '/proc/self/status'): bigint | undefined {
  return parseVmPin(fs.readFileSync(statusFile, 'utf8'));
}
