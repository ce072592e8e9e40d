#!/usr/bin/env bash
# A short fuzz run of every target (libFuzzer through cargo-fuzz): a crash or a failed property
# fails the script. Longer runs: SECONDS_PER_TARGET=600 fuzz/smoke.sh
#
# cargo-fuzz wants a nightly compiler for its sanitizer flags; this machine has only stable
# Rust 1.95, so RUSTC_BOOTSTRAP=1 unlocks them (no sanitizer: the code is safe Rust, and
# libFuzzer's coverage and crash detection are what matter here).
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTC_BOOTSTRAP=1
seconds=${SECONDS_PER_TARGET:-20}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --version 0.13.2 --locked
cargo fuzz build -O -s none
log=$(mktemp)
for target in command data_reader config operator_text bounce_report; do
  # Start from the committed seeds (valid commands, bodies, configurations).
  mkdir -p "fuzz/corpus/$target"
  cp -n fuzz/seeds/"$target"/* "fuzz/corpus/$target/" 2>/dev/null || true
  if ! cargo fuzz run -O -s none "$target" -- -max_total_time="$seconds" -rss_limit_mb=2048 >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "fuzz target $target failed: see fuzz/artifacts/$target/" >&2
    exit 1
  fi
  echo "$target: $(grep -E '^Done [0-9]+ runs' "$log" || tail -n 1 "$log")"
done
