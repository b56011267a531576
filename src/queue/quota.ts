/**
 * Per-device quotas: the most bytes and entries a device may have mapped (all address spaces
 * together). They are checked inside the device's queue, unit by unit, against the working tables
 * every earlier unit produced, so concurrent requests cannot overshoot together, and a refused
 * unit never reaches the agent.
 *
 * A unit is refused only when it leaves the device over a limit *and* grows that quantity: a
 * device already over its quota (the quota was lowered) can always shrink.
 */
import type { AddressSpaces } from '../iotlb/address-spaces.ts';
import { hex } from '../iotlb/types.ts';
import { ServiceError } from '../core/errors.ts';

export interface Quota {
  /** Most mapped bytes; undefined: no limit. */
  maxBytes?: bigint;
  /** Most mapped entries; undefined: no limit. */
  maxEntries?: number;
}

export interface QuotaConfig {
  /** Every device's quota... */
  defaults: Quota;
  /** ...unless overridden here, limit by limit. */
  devices: ReadonlyMap<string, Quota>;
}

export interface Usage {
  bytes: bigint;
  entries: number;
}

export function usageOf(spaces: AddressSpaces): Usage {
  return { bytes: spaces.bytes, entries: spaces.count };
}

/** The quota of `device`: its overrides on top of the defaults. */
export function quotaOf(config: QuotaConfig | undefined, device: string): Quota {
  if (config === undefined) return {};
  return { ...config.defaults, ...config.devices.get(device) };
}

/**
 * QUOTA_EXCEEDED when going from `before` to `after` breaks a limit of `quota`; `field` names the
 * batch op at fault, if any.
 */
export function quotaError(
  device: string,
  quota: Quota,
  before: Usage,
  after: Usage,
  field?: string,
): ServiceError | undefined {
  const at = field === undefined ? '' : `${field}: `;
  const details = field === undefined ? {} : { field };
  if (quota.maxBytes !== undefined && after.bytes > quota.maxBytes && after.bytes > before.bytes) {
    return new ServiceError(
      'QUOTA_EXCEEDED',
      `${at}device ${device}: quota max-bytes ${hex(quota.maxBytes)} exceeded: ${hex(after.bytes)} bytes would be mapped (${hex(before.bytes)} now)`,
      details,
    );
  }
  if (quota.maxEntries !== undefined && after.entries > quota.maxEntries && after.entries > before.entries) {
    return new ServiceError(
      'QUOTA_EXCEEDED',
      `${at}device ${device}: quota max-entries ${quota.maxEntries} exceeded: ${after.entries} entries would be mapped (${before.entries} now)`,
      details,
    );
  }
  return undefined;
}
