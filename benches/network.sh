#!/usr/bin/env bash
# netdrv network benchmarks (run as root; each bench makes and removes its own namespaces
# `vpcdb-<pid>-*` and pin dirs `/sys/fs/bpf/vpcd-bench-<pid>-*`):
#   plumbing: NetHost::apply creating/deleting a bridge + N taps (N = 100, 250, 500) with the
#             eBPF filter, against one `ip -batch` in the same run (targets: create <= 2x,
#             delete <= 1x, per-port cost constant), plus references and a per-step breakdown.
#   datapath: iperf3 TCP VM -> VM over VxLAN through the full netdrv path, against a plain
#             bridge + VxLAN made with `ip` in the same run (target: ratio >= 0.95).
#   dhcp:     DORA exchanges per second for 200 static-lease clients, netdrv's DHCP server
#             against dnsmasq with the same hosts in the same lab (target: ratio >= 1.0).
# Usage: benches/network.sh [plumbing] [datapath] [dhcp]     (default: all three)
# Settings (environment): BENCH_RUNS (default 3, medians are reported), BENCH_SIZES
# (plumbing, default 100,250,500), BENCH_PROFILE=0 (plumbing: no breakdown), BENCH_SECS
# (datapath iperf3 -t, default 5), BENCH_STREAMS (datapath iperf3 -P, default 2).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "network.sh: needs root (namespaces, taps, BPF)" >&2
    exit 1
fi
for tool in ip tc bridge nsenter ss iperf3 ethtool; do
    command -v "$tool" >/dev/null || { echo "network.sh: $tool not found" >&2; exit 1; }
done

benches=("$@")
[ ${#benches[@]} -gt 0 ] || benches=(plumbing datapath dhcp)
for b in "${benches[@]}"; do
    case "$b" in
        plumbing|datapath|dhcp) ;;
        *) echo "network.sh: unknown bench '$b' (plumbing, datapath, dhcp)" >&2; exit 2 ;;
    esac
done

for b in "${benches[@]}"; do
    echo "=== cargo bench -p netdrv --bench $b ($(date -u +%FT%TZ), $(uname -r), $(nproc) CPUs)"
    cargo bench -p netdrv --bench "$b"
    echo
done
