#!/usr/bin/env bash
# Runs every fuzz target (blockdrv/fuzz, netdrv/fuzz) for FUZZ_SECONDS each (default 30),
# coverage-guided, from its seeds: libFuzzer's own driver (libfuzzer-sys) and the sanitizer
# coverage rustc instruments for with stable codegen flags (-Cpasses=sancov-module), the
# flags `cargo fuzz` passes, less the nightly-only sanitizers (safe Rust needs no ASan to
# find a panic, a hang or an out-of-memory). A target that panics, hangs (-timeout) or grows
# past -rss_limit_mb fails the script; the input that did it is kept in FUZZ_DIR
# (/var/tmp/vpcd-fuzz) as crash-*, timeout-* or oom-*. `cargo +nightly fuzz run` still works
# for longer runs (the targets' README).
#
#   scripts/fuzz.sh                 every target, 30 s each
#   FUZZ_SECONDS=600 scripts/fuzz.sh nbd_session
set -euo pipefail
. "$(dirname "$0")/common.sh"
cd "$REPO"
SECONDS_EACH=${FUZZ_SECONDS:-30}
TARGET=$(rustc -vV | sed -n 's/^host: //p')
# Only the targets' own code is instrumented (--target keeps RUSTFLAGS off build scripts).
FUZZ_FLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
OUT=${FUZZ_DIR:-/var/tmp/vpcd-fuzz}
mkdir -p "$OUT"
ran=()
for crate in blockdrv netdrv; do
    manifest=$crate/fuzz/Cargo.toml
    bins=$(sed -n '/^\[\[bin\]\]/,/^path/s/^name = "\(.*\)"/\1/p' "$manifest")
    for bin in $bins; do
        [ $# -eq 0 ] || [[ " $* " == *" $bin "* ]] || continue
        ran+=("$bin")
        log "fuzz $bin (${SECONDS_EACH} s)"
        CARGO_TARGET_DIR=$OUT/target RUSTFLAGS=$FUZZ_FLAGS \
            cargo build -q --release --locked --manifest-path "$manifest" --target "$TARGET" --bin "$bin"
        corpus=$OUT/corpus/$bin
        mkdir -p "$corpus"
        seeds=()
        [ -d "$crate/fuzz/seeds/$bin" ] && seeds=("$crate/fuzz/seeds/$bin")
        # -timeout: one input taking longer is a hang; -rss_limit_mb: memory.
        log_file=$OUT/$bin.log
        if ! (cd "$OUT" && "$OUT/target/$TARGET/release/$bin" -max_total_time="$SECONDS_EACH" \
            -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 "$corpus" "${seeds[@]/#/$REPO/}" \
            > "$log_file" 2>&1); then
            tail -n 40 "$log_file" >&2
            echo "fuzz.sh: $bin failed; the input is in $OUT (crash-*, timeout-*, oom-*)" >&2
            exit 1
        fi
        grep -E '^(Done|stat::new_units_added)' "$log_file"
    done
done
for want in "$@"; do
    [[ " ${ran[*]} " == *" $want "* ]] || { echo "fuzz.sh: no fuzz target $want" >&2; exit 1; }
done
