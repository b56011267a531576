/**
 * Gives the event loop back: resolves on the next turn, after the I/O that is waiting. Long loops
 * of one device (an apply, a plan, a protobuf coding of 65,536 ops) give it back every slice
 * (bulkTurn), so that every other device's requests wait at most one slice, never the whole table.
 */
export const nextTurn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

/**
 * Bulk work gives way to small requests. Slices alone keep another device's request from waiting
 * for a whole table, but not from sharing the 2 cores with it: a long loop that takes every turn
 * it is given keeps its thread (the API server's, the agent's) busy, and a small map, which needs
 * both to answer, waited for a core. Beside a 65,536-region table on vdpa0, small maps on vdpa1
 * had a p99 of 2.5-4.0x their idle one. So while small requests (at most SMALL_REQUEST_BYTES: a
 * map, an unmap, a short batch, a read; nothing that needs slices) arrive on a thread, the bulk
 * work of that thread pauses GIVE_WAY_PAUSE_MS at each of its turns, until none has arrived for
 * GIVE_WAY_WINDOW_MS: it runs at about a ninth of its speed and they find a core free. The p99
 * above fell to 1.2-1.4x, the table taking about seven times as long while they kept coming
 * (bench head-of-line); pauses of 1 ms read 1.4-1.9x, and 2.1-2.3x in two runs of fourteen, at
 * four times as long. This is a lower CPU priority for bulk work, kept by the thread itself: an
 * unprivileged process can lower a thread's priority but not raise it again (RLIMIT_NICE), so the
 * kernel's cannot be given to one request and taken back.
 * Only requests that arrived after the bulk work began count: a client's own small requests
 * before its table (or its 256-op apply) do not slow it, nor do large requests: two devices' big
 * tables run at full speed beside each other. The window outlasts a small request's round trip
 * under load (its p99 was about 10 ms), so a stream of them keeps the bulk work paused between
 * two arrivals.
 */
export const SMALL_REQUEST_BYTES = 4096;
const GIVE_WAY_WINDOW_MS = 20;
const GIVE_WAY_PAUSE_MS = 2;

/** When small requests arrived, and so whether bulk work gives way to them. */
export class GiveWay {
  private smallAt = Number.NEGATIVE_INFINITY;

  constructor(private readonly windowMs = GIVE_WAY_WINDOW_MS) {}

  /** A request of `bytes` arrived. */
  arrived(bytes: number, now = performance.now()): void {
    if (bytes <= SMALL_REQUEST_BYTES) this.smallAt = now;
  }

  /** Whether a small request arrived at `since` (performance.now()) or later. */
  arrivedSince(since: number): boolean {
    return this.smallAt >= since;
  }

  /** Whether bulk work begun at `since` gives way at a turn taken `now`. */
  givesWay(since: number, now = performance.now()): boolean {
    return this.arrivedSince(since) && now - this.smallAt < this.windowMs;
  }
}

/** This thread's (module state: one per thread). */
const arrivals = new GiveWay();

/** A request of `bytes` arrived on this thread: a small one makes bulk work give way for a while. */
export function requestArrived(bytes: number): void {
  arrivals.arrived(bytes);
}

/**
 * Whether a small request arrived on this thread at `since` (performance.now()) or later: what the
 * transports counted, with no window (the tests of the counting read it).
 */
export function smallRequestSince(since: number): boolean {
  return arrivals.arrivedSince(since);
}

/**
 * The turn between two slices of bulk work begun at `since` (performance.now()): the next one, or,
 * while small requests that arrived after `since` keep arriving, one after a pause.
 */
export function bulkTurn(since: number, giveWay: GiveWay = arrivals): Promise<void> {
  if (!giveWay.givesWay(since)) return nextTurn();
  return new Promise((resolve) => setTimeout(resolve, GIVE_WAY_PAUSE_MS));
}

/**
 * Work done between two turns given back by a TimeSlices loop. One small request takes several
 * turns (request, queue, agent answer, journal, answer), and each may wait out a slice of a big
 * table. Beside a 65,536-region REST table, alternating runs: with 1 ms slices small maps had a
 * p99 of 24-29 ms and a p50 of 3.9-5.7 ms, with 0.25 ms 18-24 ms and 4.0-4.3 ms, and the table
 * took about a tenth longer.
 */
export const SLICE_MS = 0.25;

/**
 * Slices a long loop by time rather than by count, so that a slice stays about SLICE_MS however
 * much one item costs and however loaded the machine is: call `due()` between items (cheap: it
 * reads the clock every few calls) and `await next()` when it says so.
 */
export class TimeSlices {
  private readonly began = performance.now();
  private until = this.began + SLICE_MS;
  private calls = 0;

  /** `clockEvery`: calls of due() per look at the clock (1 when one item is a lot of work). */
  constructor(private readonly clockEvery = 16) {}

  /** Whether this slice's time is spent. */
  due(): boolean {
    if (++this.calls % this.clockEvery !== 0) return false;
    return performance.now() >= this.until;
  }

  /** Gives the event loop back (bulkTurn); the next slice starts after it. */
  async next(): Promise<void> {
    await bulkTurn(this.began);
    this.until = performance.now() + SLICE_MS;
  }
}

/** `items.map(fn)`, giving the event loop back every SLICE_MS. */
export async function mapInTimeSlices<T, U>(
  items: readonly T[],
  fn: (item: T, i: number) => U,
): Promise<U[]> {
  const out: U[] = new Array(items.length);
  const slices = new TimeSlices();
  for (let i = 0; i < items.length; i++) {
    if (slices.due()) await slices.next();
    out[i] = fn(items[i]!, i);
  }
  return out;
}

/** `fn` on every item in order, giving the event loop back every SLICE_MS. */
export async function forEachInTimeSlices<T>(
  items: Iterable<T>,
  fn: (item: T, i: number) => void,
): Promise<void> {
  const slices = new TimeSlices();
  let i = 0;
  for (const item of items) {
    if (slices.due()) await slices.next();
    fn(item, i++);
  }
}

/**
 * A long computation written once as a generator that yields wherever it may pause (every few
 * dozen items): `runWhole` runs it in one piece, `runInTimeSlices` gives the event loop back every
 * SLICE_MS at those points. Both return what it returns.
 */
export function runWhole<R>(steps: Generator<unknown, R>): R {
  let step = steps.next();
  while (!step.done) step = steps.next();
  return step.value;
}

export async function runInTimeSlices<R>(steps: Generator<unknown, R>): Promise<R> {
  const slices = new TimeSlices();
  let step = steps.next();
  while (!step.done) {
    if (slices.due()) await slices.next();
    step = steps.next();
  }
  return step.value;
}
