/**
 * Gives the event loop back: resolves on the next turn, after the I/O that is waiting. Long loops
 * of one device (an apply, a plan, a protobuf coding of 65,536 ops) call it every slice, so that
 * every other device's requests wait at most one slice, never the whole table.
 */
export const nextTurn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));
