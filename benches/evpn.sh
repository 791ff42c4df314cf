#!/usr/bin/env bash
# EVPN benchmarks (issue 5), one lab, one run: an underlay bridge with an FRR route reflector
# (192.0.2.10), two vpcd hosts (192.0.2.1, .2; their own vpcd, private D-Bus, release build) and
# two FRR VTEPs (192.0.2.3, .4; zebra + bgpd, traditional bridge, advertise-all-vni).
#
#   convergence: a port created on vpcd host 1 until host 2 has its MAC in the VxLAN FDB,
#                BENCH_PORTS times (default 20), against a MAC appearing behind FRR VTEP 3 (a
#                veth that sends a frame) until FRR VTEP 4 has it. Medians; target ratio <= 1.0.
#   scale:       N ports (BENCH_SCALE, default "100 500 1000") on host 1, made with EVPN off;
#                then host 1's vpcd restarts with EVPN on and advertises them all at once: time
#                from its first UPDATE with routes leaving host 1 (seen by tcpdump on its
#                underlay link) until host 2 has all N MACs, and from the first MAC installed
#                on host 2 to the last, per N.
#
# Everything (namespaces vpcde<pid>*, FRR and vpcd processes, state dirs) goes at the end, also
# on failure or Ctrl-C. Needs root, FRR, jq; run from the repository.
set -euo pipefail
. "$(dirname "$0")/../scripts/common.sh"
cd "$REPO"
PORTS=${BENCH_PORTS:-20}
SCALE=${BENCH_SCALE-"100 500 1000"}
[ "$(id -u)" = 0 ] || { echo "evpn.sh: needs root" >&2; exit 1; }
for t in ip bridge jq dbus-daemon vtysh; do command -v "$t" >/dev/null || { echo "evpn.sh: $t missing" >&2; exit 1; }; done

P=vpcde$$
WORK=$(mktemp -d /tmp/vpcd-evpnbench-XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    for f in "$WORK"/*/frr/*.pid "$WORK"/frr-*/*.pid; do [ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null; done || true
    for ns in $(ip netns list | awk '{print $1}'); do
        case $ns in "$P"* | e1-svc-* | e2-svc-*) ip netns pids "$ns" | xargs -r kill -9; ip netns del "$ns" ;; esac
    done
    wait 2>/dev/null || true
    rm -rf "$WORK" /sys/fs/bpf/vpcd-evpnbench-$$-*
}
trap cleanup EXIT INT TERM
[ -n "${BENCH_KEEP_LOGS:-}" ] && trap 'cp "$WORK"/vpcd*.log "$BENCH_KEEP_LOGS"/ 2>/dev/null; cleanup' EXIT INT TERM

# Release binaries, as a deployment runs them.
cargo build --release --bins -q
VPCD=$CARGO_TARGET_DIR/release/vpcd VPCTL=$CARGO_TARGET_DIR/release/vpcctl
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

# ---- the lab ------------------------------------------------------------------------------
ip netns add "${P}lan"; ip -n "${P}lan" link add br0 type bridge; ip -n "${P}lan" link set br0 up
host_ns() { # name ip
    ip netns add "$P$1"; ip -n "$P$1" link set lo up
    ip -n "${P}lan" link add name "p$1" type veth peer u0 netns "$P$1"
    ip -n "${P}lan" link set "p$1" master br0 up
    ip -n "$P$1" addr add "$2/24" dev u0; ip -n "$P$1" link set u0 up
}
host_ns rr 192.0.2.10; host_ns h1 192.0.2.1; host_ns h2 192.0.2.2; host_ns f3 192.0.2.3; host_ns f4 192.0.2.4

frr() { # ns dir bgpd.conf-body
    mkdir -p "$2"; echo "hostname x" >"$2/zebra.conf"; printf '%s\n' "$3" >"$2/bgpd.conf"; chown -R frr:frr "$2"
    for d in zebra bgpd; do
        ip netns exec "$1" /usr/lib/frr/$d -d -f "$2/$d.conf" -i "$2/$d.pid" -z "$2/zserv.api" \
            --vty_socket "$2" -A 127.0.0.1 -P 0
    done
}
frr "${P}rr" "$WORK/frr-rr" "router bgp 65000
 bgp router-id 192.0.2.10
 no bgp default ipv4-unicast
 neighbor VTEP peer-group
 neighbor VTEP remote-as 65000
 bgp listen range 192.0.2.0/24 peer-group VTEP
 address-family l2vpn evpn
  neighbor VTEP activate
  neighbor VTEP route-reflector-client
 exit-address-family"
for n in 3 4; do
    ns=${P}f$n
    ip -n "$ns" link add br9 type bridge; ip -n "$ns" link set br9 up
    ip -n "$ns" link add vx9 type vxlan id 9009 local 192.0.2.$n dstport 4789 nolearning
    ip -n "$ns" link set vx9 master br9 up
    frr "$ns" "$WORK/frr-f$n" "router bgp 65000
 bgp router-id 192.0.2.$n
 no bgp default ipv4-unicast
 neighbor 192.0.2.10 remote-as 65000
 address-family l2vpn evpn
  neighbor 192.0.2.10 activate
  advertise-all-vni
 exit-address-family"
done

cat >"$WORK/bus.conf" <<EOF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN" "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>system</type><listen>unix:path=$WORK/bus.sock</listen><auth>EXTERNAL</auth>
<policy context="default"><allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/><allow own="*"/></policy></busconfig>
EOF
dbus-daemon --config-file="$WORK/bus.conf" --nofork --nopidfile & PIDS+=($!)
for _ in $(seq 100); do [ -S "$WORK/bus.sock" ] && break; sleep 0.05; done
BUS=unix:path=$WORK/bus.sock
: >"$WORK/none.toml"
declare -A VPID
start_vpcd() { # n evpn(0/1): starts vpcd n and waits until it answers
    launch_vpcd "$@"
    wait_vpcd "$1"
}
launch_vpcd() { # n evpn(0/1)
    local n=$1 extra=()
    [ "$2" = 1 ] && extra=(--bgp-asn 65000 --bgp-peer 192.0.2.10 --bgp-hold-time 9)
    VPCD_CONFIG=$WORK/none.toml "$VPCD" --bus-address "$BUS" --bus-name "org.vpcd.E$n" \
        --state-dir "$WORK/h$n" --backend qmp --accel tcg --netns "/run/netns/${P}h$n" \
        --underlay-ip "192.0.2.$n" --link-prefix "e$n" --bpf-dir "/sys/fs/bpf/vpcd-evpnbench-$$-$n" \
        --log "${BENCH_LOG:-warn}" "${extra[@]}" >>"$WORK/vpcd$n.log" 2>&1 &
    VPID[$n]=$!; PIDS+=($!)
}
wait_vpcd() { # n
    for _ in $(seq 2400); do ctl "$1" list --all >/dev/null 2>&1 && return; sleep 0.05; done
    echo "vpcd $1 did not start: $(tail -5 "$WORK/vpcd$1.log")" >&2; exit 1
}
stop_vpcd() { kill "${VPID[$1]}"; wait "${VPID[$1]}" 2>/dev/null || true; }
ctl() { local n=$1; shift; "$VPCTL" --bus-address "$BUS" --bus-name "org.vpcd.E$n" "$@"; }
start_vpcd 1 1; start_vpcd 2 1
for n in 1 2; do
    ctl $n net-create a >/dev/null; ctl $n subnet-create a web 10.60.0.0/16 --vni 9100 >/dev/null
done
ip netns add "${P}vm1"; ip netns add "${P}vm2"
# h2 needs a port so that its VxLAN device (where remote MACs go) exists.
ctl 2 port-create a web --netns "/run/netns/${P}vm2" --ifname e0 --ip 10.60.200.1 >/dev/null
vx2=e2x$(printf %x 9100)
# The entry the control plane installs: MAC on the VxLAN device with the remote VTEP as dst (a
# bridge entry learned from flooded frames has no dst, and is not what EVPN converged on).
has_mac() { # ns dev mac vtep
    ip netns exec "$1" bridge fdb show dev "$2" 2>/dev/null | grep "^$3 .*dst $4\b" >/dev/null
}

# ---- convergence --------------------------------------------------------------------------
if [ -n "${BENCH_PCAP:-}" ]; then # for looking into it: the underlay's BGP, from here on
    ip netns exec "${P}lan" tcpdump -i br0 -w "$BENCH_PCAP" 'tcp port 179' 2>/dev/null &
    PIDS+=($!)
fi
echo "=== EVPN convergence, $PORTS ports ($(uname -r), $(nproc) CPUs)"
ours=() theirs=()
for i in $(seq 1 "$PORTS"); do
    # The MAC is chosen here, so host 2 is watched from the moment the port is asked for.
    mac=$(printf '02:aa:00:00:%02x:%02x' $((i / 256)) $((i % 256)))
    t0=$(now_ms)
    ctl 1 port-create a web --netns "/run/netns/${P}vm1" --ifname "c$i" --ip "10.60.1.$i" \
        --mac "$mac" >/dev/null &
    cpid=$!
    until has_mac "${P}h2" "$vx2" "$mac" 192.0.2.1; do sleep 0.002; done
    ours+=($(( $(now_ms) - t0 )))
    wait "$cpid"
    # FRR to FRR: a MAC appears behind VTEP 3 (a frame from a new veth) until VTEP 4 has it.
    fmac=$(printf '02:fe:00:00:%02x:%02x' $((i / 256)) $((i % 256)))
    ip -n "${P}f3" link add "m$i" type veth peer "n$i"
    ip -n "${P}f3" link set "n$i" address "$fmac"
    ip -n "${P}f3" link set "m$i" master br9 up
    # Quiet until the ping: no IPv6 (its DAD and router solicitations would show the MAC early).
    ip netns exec "${P}f3" sysctl -qw "net.ipv6.conf.n$i.disable_ipv6=1"
    ip -n "${P}f3" addr add "10.61.$((i / 250)).$((i % 250 + 1))/16" dev "n$i"
    ip -n "${P}f3" link set "n$i" up
    t0=$(now_ms)
    # Its ARP request is the MAC's first frame; poll at once, not after ping gives up.
    ip netns exec "${P}f3" ping -c 1 -W 1 -I "n$i" 10.61.255.254 >/dev/null 2>&1 &
    ppid=$!
    until has_mac "${P}f4" vx9 "$fmac" 192.0.2.3; do sleep 0.002; done
    theirs+=($(( $(now_ms) - t0 )))
    wait "$ppid" || true
    printf 'port %2d: vpcd %4d ms   FRR %4d ms\n' "$i" "${ours[-1]}" "${theirs[-1]}"
done
mo=$(printf '%s\n' "${ours[@]}" | median); mt=$(printf '%s\n' "${theirs[@]}" | median)
awk -v o="$mo" -v t="$mt" 'BEGIN { printf "median: vpcd %.0f ms, FRR-FRR %.0f ms, ratio %.2f (target <= 1.0)\n", o, t, o / t }'

# ---- scale --------------------------------------------------------------------------------
echo "=== EVPN scale: all of host 1's ports advertised at once"
stop_vpcd 1; start_vpcd 1 0
made=$PORTS
for n in $SCALE; do
    while [ "$made" -lt "$n" ]; do
        made=$((made + 1))
        ctl 1 port-create a web --netns "/run/netns/${P}vm1" --ifname "c$made" \
            --ip "10.60.$((1 + made / 250)).$((made % 250 + 1))" >/dev/null
    done
    macs=$(ctl 1 --json port-list | jq -r '.[].mac' | sort)
    # Host 1 without EVPN has withdrawn everything; wait until host 2 has none of them.
    until ! ip netns exec "${P}h2" bridge fdb show dev "$vx2" | grep -F "$(echo "$macs" | head -1)" >/dev/null; do sleep 0.05; done
    stop_vpcd 1
    # The clock starts when host 1's first UPDATE leaves it (BGP type 2 at the start of the
    # segment's payload, or right after a KEEPALIVE), not at its start-up, which reconciles N
    # ports first.
    t='((tcp[12:1] & 0xf0) >> 2)'
    ip netns exec "${P}h1" tcpdump -tt -n -l -c 1 -i u0 \
        "tcp dst port 179 and (tcp[$t + 18] = 2 or (tcp[$t + 18] = 4 and tcp[$t + 37] = 2))" \
        >"$WORK/first-update" 2>/dev/null &
    tpid=$!
    sleep 0.5 # tcpdump is listening
    launch_vpcd 1 1 # watched from now on, while it starts
    first=""
    while :; do
        have=$(ip netns exec "${P}h2" bridge fdb show dev "$vx2" | awk '{print $1}' | sort | comm -12 - <(echo "$macs") | wc -l)
        [ -z "$first" ] && [ "$have" -gt 0 ] && first=$(now_ms)
        [ "$have" -ge "$n" ] && break
        sleep 0.01
    done
    t1=$(now_ms)
    wait_vpcd 1
    wait "$tpid"
    t0=$(awk 'NR == 1 { printf "%.0f", $1 * 1000 }' "$WORK/first-update")
    printf 'N=%4d: all installed on host 2 %5d ms after host 1 sent its first UPDATE (first to last installed %4d ms)\n' "$n" $((t1 - t0)) $((t1 - first))
    stop_vpcd 1; start_vpcd 1 0
done
