#!/bin/sh
# Builds a small read-only disk image holding Debian's fio, for the test guest
# (tests/guest/build-guest.sh) to run fio against its disks.
#
#   tests/guest/build-fio-disk.sh OUTDIR
#
# Output (in OUTDIR):
#   fio.img     ext4 image: /fio/bin/fio and /fio/lib/ (every library fio loads,
#               the dynamic loader among them)
#   fio.stamp   fio's version + hash of this script: the cache key
#
# Why a disk and not the initramfs: Debian's fio links about sixty libraries
# (librbd, libgfapi, ...), some 80 MiB. In the initramfs every test boot would
# unpack them under TCG; on a disk only the guests that run fio read them.
# The guest mounts the disk (ext4 is built into the cloud kernel) and runs
#   /mnt/fio/fio/lib/ld-linux-x86-64.so.2 --library-path /mnt/fio/fio/lib \
#       /mnt/fio/fio/bin/fio ...
#
# fio comes from the host's Debian package (apt-get install -y fio; the benchmarks
# install it anyway), so the guest holds nothing that is not a Debian package.
# Needs mkfs.ext4 with -d (e2fsprogs 1.43 or later).
set -eu

OUTDIR=${1:?usage: build-fio-disk.sh OUTDIR}
SCRIPT_PATH=$(readlink -f "$0")

log() { echo "build-fio-disk: $*" >&2; }

FIO=$(command -v fio) || { log "fio is not installed (apt-get install -y fio)"; exit 1; }
FIO=$(readlink -f "$FIO")
command -v mkfs.ext4 >/dev/null || { log "mkfs.ext4 is missing (apt-get install -y e2fsprogs)"; exit 1; }
dpkg -S "$FIO" >/dev/null 2>&1 || { log "$FIO is not from a Debian package"; exit 1; }

STAMP="$(fio --version) $(sha256sum "$SCRIPT_PATH" | cut -c1-16)"
if [ -f "$OUTDIR/fio.img" ] && [ -f "$OUTDIR/fio.stamp" ] &&
    [ "$(cat "$OUTDIR/fio.stamp")" = "$STAMP" ]; then
    log "up to date in $OUTDIR ($STAMP)"
    exit 0
fi

mkdir -p "$OUTDIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/basalt-fio.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM

mkdir -p "$WORK/root/fio/bin" "$WORK/root/fio/lib"
cp "$FIO" "$WORK/root/fio/bin/fio"
# ldd lists "name => /path (addr)" for libraries and "/path (addr)" for the
# loader; vdso has no file.
ldd "$FIO" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' |
    while read -r lib; do
        cp -L "$lib" "$WORK/root/fio/lib/"
    done
[ -f "$WORK/root/fio/lib/ld-linux-x86-64.so.2" ] || { log "no dynamic loader found by ldd"; exit 1; }

size_mb=$(( $(du -sm "$WORK/root" | cut -f1) + 16 ))
rm -f "$OUTDIR/fio.img.new"
truncate -s "${size_mb}M" "$OUTDIR/fio.img.new"
mkfs.ext4 -q -F -L basalt-fio -d "$WORK/root" "$OUTDIR/fio.img.new"
mv "$OUTDIR/fio.img.new" "$OUTDIR/fio.img"
echo "$STAMP" >"$OUTDIR/fio.stamp"
log "built $OUTDIR/fio.img (${size_mb} MiB, $(ls "$WORK/root/fio/lib" | wc -l) libraries)"
