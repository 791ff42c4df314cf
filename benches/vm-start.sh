#!/usr/bin/env bash
# VM start benchmark: `vpcctl create` until the guest prints its boot marker, against
# `virsh create` of the same domain XML by hand, alternating, RUNS times each (default 7).
# Prints each run, the medians and the ratio vpcd/virsh (target <= 1.10).
# Needs the host set up by scripts/setup.sh (vpcd on the system bus, images in /var/lib/vpcd).
set -euo pipefail
RUNS=${RUNS:-7}
IMG=/var/lib/vpcd/images
WORK=$(mktemp -d /tmp/vpcd-bench-XXXXXX)
chmod 0755 "$WORK"
trap 'virsh -q destroy bench-virsh >/dev/null 2>&1 || true; vpcctl destroy bench-vpcd >/dev/null 2>&1 || true; vpcctl undefine bench-vpcd >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
MARKER=VPCD-GUEST-BOOTED

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
wait_marker() { # file
    for _ in $(seq 1 6000); do
        grep -q "$MARKER" "$1" 2>/dev/null && return 0
        sleep 0.005
    done
    echo "no boot marker in $1" >&2; return 1
}
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

cat > "$WORK/spec.toml" <<TOML
name = "bench-vpcd"
memory_mib = 256
[boot]
kernel = "$IMG/vmlinux"
initrd = "$IMG/initramfs.cpio.gz"
cmdline = "console=ttyS0 panic=-1 quiet"
TOML
vpcctl destroy bench-vpcd >/dev/null 2>&1 || true
vpcctl undefine bench-vpcd >/dev/null 2>&1 || true

# The same domain XML for virsh: vpcd's, renamed, without its UUID and metadata, its own log.
vpcctl define "$WORK/spec.toml" >/dev/null
virsh dumpxml --inactive bench-vpcd \
  | sed -e 's|<name>bench-vpcd</name>|<name>bench-virsh</name>|' -e '/<uuid>/d' \
        -e '/<metadata>/,/<\/metadata>/d' \
        -e "s|/var/lib/vpcd/vms/bench-vpcd/console.log|$WORK/virsh-console.log|" > "$WORK/virsh.xml"
vpcctl undefine bench-vpcd >/dev/null

vp=(); vi=()
for i in $(seq 1 "$RUNS"); do
    t0=$(now_ms)
    vpcctl create "$WORK/spec.toml" >/dev/null
    wait_marker /var/lib/vpcd/vms/bench-vpcd/console.log
    t1=$(now_ms)
    vp+=($((t1 - t0)))
    vpcctl destroy bench-vpcd >/dev/null; vpcctl undefine bench-vpcd >/dev/null

    rm -f "$WORK/virsh-console.log"
    t0=$(now_ms)
    virsh -q create "$WORK/virsh.xml" >/dev/null
    wait_marker "$WORK/virsh-console.log"
    t1=$(now_ms)
    vi+=($((t1 - t0)))
    virsh -q destroy bench-virsh >/dev/null
    printf 'run %d: vpcctl create %5d ms   virsh create %5d ms\n' "$i" "${vp[-1]}" "${vi[-1]}"
done
mv=$(printf '%s\n' "${vp[@]}" | median)
mi=$(printf '%s\n' "${vi[@]}" | median)
awk -v a="$mv" -v b="$mi" 'BEGIN { printf "median: vpcctl create %s ms, virsh create %s ms, ratio %.3f (target <= 1.10)\n", a, b, a / b }'
