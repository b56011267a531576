/** A device's cost counters (DeviceCounters): their names in one place, for the wire and the views. */
import type { DeviceCounters } from './types.ts';

/** Every counter at 0: what a device that has done nothing (or cannot see a cost) reports. */
export const ZERO_COUNTERS: Readonly<DeviceCounters> = Object.freeze({
  messagesWritten: 0,
  batches: 0,
  dmaMapCalls: 0,
  dmaUnmapCalls: 0,
  setMapPushes: 0,
  setMapEntriesPushed: 0,
});

/** The counters' names, complete by construction (the object above must have every key). */
export const COUNTER_KEYS = Object.keys(ZERO_COUNTERS) as readonly (keyof DeviceCounters)[];
