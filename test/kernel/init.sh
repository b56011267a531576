#!/bin/busybox sh
# /init of the kernel-tier VM (packed into the initramfs by build-vm.sh).
#
# Loads the vhost-vDPA modules, creates the VDUSE device with vduse-daemon, binds it
# to vhost_vdpa, mounts the host's /usr, the project tree and the job folder over
# virtio-9p, runs the steps listed in /job/steps and prints the verdict:
#   VDPA-MAPD-STEP: <name> PASS|FAIL ...    one per step
#   VDPA-MAPD-KERNEL-TIER: PASS | FAIL <reason>
# then powers off. /job/steps has one step a line: <name><TAB><timeout s><TAB><sh command>.
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

export VDUSE_NAME=vduse-test
export VDUSE_CTL=/run/vduse-daemon.sock
export VHOST_VDPA_DEV=/dev/vhost-vdpa-0
vduse-daemon "$VDUSE_NAME" "$VDUSE_CTL" || verdict "FAIL vduse-daemon did not start"
# With virtio_vdpa not loaded, the new vDPA device binds to vhost_vdpa.
vdpa dev add name "$VDUSE_NAME" mgmtdev vduse || verdict "FAIL vdpa dev add"
i=0
while [ ! -c "$VHOST_VDPA_DEV" ]; do
  i=$((i + 1))
  [ "$i" -gt 50 ] && verdict "FAIL $VHOST_VDPA_DEV did not appear"
  sleep 0.1
done
echo "VDPA-MAPD-TIME: device $(uptime_s)"

p9() { mount -t 9p -o "trans=virtio,version=9p2000.L,msize=262144,$3" "$1" "$2"; }
p9 job /job rw || verdict "FAIL mount job share"
p9 usr /usr ro,cache=loose || verdict "FAIL mount usr share"
set -a # /job/env: VDPA_MAPD_ROOT (the project's host path), VDPA_MAPD_KERNEL_TIER=1
. /job/env
set +a
mkdir -p "$VDPA_MAPD_ROOT"
p9 project "$VDPA_MAPD_ROOT" ro,cache=loose || verdict "FAIL mount project share"

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
tab=$(printf '\t')
while IFS="$tab" read -r name limit cmd; do
  [ -z "$name" ] && continue
  echo "VDPA-MAPD-STEP: $name BEGIN"
  t0=$(uptime_s)
  # Each step leads its own session and process group, so whatever it leaves behind can be
  # found and killed; a watchdog kills the group at the step's time limit.
  (cd "$VDPA_MAPD_ROOT" && exec setsid sh -c "$cmd") </dev/null &
  pid=$!
  (sleep "$limit" && kill -KILL -- "-$pid") 2>/dev/null &
  dog=$!
  wait "$pid"
  rc=$?
  kill "$dog" 2>/dev/null
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
  if [ "$rc" -ne 0 ]; then
    [ "$rc" -eq 137 ] && rc="137 (killed: time limit ${limit}s?)"
    why="rc=$rc${why:+, $why}"
  fi
  if [ -z "$why" ]; then
    echo "VDPA-MAPD-STEP: $name PASS ${t}s"
  else
    echo "VDPA-MAPD-STEP: $name FAIL $why ${t}s"
    failed="$failed $name"
  fi
done </job/steps

echo "VDPA-MAPD-TIME: done $(uptime_s)"
echo "VDPA-MAPD-DEVICE: $(vduse-daemon --ask "$VDUSE_CTL" stats)"
if [ -n "$failed" ]; then verdict "FAIL steps:$failed"; fi
verdict PASS
