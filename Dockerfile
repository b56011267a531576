# syntax=docker/dockerfile:1
#
# One image for both processes of vdpa-mapd, compiled to JavaScript, production dependencies only.
#
#   docker build -t vdpa-mapd:0.1.0 .
#
# API server (the default command): unprivileged, user vdpa-mapd (uid 10001), REST/metrics/health on
# 8080, gRPC on 50051, desired state in /var/lib/vdpa-mapd/api.
#
# Agent: `node services/agent/main.js ...` in the same image. It must run as the same uid as the API
# server (its socket is 0600: only its own user may connect) and needs, and is given, no more than:
#   - read/write access to the /dev/vhost-vdpa-* nodes it opens: the device in the container
#     (docker --device; in Kubernetes a privileged container, for the device cgroup only) and file
#     permissions for its user (the udev rule deploy/systemd/70-vdpa-mapd.rules gives the nodes group
#     vdpa-mapd-dev, mode 0660: pass that group with --group-add);
#   - /dev/hugepages (hugetlbfs), if guest memory lives there, with its files readable and writable by
#     uid or gid 10001;
#   - for pinned (PA-mode, hardware) devices, an RLIMIT_MEMLOCK covering the guest memory it maps
#     (docker run --ulimit memlock=-1:-1). The kernel charges pinned pages to that limit and vhost-vdpa
#     does not let CAP_IPC_LOCK bypass it, so the limit, not the capability, is what counts; VA-mode
#     parents (VDUSE) pin nothing.
# No capability, no root. Run it without the health check (it serves no HTTP):
#
#   docker run -d --name vdpa-mapd-agent --no-healthcheck --device /dev/vhost-vdpa-0 \
#     --group-add "$(getent group vdpa-mapd-dev | cut -d: -f3)" --ulimit memlock=-1:-1 \
#     -v vdpa-mapd-run:/run/vdpa-mapd -v vdpa-mapd-state:/var/lib/vdpa-mapd \
#     vdpa-mapd:0.1.0 node services/agent/main.js --device kernel:auto \
#     --socket /run/vdpa-mapd/agent/agent.sock --state-dir /var/lib/vdpa-mapd/agent
#   docker run -d --name vdpa-mapd-api -p 8080:8080 -p 50051:50051 \
#     -v vdpa-mapd-run:/run/vdpa-mapd -v vdpa-mapd-state:/var/lib/vdpa-mapd vdpa-mapd:0.1.0

ARG NODE_IMAGE=node:20-bookworm-slim

# Compile TypeScript to dist/ (with proto/, bin/ and package.json laid out as in the source tree).
FROM ${NODE_IMAGE} AS build
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json tsconfig.build.json ./
COPY proto ./proto
COPY bin ./bin
COPY src ./src
COPY services ./services
RUN npm run build

# Production dependencies only (koffi ships its native builds in the package: nothing compiles).
FROM ${NODE_IMAGE} AS deps
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund

FROM ${NODE_IMAGE}
RUN groupadd --system --gid 10001 vdpa-mapd \
  && useradd --system --uid 10001 --gid vdpa-mapd --no-create-home --home-dir /var/lib/vdpa-mapd \
    --shell /usr/sbin/nologin vdpa-mapd \
  && install -d -o vdpa-mapd -g vdpa-mapd -m 0700 /var/lib/vdpa-mapd /run/vdpa-mapd
WORKDIR /app
COPY --from=deps /app/node_modules ./node_modules
COPY --from=build /src/dist ./
RUN ln -s /app/bin/vdpactl.js /usr/local/bin/vdpactl
ENV NODE_ENV=production
USER 10001:10001
EXPOSE 8080 50051
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:8080/healthz').then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]
CMD ["node", "services/api/main.js", "--rest-listen", "0.0.0.0:8080", "--grpc-listen", "0.0.0.0:50051", "--agent-socket", "/run/vdpa-mapd/agent/agent.sock", "--state-dir", "/var/lib/vdpa-mapd/api"]
