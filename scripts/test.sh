#!/usr/bin/env bash
# The whole test suite, as root on a fresh machine: packages, services, guest images, format
# and lint checks, unit tests and the privileged integration tests (real dbus-daemon, libvirtd,
# QEMU guests). .ci/run calls exactly this.
set -euo pipefail
. "$(dirname "$0")/common.sh"
cd "$REPO"

log "packages"
bash scripts/install-deps.sh
rustup component add rustfmt clippy >/dev/null 2>&1 || true

log "services"
bash scripts/services.sh

log "guest images"
export VPCTEST_IMAGES=$CARGO_TARGET_DIR/images
bash images/build.sh "$VPCTEST_IMAGES"
VPCTEST_CLOUDINIT=$(bash scripts/cloud-init-lib.sh "$CARGO_TARGET_DIR/cloud-init")
export VPCTEST_CLOUDINIT

log "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The fuzz targets (outside the workspace): each fuzzed for 30 s, coverage-guided, on the
# stable toolchain (scripts/fuzz.sh); a panic, a hang or a memory blow-up fails the run.
bash scripts/fuzz.sh

log "build"
cargo build --workspace --bins --locked

log "tests"
# VM tests boot real guests: one test at a time on 2 cores.
out=$(mktemp /tmp/vpcd-tests-XXXXXX.log)
trap 'rm -f "$out"' EXIT
set +e
cargo test --workspace --locked --lib --bins --tests -- --test-threads=1 2>&1 | tee "$out"
rc=${PIPESTATUS[0]}
set -e
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "\nsummary: %d passed, %d failed, %d ignored (the ignored ones run inside a guest, see netdrv/tests/kernel_filter.rs)\n", p, f, i }' "$out"
exit "$rc"
