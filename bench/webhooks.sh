#!/usr/bin/env bash
# Events pipeline overhead: end-to-end relay (compare.sh, candidate alone) with and without a
# webhook receiving every event, same load, alternating. Prints each run's figures.
#   bench/webhooks.sh        # N=20000 REPS=3 SESSIONS=20 SIZE=1000
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEER=${PEER:-$ROOT/../shared/peer-bench/compare.sh}
(cd "$ROOT" && cargo build --release -q)
HOOK_PORT=${HOOK_PORT:-2599}
cp "$ROOT/bench/relay.toml" /tmp/baton-relay-hooks.toml
cat >> /tmp/baton-relay-hooks.toml <<TOML

[[webhook]]
url = "http://127.0.0.1:$HOOK_PORT/hook"
secret = "benchmark-webhook-secret"
batch_size = 500
TOML
python3 "$ROOT/bench/webhook_sink.py" "$HOOK_PORT" /tmp/baton-hook-count &
SINK=$!
trap 'kill $SINK' EXIT
for round in 1 2; do
  for mode in off on; do
    rm -rf /tmp/baton-bench-data /tmp/baton-hook-count
    config=$ROOT/bench/relay.toml
    [ "$mode" = on ] && config=/tmp/baton-relay-hooks.toml
    line=$(CANDIDATE_CMD="$ROOT/target/release/baton serve --config $config" CAND_NAME=baton \
      SKIP_POSTFIX=1 REPS=${REPS:-3} bash "$PEER" | tail -n 1)
    sleep 2
    echo "round=$round webhooks=$mode events_received=$(cat /tmp/baton-hook-count 2>/dev/null || echo 0) $line"
  done
done
