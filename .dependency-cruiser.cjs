/**
 * The layers, bottom to top. A module may import its own layer and the layers listed as below it;
 * anything else fails `npm run check`. The mains (services/) wire the layers together.
 *
 *   foundation  src/sys, src/uapi, src/iotlb, src/metrics, src/id.ts, src/u64.ts
 *   memory      src/memory                                             registered backing memory
 *   device      src/device                                             kernel and simulated devices
 *   agent       src/agent, src/vhost-user                              the agent's wire and client, vhost-user
 *   core        src/core                                               errors, requests, results, ports
 *   state       src/state                                              the durable desired state
 *   queue       src/queue                                              per-device queues, group commit
 *   api         src/api                                                transport-neutral parse and format
 *   service     src/service                                            the application core
 *   mains       services/                                              processes and transports
 */
const layers = [
  { name: 'foundation', path: '^src/(sys|uapi|iotlb|metrics)/|^src/(id|u64)\\.ts$', below: [] },
  { name: 'memory', path: '^src/memory/', below: ['foundation'] },
  { name: 'device', path: '^src/device/', below: ['memory', 'foundation'] },
  { name: 'agent', path: '^src/(agent|vhost-user)/', below: ['device', 'memory', 'foundation'] },
  { name: 'core', path: '^src/core/', below: ['agent', 'device', 'memory', 'foundation'] },
  { name: 'state', path: '^src/state/', below: ['core', 'memory', 'foundation'] },
  { name: 'queue', path: '^src/queue/', below: ['state', 'core', 'agent', 'foundation'] },
  { name: 'api', path: '^src/api/', below: ['core', 'foundation'] },
  {
    name: 'service',
    path: '^src/service/',
    below: ['queue', 'state', 'core', 'agent', 'device', 'memory', 'foundation'],
  },
];
const pathOf = Object.fromEntries(layers.map((l) => [l.name, l.path]));
const own = (l) => [l.path, ...l.below.map((b) => pathOf[b])].join('|');

module.exports = {
  forbidden: [
    ...layers.map((l) => ({
      name: `layer-${l.name}`,
      comment: `${l.name} may import only ${l.below.length ? l.below.join(', ') : 'nothing of the project'}`,
      severity: 'error',
      from: { path: l.path },
      to: { path: '^(src|services)/', pathNot: own(l) },
    })),
    {
      name: 'src-never-imports-mains',
      comment: 'src/ is wired by the mains; it never imports them',
      severity: 'error',
      from: { path: '^src/' },
      to: { path: '^services/' },
    },
    {
      name: 'no-circular',
      severity: 'error',
      from: { path: '^(src|services)/' },
      to: { circular: true },
    },
  ],
  options: {
    doNotFollow: { path: 'node_modules' },
    parser: 'swc',
    tsPreCompilationDeps: true,
    tsConfig: { fileName: 'tsconfig.json' },
  },
};
