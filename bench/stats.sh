#!/usr/bin/env bash
# Event-log readers at scale (issue "Endure", item 3): N events (default 10,000,000, about
# 2.7 GB, thirty days of history) in a data_dir, then GET /api/v1/stats?since=1h and since=24h
# against a release build, with the server's peak RSS.
#   bench/stats.sh [N] [BATON_BINARY]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
N=${1:-10000000}
BIN=${2:-$ROOT/target/release/baton}
[ "$#" -ge 2 ] || (cd "$ROOT" && cargo build --release -q)
WORK=${WORK:-/tmp/baton-stats-bench}
PORT=${PORT:-18025}
rm -rf "$WORK" && mkdir -p "$WORK/data/events"
(cd "$WORK" && python3 "$ROOT/bench/gen_events.py" "$N")
cat > "$WORK/cfg.toml" <<EOC
hostname = "bench.test"
data_dir = "$WORK/data"
[[listener]]
address = "127.0.0.1:$((PORT + 1))"
[http]
address = "127.0.0.1:$PORT"
[delivery]
hold = true
EOC
"$BIN" serve --config "$WORK/cfg.toml" >"$WORK/serve.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null' EXIT
for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$PORT/api/v1/queue" && break; sleep 0.1; done
for q in since=1h since=1h since=1h since=24h; do
  start=$EPOCHREALTIME
  curl -s -o "$WORK/out.json" --max-time 900 "http://127.0.0.1:$PORT/api/v1/stats?$q"
  end=$EPOCHREALTIME
  delivered=$(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['total']['delivered'])" "$WORK/out.json")
  echo "$q: $(python3 -c "print(round($end - $start, 3))") s, $delivered deliveries counted"
done
grep VmHWM "/proc/$PID/status"
