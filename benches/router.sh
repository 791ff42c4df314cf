#!/usr/bin/env bash
# Router benchmark: iperf3 TCP from a namespace "VM" through a vpcd router with SNAT to an
# external namespace, against plain forwarding through the same router namespace with its
# nftables table removed (no rules at all; the external side routes the subnet back), in the
# same run. Target: ratio SNAT / plain >= 0.9.
#
#   vm (10.60.1.5) -- veth port -- tenant bridge -- leg dh1 (10.60.1.1) [router namespace:
#   forwarding, nft table ip vpcd, ext0 203.0.113.10] -- veth vpce1 -- bridge xbr -- world
#   (203.0.113.1, iperf3 server)
#
# Runs its own vpcd (debug build, private D-Bus, own state dir, namespaces `vpcdr<pid>*`, link
# prefix `rb`); removes everything at the end, also on failure or Ctrl-C.
# Settings: BENCH_RUNS (default 3, alternating, medians), BENCH_SECS (iperf3 -t, default 5),
# BENCH_STREAMS (iperf3 -P, default 2).
set -euo pipefail
. "$(dirname "$0")/../scripts/common.sh"
cd "$REPO"
RUNS=${BENCH_RUNS:-3}
SECS=${BENCH_SECS:-5}
STREAMS=${BENCH_STREAMS:-2}

[ "$(id -u)" = 0 ] || { echo "router.sh: needs root" >&2; exit 1; }
for tool in ip nft iperf3 dbus-daemon jq; do
    command -v "$tool" >/dev/null || { echo "router.sh: $tool not found" >&2; exit 1; }
done

P=vpcdr$$
H=${P}h W=${P}w V=${P}v
WORK=$(mktemp -d "/tmp/vpcd-routerbench-XXXXXX")
BPF=/sys/fs/bpf/vpcd-routerbench-$$
VPCD_PID="" BUS_PID=""
cleanup() {
    if [ -n "$VPCD_PID" ]; then kill -9 "$VPCD_PID" 2>/dev/null; wait "$VPCD_PID" 2>/dev/null; fi || true
    [ -n "$BUS_PID" ] && kill "$BUS_PID" 2>/dev/null || true
    for ns in $(ip netns list | awk '{print $1}'); do
        case $ns in "$P"* | rb-svc-*) ip netns pids "$ns" 2>/dev/null | xargs -r kill -9; ip netns del "$ns" ;; esac
    done
    [ -n "${BENCH_KEEP_LOG:-}" ] && cp "$WORK/vpcd.log" "$BENCH_KEEP_LOG"
    rm -rf "$WORK" "$BPF"
}
trap cleanup EXIT INT TERM

cargo build --bins -q
VPCD=$CARGO_TARGET_DIR/debug/vpcd VPCTL=$CARGO_TARGET_DIR/debug/vpcctl

for ns in "$H" "$W" "$V"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip -n "$H" link add xbr type bridge && ip -n "$H" link set xbr up
ip -n "$H" link add wx type veth peer eth0 netns "$W"
ip -n "$H" link set wx master xbr up
ip -n "$W" addr add 203.0.113.1/24 dev eth0 && ip -n "$W" link set eth0 up

cat >"$WORK/bus.conf" <<EOF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN" "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>system</type><listen>unix:path=$WORK/bus.sock</listen><auth>EXTERNAL</auth>
<policy context="default"><allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/><allow own="*"/></policy></busconfig>
EOF
dbus-daemon --config-file="$WORK/bus.conf" --nofork --nopidfile & BUS_PID=$!
for _ in $(seq 100); do [ -S "$WORK/bus.sock" ] && break; sleep 0.05; done
BUS=unix:path=$WORK/bus.sock
: >"$WORK/none.toml"
VPCD_CONFIG=$WORK/none.toml "$VPCD" --bus-address "$BUS" --state-dir "$WORK/state" \
    --backend qmp --accel tcg --netns "/run/netns/$H" --link-prefix rb --bpf-dir "$BPF" \
    --external-link xbr --external-cidr 203.0.113.0/24 --external-gateway 203.0.113.1 \
    --external-pool 203.0.113.10-203.0.113.20 --log "${BENCH_LOG:-warn}" >"$WORK/vpcd.log" 2>&1 & VPCD_PID=$!
ctl() { "$VPCTL" --bus-address "$BUS" "$@" >/dev/null; }
for _ in $(seq 200); do ctl list --all 2>/dev/null && break; sleep 0.05; done

ctl net-create a
ctl subnet-create a web 10.60.1.0/24
ctl port-create a web --netns "/run/netns/$V" --ip 10.60.1.5
ip -n "$V" route add default via 10.60.1.1
ctl router-create r1 a
ctl router-add-subnet r1 web
ctl router-set-gateway r1
RNS=$("$VPCTL" --bus-address "$BUS" --json router-info r1 | jq -r .namespace)
ip netns exec "$V" ping -c 1 -W 2 203.0.113.1 >/dev/null

# iperf3 server in the world namespace; each measurement: one client run, received Gb/s.
ip netns exec "$W" iperf3 -s -D --pidfile "$WORK/iperf3.pid" >/dev/null
sleep 0.3
measure() {
    ip netns exec "$V" timeout $((SECS + 20)) iperf3 -c 203.0.113.1 -t "$SECS" -P "$STREAMS" -J |
        jq '.end.sum_received.bits_per_second / 1e9'
}
snat_mode() { # with the router's table (SNAT); the world needs no route back
    ip -n "$W" route del 10.60.1.0/24 2>/dev/null || true
    ctl router-add-subnet r1 web   # a no-op change: vpcd applies the router again, table included
    ip netns exec "$RNS" nft list table ip vpcd >/dev/null
}
plain_mode() { # the same namespace, forwarding on, no nft table at all
    ip netns exec "$RNS" nft delete table ip vpcd 2>/dev/null || true
    ip -n "$W" route replace 10.60.1.0/24 via 203.0.113.10
}
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

echo "router: iperf3 -t $SECS -P $STREAMS, $RUNS runs each ($(uname -r), $(nproc) CPUs)"
snat=() plain=()
for i in $(seq 1 "$RUNS"); do
    order=(snat plain); [ $((i % 2)) = 0 ] && order=(plain snat)
    for m in "${order[@]}"; do
        "${m}_mode"
        g=$(measure)
        printf 'run %d: %-5s %6.2f Gb/s\n' "$i" "$m" "$g"
        if [ "$m" = snat ]; then snat+=("$g"); else plain+=("$g"); fi
    done
done
ms=$(printf '%s\n' "${snat[@]}" | median)
mp=$(printf '%s\n' "${plain[@]}" | median)
awk -v s="$ms" -v p="$mp" 'BEGIN { printf "median: SNAT %.2f Gb/s, plain forwarding %.2f Gb/s, ratio %.3f (target >= 0.9)\n", s, p, s / p }'
kill "$(cat "$WORK/iperf3.pid")" 2>/dev/null || true
