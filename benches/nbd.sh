#!/usr/bin/env bash
# NBD front-end benchmark: blockdrv serving a raw file against qemu-nbd serving a raw file of
# the same size in the same directory (tmpfs, so the disk does not decide), same clients, same
# run, alternating. Until volumes are raft-replicated (issue 6) this measures the NBD server
# alone; the issue's targets (3 replicas vs qemu-nbd: read >= 0.8x, write >= 0.5x, 4 KiB
# write >= 0.3x) apply to replicated volumes.
#
#   seq write   nbdcopy, 1 MiB requests, 1 connection, from a file of random data
#   seq read    nbdcopy, 1 MiB requests, 1 connection, to null:
#   4k read     qemu-img bench, 4 KiB, queue depth 32, strided offsets (step 257 x 4 KiB)
#   4k write    the same with -w
#
# Settings: BENCH_RUNS (default 3; medians), BENCH_MIB (volume size, default 1024),
# BENCH_DIR (default /dev/shm).
set -euo pipefail
. "$(dirname "$0")/../scripts/common.sh"
cd "$REPO"
RUNS=${BENCH_RUNS:-3}
MIB=${BENCH_MIB:-1024}
for tool in nbdcopy qemu-nbd qemu-img; do
    command -v "$tool" >/dev/null || { echo "nbd.sh: $tool not found (scripts/install-deps.sh)" >&2; exit 1; }
done
cargo build -q -p blockdrv --bin blockdrv
BIN=$CARGO_TARGET_DIR/debug/blockdrv
cargo build -q --release -p blockdrv --bin blockdrv && BIN=$CARGO_TARGET_DIR/release/blockdrv

WORK=$(mktemp -d "${BENCH_DIR:-/dev/shm}/vpcd-nbdbench-XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

head -c "$((MIB << 20))" /dev/urandom > "$WORK/src.bin"
truncate -s "${MIB}M" "$WORK/ours.img" "$WORK/qemu.img"
"$BIN" nbd --unix "$WORK/ours.sock" --export "v=$WORK/ours.img" --log warn &
PIDS+=($!)
qemu-nbd --socket="$WORK/qemu.sock" --format=raw --persistent --shared=8 --cache=writeback --discard=unmap \
    "$WORK/qemu.img" &
PIDS+=($!)
for s in ours qemu; do
    until [ -S "$WORK/$s.sock" ]; do sleep 0.05; done
done
uri() { echo "nbd+unix:///$([ "$1" = ours ] && echo v)?socket=$WORK/$1.sock"; }

now() { date +%s.%N; }
# MiB/s of one nbdcopy
copy() {
    local t0 t1
    t0=$(now)
    nbdcopy --connections=1 --request-size=1048576 "$1" "$2"
    t1=$(now)
    awk -v m="$MIB" -v a="$t0" -v b="$t1" 'BEGIN { print m / (b - a) }'
}
# IOPS of one qemu-img bench run (it prints "Run completed in N seconds.")
COUNT=$((MIB * 64))
bench4k() {
    local secs
    secs=$(qemu-img bench -f raw -c "$COUNT" -d 32 -s 4096 -S $((257 * 4096)) $2 "$1" \
        | sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p')
    awk -v c="$COUNT" -v s="$secs" 'BEGIN { print c / s }'
}
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

for metric in write read rand_read rand_write; do
    for s in ours qemu; do : > "$WORK/$metric.$s"; done
done
for _ in $(seq "$RUNS"); do
    for s in ours qemu; do
        copy "$WORK/src.bin" "$(uri $s)" >> "$WORK/write.$s"
        copy "$(uri $s)" null: >> "$WORK/read.$s"
        bench4k "$(uri $s)" "" >> "$WORK/rand_read.$s"
        bench4k "$(uri $s)" -w >> "$WORK/rand_write.$s"
    done
done
printf '%-12s %14s %14s %8s\n' metric blockdrv qemu-nbd ratio
for metric in write read rand_read rand_write; do
    o=$(median < "$WORK/$metric.ours")
    q=$(median < "$WORK/$metric.qemu")
    unit=$([[ $metric == rand_* ]] && echo IOPS || echo MiB/s)
    printf '%-12s %10.0f %-5s %8.0f %-5s %6.3f\n' "$metric" "$o" "$unit" "$q" "$unit" "$(awk -v o="$o" -v q="$q" 'BEGIN { print o / q }')"
done
