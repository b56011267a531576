import { pollUntil } from '../poll.ts';

/**
 * The unit tier's budget, and the only bound of its waits: a busy machine makes a step slower,
 * never wrong, so no wait is tighter than the whole tier may take (about a minute on a quiet
 * 2-core machine; with the integration tier's 30 minutes and the kernel tier's 40, a hang still
 * ends inside CI's 90).
 */
export const TIER_BUDGET_MS = 10 * 60_000;

/** Polls `check` every 5 ms until it holds; fails once the tier's budget has passed. */
export function until(what: string, check: () => boolean | Promise<boolean>): Promise<void> {
  return pollUntil(TIER_BUDGET_MS, 5, what, check);
}
