#!/bin/busybox sh
# /init of the kernel-tier VM (packed into the initramfs by build-vm.sh).
#
# Loads the vhost-vDPA modules, mounts the host's /usr, the project tree and the job
# folder over virtio-9p, then runs the steps listed in /job/steps, one parent kind after
# the other: for each kind it creates that kind's vDPA device (bound to vhost_vdpa as
# /dev/vhost-vdpa-0), runs the kind's steps and deletes the device again. It prints
#   VDPA-MAPD-KIND: <kind> READY|FAIL ...   one per kind
#   VDPA-MAPD-STEP: <name> PASS|FAIL ...    one per step
#   VDPA-MAPD-KERNEL-TIER: PASS | FAIL <reason>
# then powers off. /job/steps has one step a line: <kind><TAB><name><TAB><sh command>, the
# steps of a kind together. Kinds (docs/kernel-notes.md):
#   vduse          VDUSE (vduse-daemon): VA mode, set_map
#   vp-vdpa        vp_vdpa on QEMU's virtio-net-pci behind intel-iommu: PA mode, platform IOMMU
#   sim-dma-pa     vdpa_sim batch_mapping=0 use_va=0: dma_map per entry, PA mode
#   sim-dma-va     vdpa_sim batch_mapping=0 use_va=1: dma_map per entry, VA mode
#   sim-setmap-pa  vdpa_sim batch_mapping=1 use_va=0: set_map, PA mode
#   sim-setmap-va  vdpa_sim batch_mapping=1 use_va=1: set_map, VA mode
#   vduse-blk      VDUSE with QEMU's own device: qemu-storage-daemon's vduse-blk export of
#                  /job/vduse-blk.img (the host checks the image after the run)
#   vp-vdpa-blk    vp_vdpa on QEMU's virtio-blk-pci behind intel-iommu, backed by the host's
#                  image (run-vm.ts)
# No step has a time limit of its own: the host bounds the whole run.
#
# One API server (services/api/main.ts, bundled) runs for the whole boot, started here before
# the first kind: the steps that use it start their own agent on $VDPA_MAPD_AGENT_SOCKET, and it
# reconciles each new agent, as after an agent restart. Its verdict is the `boot-api` step:
# it must stop with exit 0 at the end.
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /usr /job
/bin/busybox --install -s /bin
export PATH=/opt/vdpa-mapd/bin:/bin:/usr/local/bin:/usr/bin:/usr/sbin
export HOME=/tmp

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
ip link set lo up 2>/dev/null

uptime_s() { cut -d' ' -f1 /proc/uptime; }
verdict() {
  echo "VDPA-MAPD-KERNEL-TIER: $*"
  sync
  poweroff -f
  sleep 10
}
echo "VDPA-MAPD-TIME: init $(uptime_s)"

# Dependencies first (build-vm.sh wrote the order): vhost_iotlb, vdpa, vhost, irqbypass,
# vhost_vdpa, vduse, then the 9p stack.
for m in $(cat /lib/modules/order); do
  insmod "/lib/modules/$m" || verdict "FAIL insmod $m"
done

p9() { mount -t 9p -o "trans=virtio,version=9p2000.L,msize=262144,$3" "$1" "$2"; }
p9 job /job rw || verdict "FAIL mount job share"
p9 usr /usr ro,cache=loose || verdict "FAIL mount usr share"
set -a # /job/env: VDPA_MAPD_ROOT (the project's host path), VDPA_MAPD_KERNEL_TIER=1
. /job/env
set +a
mkdir -p "$VDPA_MAPD_ROOT"
p9 project "$VDPA_MAPD_ROOT" ro,cache=loose || verdict "FAIL mount project share"

# The boot's API server (see the header); VDPA_MAPD_API_LOG has its "api server listening" line.
export VDPA_MAPD_AGENT_SOCKET=/run/vdpa-mapd/agent.sock VDPA_MAPD_API_LOG=/run/vdpa-mapd/api.log
mkdir -p /run/vdpa-mapd
(cd "$VDPA_MAPD_ROOT" && exec setsid node .cache/guest-js/api.mjs --rest-listen 127.0.0.1:0 \
  --grpc-listen 127.0.0.1:0 --agent-socket "$VDPA_MAPD_AGENT_SOCKET" --state-dir /run/vdpa-mapd/api \
  --log-level info) </dev/null >"$VDPA_MAPD_API_LOG" 2>&1 &
api_pid=$!

export VHOST_VDPA_DEV=/dev/vhost-vdpa-0
export VDUSE_NAME=vduse-test
ctl=/run/vduse-daemon.sock
extra=/lib/modules/extra

# Waits (bounded: 120 s, the device appears at once) until the new vDPA device's node appears.
wait_node() {
  i=0
  while [ ! -c "$VHOST_VDPA_DEV" ]; do
    i=$((i + 1))
    [ "$i" -gt 1200 ] && return 1
    sleep 0.1
  done
}

# Creates kind $1's device as /dev/vhost-vdpa-0; prints why not and fails otherwise.
kind_up() {
  export VDUSE_CTL=''
  case $1 in
  vduse)
    VDUSE_CTL=$ctl
    vduse-daemon "$VDUSE_NAME" "$ctl" || { echo 'vduse-daemon did not start'; return 1; }
    # With virtio_vdpa not loaded, the new vDPA device binds to vhost_vdpa.
    vdpa dev add name "$VDUSE_NAME" mgmtdev vduse || { echo 'vdpa dev add (vduse)'; return 1; }
    ;;
  vp-vdpa) vp_vdpa_up 0x1041 vp0 ;;     # QEMU's virtio-net-pci
  vp-vdpa-blk) vp_vdpa_up 0x1042 vpb0 ;; # QEMU's virtio-blk-pci
  vduse-blk)
    # QEMU's own VDUSE virtio-blk device (libvduse) on an image of the read-write job share.
    qemu-storage-daemon --blockdev driver=file,filename=/job/vduse-blk.img,node-name=d0 \
      --export type=vduse-blk,id=e0,node-name=d0,name=vduse-blk0,writable=on \
      </dev/null >/tmp/qsd.log 2>&1 &
    qsd_pid=$!
    i=0
    while [ ! -e /sys/class/vduse/vduse-blk0 ]; do
      i=$((i + 1))
      [ "$i" -gt 1200 ] && { echo 'qemu-storage-daemon made no VDUSE device:'; cat /tmp/qsd.log; return 1; }
      sleep 0.1
    done
    # 0: the kernel waits for the daemon's answer (no limit tighter than the tier's budget).
    echo 0 >/sys/class/vduse/vduse-blk0/msg_timeout
    # The node appears at VDUSE_CREATE_DEV, before the daemon has set up its queues
    # (VDUSE_VQ_SETUP): until then vduse_dev_is_ready() is false and vdpa_dev_add() answers EINVAL.
    i=0
    until vdpa dev add name vduse-blk0 mgmtdev vduse 2>/tmp/vdpa-add.err; do
      i=$((i + 1))
      [ "$i" -gt 1200 ] && { echo 'vdpa dev add (vduse-blk0)'; cat /tmp/vdpa-add.err; return 1; }
      sleep 0.1
    done
    echo "qemu-storage-daemon $(qemu-storage-daemon --version | head -1 | cut -d' ' -f3) pid $qsd_pid, vduse-blk0"
    ;;
  sim-*)
    case $1 in
    sim-dma-pa) b=0 v=0 ;; sim-dma-va) b=0 v=1 ;; sim-setmap-pa) b=1 v=0 ;; sim-setmap-va) b=1 v=1 ;;
    *) echo "unknown kind $1"; return 1 ;;
    esac
    [ -e /sys/module/vringh ] || insmod "$extra/vringh.ko" || { echo 'insmod vringh'; return 1; }
    insmod "$extra/vdpa_sim.ko" "batch_mapping=$b" "use_va=$v" || { echo 'insmod vdpa_sim'; return 1; }
    insmod "$extra/vdpa_sim_net.ko" || { echo 'insmod vdpa_sim_net'; return 1; }
    vdpa dev add name sim0 mgmtdev vdpasim_net || { echo 'vdpa dev add (vdpasim_net)'; return 1; }
    echo "vdpa_sim batch_mapping=$(cat /sys/module/vdpa_sim/parameters/batch_mapping) use_va=$(cat /sys/module/vdpa_sim/parameters/use_va)"
    ;;
  *) echo "unknown kind $1"; return 1 ;;
  esac
  wait_node || { echo "$VHOST_VDPA_DEV did not appear"; return 1; }
}

# Binds the modern virtio PCI device 1af4:$1 (bound to the built-in virtio-pci at boot) to
# vp_vdpa and adds it as vDPA device $2.
vp_vdpa_up() {
  [ -e /sys/module/vp_vdpa ] || insmod "$extra/vp_vdpa.ko" || { echo 'insmod vp_vdpa'; return 1; }
  bdf=''
  for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/vendor"):$(cat "$d/device")" = "0x1af4:$1" ] && bdf=${d##*/}
  done
  [ -n "$bdf" ] || { echo "no PCI device 1af4:$1"; return 1; }
  d=/sys/bus/pci/devices/$bdf
  [ -e "$d/driver" ] && echo "$bdf" >"$d/driver/unbind"
  echo vp-vdpa >"$d/driver_override"
  echo "$bdf" >/sys/bus/pci/drivers_probe
  vdpa dev add name "$2" mgmtdev "pci/$bdf" || { echo "vdpa dev add (pci/$bdf)"; return 1; }
  echo "vp_vdpa on $bdf, iommu group $(basename "$(readlink "$d/iommu_group")")"
}

# Deletes kind $1's device (and unloads vdpa_sim, whose parameters differ per kind).
kind_down() {
  case $1 in
  vduse)
    vdpa dev del "$VDUSE_NAME"
    [ -n "${daemon_pid:-}" ] && kill "$daemon_pid"
    ;;
  vp-vdpa) vdpa dev del vp0 ;;
  vp-vdpa-blk) vdpa dev del vpb0 ;;
  vduse-blk)
    vdpa dev del vduse-blk0
    kill "$qsd_pid" && wait "$qsd_pid"
    ;;
  sim-*) vdpa dev del sim0 && rmmod vdpa_sim_net vdpa_sim ;;
  esac
  i=0
  while [ -e "$VHOST_VDPA_DEV" ] && [ "$i" -lt 1200 ]; do
    i=$((i + 1))
    sleep 0.1
  done
  [ ! -e "$VHOST_VDPA_DEV" ]
}

# True while process group $1 has a live (non-zombie) process.
group_alive() {
  g=$1
  for d in /proc/[0-9]*; do
    read -r f <"$d/stat" 2>/dev/null || continue
    set -- ${f##*) } # state ppid pgrp ...
    [ "$3" = "$g" ] && [ "$1" != Z ] && return 0
  done
  return 1
}

[ -s /job/steps ] || verdict 'FAIL no steps in /job/steps'
failed=''
kind=''
kind_ok=0
tab=$(printf '\t')
while IFS="$tab" read -r step_kind name cmd; do
  [ -z "$name" ] && continue
  if [ "$step_kind" != "$kind" ]; then
    if [ -n "$kind" ] && [ "$kind_ok" = 1 ] && ! kind_down "$kind" >/dev/null 2>&1; then
      echo "VDPA-MAPD-KIND: $kind FAIL the device did not go away"
      failed="$failed $kind-teardown"
    fi
    kind=$step_kind
    # Not in a subshell: kind_up exports VDUSE_CTL for the kind's steps.
    if kind_up "$kind" >/tmp/kind-up.log 2>&1; then
      kind_ok=1
      daemon_pid=$(pidof vduse-daemon || true)
      echo "VDPA-MAPD-KIND: $kind READY $(tail -1 /tmp/kind-up.log)"
    else
      kind_ok=0
      echo "VDPA-MAPD-KIND: $kind FAIL $(tr '\n' ' ' </tmp/kind-up.log)"
    fi
    echo "VDPA-MAPD-TIME: kind-$kind $(uptime_s)"
  fi
  if [ "$kind_ok" != 1 ]; then
    echo "VDPA-MAPD-STEP: $name FAIL its kind $kind could not be set up"
    failed="$failed $name"
    continue
  fi
  echo "VDPA-MAPD-STEP: $name BEGIN"
  t0=$(uptime_s)
  # Each step leads its own session and process group, so whatever it leaves behind can be
  # found and killed.
  (cd "$VDPA_MAPD_ROOT" && VDPA_MAPD_KIND=$kind exec setsid sh -c "$cmd") </dev/null &
  pid=$!
  wait "$pid"
  rc=$?
  t=$(echo "$t0 $(uptime_s)" | awk '{ printf "%.2f", $2 - $1 }')
  why=''
  if group_alive "$pid"; then
    why='left processes running'
    kill -KILL -- "-$pid"
    sleep 0.3
  fi
  # Nothing may still hold the device, and a new owner must leave it unmapped.
  if ! device=$(guest-smoke --sync 2>&1); then
    why="${why:+$why, }device not clean after the step: $device"
  fi
  [ "$rc" -ne 0 ] && why="rc=$rc${why:+, $why}"
  if [ -z "$why" ]; then
    echo "VDPA-MAPD-STEP: $name PASS ${t}s"
  else
    echo "VDPA-MAPD-STEP: $name FAIL $why ${t}s"
    failed="$failed $name"
  fi
done </job/steps
if [ -n "$kind" ] && [ "$kind_ok" = 1 ] && ! kind_down "$kind" >/dev/null 2>&1; then
  echo "VDPA-MAPD-KIND: $kind FAIL the device did not go away"
  failed="$failed $kind-teardown"
fi

# The boot's API server stops cleanly (SIGTERM: exit 0).
kill -TERM "$api_pid" 2>/dev/null
wait "$api_pid"
rc=$?
if [ "$rc" -eq 0 ]; then
  echo "VDPA-MAPD-STEP: boot-api PASS exit 0"
else
  echo "VDPA-MAPD-STEP: boot-api FAIL exit $rc; its log:"
  tail -n 20 "$VDPA_MAPD_API_LOG"
  failed="$failed boot-api"
fi
echo "VDPA-MAPD-TIME: done $(uptime_s)"
if [ -n "$failed" ]; then verdict "FAIL steps:$failed"; fi
verdict PASS
