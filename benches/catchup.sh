#!/usr/bin/env bash
# How long a new replica takes to catch up, by snapshot: a replica of a volume is moved to a
# node that had none (`blockdrv volume move`), and timed until that node has applied what the
# leader has. Two volumes of the same size, same run: one written whole with random data (the
# baseline: every byte must travel) and one with only SPARSE_MIB written (a new or thin disk,
# whose snapshot carries only its data). Four `blockdrv node`
# processes on loopback, logs purged early (`--snapshot-logs 16 --keep-logs 1`) so that a
# snapshot is the only way to catch up. Prints both times, the ratio, and what the senders
# say they sent.
#
# Settings: BENCH_MIB (volume size, default 1024), SPARSE_MIB (default 16), BENCH_DIR (default
# /dev/shm), KEEP=1 to keep the work directory (the nodes' logs).
set -euo pipefail
. "$(dirname "$0")/../scripts/common.sh"
cd "$REPO"
MIB=${BENCH_MIB:-1024}
SPARSE=${SPARSE_MIB:-16}
for tool in nbdcopy; do
    command -v "$tool" >/dev/null || { echo "catchup.sh: $tool not found (scripts/install-deps.sh)" >&2; exit 1; }
done
cargo build -q --release -p blockdrv --bin blockdrv
BIN=$CARGO_TARGET_DIR/release/blockdrv

WORK=$(mktemp -d "${BENCH_DIR:-/dev/shm}/vpcd-catchup-XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ -n "${KEEP:-}" ] && { echo "kept $WORK"; return; }
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

PORT=$((20000 + $$ % 20000))
addr() { echo "127.0.0.1:$((PORT + $1))"; }
MEMBERS=()
for i in 1 2 3 4; do MEMBERS+=(--member "$i=$(addr "$i")"); done
for i in 1 2 3 4; do
    "$BIN" node --id "$i" --dir "$WORK/n$i" --listen "$(addr "$i")" "${MEMBERS[@]}" \
        --nbd-unix "$WORK/n$i.sock" --heartbeat-ms 100 --election-ms 500 \
        --snapshot-logs 16 --keep-logs 1 --log info 2>>"$WORK/n$i.log" &
    PIDS+=($!)
done
for i in 1 2 3 4; do until [ -S "$WORK/n$i.sock" ]; do sleep 0.05; done; done

status() { "$BIN" status --addr "$(addr "$1")" --volume "$2" 2>/dev/null || true; }
field() { sed -n "s/.*\"$1\":\\([0-9]*\\).*/\\1/p"; }
now() { date +%s.%N; }

head -c "$((MIB << 20))" /dev/urandom > "$WORK/full.bin"
head -c "$((SPARSE << 20))" /dev/urandom > "$WORK/sparse.bin"
declare -A TIME
for vol in full sparse; do
    "$BIN" volume create --addr "$(addr 1)" "$vol" "${MIB}M" >/dev/null
    # Members: the nodes whose status names a leader.
    members=()
    until [ ${#members[@]} -eq 3 ]; do
        sleep 0.1
        members=()
        for i in 1 2 3 4; do
            [ -n "$(status "$i" "$vol" | field leader)" ] && members+=("$i")
        done
    done
    spare=$(for i in 1 2 3 4; do [[ " ${members[*]} " == *" $i "* ]] || echo "$i"; done)
    leader=
    until [ -n "$leader" ]; do leader=$(status "${members[0]}" "$vol" | field leader); done
    # Written four times (the same data), so that the log is purged past the writes on
    # both volumes: 16 MiB of log at most is kept, the spare needs a snapshot.
    for _ in 1 2 3 4; do
        nbdcopy --request-size=1048576 "$WORK/$vol.bin" "nbd+unix:///$vol?socket=$WORK/n$leader.sock"
    done
    # Snapshots and purges are checked every 250 ms: give them time to happen.
    sleep 1
    # A member other than the leader hands its replica to the spare.
    from=$(for i in "${members[@]}"; do [ "$i" = "$leader" ] || echo "$i"; done | head -1)
    target=$(status "$leader" "$vol" | field last_applied)
    t0=$(now)
    "$BIN" volume move --addr "$(addr "$leader")" "$vol" "$from" "$spare=$(addr "$spare")" >/dev/null
    until a=$(status "$spare" "$vol" | field last_applied) && [ -n "$a" ] && [ "$a" -ge "$target" ]; do
        sleep 0.02
    done
    TIME[$vol]=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }')
    sent=$(grep -h " sent: .*volume=$vol " "$WORK"/n*.log | tail -1 | sed 's/.* sent: //' || true)
    echo "  $vol: the snapshot sent: ${sent:-none}"
done
printf 'new replica caught up (%s MiB volume): written whole %s s, %s MiB written %s s, ratio %.3f\n' \
    "$MIB" "${TIME[full]}" "$SPARSE" "${TIME[sparse]}" \
    "$(awk -v a="${TIME[sparse]}" -v b="${TIME[full]}" 'BEGIN { print a / b }')"
