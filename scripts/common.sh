# Shared by the set-up scripts: paths and helpers. Sourced, not run.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Build output outside the clone, so a fresh clone builds incrementally and CI stays fast.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/vpcd-target}
export CARGO_TERM_COLOR=never
log() { printf '\n==> %s\n' "$*"; }
has_systemd() { [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; }
