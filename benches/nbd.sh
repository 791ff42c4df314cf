#!/usr/bin/env bash
# Block storage benchmark, same clients, same run, alternating, medians: a 3-replica volume
# (three `blockdrv node` processes on loopback, their logs and blocks in the same directory,
# NBD through a follower's socket... and through the leader's) and blockdrv serving a plain
# file, each against qemu-nbd serving a raw file of the same size in that directory (tmpfs by
# default, so the disk does not decide; BENCH_DIR=/var/tmp for a disk). Targets for the
# replicated volume vs qemu-nbd: read >= 0.8x, write >= 0.5x, 4 KiB write >= 0.3x.
# Failover: SIGKILL of the leader until the next 4 KiB write is acknowledged (target < 2 s);
# also SIGSTOP of the leader (nothing tells the followers; see the end).
#
#   seq write   nbdcopy, 1 MiB requests, 1 connection, from a file of random data
#   hot write   the first 64 MiB (BENCH_HOT_MIB) written 4 times over, the same way
#   seq read    nbdcopy, 1 MiB requests, 1 connection, to null:
#   4k read     qemu-img bench, 4 KiB, queue depth 32, strided offsets (step 257 x 4 KiB)
#   4k write    the same with -w
#
# Each target is written a few times first, unmeasured (a warm-up, BENCH_WARMUP times: by default
# 192 MiB and one volume's worth). Settings: BENCH_RUNS (default 5; medians), BENCH_MIB (volume
# size, default 256, as in the README), BENCH_DIR (default /dev/shm), BENCH_NODE_ARGS (more
# options for every `blockdrv node`, e.g. --defer-logs 0).
set -euo pipefail
. "$(dirname "$0")/../scripts/common.sh"
cd "$REPO"
RUNS=${BENCH_RUNS:-5}
MIB=${BENCH_MIB:-256}
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
HOT=${BENCH_HOT_MIB:-64}
head -c "$((HOT << 20))" "$WORK/src.bin" > "$WORK/hot.bin"
truncate -s "${MIB}M" "$WORK/ours.img" "$WORK/qemu.img"
"$BIN" nbd --unix "$WORK/ours.sock" --export "v=$WORK/ours.img" --log warn &
OURS_PID=$!
PIDS+=($!)
# The 3-node cluster.
PORT=$((20000 + $$ % 20000))
MEMBERS=()
for i in 1 2 3; do MEMBERS+=(--member "$i=127.0.0.1:$((PORT + i))"); done
declare -A NODE
start_node() {
    rm -f "$WORK/n$1.sock"
    "$BIN" node --id "$1" --dir "$WORK/n$1" --listen "127.0.0.1:$((PORT + $1))" "${MEMBERS[@]}" \
        --volume "v:${MIB}M" --nbd-unix "$WORK/n$1.sock" --heartbeat-ms 100 --election-ms 500 \
        --log warn ${BENCH_NODE_ARGS:-} 2>>"$WORK/n$1.log" &
    NODE[$1]=$!
    PIDS+=($!)
}
for i in 1 2 3; do start_node "$i"; done
status() { "$BIN" status --addr "127.0.0.1:$((PORT + $1))" --volume v 2>/dev/null; }
LEADER=
until [ -n "$LEADER" ]; do
    sleep 0.1
    LEADER=$(status 1 | sed -n 's/.*"leader":\([0-9]*\).*/\1/p')
done
FOLLOWER=$((LEADER % 3 + 1))
for i in 1 2 3; do until [ -S "$WORK/n$i.sock" ]; do sleep 0.05; done; done
ln -sf "n$LEADER.sock" "$WORK/raft.sock"
ln -sf "n$FOLLOWER.sock" "$WORK/raftf.sock"
qemu-nbd --socket="$WORK/qemu.sock" --format=raw --persistent --shared=8 --cache=writeback --discard=unmap \
    "$WORK/qemu.img" &
QEMU_PID=$!
PIDS+=($!)
for s in ours qemu; do
    until [ -S "$WORK/$s.sock" ]; do sleep 0.05; done
done
uri() { echo "nbd+unix:///$([ "$1" = qemu ] || echo v)?socket=$WORK/$1.sock"; }

now() { date +%s.%N; }
# MiB/s of one nbdcopy
copy() {
    local t0 t1
    t0=$(now)
    nbdcopy --connections=1 --request-size=1048576 "$1" "$2"
    t1=$(now)
    awk -v m="$MIB" -v a="$t0" -v b="$t1" 'BEGIN { print m / (b - a) }'
}
# MiB/s of writing the first HOT MiB of the target four times over (a hot region rewritten)
hot() {
    local t0 t1
    t0=$(now)
    for _ in 1 2 3 4; do
        nbdcopy --connections=1 --request-size=1048576 "$WORK/hot.bin" "$1"
    done
    t1=$(now)
    awk -v m="$((4 * HOT))" -v a="$t0" -v b="$t1" 'BEGIN { print m / (b - a) }'
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
# After each measurement of the replicated volume, untimed: wait until all three replicas have
# applied the same index (a write is acknowledged once a majority has it; the third replica,
# and the followers' state machines, catch up after), so that the next measurement does not pay
# for the last one. How long that took after writes is printed.
applied() { status "$1" | sed -n 's/.*"last_applied":\([0-9]*\).*/\1/p'; }
settle() {
    [[ $1 == raft* ]] || return 0
    local t0 a b c
    t0=$(now)
    for _ in $(seq 250); do
        a=$(applied 1) b=$(applied 2) c=$(applied 3)
        [[ -n $a && $a == "$b" && $b == "$c" ]] && break
        sleep 0.02
    done
    awk -v a="$t0" -v b="$(now)" 'BEGIN { print (b - a) * 1000 }'
}
# CPU time (user + system, clock ticks) the server processes of a target have used so far: all
# three nodes for the replicated volume.
server_pids() {
    case $1 in
    raft | raftf) echo "${NODE[@]}" ;;
    ours) echo "$OURS_PID" ;;
    qemu) echo "$QEMU_PID" ;;
    esac
}
ticks() {
    local t=0 p
    for p in $(server_pids "$1"); do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
    echo "$t"
}

SERVERS="raft raftf ours qemu"
for metric in write hot_write read rand_read rand_write; do
    for s in $SERVERS; do : > "$WORK/$metric.$s"; done
done
for s in $SERVERS; do : > "$WORK/cpu.$s" && : > "$WORK/rcpu.$s" && : > "$WORK/settle.$s"; done
# Warm-up, not measured: the first writes of each target allocate its files' pages (on this VM,
# fresh pages cost a fault in the host too), which a server that has been running has done; a
# replica's log, and the segments it holds for the volume's data (see --defer-logs), grow until
# the volume is rewritten and its first segments are given back as spares: every target is
# written 192 MiB and a volume more first (twice, for 256 MiB).
WARMUP=${BENCH_WARMUP:-$(((192 + 2 * MIB - 1) / MIB))}
for s in $SERVERS; do
    for _ in $(seq "$WARMUP"); do
        copy "$WORK/src.bin" "$(uri $s)" > /dev/null
        settle "$s" > /dev/null
    done
done
for _ in $(seq "$RUNS"); do
    for s in $SERVERS; do
        c0=$(ticks "$s")
        copy "$WORK/src.bin" "$(uri $s)" >> "$WORK/write.$s"
        echo $(($(ticks "$s") - c0)) >> "$WORK/cpu.$s"
        settle "$s" >> "$WORK/settle.$s"
        hot "$(uri $s)" >> "$WORK/hot_write.$s"
        settle "$s" > /dev/null
        c0=$(ticks "$s")
        copy "$(uri $s)" null: >> "$WORK/read.$s"
        echo $(($(ticks "$s") - c0)) >> "$WORK/rcpu.$s"
        bench4k "$(uri $s)" "" >> "$WORK/rand_read.$s"
        bench4k "$(uri $s)" -w >> "$WORK/rand_write.$s"
        settle "$s" > /dev/null
    done
done
ratio() { awk -v o="$1" -v q="$2" 'BEGIN { printf "%.3f", o / q }'; }
printf '%-11s %-6s %10s %10s %10s %10s   %s\n' metric unit "3 replicas" "(follower)" "file" qemu-nbd \
    "ratios vs qemu-nbd: 3 replicas, via follower, file"
for metric in write hot_write read rand_read rand_write; do
    r=$(median < "$WORK/$metric.raft"); f=$(median < "$WORK/$metric.raftf")
    o=$(median < "$WORK/$metric.ours"); q=$(median < "$WORK/$metric.qemu")
    unit=$([[ $metric == rand_* ]] && echo IOPS || echo MiB/s)
    printf '%-11s %-6s %10.0f %10.0f %10.0f %10.0f   %s %s %s\n' "$metric" "$unit" "$r" "$f" "$o" "$q" \
        "$(ratio "$r" "$q")" "$(ratio "$f" "$q")" "$(ratio "$o" "$q")"
done
# The same per round: each round measures every server back to back, so a ratio of one round
# compares the volume with qemu-nbd under the same conditions (qemu-nbd's speed on this VM
# varies by 2x from one minute to the next); the median of those ratios.
paired() { paste "$WORK/$1.$2" "$WORK/$1.qemu" | awk '{ printf "%.3f\n", $1 / $2 }'; }
for metric in write hot_write read rand_read rand_write; do
    printf '%-11s per-round ratios vs qemu-nbd, median (every round): 3 replicas %s (%s)  via follower %s\n' \
        "$metric" "$(paired "$metric" raft | median)" "$(paired "$metric" raft | tr '\n' ' ' | sed 's/ $//')" \
        "$(paired "$metric" raftf | median)"
done
# Where a write's time goes: the servers' CPU per GiB written (the machine's cores are shared by
# the client and, for the replicated volume, all three nodes).
hz=$(getconf CLK_TCK)
for what in written:cpu read:rcpu; do
    printf 'server CPU per GiB %s (median): ' "${what%%:*}"
    for s in $SERVERS; do
        printf '%s %.2f s  ' "$s" "$(median < "$WORK/${what#*:}.$s" | awk -v h="$hz" -v m="$MIB" '{print $1 / h * 1024 / m}')"
    done
    echo "(raft, raftf: the three nodes together, during the copy)"
done
printf 'replicas all applied after the write copy ended, in ms (every run): %s\n' \
    "$(awk '{printf "%.0f ", $1}' "$WORK/settle.raft" "$WORK/settle.raftf")"
echo "every run (in order), per metric and server:"
for metric in write hot_write read rand_read rand_write; do
    for s in $SERVERS; do
        printf '  %-10s %-6s %s\n' "$metric" "$s" "$(awk '{printf "%.0f ", $1}' "$WORK/$metric.$s")"
    done
done

# Failover, FAILOVER_RUNS times each (default 5), with all three replicas caught up first:
#   kill   SIGKILL of the leader: its followers see its connections end and nothing answer at
#          its address, and elect at once (the killed node is restarted after)
#   stop   SIGSTOP of the leader, as a hung or cut-off node: nothing tells, so openraft's timer
#          elects once the lease the followers gave it has run out (SIGCONT after)
# Each is timed until a 4 KiB write through a survivor is acknowledged (qemu-io retries
# nothing: blockdrv waits for the new leader itself).
agreed_leader() {
    local a b c
    for _ in $(seq 200); do
        a=$(status 1 | sed -n 's/.*"leader":\([0-9]*\).*/\1/p')
        b=$(status 2 | sed -n 's/.*"leader":\([0-9]*\).*/\1/p')
        c=$(status 3 | sed -n 's/.*"leader":\([0-9]*\).*/\1/p')
        [[ -n $a && $a == "$b" && $b == "$c" ]] && { echo "$a"; return; }
        sleep 0.05
    done
    echo "nbd.sh: the nodes do not agree on a leader" >&2
    exit 1
}
: > "$WORK/failover.kill" && : > "$WORK/failover.stop"
for _ in $(seq "${FAILOVER_RUNS:-5}"); do
    for how in kill stop; do
        settle raft > /dev/null
        leader=$(agreed_leader)
        survivor=$((leader % 3 + 1))
        if [ "$how" = kill ]; then kill -9 "${NODE[$leader]}"; else kill -STOP "${NODE[$leader]}"; fi
        t0=$(now)
        qemu-io -f raw -c "write -P 9 0 4k" "nbd+unix:///v?socket=$WORK/n$survivor.sock" >/dev/null
        awk -v a="$t0" -v b="$(now)" 'BEGIN { print b - a }' >> "$WORK/failover.$how"
        if [ "$how" = kill ]; then
            wait "${NODE[$leader]}" 2>/dev/null || true
            start_node "$leader"
            until [ -S "$WORK/n$leader.sock" ]; do sleep 0.05; done
        else
            kill -CONT "${NODE[$leader]}"
        fi
    done
done
for how in kill stop; do
    printf 'failover (%s of the leader -> next write acknowledged): median %.2f s, max %.2f s; every run: %s\n' \
        "$how" "$(median < "$WORK/failover.$how")" "$(sort -g "$WORK/failover.$how" | tail -1)" \
        "$(awk '{printf "%.2f ", $1}' "$WORK/failover.$how")"
done
