/**
 * vdpactl's command line: the command table (words, arguments, options, help) and its parser.
 * Every option is declared once for node:util parseArgs; each command then accepts only its own.
 */
import { parseArgs } from 'node:util';
import { EXIT_CODES_HELP } from './exit-codes.ts';
import { commandLineProblem } from './failures.ts';
import { type TlsOptions, tlsOptions } from './tls.ts';
import { positiveArg, UsageError } from './values.ts';

export const DEFAULT_SERVER = '127.0.0.1:50051';
const DEFAULT_TIMEOUT_S = 30;

const GLOBAL_OPTIONS = {
  server: { type: 'string' },
  token: { type: 'string' },
  'tls-ca': { type: 'string' },
  'tls-cert': { type: 'string' },
  'tls-key': { type: 'string' },
  'tls-server-name': { type: 'string' },
  json: { type: 'boolean' },
  timeout: { type: 'string' },
  help: { type: 'boolean', short: 'h' },
} as const;

const COMMAND_OPTIONS = {
  iova: { type: 'string' },
  size: { type: 'string' },
  memory: { type: 'string' },
  offset: { type: 'string' },
  perm: { type: 'string' },
  asid: { type: 'string' },
  exact: { type: 'boolean' },
  'request-id': { type: 'string' },
  file: { type: 'string', short: 'f' },
  'dry-run': { type: 'boolean' },
  summary: { type: 'boolean' },
  path: { type: 'string' },
  count: { type: 'string' },
} as const;

export type CommandOption = keyof typeof COMMAND_OPTIONS;

export interface CommandSpec {
  /** The command's words, e.g. `mappings map`. */
  name: string;
  /** Positional arguments; a trailing `?` marks an optional one. */
  args: readonly string[];
  options: readonly CommandOption[];
  /** Options that must be given. */
  required?: readonly CommandOption[];
  synopsis: string;
  summary: string;
}

export const COMMANDS: readonly CommandSpec[] = [
  {
    name: 'devices',
    args: ['DEVICE?'],
    options: [],
    synopsis: 'devices [DEVICE]',
    summary: 'list the devices, or show one',
  },
  {
    name: 'mappings list',
    args: ['DEVICE'],
    options: ['asid'],
    synopsis: 'mappings list DEVICE [--asid N]',
    summary: "the device's mappings (desired state), by asid then iova",
  },
  {
    name: 'mappings map',
    args: ['DEVICE'],
    options: ['iova', 'size', 'memory', 'offset', 'perm', 'asid', 'request-id'],
    required: ['iova', 'size', 'memory'],
    synopsis:
      'mappings map DEVICE --iova A --size S --memory ID [--offset O] [--perm ro|wo|rw] [--asid N] [--request-id ID]',
    summary: 'map [iova, iova+size) to the memory at offset',
  },
  {
    name: 'mappings unmap',
    args: ['DEVICE'],
    options: ['iova', 'size', 'asid', 'exact', 'request-id'],
    required: ['iova', 'size'],
    synopsis: 'mappings unmap DEVICE --iova A --size S [--asid N] [--exact] [--request-id ID]',
    summary: 'unmap the range (mappings it covers in part are split, unless --exact)',
  },
  {
    name: 'memtable apply',
    args: ['DEVICE'],
    options: ['file', 'dry-run', 'summary', 'request-id'],
    required: ['file'],
    synopsis: 'memtable apply DEVICE -f TABLE.json [--dry-run] [--summary] [--request-id ID]',
    summary: 'make the address space hold exactly the regions of the file (- for stdin)',
  },
  {
    name: 'memory list',
    args: [],
    options: [],
    synopsis: 'memory list',
    summary: 'the backing memory the agent holds',
  },
  {
    name: 'memory register',
    args: ['ID'],
    options: ['size', 'path'],
    synopsis: 'memory register ID (--size S | --path FILE)',
    summary: 'create memory of size bytes, or open a file under the allowed roots',
  },
  {
    name: 'memory release',
    args: ['ID'],
    options: [],
    synopsis: 'memory release ID',
    summary: 'unregister memory (refused while a device maps it)',
  },
  {
    name: 'watch',
    args: ['DEVICE?'],
    options: ['count'],
    synopsis: 'watch [DEVICE] [--count N]',
    summary: 'print every applied change as it happens, until Ctrl-C or N events',
  },
];

export const USAGE = `usage: vdpactl [global options] COMMAND [arguments]

commands:
${COMMANDS.map((c) => `  ${c.synopsis}\n      ${c.summary}`).join('\n')}

global options:
  --server HOST:PORT   gRPC address of the API server (VDPA_MAPD_SERVER; default ${DEFAULT_SERVER})
  --token TOKEN        sent as "authorization: Bearer TOKEN" (VDPA_MAPD_TOKEN)
  --tls-ca FILE        verify the server's certificate against this PEM CA bundle (VDPA_MAPD_TLS_CA)
  --tls-cert FILE      PEM client certificate for mTLS, with --tls-key (VDPA_MAPD_TLS_CERT)
  --tls-key FILE       PEM private key of --tls-cert (VDPA_MAPD_TLS_KEY)
  --tls-server-name NAME
                       the name the server's certificate must carry, if not the host of --server
                       (VDPA_MAPD_TLS_SERVER_NAME)
  --json               print the answer as JSON (watch: one event per line) instead of a table
  --timeout SECONDS    deadline of each call (default ${DEFAULT_TIMEOUT_S}; watch has none)
  -h, --help

Any --tls-* option turns TLS on; without --tls-ca the server is verified against Node's default CAs.

u64 values (iova, size, offset) are decimal, 0x hex, or with a K/M/G/T suffix: 1048576 = 0x100000 = 1M.
The memtable file is the REST body of PUT /v1/devices/DEVICE/memtable: decimal or 0x hex, no suffix.
--request-id ID makes map, unmap and memtable apply safe to retry: a retry gets the first answer.

${EXIT_CODES_HELP}`;

export interface Invocation {
  command: CommandSpec;
  /** Positional arguments by name (without the `?`). */
  args: Record<string, string | undefined>;
  options: Partial<Record<CommandOption, string | boolean>>;
  server: string;
  token: string | undefined;
  /** Undefined: plaintext. */
  tls: TlsOptions | undefined;
  json: boolean;
  timeoutMs: number;
}

function findCommand(positionals: readonly string[]): CommandSpec {
  const matches = COMMANDS.filter((c) => c.name.split(' ').every((word, i) => positionals[i] === word));
  const command = matches.sort((a, b) => b.name.length - a.name.length)[0];
  if (command === undefined) {
    const given = positionals.join(' ');
    throw new UsageError(given === '' ? 'no command given' : `unknown command "${given}"`);
  }
  return command;
}

/** Parses argv (without node and the script); returns null for --help. Throws UsageError. */
export function parseInvocation(argv: readonly string[], env: NodeJS.ProcessEnv): Invocation | null {
  let parsed: ReturnType<typeof parse>;
  try {
    parsed = parse(argv);
  } catch (e) {
    throw new UsageError(
      commandLineProblem(e as Error, Object.keys({ ...GLOBAL_OPTIONS, ...COMMAND_OPTIONS })),
    );
  }
  const { values, positionals, tokens } = parsed;
  if (values.help) return null;

  const command = findCommand(positionals);
  const given = positionals.slice(command.name.split(' ').length);
  const optional = command.args.filter((a) => a.endsWith('?')).length;
  if (given.length < command.args.length - optional || given.length > command.args.length)
    throw new UsageError(`usage: vdpactl ${command.synopsis}`);

  for (const token of tokens) {
    if (token.kind !== 'option' || token.name in GLOBAL_OPTIONS) continue;
    if (!command.options.includes(token.name as CommandOption))
      throw new UsageError(`${command.name} takes no option --${token.name}`);
  }
  for (const name of command.required ?? []) {
    if (values[name] === undefined) throw new UsageError(`${command.name} needs --${name}`);
  }

  const options: Invocation['options'] = {};
  for (const name of command.options) {
    if (values[name] !== undefined) options[name] = values[name];
  }
  return {
    command,
    args: Object.fromEntries(command.args.map((a, i) => [a.replace(/\?$/, ''), given[i]])),
    options,
    server: values.server ?? (env.VDPA_MAPD_SERVER || DEFAULT_SERVER),
    token: values.token ?? (env.VDPA_MAPD_TOKEN || undefined),
    tls: tlsOptions(
      {
        ca: values['tls-ca'],
        cert: values['tls-cert'],
        key: values['tls-key'],
        serverName: values['tls-server-name'],
      },
      env,
    ),
    json: values.json === true,
    timeoutMs:
      1000 *
      (values.timeout === undefined ? DEFAULT_TIMEOUT_S : positiveArg(values.timeout, '--timeout', true)),
  };
}

function parse(argv: readonly string[]) {
  return parseArgs({
    args: [...argv],
    options: { ...GLOBAL_OPTIONS, ...COMMAND_OPTIONS },
    allowPositionals: true,
    strict: true,
    tokens: true,
  });
}
