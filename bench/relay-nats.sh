#!/usr/bin/env bash
# Relay benchmark with and without the NATS JetStream export ([nats]): compare.sh runs Baton
# as the candidate, alternately with bench/relay.toml and bench/relay-nats.toml (a local
# nats-server -js on 127.0.0.1:4299, a fresh store each run), REPS times each; prints each
# run's last line and, after each export run, how many of the log's events the stream holds.
#   bench/relay-nats.sh                  # REPS=2, N=20000 (compare.sh's knobs)
#   BATON=/path/to/baton bench/relay-nats.sh
# Needs nats-server (Debian's) and nats-py (scripts/test puts it in target/peers/venv).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEER=${PEER:-$ROOT/../shared/peer-bench/compare.sh}
PY=${BATON_PYTHON:-$ROOT/target/peers/venv/bin/python}
REPS=${REPS:-2}
BATON=${BATON:-}
if [ -z "$BATON" ]; then (cd "$ROOT" && cargo build --release -q); BATON=$ROOT/target/release/baton; fi
store=$(mktemp -d)
nats_pid=""
trap '[ -n "$nats_pid" ] && kill $nats_pid 2>/dev/null; rm -rf "$store"' EXIT
count_stream() {
  "$PY" - <<'PY'
import asyncio, nats
async def main():
    nc = await nats.connect("nats://127.0.0.1:4299")
    info = await nc.jetstream().stream_info("BATON_EVENTS")
    print(info.state.messages)
    await nc.close()
asyncio.run(main())
PY
}
for i in $(seq "$REPS"); do
  for config in relay relay-nats; do
    rm -rf /tmp/baton-bench-data "$store"/*
    if [ "$config" = relay-nats ]; then
      nats-server -js -a 127.0.0.1 -p 4299 -sd "$store" >/dev/null 2>&1 & nats_pid=$!
      sleep 0.5
    fi
    echo "== $config ($i)"
    CANDIDATE_CMD="$BATON serve --config $ROOT/bench/$config.toml" CAND_NAME=baton \
      REPS=1 bash "$PEER" | tail -1
    if [ "$config" = relay-nats ]; then
      sleep 3
      logged=$(cat /tmp/baton-bench-data/events/events-*.jsonl | wc -l)
      echo "events logged: $logged, in the stream: $(count_stream)"
      kill "$nats_pid"; wait "$nats_pid" 2>/dev/null || true; nats_pid=""
    fi
  done
done
