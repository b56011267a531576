#!/usr/bin/env bash
# Builds the vDPA parents Debian's 6.12 leaves out (CONFIG_VP_VDPA and CONFIG_VDPA_SIM are unset):
# vp_vdpa.ko, vdpa_sim.ko, vdpa_sim_net.ko and vringh.ko, out of tree, from Debian packages only:
# `apt-get download` of linux-source-6.12 and the matching linux-headers/-kbuild, unpacked with
# `dpkg-deb -x` (nothing is installed), then `make M=... modules` against the unpacked headers.
# The kernel does not enforce module signatures: they load with a taint message.
#
# Usage: build-modules.sh <kernel version, e.g. 6.12.107-1~deb12u1> <kernel release, e.g.
# 6.12.107+deb12-amd64>. Cached under .cache/kernel-vm/modules/<version>-<hash of this script>/;
# prints that folder (the four .ko files) on stdout, progress and timings on stderr.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
kver=${1:?kernel package version}
release=${2:?kernel release}
abi=${release%-amd64} # 6.12.107+deb12
script_key=$(sha256sum "$here/build-modules.sh" | cut -c1-12)
out="$root/.cache/kernel-vm/modules/$kver-$script_key"

log() { echo "build-modules: $*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }

if [ -f "$out/done" ]; then
  echo "$out"
  exit 0
fi
for tool in make gcc pahole modinfo; do
  command -v "$tool" >/dev/null || die "$tool missing (packages make, gcc, dwarves, kmod)"
done

t=$(now)
rm -rf "$out" "$out.tmp"
mkdir -p "$out.tmp/deb" "$out.tmp/root" "$out.tmp/src"
pkgs=("linux-source-6.12=$kver" "linux-headers-$release=$kver" "linux-headers-$abi-common=$kver" "linux-kbuild-$abi=$kver")
(cd "$out.tmp/deb" && apt-get download -qq -o APT::Sandbox::User=root "${pkgs[@]}" >&2) ||
  die "apt-get download ${pkgs[*]} failed"
td=$(now)
for deb in "$out.tmp/deb/"linux-{headers,kbuild}-*.deb; do dpkg-deb -x "$deb" "$out.tmp/root"; done
# Only the sources of the four modules, straight out of the source tarball.
dpkg-deb --fsys-tarfile "$out.tmp/deb/"linux-source-6.12_*.deb |
  tar -xO ./usr/src/linux-source-6.12.tar.xz |
  tar -xJ -C "$out.tmp/src" --strip-components=1 \
    linux-source-6.12/drivers/vdpa/virtio_pci/vp_vdpa.c \
    linux-source-6.12/drivers/vdpa/vdpa_sim \
    linux-source-6.12/drivers/vhost/vringh.c
rm -rf "$out.tmp/deb"
tu=$(now)

headers="$out.tmp/root/usr/src/linux-headers-$release"
[ -f "$headers/Makefile" ] || die "no $headers/Makefile"
# The per-flavour Makefile includes the common one by its installed path: point it at ours.
sed -i "s|^include /usr/src/|include $out.tmp/root/usr/src/|" "$headers/Makefile"
build="$out.tmp/build"
mkdir -p "$build"
cp "$out.tmp/src/drivers/vdpa/virtio_pci/vp_vdpa.c" "$out.tmp/src/drivers/vhost/vringh.c" \
  "$out.tmp/src/drivers/vdpa/vdpa_sim/"vdpa_sim{,_net}.c "$out.tmp/src/drivers/vdpa/vdpa_sim/vdpa_sim.h" "$build/"
echo 'obj-m += vp_vdpa.o vdpa_sim.o vdpa_sim_net.o vringh.o' >"$build/Kbuild"
make -s -C "$headers" M="$build" -j"$(nproc)" modules >&2 || die 'module build failed'
for m in vp_vdpa vdpa_sim vdpa_sim_net vringh; do
  [ "$(modinfo -F vermagic "$build/$m.ko" | cut -d' ' -f1)" = "$release" ] || die "$m.ko: wrong vermagic"
  cp "$build/$m.ko" "$out.tmp/"
done
rm -rf "$out.tmp/root" "$out.tmp/src" "$build"
touch "$out.tmp/done"
rm -rf "$out"
mv "$out.tmp" "$out"
# Keep only the current build.
for old in "$root/.cache/kernel-vm/modules/"*; do
  [ "$old" = "$out" ] || rm -rf "$old"
done
log "TIME modules-download $(awk -v a="$t" -v b="$td" 'BEGIN { printf "%.1fs", b - a }') unpack $(awk -v a="$td" -v b="$tu" 'BEGIN { printf "%.1fs", b - a }') build $(since "$tu")"
echo "$out"
