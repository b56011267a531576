/**
 * The command that runs test/grpcurl.ts: a bundle of it (bin/checkout-bundle.js), so that each call
 * is a plain node start rather than a TypeScript compile.
 */
// @ts-expect-error: plain JavaScript, no declarations
import { checkoutBundle } from '../../bin/checkout-bundle.js';

let bundle: Promise<string> | undefined;

export async function grpcurlCommand(): Promise<string[]> {
  bundle ??= (checkoutBundle as (entry: string, name: string) => Promise<string>)(
    'test/grpcurl.ts',
    'vdpa-mapd-test-grpcurl.mjs',
  );
  return [process.execPath, await bundle];
}
