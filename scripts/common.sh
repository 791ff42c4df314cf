# Shared by the set-up scripts: paths and helpers. Sourced, not run.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Build output outside the clone, so a fresh clone builds incrementally and CI stays fast.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/vpcd-target}
export CARGO_TERM_COLOR=never
log() { printf '\n==> %s\n' "$*"; }
# Shows a command, then runs it (the demo's way of showing what it does).
run() { printf '\n$ %s\n' "$*"; "$@"; }
has_systemd() { [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; }
# The start of a VM spec (TOML) that boots the test guest's kernel (scripts/setup.sh puts the
# images in /var/lib/vpcd/images): name $1, one vCPU, 256 MiB.
guest_spec() {
    cat <<TOML
name = "$1"
vcpus = 1
memory_mib = 256

[boot]
kernel = "/var/lib/vpcd/images/vmlinux"
initrd = "/var/lib/vpcd/images/initramfs.cpio.gz"
cmdline = "console=ttyS0 panic=-1 quiet vpcd.hostname=$1"
TOML
}
