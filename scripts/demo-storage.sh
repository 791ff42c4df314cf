#!/usr/bin/env bash
# The block storage part of the demo (scripts/demo.sh runs it after scripts/setup.sh): a
# storage cluster of three nodes on this host, a 3-replica volume, a VM whose disk it is
# writing to it, a node killed and back. The storage node in vpcd is a second vpcd (storage
# and compute roles) on a D-Bus bus, state directory, link prefix and eBPF directory of its
# own, so that the host's vpcd and its configuration are left alone; the other two nodes are
# `blockdrv node` processes. Everything it starts and makes is removed at the end, or at the
# start of the next run if this one was cut short.
set -euo pipefail
. "$(dirname "$0")/common.sh"
# Only the command lines below configure the demo's vpcd.
for v in $(compgen -e | grep '^VPCD_' || true); do unset "$v"; done

cargo build --release --locked --manifest-path "$REPO/Cargo.toml" -p blockdrv -p vpcd -p vpcctl
BIN=$CARGO_TARGET_DIR/release
DIR=/var/lib/vpcd-demo-storage
RUN=/run/vpcd-demo-storage
BUS=unix:path=$RUN/bus.sock
BPF=/sys/fs/bpf/vpcd-demo-storage
PORTS=(17461 17462 17463)
VM=vpcd-demo-disk
MEMBERS=()
for i in 1 2 3; do MEMBERS+=(--member "$i=127.0.0.1:${PORTS[$((i - 1))]}"); done

# Bounded: a bus or vpcd that does not answer fails the demo instead of hanging it.
vpc() { timeout 120 "$BIN/vpcctl" --bus-address "$BUS" "$@"; }
quick() { timeout 10 "$BIN/vpcctl" --bus-address "$BUS" "$@"; }
# `vpcctl` as shown to the reader (the bus address is the only difference).
svpc() { printf '\n$ vpcctl %s\n' "$*"; vpc "$@"; }

# Stops the process in pid file $1 (signal $2, TERM by default), if it is still one this
# script started (its command line names the demo's directories: a pid left by a run cut
# short may be another process's now).
stop_pid() {
    local f=$1 pid
    pid=$(cat "$f" 2>/dev/null || true)
    if [ -n "$pid" ] && tr '\0' ' ' 2>/dev/null </proc/"$pid"/cmdline | grep -qE "$RUN|$DIR"; then
        kill "${2:--TERM}" "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}
cleanup() {
    if [ -S "$RUN/bus.sock" ] && quick domstate "$VM" >/dev/null 2>&1; then
        quick destroy "$VM" >/dev/null 2>&1 || true
        quick undefine "$VM" >/dev/null 2>&1 || true
    fi
    if [ -S "$RUN/bus.sock" ]; then quick vol-delete demo-data >/dev/null 2>&1 || true; fi
    stop_pid "$RUN/vpcd.pid"
    stop_pid "$RUN/node2.pid"
    stop_pid "$RUN/node3.pid"
    stop_pid "$RUN/bus.pid"
    # A VM left by a run cut short while vpcd was down (libvirt keeps it): only the demo's.
    if virsh dumpxml "$VM" 2>/dev/null | grep -q "$DIR/"; then
        virsh destroy "$VM" >/dev/null 2>&1 || true
        virsh undefine "$VM" >/dev/null 2>&1 || true
    fi
    rm -rf "$DIR" "$RUN" "$BPF"
}
# On failure, what the nodes said (their logs go with the rest).
on_exit() {
    local rc=$?
    if [ "$rc" != 0 ]; then
        for f in "$DIR"/vpcd.log "$DIR"/n2.log "$DIR"/n3.log; do
            [ -e "$f" ] && { echo "--- $f (last lines)"; tail -20 "$f"; } >&2
        done
    fi
    cleanup
}
cleanup
for p in "${PORTS[@]}"; do
    if [ -n "$(ss -Htln "sport = :$p")" ]; then
        echo "port $p is in use: the demo's storage nodes listen on ${PORTS[*]}" >&2
        exit 1
    fi
done
trap on_exit EXIT
# The bus (it lets anyone do anything) and the blockdrv nodes' NBD sockets: root's only.
mkdir -p -m 0700 "$RUN"
mkdir -p "$DIR"
# QEMU under libvirt runs unprivileged and must reach the VM's files in vpcd's state.
chmod 0755 "$DIR"

log "demo: replicated block storage, three storage nodes on this host"
cat > "$RUN/bus.conf" <<XML
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN" "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>system</type><listen>$BUS</listen><auth>EXTERNAL</auth>
<policy context="default"><allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/><allow own="*"/></policy></busconfig>
XML
setsid dbus-daemon --config-file="$RUN/bus.conf" --nofork --nopidfile </dev/null >/dev/null 2>&1 &
echo $! > "$RUN/bus.pid"
disown
for _ in $(seq 1 100); do [ -S "$RUN/bus.sock" ] && break; sleep 0.1; done

node() {
    local i=$1
    mkdir -p "$DIR/n$i"
    setsid "$BIN/blockdrv" node --id "$i" --dir "$DIR/n$i" --listen "127.0.0.1:${PORTS[$((i - 1))]}" \
        --nbd-unix "$RUN/n$i.sock" "${MEMBERS[@]}" </dev/null >>"$DIR/n$i.log" 2>&1 &
    echo $! > "$RUN/node$i.pid"
    disown
}
node 2
node 3
STORAGE=(--role compute --role storage --storage-node-id 1 --storage-listen "127.0.0.1:${PORTS[0]}")
for i in 1 2 3; do STORAGE+=(--storage-member "$i=127.0.0.1:${PORTS[$((i - 1))]}"); done
echo "$ vpcd --bus-address $BUS --state-dir $DIR ${STORAGE[*]}   # and blockdrv node --id 2, --id 3"
printf '' > "$DIR/none.toml"
VPCD_CONFIG=$DIR/none.toml setsid "$BIN/vpcd" --bus-address "$BUS" --state-dir "$DIR" \
    --link-prefix vpd --bpf-dir "$BPF" "${STORAGE[@]}" </dev/null >>"$DIR/vpcd.log" 2>&1 &
echo $! > "$RUN/vpcd.pid"
disown
for _ in $(seq 1 200); do quick vol-list >/dev/null 2>&1 && break; sleep 0.1; done

wait_health() {
    local want=$1
    for _ in $(seq 1 300); do
        quick --json vol-info demo-data 2>/dev/null | grep -q "\"health\": \"$want" && return 0
        sleep 0.1
    done
    echo "the volume's health did not become '$want'" >&2
    return 1
}
svpc vol-create demo-data 64M
wait_health ok
svpc vol-list
svpc vol-info demo-data
URI=$(vpc vol-export demo-data)

log "demo: a VM whose disk is the volume (NBD, through libvirt)"
SPEC=$RUN/vm.toml
guest_spec "$VM" > "$SPEC"
cat >> "$SPEC" <<TOML

[[disks]]
volume = "demo-data"
TOML
run cat "$SPEC"
svpc define "$SPEC"
log "the volume is that domain's now: the cluster records it, and refuses it to anyone else (and its delete)"
svpc vol-list
echo "$ vpcctl vol-delete demo-data"
if out=$(quick vol-delete demo-data 2>&1); then echo "demo: the delete went through" >&2; exit 1; fi
printf '%s\n' "$out"
svpc start "$VM"
run virsh domblklist "$VM"
virsh dumpxml "$VM" | sed -n "/<disk type='network'/,/<\/disk>/p"
console=$DIR/vms/$VM/console.log
for _ in $(seq 1 300); do grep -q VPCD-GUEST-BOOTED "$console" 2>/dev/null && break; sleep 0.1; done
grep -q VPCD-GUEST-BOOTED "$console"
log "the guest writes to its disk, /dev/vda (the volume), and reads it back (through vpcctl console --devname serial1)"
GUEST='printf "written by the guest on %s\n" "$(date -u)" | dd of=/dev/vda bs=512 conv=sync,fsync 2>/dev/null
dd if=/dev/vda bs=512 count=1 2>/dev/null | head -1'
printf '%s\n' "$GUEST" | sed 's/^/(guest) $ /'
printf '%s\n' "$GUEST" | vpc console "$VM" --devname serial1
svpc destroy "$VM"
svpc undefine "$VM"

log "demo: storage node 3 killed: the volume goes on with two replicas"
echo "$ kill -KILL $(cat "$RUN/node3.pid")   # blockdrv node --id 3"
stop_pid "$RUN/node3.pid" -KILL
wait_health degraded
svpc vol-info demo-data
run qemu-io -f raw -c "read -v 0 64" "$URI"
run qemu-io -f raw -c "write -P 0x61 1M 1M" "$URI"
log "node 3 back: it catches up, and serves the volume too (what was written without it included)"
node 3
wait_health ok
svpc vol-info demo-data
run qemu-io -f raw -c "read -P 0x61 1M 1M" "nbd+unix:///demo-data?socket=$RUN/n3.sock"
svpc vol-delete demo-data
svpc vol-list
