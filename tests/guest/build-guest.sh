#!/bin/sh
# Builds Basalt's tiny test guest: a Debian cloud kernel and a busybox initramfs
# whose /init runs the block-device checks named on the kernel command line.
#
#   tests/guest/build-guest.sh OUTDIR
#
# Output (in OUTDIR):
#   vmlinuz         the kernel (Debian linux-image-<ver>-cloud-amd64)
#   initrd          gzip'd cpio (newc) initramfs: busybox, virtio modules, /init
#   kernel-version  the kernel release string, e.g. 6.1.0-56-cloud-amd64
#   stamp           kernel release + hash of this script: the cache key
#
# The output is cached: when OUTDIR already holds vmlinuz and initrd built by
# this same script for the same kernel version, nothing is done. Override the
# kernel with BASALT_GUEST_KERNEL=6.1.0-56-cloud-amd64.
#
# Needs (fresh Debian 12, as root): apt-get install -y busybox-static qemu-system-x86
# Uses only Debian packages: apt-get download + dpkg-deb -x, busybox for the rest.
#
# Boot it with:
#   qemu-system-x86_64 -accel tcg -m 256 -nographic -no-reboot \
#     -kernel OUTDIR/vmlinuz -initrd OUTDIR/initrd \
#     -append "console=ttyS0 quiet panic=-1 basalt.test=info,write-pattern"
#
# Commands (basalt.test=a,b,c — run in order, each prints one result line):
#   info           prints BASALT-INFO: lines (sizes, block sizes, serial, queues)
#   write-pattern  writes the pattern to /dev/vda (O_DIRECT, 64 KiB writes), fsyncs
#   verify-pattern reads the pattern back from /dev/vda and compares
#   verify         reads the host pattern (written by the test into the backend)
#   discard        blkdiscard of the discard range, then reads it back as zeros
#   flush          a small write followed by fsync (a FLUSH request)
#   writethrough   switches /dev/vda to write-through through its cache_type (the
#                  virtio-blk config field), as a guest that wants no volatile
#                  cache does; from then on the guest sends no FLUSH
#   soak           SOAK_ROUNDS rounds of: write a fresh pattern, read it back,
#                  compare; prints "BASALT-SOAK: round N" (a live-migration load)
#   seq            writes a sequence: block i (from SEQ_OFFSET) holds "basalt seq <i>",
#                  for i below basalt.seq=N (default 1000), one O_DIRECT write each,
#                  printing "BASALT-SEQ: i" every 10 blocks; every 100 blocks it reads
#                  the last 100 back and compares ("BASALT-SEQ: mismatch ..." if not);
#                  with basalt.seqreader=1 a second process keeps reading the first
#                  1 MiB of the sequence (O_DIRECT, 64 KiB at a time) meanwhile, so
#                  that reads and writes are in flight together, printing
#                  "BASALT-READS: n" every 20 reads
#   idle           prints "BASALT-ALIVE: n" every second, forever
#   ddbench        sequential O_DIRECT write then read of basalt.ddmb=N MiB (default
#                  256) in 1 MiB requests; prints "BASALT-DD: mb=N write_s=S read_s=S"
#   ddpair         the same on /dev/vda and /dev/vdb in turn, basalt.ddrounds=R rounds
#                  (default 6; the first disk alternates), so both disks are measured
#                  side by side in one guest (basalt.ddwt=1: both switched to
#                  write-through first, as a guest that wants no volatile cache);
#                  prints per disk and round
#                  "BASALT-DDPAIR: round=R disk=D sectors=N mb=N write_s=S read_s=S".
#                  With basalt.ddchunk=C (MiB) each pass is cut into chunks of C MiB
#                  and the two disks take turns chunk by chunk (write phase, then
#                  read phase), so a swing of the host hits both alike; write_s and
#                  read_s are then the sums over a disk's chunks
#   fiopair        fio (from the disk tests/guest/build-fio-disk.sh builds, attached as
#                  /dev/vdc) on /dev/vda and /dev/vdb in turn, basalt.fiorounds=R rounds
#                  (default 2; the first disk alternates) of the jobs in FIO_JOBS, each
#                  basalt.fioruntime=S seconds (default 5) over the first basalt.fiomb=N
#                  MiB (default 256), after one write of that range on both disks
#                  (basalt.fiojobs=a,b: only the jobs named);
#                  prints fio's terse (version 3) lines as
#                  "BASALT-FIO: round=R disk=D sectors=N job=J <terse line>"
# Result lines: "BASALT-TEST: <cmd> PASS" or "BASALT-TEST: <cmd> FAIL <why>";
# the guest ends with "BASALT-DONE" and powers off.
#
# Pattern layout (kept in sync with crates/basalt-vhost/tests/qemu_guest.rs):
#   guest pattern: PATTERN_BLOCKS blocks of 4096 bytes from byte PATTERN_OFFSET;
#     block i holds "basalt guest block <i>" padded with spaces to 4095 bytes + "\n".
#   host pattern: the same blocks with "basalt host block <i>", written by the test
#     from byte HOST_OFFSET.
#   discard range: DISCARD_LEN bytes from DISCARD_OFFSET.
#   soak pattern: SOAK_BLOCKS blocks from SOAK_OFFSET, word "soak<round>".
#   sequence: block i at SEQ_OFFSET + 4096 * i, "basalt seq <i>" padded like the pattern.
set -eu

OUTDIR=${1:?usage: build-guest.sh OUTDIR}
SCRIPT_PATH=$(readlink -f "$0")

log() { echo "build-guest: $*" >&2; }

need() {
    command -v "$1" >/dev/null 2>&1 || { log "missing tool: $1 ($2)"; exit 1; }
}
need apt-get "Debian apt"
need dpkg-deb "dpkg"
need sha256sum "coreutils"

# A static busybox: the installed busybox-static, else the package's binary.
BUSYBOX=""
if dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "install ok installed"; then
    BUSYBOX=/bin/busybox
fi

# --- which kernel -----------------------------------------------------------
kernel_release() {
    if [ -n "${BASALT_GUEST_KERNEL:-}" ]; then
        echo "$BASALT_GUEST_KERNEL"
        return
    fi
    # The cloud meta-package depends on exactly the current kernel image.
    rel=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        sed -n 's/^ *Depends: linux-image-\(.*-cloud-amd64\)$/\1/p' | head -n 1)
    if [ -z "$rel" ]; then
        # Fall back to the newest signed image apt knows about.
        rel=$(apt-cache search --names-only '^linux-image-[0-9].*-cloud-amd64$' 2>/dev/null |
            sed -n 's/^linux-image-\([0-9][^ ]*-cloud-amd64\) .*/\1/p' | sort -V | tail -n 1)
    fi
    echo "$rel"
}

KREL=$(kernel_release)
if [ -z "$KREL" ]; then
    log "apt knows no cloud kernel; running apt-get update"
    apt-get update -qq >&2 || true
    KREL=$(kernel_release)
fi
if [ -z "$KREL" ] && [ -f "$OUTDIR/kernel-version" ]; then
    # Offline and no package lists: reuse what was built before.
    KREL=$(cat "$OUTDIR/kernel-version")
fi
[ -n "$KREL" ] || { log "cannot find a linux-image-*-cloud-amd64 package"; exit 1; }

SCRIPT_HASH=$(sha256sum "$SCRIPT_PATH" | cut -c1-16)
STAMP="$KREL $SCRIPT_HASH"
if [ -f "$OUTDIR/vmlinuz" ] && [ -f "$OUTDIR/initrd" ] && [ -f "$OUTDIR/stamp" ] &&
    [ "$(cat "$OUTDIR/stamp")" = "$STAMP" ]; then
    log "up to date in $OUTDIR ($KREL)"
    exit 0
fi

log "building guest for $KREL in $OUTDIR"
mkdir -p "$OUTDIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/basalt-guest.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM

download() {
    # apt-get download writes into the current directory.
    (cd "$WORK" && apt-get download "$1" >/dev/null 2>&1) && return 0
    log "apt-get download $1 failed; running apt-get update and retrying"
    apt-get update -qq >&2 || true
    (cd "$WORK" && apt-get download "$1" >&2)
}

download "linux-image-$KREL"
mkdir "$WORK/kernel"
dpkg-deb -x "$WORK"/linux-image-"$KREL"_*.deb "$WORK/kernel"

if [ -z "$BUSYBOX" ]; then
    download busybox-static
    mkdir "$WORK/bb"
    dpkg-deb -x "$WORK"/busybox-static_*.deb "$WORK/bb"
    BUSYBOX="$WORK/bb/bin/busybox"
fi
[ -x "$BUSYBOX" ] || { log "no busybox binary"; exit 1; }
BB="$BUSYBOX"

KVMLINUZ="$WORK/kernel/boot/vmlinuz-$KREL"
MODDIR="$WORK/kernel/lib/modules/$KREL"
[ -f "$KVMLINUZ" ] || { log "kernel package has no $KVMLINUZ"; exit 1; }

# --- modules, dependencies first ----------------------------------------------
ROOT="$WORK/root"
mkdir -p "$ROOT/bin" "$ROOT/lib/modules" "$ROOT/dev" "$ROOT/proc" "$ROOT/sys" "$ROOT/tmp"
: >"$ROOT/lib/modules/order"

module_file() {
    find "$MODDIR/kernel" -name "$1.ko" -o -name "$1.ko.xz" -o -name "$1.ko.zst" | head -n 1
}

add_module() {
    # dash and busybox sh both support `local`; recursion needs it.
    local name file deps dep
    name=$1
    grep -qx "$name" "$ROOT/lib/modules/order" && return 0
    file=$(module_file "$name")
    if [ -z "$file" ]; then
        # Built into the kernel: nothing to load.
        if grep -q "/$name.ko\$" "$MODDIR/modules.builtin" 2>/dev/null; then
            return 0
        fi
        log "module $name not found in $KREL"
        exit 1
    fi
    case "$file" in
    *.xz) "$BB" xz -dc "$file" >"$WORK/$name.ko" ;;
    *.zst) log "zstd-compressed module $file is not supported"; exit 1 ;;
    *) cp "$file" "$WORK/$name.ko" ;;
    esac
    deps=$("$BB" strings "$WORK/$name.ko" | sed -n 's/^depends=//p' | head -n 1 | tr ',' ' ')
    for dep in $deps; do
        # Module names in depends= may use '-' or '_'; files use either.
        add_module "$dep"
    done
    cp "$WORK/$name.ko" "$ROOT/lib/modules/$name.ko"
    echo "$name" >>"$ROOT/lib/modules/order"
}

for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
    add_module "$m"
done
log "modules: $(tr '\n' ' ' <"$ROOT/lib/modules/order")"

cp "$BB" "$ROOT/bin/busybox"

# --- /init ----------------------------------------------------------------------
cat >"$ROOT/init" <<'INIT'
#!/bin/busybox sh
# Basalt test guest init. See tests/guest/build-guest.sh.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

PATTERN_OFFSET=1048576
PATTERN_BLOCKS=256
HOST_OFFSET=4194304
DISCARD_OFFSET=8388608
DISCARD_LEN=1048576
SOAK_OFFSET=16777216
SOAK_BLOCKS=64
SOAK_ROUNDS=100
SEQ_OFFSET=33554432

for m in $(cat /lib/modules/order); do
    insmod "/lib/modules/$m.ko" || echo "BASALT-GUEST: insmod $m failed"
done

i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do
    sleep 0.1
    i=$((i + 1))
done

result() { echo "BASALT-TEST: $*"; }

# param NAME DEFAULT: the value of basalt.NAME= on the kernel command line,
# or DEFAULT when it is not given.
param() {
    value=$(tr ' ' '\n' </proc/cmdline | sed -n "s/^basalt\.$1=//p")
    echo "${value:-$2}"
}

# pattern WORD [N]: N (default PATTERN_BLOCKS) blocks of 4096 bytes,
# block i = "basalt WORD block i" padded with spaces, ending in a newline.
pattern() {
    awk -v word="$1" -v n="${2:-$PATTERN_BLOCKS}" 'BEGIN {
        for (i = 0; i < n; i++) printf "%-4095s\n", "basalt " word " block " i
    }'
}

cmd_info() {
    echo "BASALT-INFO: size_sectors=$(cat /sys/block/vda/size)"
    echo "BASALT-INFO: logical_block_size=$(cat /sys/block/vda/queue/logical_block_size)"
    echo "BASALT-INFO: physical_block_size=$(cat /sys/block/vda/queue/physical_block_size)"
    echo "BASALT-INFO: discard_granularity=$(cat /sys/block/vda/queue/discard_granularity)"
    echo "BASALT-INFO: write_zeroes_max_bytes=$(cat /sys/block/vda/queue/write_zeroes_max_bytes)"
    echo "BASALT-INFO: write_cache=$(cat /sys/block/vda/queue/write_cache)"
    echo "BASALT-INFO: serial=$(cat /sys/block/vda/serial)"
    echo "BASALT-INFO: queues=$(ls /sys/block/vda/mq | wc -l)"
    result info PASS
}

cmd_write_pattern() {
    pattern guest >/tmp/pattern
    if dd if=/tmp/pattern of=/dev/vda bs=65536 seek=$((PATTERN_OFFSET / 65536)) \
        oflag=direct conv=fsync 2>/tmp/dd.err; then
        result write-pattern PASS
    else
        result write-pattern FAIL "dd: $(cat /tmp/dd.err)"
    fi
}

compare() { # name word offset
    pattern "$2" >/tmp/expect
    dd if=/dev/vda of=/tmp/got bs=4096 skip=$(($3 / 4096)) count="$PATTERN_BLOCKS" \
        iflag=direct 2>/tmp/dd.err || { result "$1" FAIL "dd: $(cat /tmp/dd.err)"; return; }
    if cmp /tmp/expect /tmp/got >/tmp/cmp.out 2>&1; then
        result "$1" PASS
    else
        result "$1" FAIL "$(cat /tmp/cmp.out)"
    fi
}

cmd_discard() {
    if ! blkdiscard -o "$DISCARD_OFFSET" -l "$DISCARD_LEN" /dev/vda 2>/tmp/bd.err; then
        result discard FAIL "blkdiscard: $(cat /tmp/bd.err)"
        return
    fi
    dd if=/dev/zero of=/tmp/zero bs=4096 count=$((DISCARD_LEN / 4096)) 2>/dev/null
    dd if=/dev/vda of=/tmp/got bs=4096 skip=$((DISCARD_OFFSET / 4096)) \
        count=$((DISCARD_LEN / 4096)) iflag=direct 2>/dev/null
    if cmp /tmp/zero /tmp/got >/tmp/cmp.out 2>&1; then
        result discard PASS
    else
        result discard FAIL "not zero after discard: $(cat /tmp/cmp.out)"
    fi
}

cmd_flush() {
    echo "basalt flush" | dd of=/dev/vda bs=512 seek=1 conv=sync,fsync 2>/tmp/dd.err &&
        result flush PASS || result flush FAIL "dd: $(cat /tmp/dd.err)"
}

cmd_writethrough() {
    f=/sys/block/vda/cache_type
    if ! echo "write through" >$f 2>/tmp/wt.err; then
        result writethrough FAIL "$(cat /tmp/wt.err)"
        return
    fi
    mode=$(cat $f)
    if [ "$mode" = "write through" ]; then
        result writethrough PASS
    else
        result writethrough FAIL "cache_type is $mode"
    fi
}

cmd_soak() {
    fails=0
    r=0
    while [ $r -lt "$SOAK_ROUNDS" ]; do
        pattern "soak$r" "$SOAK_BLOCKS" >/tmp/soak.expect
        dd if=/tmp/soak.expect of=/dev/vda bs=65536 seek=$((SOAK_OFFSET / 65536)) \
            oflag=direct 2>/dev/null || fails=$((fails + 1))
        dd if=/dev/vda of=/tmp/soak.got bs=65536 skip=$((SOAK_OFFSET / 65536)) \
            count=$((SOAK_BLOCKS / 16)) iflag=direct 2>/dev/null || fails=$((fails + 1))
        if ! cmp /tmp/soak.expect /tmp/soak.got >/tmp/cmp.out 2>&1; then
            fails=$((fails + 1))
            echo "BASALT-SOAK: round $r mismatch: $(cat /tmp/cmp.out)"
        fi
        echo "BASALT-SOAK: round $r"
        r=$((r + 1))
    done
    if [ "$fails" = 0 ]; then
        result soak PASS
    else
        result soak FAIL "$fails failures"
    fi
}

cmd_seq() {
    n=$(param seq 1000)
    base=$((SEQ_OFFSET / 4096))
    if [ "$(param seqreader 0)" = 1 ]; then
        (
            r=0
            while :; do
                dd if=/dev/vda of=/dev/null bs=65536 count=1 \
                    skip=$((SEQ_OFFSET / 65536 + r % 16)) iflag=direct 2>/dev/null
                r=$((r + 1))
                [ $((r % 20)) = 0 ] && echo "BASALT-READS: $r"
            done
        ) &
    fi
    fails=0
    i=0
    while [ $i -lt "$n" ]; do
        printf "%-4095s\n" "basalt seq $i" >/tmp/seq.block
        dd if=/tmp/seq.block of=/dev/vda bs=4096 seek=$((base + i)) count=1 \
            oflag=direct conv=notrunc 2>/dev/null || fails=$((fails + 1))
        i=$((i + 1))
        [ $((i % 10)) = 0 ] && echo "BASALT-SEQ: $i"
        if [ $((i % 100)) = 0 ]; then
            j=$((i - 100))
            : >/tmp/seq.expect
            while [ $j -lt $i ]; do
                printf "%-4095s\n" "basalt seq $j" >>/tmp/seq.expect
                j=$((j + 1))
            done
            dd if=/dev/vda of=/tmp/seq.got bs=4096 skip=$((base + i - 100)) count=100 \
                iflag=direct 2>/dev/null || fails=$((fails + 1))
            if ! cmp /tmp/seq.expect /tmp/seq.got >/tmp/cmp.out 2>&1; then
                fails=$((fails + 1))
                echo "BASALT-SEQ: mismatch before $i: $(cat /tmp/cmp.out)"
            fi
        fi
    done
    if [ "$fails" = 0 ]; then
        result seq PASS
    else
        result seq FAIL "$fails failures"
    fi
}

cmd_ddbench() {
    mb=$(param ddmb 256)
    t0=$(cut -d' ' -f1 /proc/uptime)
    if ! dd if=/dev/zero of=/dev/vda bs=1048576 count="$mb" oflag=direct conv=fsync 2>/tmp/dd.err; then
        result ddbench FAIL "write: $(cat /tmp/dd.err)"
        return
    fi
    t1=$(cut -d' ' -f1 /proc/uptime)
    if ! dd if=/dev/vda of=/dev/null bs=1048576 count="$mb" iflag=direct 2>/tmp/dd.err; then
        result ddbench FAIL "read: $(cat /tmp/dd.err)"
        return
    fi
    t2=$(cut -d' ' -f1 /proc/uptime)
    echo "BASALT-DD: mb=$mb write_s=$(awk "BEGIN { print $t1 - $t0 }") read_s=$(awk "BEGIN { print $t2 - $t1 }")"
    result ddbench PASS
}

# dd_pass DISK MB: O_DIRECT write then read of MB MiB; sets write_s and read_s.
dd_pass() {
    t0=$(cut -d' ' -f1 /proc/uptime)
    if ! dd if=/dev/zero of="$1" bs=1048576 count="$2" oflag=direct conv=fsync 2>/tmp/dd.err; then
        echo "write $1: $(cat /tmp/dd.err)"
        return 1
    fi
    t1=$(cut -d' ' -f1 /proc/uptime)
    if ! dd if="$1" of=/dev/null bs=1048576 count="$2" iflag=direct 2>/tmp/dd.err; then
        echo "read $1: $(cat /tmp/dd.err)"
        return 1
    fi
    t2=$(cut -d' ' -f1 /proc/uptime)
    write_s=$(awk "BEGIN { print $t1 - $t0 }")
    read_s=$(awk "BEGIN { print $t2 - $t1 }")
}

# uptime_now: seconds since boot (10 ms resolution).
uptime_now() {
    cut -d' ' -f1 /proc/uptime
}

# dd_chunked ORDER MB CHUNK: the disks of ORDER take turns, CHUNK MiB each,
# writing MB MiB each, then reading them back; sets w_<disk> and r_<disk>
# to each disk's summed seconds.
dd_chunked() {
    for d in $1; do eval "w_$d=0; r_$d=0"; done
    for phase in w r; do
        c=0
        while [ $((c * $3)) -lt "$2" ]; do
            for d in $1; do
                t0=$(uptime_now)
                if [ "$phase" = w ]; then
                    dd if=/dev/zero of="/dev/$d" bs=1048576 count="$3" seek=$((c * $3)) \
                        oflag=direct conv=fsync 2>/tmp/dd.err || { echo "write $d: $(cat /tmp/dd.err)"; return 1; }
                else
                    dd if="/dev/$d" of=/dev/null bs=1048576 count="$3" skip=$((c * $3)) \
                        iflag=direct 2>/tmp/dd.err || { echo "read $d: $(cat /tmp/dd.err)"; return 1; }
                fi
                t1=$(uptime_now)
                eval "${phase}_$d=\$(awk \"BEGIN { print \$${phase}_$d + $t1 - $t0 }\")"
            done
            c=$((c + 1))
        done
    done
}

cmd_ddpair() {
    mb=$(param ddmb 256)
    chunk=$(param ddchunk 0)
    rounds=$(param ddrounds 6)
    if [ ! -b /dev/vdb ]; then
        result ddpair FAIL "no /dev/vdb"
        return
    fi
    if [ "$(param ddwt 0)" = 1 ]; then
        for d in vda vdb; do
            echo "write through" >/sys/block/$d/cache_type
        done
    fi
    for d in vda vdb; do
        q=/sys/block/$d/queue
        echo "BASALT-DDPAIR-DISK: disk=$d sectors=$(cat /sys/block/$d/size)" \
            "max_sectors_kb=$(cat $q/max_sectors_kb) max_segments=$(cat $q/max_segments)" \
            "max_segment_size=$(cat $q/max_segment_size) write_cache=$(cat $q/write_cache | tr ' ' '-')"
    done
    r=0
    while [ "$r" -lt "$rounds" ]; do
        if [ $((r % 2)) -eq 0 ]; then order="vda vdb"; else order="vdb vda"; fi
        if [ "$chunk" -gt 0 ]; then
            if ! dd_chunked "$order" "$mb" "$chunk" >/tmp/ddpair.err; then
                result ddpair FAIL "$(cat /tmp/ddpair.err)"
                return
            fi
            for d in vda vdb; do
                eval "write_s=\$w_$d; read_s=\$r_$d"
                echo "BASALT-DDPAIR: round=$r disk=$d sectors=$(cat /sys/block/$d/size) mb=$mb write_s=$write_s read_s=$read_s"
            done
            r=$((r + 1))
            continue
        fi
        for d in $order; do
            if ! dd_pass "/dev/$d" "$mb" >/tmp/ddpair.err; then
                result ddpair FAIL "$(cat /tmp/ddpair.err)"
                return
            fi
            echo "BASALT-DDPAIR: round=$r disk=$d sectors=$(cat /sys/block/$d/size) mb=$mb write_s=$write_s read_s=$read_s"
        done
        r=$((r + 1))
    done
    # What each disk cost the guest: its requests (reads and writes
    # completed, from /sys/block/*/stat), the milliseconds its requests
    # spent in the device as the guest's block layer times them (write_ms
    # and flush_ms: the rest of a pass is the guest's own time), and its
    # queue's interrupts.
    for d in vda vdb; do
        virtio=$(basename "$(readlink -f /sys/block/$d/device)")
        irqs=$(grep -E "[[:space:]]$virtio-req\." /proc/interrupts | awk '{ n = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i; s += n } END { print s + 0 }')
        set -- $(cat /sys/block/$d/stat)
        echo "BASALT-DDPAIR-COST: disk=$d reads=$1 writes=$5 irqs=$irqs" \
            "read_ms=$4 write_ms=$8 flush_ms=${16:-0}"
    done
    result ddpair PASS
}

# fiopair: fio jobs on /dev/vda and /dev/vdb in turn (see the header).
FIO_JOBS='seqwrite --rw=write --bs=1M --iodepth=1
seqwrite-qd4 --rw=write --bs=1M --iodepth=4
seqwrite-512k --rw=write --bs=512k --iodepth=2
seqread-qd4 --rw=read --bs=1M --iodepth=4
randread --rw=randread --bs=4k --iodepth=32
randwrite --rw=randwrite --bs=4k --iodepth=32
randwrite-qd1 --rw=randwrite --bs=4k --iodepth=1
mixed --name=bulk --rw=write --bs=1M --iodepth=4 --name=probe --rw=randread --bs=4k --iodepth=1'

cmd_fiopair() {
    mb=$(param fiomb 256)
    runtime=$(param fioruntime 5)
    rounds=$(param fiorounds 2)
    only=$(param fiojobs "" | tr ',' ' ')
    for d in vda vdb vdc; do
        [ -b /dev/$d ] || { result fiopair FAIL "no /dev/$d"; return; }
    done
    mkdir -p /mnt/fio
    if ! mount -t ext4 -o ro /dev/vdc /mnt/fio 2>/tmp/mount.err; then
        result fiopair FAIL "mount /dev/vdc: $(cat /tmp/mount.err)"
        return
    fi
    lib=/mnt/fio/fio/lib
    fio() {
        "$lib/ld-linux-x86-64.so.2" --library-path "$lib" /mnt/fio/fio/bin/fio \
            --eta=never --direct=1 --ioengine=libaio --size="${mb}M" "$@"
    }
    # Both disks written once first: reads then find data on both, not holes.
    for d in vda vdb; do
        if ! fio --filename=/dev/$d --name=prep --rw=write --bs=1M --iodepth=4 \
            >/dev/null 2>/tmp/fio.err; then
            result fiopair FAIL "prep $d: $(tail -n 3 /tmp/fio.err)"
            return
        fi
    done
    : >/tmp/fio.fail
    r=0
    while [ "$r" -lt "$rounds" ]; do
        if [ $((r % 2)) -eq 0 ]; then order="vda vdb"; else order="vdb vda"; fi
        echo "$FIO_JOBS" | while read -r job opts; do
            if [ -n "$only" ] && ! echo " $only " | grep -q " $job "; then
                continue
            fi
            for d in $order; do
                # A job line of several jobs names each of them itself.
                case "$opts" in --name=*) name="" ;; *) name="--name=$job" ;; esac
                # $name and $opts are meant to split into options.
                # shellcheck disable=SC2086
                if ! fio --filename=/dev/$d --runtime="$runtime" --time_based \
                    --output-format=terse --terse-version=3 $name $opts \
                    >/tmp/fio.out 2>/tmp/fio.err; then
                    echo "BASALT-FIO-FAIL: $job $d: $(tail -n 3 /tmp/fio.err)"
                    echo "$job $d" >>/tmp/fio.fail
                    continue
                fi
                while read -r line; do
                    echo "BASALT-FIO: round=$r disk=$d sectors=$(cat /sys/block/$d/size) job=$job $line"
                done </tmp/fio.out
            done
        done
        r=$((r + 1))
    done
    umount /mnt/fio
    if [ -s /tmp/fio.fail ]; then
        result fiopair FAIL "see BASALT-FIO-FAIL lines"
    else
        result fiopair PASS
    fi
}

cmd_idle() {
    n=0
    while true; do
        echo "BASALT-ALIVE: $n"
        n=$((n + 1))
        sleep 1
    done
}

cmds=$(param test "" | tr ',' ' ')
if [ ! -b /dev/vda ]; then
    echo "BASALT-TEST: boot FAIL no /dev/vda"
    cmds=""
fi
for c in $cmds; do
    case "$c" in
    info) cmd_info ;;
    write-pattern) cmd_write_pattern ;;
    verify-pattern) compare verify-pattern guest "$PATTERN_OFFSET" ;;
    verify) compare verify host "$HOST_OFFSET" ;;
    discard) cmd_discard ;;
    flush) cmd_flush ;;
    writethrough) cmd_writethrough ;;
    soak) cmd_soak ;;
    seq) cmd_seq ;;
    idle) cmd_idle ;;
    ddbench) cmd_ddbench ;;
    ddpair) cmd_ddpair ;;
    fiopair) cmd_fiopair ;;
    shell) setsid cttyhack sh ;;
    *) result "$c" FAIL unknown command ;;
    esac
done
sync
echo "BASALT-DONE"
poweroff -f
INIT
chmod 755 "$ROOT/init"

# --- pack ---------------------------------------------------------------------
(cd "$ROOT" && find . | "$BB" cpio -o -H newc 2>/dev/null | "$BB" gzip -9) >"$WORK/initrd"
cp "$KVMLINUZ" "$WORK/vmlinuz"
# Replace the outputs atomically enough for concurrent readers.
mv "$WORK/vmlinuz" "$OUTDIR/vmlinuz"
mv "$WORK/initrd" "$OUTDIR/initrd"
echo "$KREL" >"$OUTDIR/kernel-version"
echo "$STAMP" >"$OUTDIR/stamp"
log "done: $OUTDIR/vmlinuz $OUTDIR/initrd ($KREL)"
