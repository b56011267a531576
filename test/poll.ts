/** Polls `check` every `everyMs` until it holds; fails once `budgetMs` has passed (a tier's budget). */
export async function pollUntil(
  budgetMs: number,
  everyMs: number,
  what: string,
  check: () => boolean | Promise<boolean>,
): Promise<void> {
  const deadline = performance.now() + budgetMs;
  while (performance.now() < deadline) {
    if (await check()) return;
    await new Promise((r) => setTimeout(r, everyMs));
  }
  throw new Error(`timed out waiting for ${what}`);
}
