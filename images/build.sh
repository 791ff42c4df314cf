#!/usr/bin/env bash
# Builds the vpcd test-guest images from Debian packages already on the machine.
#
#   images/build.sh OUTDIR
#
# OUTDIR/vmlinux            ELF kernel extracted from /boot/vmlinuz-KVER (boot with -kernel)
# OUTDIR/initramfs.cpio.gz  busybox userland + virtio/ACPI/ext4/... modules + /init
# OUTDIR/disk.qcow2         MBR disk booted by the firmware: syslinux on a FAT partition loads
#                           the bzImage + the same initramfs, which mounts the ext4 root
#                           partition (same userland tree) and switches to it
#
# Reproducible (same inputs -> byte-identical outputs) and cheap when nothing changed: a stamp
# of every input is kept in OUTDIR/.stamp. Runs as root. See images/README.md.
#
# Environment: VPCD_GUEST_KVER (default: newest /boot/vmlinuz-*-amd64),
#              SOURCE_DATE_EPOCH (default: fixed, 2024-01-01 00:00:00 UTC),
#              VPCD_DISK_SIZE_MIB (virtual size of disk.qcow2, default 1024).
set -euo pipefail

if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
OUT=$1
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
GUEST=$HERE/guest
export LC_ALL=C TZ=UTC
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1704067200}
DISK_MIB=${VPCD_DISK_SIZE_MIB:-1024}

die() { echo "images/build.sh: $*" >&2; exit 1; }

if [ -n "${VPCD_GUEST_KVER:-}" ]; then
    KVER=$VPCD_GUEST_KVER
else
    KVER=$(cd /boot && ls vmlinuz-*-amd64 2>/dev/null | sed 's/^vmlinuz-//' | sort -V | tail -n 1)
    [ -n "$KVER" ] || die "no /boot/vmlinuz-*-amd64 (install linux-image-amd64)"
fi
KIMG=/boot/vmlinuz-$KVER
MODDIR=/lib/modules/$KVER
BUSYBOX=/bin/busybox
SYSLINUX_MBR=/usr/lib/syslinux/mbr/mbr.bin

# Modules, in load order (dependencies are added from modules.dep in front of what needs them).
MODS_BASE="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_mmio
           failover net_failover virtio_net virtio_blk button evdev"
MODS_ROOT="crc16 mbcache jbd2 crc32c_generic ext4"
MODS_SCSI="scsi_common scsi_mod libata libahci ahci virtio_scsi crct10dif_generic sd_mod cdrom sr_mod"
MODS_CIDATA="cdrom isofs nls_cp437 nls_ascii nls_utf8 fat vfat"

[ -r "$KIMG" ] || die "$KIMG missing (install linux-image-amd64)"
[ -r "$MODDIR/modules.dep" ] || die "$MODDIR/modules.dep missing"
[ -x "$BUSYBOX" ] || die "$BUSYBOX missing (install busybox-static)"
for c in cpio gzip xz qemu-img mkfs.ext4 debugfs mformat mcopy syslinux flock sha256sum; do
    command -v "$c" >/dev/null || die "$c not found (packages: cpio gzip xz-utils qemu-utils e2fsprogs mtools syslinux util-linux coreutils)"
done
[ -r "$SYSLINUX_MBR" ] || die "$SYSLINUX_MBR missing (install syslinux-common)"

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# ---- up-to-date check ---------------------------------------------------------------------------
# The stamp covers: this script and the guest tree (content), the kernel, modules, busybox and
# syslinux files (path, size, mtime), the tool versions, and the settings above.
inputs_stamp() {
    {
        echo "kver=$KVER epoch=$SOURCE_DATE_EPOCH disk=$DISK_MIB"
        sha256sum "$HERE/build.sh"
        (cd "$GUEST" && find . -print0 | sort -z | xargs -0 stat -c '%n %a %F' && \
            find . -type f -print0 | sort -z | xargs -0 sha256sum)
        stat -L -c '%n %s %Y' "$KIMG" "$MODDIR/modules.dep" "$BUSYBOX" "$SYSLINUX_MBR" \
            "$(command -v syslinux)"
        dpkg-query -W -f '${Package} ${Version}\n' busybox-static cpio gzip xz-utils e2fsprogs \
            mtools syslinux syslinux-common qemu-utils 2>/dev/null || true
    } | sha256sum | cut -d' ' -f1
}
outputs_stamp() {
    (cd "$OUT" && stat -c '%n %s %Y' vmlinux initramfs.cpio.gz disk.qcow2 2>/dev/null)
}

exec 9>"$OUT/.lock"
flock 9
STAMP=$(inputs_stamp)
if [ -f "$OUT/.stamp" ] && [ "$(head -n 1 "$OUT/.stamp")" = "$STAMP" ] &&
    [ "$(tail -n +2 "$OUT/.stamp")" = "$(outputs_stamp)" ]; then
    exit 0
fi

echo "images/build.sh: building guest images for $KVER in $OUT" >&2
rm -rf "$OUT/.stamp" "$OUT"/.build.* # (leftovers of an interrupted build: we hold the lock)
TMP=$(mktemp -d "$OUT/.build.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

# ---- vmlinux: the ELF kernel inside the bzImage (xz stream at the \xfd7zXZ\0 magic) -------------
off=$(grep -m 1 -obUaP '\xfd7zXZ\x00' "$KIMG" | head -n 1 | cut -d: -f1)
[ -n "$off" ] || die "no xz stream in $KIMG"
# (xz stops reading at the end of the stream: tail's SIGPIPE is expected, xz's status counts)
{ tail -c +$((off + 1)) "$KIMG" || true; } | xz -dc --single-stream >"$TMP/vmlinux"
[ "$(head -c 4 "$TMP/vmlinux" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] || die "extracted kernel is not ELF"

# ---- root filesystem tree (shared by the initramfs and the disk's ext4 root) --------------------
R=$TMP/root
mkdir -p "$R"
for d in bin sbin usr/bin usr/sbin usr/local/bin usr/local/sbin etc/vpcd dev proc sys run tmp \
    root mnt newroot var/log "lib/modules/$KVER"; do
    mkdir -p "$R/$d"
done
cp "$BUSYBOX" "$R/bin/busybox"
for a in $("$R/bin/busybox" --list-full); do
    case "$a" in bin/busybox | linuxrc) continue ;; esac
    [ -e "$R/$a" ] || [ -L "$R/$a" ] || ln -s /bin/busybox "$R/$a"
done
cp -a "$GUEST/." "$R/"
ln -sfn /run/resolv.conf "$R/etc/resolv.conf"
ln -sfn /proc/mounts "$R/etc/mtab"
touch "$R/etc/fstab"
mknod -m 600 "$R/dev/console" c 5 1
mknod -m 666 "$R/dev/null" c 1 3

# Modules: dependency-ordered lists for /init (paths relative to /lib/modules) + a modules.dep
# subset so that busybox modprobe and the kernel's request_module work for what is shipped.
declare -A MODPATH=() MODDEPS=() DONE=()
while IFS= read -r line; do
    p=${line%%:*}
    n=${p##*/}; n=${n%.ko*}; n=${n//-/_}
    MODPATH[$n]=$p
    MODDEPS[$n]=${line#*:}
done <"$MODDIR/modules.dep"
resolve() { # resolve NAME: print NAME's dependencies (depth first) and then NAME, each once
    local n=${1//-/_} d dn
    [ -n "${MODPATH[$n]:-}" ] || die "module $1 not in $MODDIR/modules.dep"
    [ -n "${DONE[$n]:-}" ] && return 0
    for d in ${MODDEPS[$n]}; do
        dn=${d##*/}; dn=${dn%.ko*}
        resolve "$dn"
    done
    DONE[$n]=1
    echo "$KVER/${MODPATH[$n]}"
}
modlist() { # modlist FILE MOD...
    local f=$1 m; shift
    DONE=()
    for m in "$@"; do resolve "$m"; done >"$R/etc/vpcd/$f"
}
modlist modules.base $MODS_BASE
modlist modules.root $MODS_ROOT
modlist modules.scsi $MODS_SCSI
modlist modules.cidata $MODS_CIDATA
# Compressed modules (newer Debian kernels ship .ko.xz) are stored decompressed: busybox insmod
# takes them as they are and loading is faster.
sort -u "$R"/etc/vpcd/modules.* | while read -r p; do
    dst=$R/lib/modules/${p%.ko*}.ko
    mkdir -p "${dst%/*}"
    case "$p" in
    *.ko) cp "$MODDIR/${p#*/}" "$dst" ;;
    *.ko.xz) xz -dc "$MODDIR/${p#*/}" >"$dst" ;;
    *.ko.gz) gzip -dc "$MODDIR/${p#*/}" >"$dst" ;;
    *.ko.zst) zstd -qdc "$MODDIR/${p#*/}" >"$dst" ;;
    *) die "unexpected module file $p" ;;
    esac
done
sed -i 's/\.ko\.[a-z]*$/.ko/' "$R"/etc/vpcd/modules.*
(cd "$R/lib/modules/$KVER" && find kernel -name '*.ko' | sort) >"$TMP/shipped"
sed 's/\.ko\.[a-z]*\b/.ko/g' "$MODDIR/modules.dep" | grep -F -f <(sed 's/$/:/' "$TMP/shipped") |
    sort >"$R/lib/modules/$KVER/modules.dep"
cp "$MODDIR/modules.builtin" "$R/lib/modules/$KVER/"
names=$(sed 's|.*/||; s|\.ko.*||' "$TMP/shipped" | sed 's/-/_/g' | sort -u)
awk -v names="$names" 'BEGIN { n = split(names, a, "\n"); for (i = 1; i <= n; i++) keep[a[i]] = 1 }
    $1 == "alias" && ($3 in keep)' "$MODDIR/modules.alias" | sort >"$R/lib/modules/$KVER/modules.alias"

# Normalise modes and times: the same inputs give the same tree.
find "$R" -type d -exec chmod 0755 {} +
find "$R" -type f -perm /111 -exec chmod 0755 {} +
find "$R" -type f ! -perm /111 -exec chmod 0644 {} +
chmod 0700 "$R/root"
chmod 1777 "$R/tmp"
chmod 0600 "$R/dev/console"
chmod 0666 "$R/dev/null"
chown -R -h 0:0 "$R"
find "$R" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

# ---- initramfs ----------------------------------------------------------------------------------
(cd "$R" && find . -mindepth 1 -print0 | sort -z |
    cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) |
    gzip -9 -n >"$TMP/initramfs.cpio.gz"

# ---- disk: MBR (syslinux mbr.bin) | p1 FAT16 "VPCDBOOT" (syslinux, bzImage, initramfs) |
#            p2 ext4 "vpcd-root" (the tree above) ----------------------------------------------
SECT=512
P1_START=2048                     # 1 MiB
P1_SECTORS=$((48 * 2048))         # 48 MiB
P2_START=$((P1_START + P1_SECTORS))
TOTAL=$((DISK_MIB * 2048))
P2_SECTORS=$((TOTAL - P2_START))
[ "$P2_SECTORS" -ge $((64 * 2048)) ] || die "VPCD_DISK_SIZE_MIB too small"
RAW=$TMP/disk.raw
truncate -s $((TOTAL * SECT)) "$RAW"

le32() { # little-endian 32-bit as printf escapes
    printf '\\x%02x\\x%02x\\x%02x\\x%02x' $(($1 & 255)) $(($1 >> 8 & 255)) $(($1 >> 16 & 255)) $(($1 >> 24 & 255))
}
{
    head -c 440 "$SYSLINUX_MBR"
    printf 'VPCD\0\0'                                       # disk signature, reserved
    printf "\\x80\\xfe\\xff\\xff\\x0e\\xfe\\xff\\xff$(le32 $P1_START)$(le32 $P1_SECTORS)"  # active, FAT16 LBA
    printf "\\x00\\xfe\\xff\\xff\\x83\\xfe\\xff\\xff$(le32 $P2_START)$(le32 $P2_SECTORS)"  # Linux
    head -c 32 /dev/zero
    printf '\x55\xaa'
} | dd of="$RAW" conv=notrunc status=none
[ "$(stat -c %s "$RAW")" = $((TOTAL * SECT)) ] || die "MBR write changed the disk size"

# Boot partition (mtools: no mount needed). SOURCE_DATE_EPOCH fixes the mtools timestamps.
BOOTFS="$RAW@@$((P1_START * SECT))"
export MTOOLS_SKIP_CHECK=1 MTOOLS_NO_VFAT=0
mformat -i "$BOOTFS" -T "$P1_SECTORS" -h 64 -s 32 -H "$P1_START" -N 7670cd00 -v VPCDBOOT ::
syslinux --install --offset $((P1_START * SECT)) "$RAW"
cat >"$TMP/syslinux.cfg" <<EOF
DEFAULT vpcd
PROMPT 0
TIMEOUT 0
NOESCAPE 1
LABEL vpcd
  KERNEL /vmlinuz
  INITRD /initramfs.cpio.gz
  APPEND console=ttyS0 panic=-1 quiet cryptomgr.notests vpcd.root=LABEL=vpcd-root
EOF
mkdir "$TMP/boot"
mv "$TMP/syslinux.cfg" "$TMP/boot/"
cp "$KIMG" "$TMP/boot/vmlinuz"
cp "$TMP/initramfs.cpio.gz" "$TMP/boot/"
touch -d "@$SOURCE_DATE_EPOCH" "$TMP"/boot/*
mcopy -i "$BOOTFS" -m "$TMP/boot/syslinux.cfg" "$TMP/boot/vmlinuz" "$TMP/boot/initramfs.cpio.gz" ::/

# Root partition: ext4 populated from the tree (no mount needed); fixed UUID, hash seed, times.
ROOTUUID=7670cd00-0000-4000-8000-000000000002
E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH mkfs.ext4 -q -F -L vpcd-root -U "$ROOTUUID" -m 0 -b 4096 \
    -E "offset=$((P2_START * SECT)),hash_seed=$ROOTUUID,root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0,nodiscard" \
    -d "$R" "$RAW" $((P2_SECTORS / 8))

# mke2fs -d copies atime/ctime from the build tree (ctime cannot be set there): pin them.
(cd "$R" && find . -print | sort) | while IFS= read -r p; do
    p=${p#.}
    printf 'sif "%s" atime @%s\nsif "%s" ctime @%s\n' "${p:-/}" "$SOURCE_DATE_EPOCH" "${p:-/}" "$SOURCE_DATE_EPOCH"
done >"$TMP/debugfs.cmd"
E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH debugfs -w -f "$TMP/debugfs.cmd" "$RAW?offset=$((P2_START * SECT))" >"$TMP/debugfs.log" 2>&1
if grep -v -e '^debugfs' "$TMP/debugfs.log" | grep -q .; then
    cat "$TMP/debugfs.log" >&2
    die "debugfs failed"
fi

qemu-img convert -f raw -O qcow2 "$RAW" "$TMP/disk.qcow2"

# ---- install ------------------------------------------------------------------------------------
for f in vmlinux initramfs.cpio.gz disk.qcow2; do
    mv -f "$TMP/$f" "$OUT/$f"
done
{ echo "$STAMP"; outputs_stamp; } >"$OUT/.stamp"
echo "images/build.sh: done" >&2
