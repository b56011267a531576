#!/usr/bin/env bash
# Builds the VM of the real-kernel test tier, from Debian packages only:
#   - installs the host tools it needs with apt-get when missing;
#   - fetches Debian's 6.12 kernel (it has vhost_vdpa and vduse; 6.1 has not) with
#     `apt-get download` and unpacks it with `dpkg-deb -x` (nothing is installed);
#   - builds the parents Debian leaves out (vp_vdpa, vdpa_sim, vdpa_sim_net, vringh) out of
#     tree from linux-source-6.12 (build-modules.sh, cached);
#   - packs an initramfs (cpio newc, gzip): busybox, the modules (the extra ones in
#     /lib/modules/extra, loaded per parent kind by init.sh), `vdpa` and its libraries, our
#     static helpers (vduse-daemon, guest-smoke) and init.sh as /init.
# Node and the project tree are not packed: the guest mounts the host's /usr and
# the project over virtio-9p (see run-vm.ts).
#
# Everything is cached under .cache/kernel-vm/: the unpacked kernel by package
# version, the VM by a hash of all its inputs. A second run with the same inputs
# does nothing. Prints the VM folder (vmlinuz, initramfs.gz, info) on stdout;
# progress and timings go to stderr.
#
# Environment: VDPA_MAPD_KERNEL_PKG overrides the kernel package name.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
cache="$root/.cache/kernel-vm"
kernel_pkg=${VDPA_MAPD_KERNEL_PKG:-linux-image-6.12.107+deb12-amd64-unsigned}
tools=(qemu-system-x86 busybox-static iproute2 gcc make libc6-dev linux-libc-dev xz-utils cpio dwarves kmod bc)
# Wanted modules; their dependencies are added and the guest loads them in order.
modules=(vhost_vdpa vduse 9p 9pnet_virtio)

log() { echo "build-vm: $*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }

apt_updated=0
apt_update_once() {
  if ((!apt_updated)); then
    apt-get update -qq >&2 || die 'apt-get update failed'
    apt_updated=1
  fi
}

mkdir -p "$cache"
export DEBIAN_FRONTEND=noninteractive

# 1. Host tools.
missing=()
for p in "${tools[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  t=$(now)
  apt_update_once
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 || die "apt-get install ${missing[*]} failed"
  log "TIME apt-install $(since "$t") (${missing[*]})"
fi
busybox=/bin/busybox
vdpa=$(command -v vdpa) || die 'vdpa (iproute2) not found'
[ -f /usr/include/linux/vduse.h ] || die '/usr/include/linux/vduse.h missing (linux-libc-dev)'
command -v qemu-system-x86_64 >/dev/null || die 'qemu-system-x86_64 missing'
[ -x "$busybox" ] || die "$busybox missing (busybox-static)"
ldd "$busybox" >/dev/null 2>&1 && die "$busybox is not static (busybox-static expected)"

# 2. Kernel: resolve the package version, download and unpack once per version.
kernel_version() { { apt-cache show --no-all-versions "$1" 2>/dev/null || true; } | awk '/^Version:/ { print $2; exit }'; }
kver=$(kernel_version "$kernel_pkg")
if [ -z "$kver" ]; then
  apt_update_once
  kver=$(kernel_version "$kernel_pkg")
fi
if [ -z "$kver" ] && [ -z "${VDPA_MAPD_KERNEL_PKG:-}" ]; then
  # Debian drops old kernel ABIs from time to time: fall back to the newest 6.12.
  fallback=$(apt-cache pkgnames linux-image-6.12. | grep -E '^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$' | sort -V | tail -1 || true)
  [ -n "$fallback" ] && log "WARNING: $kernel_pkg not available, using $fallback"
  kernel_pkg=${fallback:-$kernel_pkg}
  kver=$(kernel_version "$kernel_pkg")
fi
[ -n "$kver" ] || die "kernel package $kernel_pkg not found in apt (set VDPA_MAPD_KERNEL_PKG)"
kdir="$cache/kernel/$kernel_pkg=$kver"
if [ ! -f "$kdir/done" ] && ((!apt_updated)); then
  # Not cached: download what fresh package lists offer (the version may have moved on).
  apt_update_once
  kver=$(kernel_version "$kernel_pkg")
  [ -n "$kver" ] || die "kernel package $kernel_pkg vanished after apt-get update"
  kdir="$cache/kernel/$kernel_pkg=$kver"
fi
if [ ! -f "$kdir/done" ]; then
  t=$(now)
  rm -rf "$kdir" "$kdir.tmp"
  mkdir -p "$kdir.tmp/deb"
  (cd "$kdir.tmp/deb" && apt-get download -qq -o APT::Sandbox::User=root "$kernel_pkg=$kver" >&2) || die "apt-get download $kernel_pkg failed"
  td=$(now)
  dpkg-deb -x "$kdir.tmp/deb/"*.deb "$kdir.tmp/root"
  release=$(ls "$kdir.tmp/root/lib/modules")
  cp "$kdir.tmp/root/boot/vmlinuz-$release" "$kdir.tmp/vmlinuz"
  mv "$kdir.tmp/root/lib/modules/$release" "$kdir.tmp/modules"
  rm -rf "$kdir.tmp/deb" "$kdir.tmp/root"
  mv "$kdir.tmp" "$kdir"
  touch "$kdir/done"
  log "TIME kernel-download $(awk -v a="$t" -v b="$td" 'BEGIN { printf "%.1fs", b - a }') kernel-unpack $(since "$td") ($kernel_pkg=$kver)"
fi

# Modules to load, dependencies first. The package has no modules.dep (depmod runs
# at install): read each module's "depends=" from its .modinfo section instead.
declare -A mpath=() seen=()
while IFS= read -r f; do
  n=${f##*/}
  n=${n%.xz}
  n=${n%.ko}
  mpath[${n//-/_}]=$f
done < <(cd "$kdir/modules" && find kernel -name '*.ko*')
order=()
add_module() { # $1: module name
  [ -n "${seen[$1]:-}" ] && return
  seen[$1]=1
  local f=${mpath[$1]:-} deps d
  if [ -z "$f" ]; then
    grep -qE "/(${1}|${1//_/-})\.ko$" "$kdir/modules/modules.builtin" || die "module $1 not in $kernel_pkg"
    return # built in
  fi
  deps=$(xz -dcf "$kdir/modules/$f" | tr '\0' '\n' | sed -n 's/^depends=//p' | tr ',' ' ')
  for d in $deps; do add_module "$d"; done
  order+=("$f")
}
for m in "${modules[@]}"; do add_module "$m"; done

# The kernel release (from a module's vermagic) names the headers the extra modules build against.
release=$(xz -dcf "$kdir/modules/${mpath[vhost_vdpa]}" | tr '\0' '\n' | sed -n 's/^vermagic=\([^ ]*\).*/\1/p')
[ -n "$release" ] || die 'no vermagic in vhost_vdpa'
extra=$(bash "$here/build-modules.sh" "$kver" "$release") || die 'build-modules.sh failed'

# 3. The VM, keyed by every input.
key=$(
  {
    cat "$here/build-vm.sh" "$here/init.sh" "$here/vduse-daemon.c" "$here/guest-smoke.c"
    echo "$kernel_pkg=$kver ${order[*]} $extra"
    gcc --version | head -1
    sha256sum "$busybox" "$vdpa" $(ldd "$vdpa" | awk '/=> \// { print $3 } /^\t\// { print $1 }')
    sha256sum /usr/include/linux/vduse.h /usr/include/linux/vhost.h
  } | sha256sum | cut -c1-16
)
out="$cache/vm-$key"
if [ ! -f "$out/initramfs.gz" ]; then
  t=$(now)
  rm -rf "$out.tmp"
  ird="$out.tmp/root"
  mkdir -p "$ird"/{bin,lib/modules,lib64,opt/vdpa-mapd/bin,proc,sys,dev,tmp,run,usr,job,etc}
  cp "$busybox" "$ird/bin/busybox"
  cp "$here/init.sh" "$ird/init"
  chmod 755 "$ird/init"
  for m in "${order[@]}"; do
    name=${m##*/}
    name=${name%.xz}
    xz -dcf "$kdir/modules/$m" >"$ird/lib/modules/$name"
    echo "$name" >>"$ird/lib/modules/order"
  done
  mkdir -p "$ird/lib/modules/extra"
  for m in "$extra"/*.ko; do strip --strip-debug -o "$ird/lib/modules/extra/${m##*/}" "$m"; done
  cflags=(-static -O2 -Wall -Wextra -Werror)
  gcc "${cflags[@]}" -pthread -o "$ird/opt/vdpa-mapd/bin/vduse-daemon" "$here/vduse-daemon.c"
  gcc "${cflags[@]}" -o "$ird/opt/vdpa-mapd/bin/guest-smoke" "$here/guest-smoke.c"
  # vdpa is dynamic: pack it with its libraries at their host paths. The guest's /lib
  # and /lib64 are real folders, so the host's /usr mounted later does not hide them.
  cp "$vdpa" "$ird/opt/vdpa-mapd/bin/vdpa"
  for lib in $(ldd "$vdpa" | awk '/=> \// { print $3 } /^\t\// { print $1 }'); do
    mkdir -p "$ird$(dirname "$lib")"
    cp -L "$lib" "$ird$lib"
  done
  (cd "$ird" && find . -print0 | sort -z | cpio --null -o -H newc --quiet | gzip -6) >"$out.tmp/initramfs.gz"
  rm -rf "$ird"
  cp "$kdir/vmlinuz" "$out.tmp/vmlinuz"
  {
    echo "kernel $kernel_pkg=$kver"
    echo "modules ${order[*]}"
    echo "extra modules $(cd "$extra" && echo *.ko) ($extra)"
    echo "initramfs $(stat -c %s "$out.tmp/initramfs.gz") bytes"
  } >"$out.tmp/info"
  rm -rf "$out"
  mv "$out.tmp" "$out"
  log "TIME initramfs $(since "$t") ($(stat -c %s "$out/initramfs.gz") bytes)"
  # Keep only the current VM.
  for old in "$cache"/vm-*; do
    [ "$old" = "$out" ] || rm -rf "$old"
  done
fi
echo "$out"
