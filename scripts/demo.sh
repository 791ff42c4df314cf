#!/usr/bin/env bash
# The main job: set the host up (scripts/setup.sh), then show vpcd at work: make a tenant
# network with two subnets and a router between them, define and boot a VM with a NIC on it
# from the test guest, list it with vpcctl and virsh, show its console, run commands inside it
# (it pings a namespace "VM" on its subnet through the filtered tenant bridge and one on the
# other subnet through the router, and reads its metadata from 169.254.169.254); then
# replicated block storage: a storage cluster of three nodes on this host (a second vpcd with
# the storage role, on a bus and state directory of its own, and two blockdrv nodes), a
# volume of three replicas, a VM with it as its disk writing to it, one node killed (the
# volume degraded, its data still there) and back; and shut everything down again. Safe to
# run again: what an earlier run left is removed first.
set -euo pipefail
. "$(dirname "$0")/common.sh"

bash "$REPO/scripts/setup.sh"

VM=vpcd-demo
SPEC=$(mktemp /tmp/vpcd-demo-XXXXXX.toml)
trap 'rm -f "$SPEC"' EXIT
guest_spec "$VM" > "$SPEC"
cat >> "$SPEC" <<TOML

[[nics]]
network = "demo-net"
subnet = "web"
ip = "10.99.0.10"

[cloud_init]
hostname = "$VM"
user_data = "#cloud-config\n"
TOML


NS=vpcd-demo-ns
NS2=vpcd-demo-ns2
cleanup() {
    if vpcctl domstate "$VM" >/dev/null 2>&1; then
        vpcctl destroy "$VM" >/dev/null
        vpcctl undefine "$VM" >/dev/null
    fi
    for id in $(vpcctl --json port-list 2>/dev/null | sed -n 's/.*"id": \([0-9]*\).*/\1/p'); do
        vpcctl port-delete "$id" >/dev/null 2>&1 || true
    done
    for s in web db; do
        vpcctl router-remove-subnet demo-router "$s" >/dev/null 2>&1 || true
    done
    vpcctl router-delete demo-router >/dev/null 2>&1 || true
    for s in web db; do
        vpcctl subnet-delete demo-net "$s" >/dev/null 2>&1 || true
    done
    vpcctl net-delete demo-net >/dev/null 2>&1 || true
    ip netns del "$NS" 2>/dev/null || true
    ip netns del "$NS2" 2>/dev/null || true
}
cleanup

log "demo: a tenant network"
run vpcctl net-create demo-net
run vpcctl subnet-create demo-net web 10.99.0.0/24
ip netns add "$NS"
run vpcctl port-create demo-net web --netns /run/netns/$NS --ip 10.99.0.20
run vpcctl subnet-create demo-net db 10.99.1.0/24
ip netns add "$NS2"
run vpcctl port-create demo-net db --netns /run/netns/$NS2 --ip 10.99.1.20
ip -n "$NS2" route add default via 10.99.1.1
run vpcctl net-info demo-net

log "demo: a router between web and db"
run vpcctl router-create demo-router demo-net
run vpcctl router-add-subnet demo-router web
run vpcctl router-add-subnet demo-router db
run vpcctl router-info demo-router

log "demo: a VM with a NIC on it"
run cat "$SPEC"
run vpcctl define "$SPEC"
run vpcctl start "$VM"
run vpcctl list
run virsh list
run vpcctl dominfo "$VM"
run vpcctl domiflist "$VM"
log "console (serial0, written to $(vpcctl dominfo --json "$VM" | sed -n 's/.*"console_log": "\(.*\)".*/\1/p'))"
log_file=/var/lib/vpcd/vms/$VM/console.log
for _ in $(seq 1 300); do grep -q VPCD-GUEST-BOOTED "$log_file" 2>/dev/null && break; sleep 0.1; done
cat "$log_file"
log "the guest got 10.99.0.10 by DHCP (from the router's namespace); commands inside it, through vpcctl console --devname serial1"
grep VPCD-DHCP "$log_file" || { sleep 2; grep VPCD-DHCP "$log_file"; } || true
{
    printf 'uname -a; ip addr show eth0; ip route; ping -c 3 10.99.0.20; ping -c 1 10.99.0.1\n'
    printf 'ping -c 3 10.99.1.20   # on subnet db, through the router\n'
    printf "printf 'GET /latest/meta-data/hostname HTTP/1.0\\\\r\\\\n\\\\r\\\\n' | nc 169.254.169.254 80; echo\n"
} | vpcctl console "$VM" --devname serial1
run vpcctl port-list
run vpcctl shutdown "$VM"
run vpcctl list --all
run vpcctl undefine "$VM"
cleanup

bash "$REPO/scripts/demo-storage.sh"
log "demo done"
