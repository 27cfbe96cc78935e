#!/bin/sh
# Builds a BIOS-bootable raw disk image of Basalt's tiny test guest: a FAT
# file system (no partition table) with SYSLINUX in its boot sector, the
# guest's kernel and initrd, and a configuration that boots them with the
# serial console and the test commands given.
#
#   tests/guest/build-boot-disk.sh GUEST_DIR OUT_IMAGE "COMMANDS"
#
# GUEST_DIR holds vmlinuz and initrd (tests/guest/build-guest.sh); COMMANDS
# is the guest's basalt.test= list (e.g. "info,write-pattern"). The guest's
# /dev/vda is the VM's first disk, so give the VM a data disk first and this
# image as its boot disk.
#
# Needs (Debian packages): syslinux, mtools, dosfstools.
set -eu

GUEST=${1:?usage: build-boot-disk.sh GUEST_DIR OUT_IMAGE COMMANDS}
OUT=${2:?usage: build-boot-disk.sh GUEST_DIR OUT_IMAGE COMMANDS}
COMMANDS=${3:?usage: build-boot-disk.sh GUEST_DIR OUT_IMAGE COMMANDS}

for tool in mkfs.fat syslinux mcopy; do
    command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || {
        echo "build-boot-disk: missing $tool (apt-get install syslinux mtools dosfstools)" >&2
        exit 1
    }
done
PATH="$PATH:/usr/sbin:/sbin"

kernel_kib=$(( $(wc -c <"$GUEST/vmlinuz") / 1024 ))
initrd_kib=$(( $(wc -c <"$GUEST/initrd") / 1024 ))
# Room for both, the boot loader and FAT overhead; a multiple of 4 KiB.
size_kib=$(( (kernel_kib + initrd_kib + 4096) / 4 * 4 ))

rm -f "$OUT"
mkfs.fat -C -n BASALTBOOT "$OUT" "$size_kib" >/dev/null
syslinux --install "$OUT"
CFG=$(mktemp "${TMPDIR:-/tmp}/basalt-syslinux.XXXXXX")
trap 'rm -f "$CFG"' EXIT
cat >"$CFG" <<CFGEOF
SERIAL 0 115200
DEFAULT basalt
PROMPT 0
TIMEOUT 0
LABEL basalt
  KERNEL vmlinuz
  INITRD initrd
  APPEND console=ttyS0 quiet panic=-1 basalt.test=$COMMANDS
CFGEOF
MTOOLS_SKIP_CHECK=1 mcopy -i "$OUT" "$GUEST/vmlinuz" ::vmlinuz
MTOOLS_SKIP_CHECK=1 mcopy -i "$OUT" "$GUEST/initrd" ::initrd
MTOOLS_SKIP_CHECK=1 mcopy -i "$OUT" "$CFG" ::syslinux.cfg
