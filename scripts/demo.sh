#!/usr/bin/env bash
# The main job: set the host up (scripts/setup.sh), then show vpcd at work: define and boot a VM
# from the test guest, list it with vpcctl and virsh, show its console, run a command inside
# it, and shut it down. Safe to run again: a demo VM left by an earlier run is removed first.
set -euo pipefail
. "$(dirname "$0")/common.sh"

bash "$REPO/scripts/setup.sh"

VM=vpcd-demo
IMG=/var/lib/vpcd/images
SPEC=$(mktemp /tmp/vpcd-demo-XXXXXX.toml)
trap 'rm -f "$SPEC"' EXIT
cat > "$SPEC" <<TOML
name = "$VM"
vcpus = 1
memory_mib = 256

[boot]
kernel = "$IMG/vmlinux"
initrd = "$IMG/initramfs.cpio.gz"
cmdline = "console=ttyS0 panic=-1 quiet vpcd.hostname=$VM"

[cloud_init]
hostname = "$VM"
user_data = "#cloud-config\n"
TOML

run() { printf '\n$ %s\n' "$*"; "$@"; }

if vpcctl domstate "$VM" >/dev/null 2>&1; then
    vpcctl destroy "$VM" >/dev/null
    vpcctl undefine "$VM" >/dev/null
fi

log "demo"
run cat "$SPEC"
run vpcctl define "$SPEC"
run vpcctl start "$VM"
run vpcctl list
run virsh list
run vpcctl dominfo "$VM"
log "console (serial0, written to $(vpcctl dominfo --json "$VM" | sed -n 's/.*"console_log": "\(.*\)".*/\1/p'))"
log_file=/var/lib/vpcd/vms/$VM/console.log
for _ in $(seq 1 300); do grep -q VPCD-GUEST-BOOTED "$log_file" 2>/dev/null && break; sleep 0.1; done
cat "$log_file"
log "a command inside the guest, through vpcctl console --devname serial1"
printf 'uname -a; cat /proc/cmdline\n' | vpcctl console "$VM" --devname serial1
run vpcctl shutdown "$VM"
run vpcctl list --all
run vpcctl undefine "$VM"
log "demo done"
