#!/bin/bash
# Runs a host program inside a throw-away TCG guest with the Debian kernel, for tests that need
# kernel features the host kernel lacks (bridge VLAN filtering on this project's CI).
#
# usage: images/run-in-guest.sh [-m "MODULE..."] [-b "BINARY..."] [-t SECONDS] -- PROGRAM [ARG...]
#
#   -m  kernel modules to load, dependencies first (from modules.dep of the guest kernel)
#   -b  host binaries to put in the guest's PATH with their libraries (e.g. "ip bridge ping")
#   -t  time limit for the whole run (default 600)
#
# The guest is /boot/vmlinuz-KVER (VPCD_GUEST_KVER, default the newest *-amd64, as
# images/build.sh) booted by QEMU with an initramfs made here: busybox, PROGRAM and the binaries
# with the shared libraries ldd lists, the modules, and an /init that mounts proc, sys, bpffs,
# tmpfs /run and /tmp, loads the modules, runs PROGRAM with ARGs (cwd /, HOME=/tmp), prints
# its exit status and powers off. PROGRAM's output comes through the serial console to stdout;
# the script exits with PROGRAM's status (125 if the guest gave none: crash or time-out).
set -euo pipefail

die() { echo "run-in-guest: $*" >&2; exit 125; }

MODULES=""
BINARIES=""
TIMEOUT=600
while getopts m:b:t: o; do
    case $o in
    m) MODULES=$OPTARG ;;
    b) BINARIES=$OPTARG ;;
    t) TIMEOUT=$OPTARG ;;
    *) die "usage: $0 [-m MODULES] [-b BINARIES] [-t SECONDS] -- PROGRAM [ARG...]" ;;
    esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || die "no program"
PROGRAM=$(readlink -f "$1")
shift
[ -x "$PROGRAM" ] || die "$PROGRAM is not executable"

if [ -n "${VPCD_GUEST_KVER:-}" ]; then
    KVER=$VPCD_GUEST_KVER
else
    KVER=$(cd /boot && ls vmlinuz-*-amd64 2>/dev/null | sed 's/^vmlinuz-//' | sort -V | tail -n 1)
fi
[ -n "$KVER" ] && [ -r "/boot/vmlinuz-$KVER" ] || die "no /boot/vmlinuz-*-amd64 (install linux-image-amd64)"
BUSYBOX=/bin/busybox
# (grep reads all of the list: with -q it could exit early and fail the pipe under pipefail)
[ -x "$BUSYBOX" ] && "$BUSYBOX" --list | grep -x insmod >/dev/null || die "busybox with insmod needed (busybox-static)"
QEMU=$(command -v qemu-system-x86_64) || die "qemu-system-x86_64 not found"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/vpcd-guest.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
R=$TMP/root
mkdir -p "$R"/{bin,dev,proc,sys,run,tmp,lib/modules,test}

# A host file and every shared library ldd lists for it, at the same paths.
copy_with_libs() {
    local f=$1 dst=$2 lib
    cp -L "$f" "$R$dst"
    ldd "$f" 2>/dev/null | grep -o '/[^ ]*' | while read -r lib; do
        [ -e "$R$lib" ] && continue
        mkdir -p "$R$(dirname "$lib")"
        cp -L "$lib" "$R$lib"
    done
}

cp "$BUSYBOX" "$R/bin/busybox"
copy_with_libs "$PROGRAM" /test/program
for b in $BINARIES; do
    p=$(command -v "$b") || die "binary $b not found"
    copy_with_libs "$p" "/bin/$b"
done

# Modules in load order, decompressed (busybox insmod reads plain .ko).
n=0
if [ -n "$MODULES" ]; then
    for m in $MODULES; do
        modprobe -S "$KVER" --show-depends "$m" || die "module $m not found for $KVER"
    done | awk '$1 == "insmod" && !seen[$2]++ { print $2 }' >"$TMP/mods"
    while read -r m; do
        n=$((n + 1))
        dst=$R/lib/modules/$(printf %03d "$n")-$(basename "${m%.ko*}").ko
        case $m in
        *.ko) cp "$m" "$dst" ;;
        *.ko.xz) xz -dc "$m" >"$dst" ;;
        *.ko.gz) gzip -dc "$m" >"$dst" ;;
        *.ko.zst) zstd -qdc "$m" >"$dst" ;;
        esac
    done <"$TMP/mods"
fi

{
    echo '#!/bin/busybox sh'
    echo '/bin/busybox --install -s /bin'
    echo 'export PATH=/bin HOME=/tmp RUST_BACKTRACE=1'
    echo 'mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev'
    echo 'mount -t tmpfs run /run; mount -t tmpfs tmp /tmp; mount -t bpf bpf /sys/fs/bpf'
    echo 'for m in /lib/modules/*.ko; do [ -e "$m" ] && insmod "$m"; done'
    echo 'ip link set lo up 2>/dev/null || busybox ip link set lo up'
    printf 'cd / && /test/program'
    printf ' %q' "$@"
    echo
    echo 'echo "VPCD-GUEST-EXIT=$?"'
    echo 'poweroff -f'
} >"$R/init"
chmod +x "$R/init"
(cd "$R" && find . | cpio -o -H newc --quiet) >"$TMP/initramfs.cpio"

# Console to stdout; the exit status from the marker line.
set +e
timeout --kill-after=10 "$TIMEOUT" "$QEMU" -machine q35 -accel tcg -cpu max -smp 2 -m 1024 \
    -nodefaults -no-reboot -display none -serial stdio \
    -kernel "/boot/vmlinuz-$KVER" -initrd "$TMP/initramfs.cpio" \
    -append "console=ttyS0 panic=-1 quiet loglevel=3 cryptomgr.notests" </dev/null |
    tee "$TMP/console" | tr -d '\r'
set -e
rc=$({ grep -a -o 'VPCD-GUEST-EXIT=[0-9]*' "$TMP/console" || true; } | tail -n 1 | cut -d= -f2)
[ -n "$rc" ] || die "the guest reported no exit status (crash or time-out after ${TIMEOUT}s)"
exit "$rc"
