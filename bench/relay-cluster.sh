#!/usr/bin/env bash
# Relay benchmark with and without [cluster] on one node (issue "Cluster"): compare.sh runs
# Baton as the candidate, alternately with bench/relay.toml and bench/relay-cluster.toml (a
# local redis-server on 127.0.0.1:6391), REPS times each; prints each run's last line.
#   bench/relay-cluster.sh            # N=20000 REPS=2 (compare.sh's knobs)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEER=${PEER:-$ROOT/../shared/peer-bench/compare.sh}
REPS=${REPS:-2}
(cd "$ROOT" && cargo build --release -q)
redis-server --bind 127.0.0.1 --port 6391 --save "" --appendonly no >/dev/null &
redis_pid=$!
trap 'kill $redis_pid 2>/dev/null' EXIT
for i in $(seq "$REPS"); do
  for config in relay relay-cluster; do
    rm -rf /tmp/baton-bench-data
    echo "== $config ($i)"
    CANDIDATE_CMD="$ROOT/target/release/baton serve --config $ROOT/bench/$config.toml" CAND_NAME=baton \
      REPS=1 bash "$PEER" | tail -1
  done
done
