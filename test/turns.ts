/**
 * Whether a turn of bulk work paused (src/sys/next-turn.ts bulkTurn), read from the order of
 * events rather than from a clock: a turn that is the next one resolves before a setImmediate
 * queued after it, a paused one after it.
 */
export async function paused(turn: () => Promise<void>): Promise<boolean> {
  const pending = turn();
  let immediateRan = false;
  setImmediate(() => {
    immediateRan = true;
  });
  await pending;
  return immediateRan;
}
