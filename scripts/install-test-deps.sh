#!/usr/bin/env bash
# Installs the system packages Basalt's tests and benchmarks use (Debian 12, as root).
# Safe to run again: it only installs what is missing unless --force is given.
set -euo pipefail

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v qemu-storage-daemon >/dev/null || need+=(qemu-system-x86)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
command -v nbdcopy >/dev/null || need+=(libnbd-bin)
command -v fio >/dev/null || need+=(fio)
[ -x /bin/busybox ] || command -v busybox >/dev/null || need+=(busybox-static)
# The BIOS-bootable test disk (tests/guest/build-boot-disk.sh).
command -v syslinux >/dev/null || need+=(syslinux)
command -v mcopy >/dev/null || need+=(mtools)
[ -x /usr/sbin/mkfs.fat ] || command -v mkfs.fat >/dev/null || need+=(dosfstools)
# The guest's fio disk for bench/vm_bench.py (tests/guest/build-fio-disk.sh).
[ -x /usr/sbin/mkfs.ext4 ] || command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
if [ "${1:-}" != "--force" ] && [ ${#need[@]} -eq 0 ]; then
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
if [ "${BASALT_SKIP_APT_UPDATE:-}" != 1 ]; then
  apt-get update -q
fi
# qemu-system-x86 in Debian 12 is QEMU 7.2; its qemu-utils must match, so an
# installed newer qemu-utils (bookworm-backports) is replaced by bookworm's.
apt-get install -y -q --allow-downgrades \
  qemu-system-x86 qemu-utils/bookworm qemu-block-extra/bookworm \
  libnbd-bin fio busybox-static syslinux mtools dosfstools e2fsprogs
