#!/usr/bin/env bash
# Runs every dlrflow-events fuzz target for a bounded time (default 60 s each).
#
#   fuzz/run.sh [seconds-per-target] [target...]
#
# cargo-fuzz wants a nightly toolchain for its -Z sanitizer flags. This machine
# has stable only, so RUSTC_BOOTSTRAP=1 unlocks them on stable; AddressSanitizer
# is kept (the crate forbids unsafe code, but dependencies have some).
set -euo pipefail
cd "$(dirname "$0")"

seconds="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(parse_lisoloo parse_arpoone parse_status)
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    # Seed the corpus with the providers' documented examples.
    if [ -d "seeds/$t" ]; then
        cp -n seeds/"$t"/* "corpus/$t/" 2>/dev/null || true
    fi
    echo "== fuzzing $t for ${seconds}s"
    cargo fuzz run "$t" "corpus/$t" -- -max_total_time="$seconds" -max_len=8192
done
echo "fuzz: all targets ran ${seconds}s without a crash"
