#!/usr/bin/env bash
# End-to-end relay benchmark (issue "Deliver"): smtp-source -> Baton -> smtp-sink beside
# Postfix on the same load, in one run of ../shared/peer-bench/compare.sh; then the latency
# from 250 to delivery (p50, p99) from Baton's event log.
#   bench/relay.sh            # N=20000 REPS=3 SESSIONS=20 SIZE=1000 (compare.sh's knobs)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEER=${PEER:-$ROOT/../shared/peer-bench/compare.sh}
(cd "$ROOT" && cargo build --release -q)
rm -rf /tmp/baton-bench-data
CANDIDATE_CMD="$ROOT/target/release/baton serve --config $ROOT/bench/relay.toml" CAND_NAME=baton \
  bash "$PEER" | tee /tmp/baton-relay-bench.txt
python3 "$ROOT/bench/latency.py" /tmp/baton-bench-data/events/events.jsonl
