#!/usr/bin/env bash
# A Baton fleet on this machine against one node (issue "Cluster"): NODES Baton processes, each
# with [cluster] on one local redis-server and its own spool, relay N messages in all to one
# smtp-sink; smtp-source sends N/NODES to each node with SESSIONS/NODES sessions, all at once.
# Prints one line per run: total msgs/s (first byte sent to the sink's last count), Baton's CPU
# ms per message (all nodes), Redis's. Runs 1 node and NODES nodes alternately, REPS times.
#   bench/fleet.sh                       # NODES=3 N=20000 SESSIONS=21 REPS=2
#   CAP=8 bench/fleet.sh                 # with a fleet-wide cap of 8 connections to the sink
#   RATE=1000 N=10000 bench/fleet.sh     # with a fleet-wide rate of 1000 messages a second
#   REDIS_CLUSTER=1 bench/fleet.sh       # on a Redis Cluster of 3 primaries (redis-cli makes it)
#   BATON=/path/to/baton bench/fleet.sh  # a given binary (else target/release/baton, built)
# Needs smtp-source/smtp-sink (Debian's postfix package; ../shared/peer-bench/compare.sh
# installs it) and redis-server. Loopback only: nodes on 127.0.0.1:2541.., sink 127.0.0.2:2546.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
NODES=${NODES:-3} N=${N:-20000} SESSIONS=${SESSIONS:-21} REPS=${REPS:-2} SIZE=${SIZE:-1000}
CAP=${CAP:-} RATE=${RATE:-} REDIS_CLUSTER=${REDIS_CLUSTER:-} OUT=${OUT:-/tmp/baton-fleet}
BATON=${BATON:-}
if [ -z "$BATON" ]; then (cd "$ROOT" && cargo build --release -q); BATON=$ROOT/target/release/baton; fi
HZ=$(getconf CLK_TCK)
mkdir -p "$OUT"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

stat_files() { local f=(); for p in "$@"; do f+=("/proc/$p/stat"); done; awk '{ sub(/^.*\) /,""); s+=$12+$13 } END { print s+0 }' "${f[@]}"; }
now() { date +%s.%N; }

node_config() {  # $1 = node index
  cat <<TOML
hostname = "fleet-$1.localdomain"
data_dir = "$OUT/data-$1"
[[listener]]
address = "127.0.0.1:$((2540 + $1))"
role = "mx"
[relay]
networks = ["127.0.0.0/8"]
[limits]
max_connections_per_ip = 1000
[http]
address = "127.0.0.1:$((8540 + $1))"
[[route]]
domain = "*"
smarthost = "127.0.0.2:2546"
[cluster]
node = "fleet-$1"
TOML
  if [ -n "$REDIS_CLUSTER" ]; then
    printf 'redis = ["redis://127.0.0.1:6393", "redis://127.0.0.1:6394", "redis://127.0.0.1:6395"]\nredis_cluster = true\n'
  else
    printf 'redis = "redis://127.0.0.1:6393"\n'
  fi
  if [ -n "$CAP$RATE" ]; then printf '[[shaping]]\ndomain = "*"\n'; fi
  if [ -n "$CAP" ]; then printf 'max_connections = %s\n' "$CAP"; fi
  if [ -n "$RATE" ]; then printf 'max_message_rate = "%s/s"\n' "$RATE"; fi
}

# One redis-server, or three made a Redis Cluster; their pids in redis_pids.
start_redis() {
  redis_pids=()
  local ports=(6393) p
  [ -z "$REDIS_CLUSTER" ] || ports=(6393 6394 6395)
  for p in "${ports[@]}"; do
    rm -rf "$OUT/redis-$p"; mkdir -p "$OUT/redis-$p"
    local extra=()
    [ -z "$REDIS_CLUSTER" ] || extra=(--cluster-enabled yes --cluster-port $((p + 100)))
    redis-server --bind 127.0.0.1 --port "$p" --save "" --appendonly no --dir "$OUT/redis-$p" \
      "${extra[@]}" >/dev/null & redis_pids+=($!)
    pids+=("$!")
  done
  for p in "${ports[@]}"; do until redis-cli -p "$p" ping >/dev/null 2>&1; do sleep 0.1; done; done
  if [ -n "$REDIS_CLUSTER" ]; then
    redis-cli --cluster create 127.0.0.1:6393 127.0.0.1:6394 127.0.0.1:6395 --cluster-yes >/dev/null
    for p in "${ports[@]}"; do
      until redis-cli -p "$p" cluster info | grep -q cluster_state:ok; do sleep 0.1; done
    done
  fi
}

run() {  # $1 = nodes
  local nodes=$1 per=$((N / $1)) sessions=$((SESSIONS / $1)) baton_pids=() i
  start_redis
  /usr/sbin/smtp-sink -u nobody -c 127.0.0.2:2546 1024 >"$OUT/sink.out" 2>&1 & local sink=$!
  pids+=("$sink")
  for i in $(seq "$nodes"); do
    rm -rf "$OUT/data-$i"; node_config "$i" >"$OUT/node-$i.toml"
    "$BATON" serve --config "$OUT/node-$i.toml" >"$OUT/node-$i.log" 2>&1 & baton_pids+=($!)
    pids+=("$!")
  done
  for i in $(seq "$nodes"); do
    until ss -ltn "sport = :$((2540 + i))" | grep -q LISTEN; do
      kill -0 "${baton_pids[$((i - 1))]}" 2>/dev/null || { echo "node $i did not start:" >&2; tail -3 "$OUT/node-$i.log" >&2; exit 1; }
      sleep 0.1
    done
  done
  sleep 2  # every node has beaten once
  local c0 r0 t0 t1 count=0 src=()
  c0=$(stat_files "${baton_pids[@]}"); r0=$(stat_files "${redis_pids[@]}"); t0=$(now)
  for i in $(seq "$nodes"); do
    /usr/sbin/smtp-source -s "$sessions" -m "$per" -l "$SIZE" -f bench@fleet.test -t sink@sink.test \
      "127.0.0.1:$((2540 + i))" & src+=($!)
  done
  wait "${src[@]}"
  local want=$((per * nodes)) deadline=$(( $(date +%s) + 600 ))
  while [ "$count" -lt "$want" ]; do
    local x; x=$(tail -c 64 "$OUT/sink.out")
    case "$x" in *mesg=*) x=${x##*mesg=}; count=${x%%[!0-9]*};; esac
    count=${count:-0}
    [ "$(date +%s)" -lt "$deadline" ] || { echo "sink timeout at $count/$want" >&2; break; }
    sleep 0.05
  done
  t1=$(now)
  local c1 r1; c1=$(stat_files "${baton_pids[@]}"); r1=$(stat_files "${redis_pids[@]}")
  awk -v n="$nodes" -v m="$want" -v t0="$t0" -v t1="$t1" -v c="$((c1 - c0))" -v r="$((r1 - r0))" -v hz="$HZ" -v cap="${CAP:-none}" -v rate="${RATE:-none}" -v rc="${REDIS_CLUSTER:+cluster}" \
    'BEGIN { printf "nodes=%d redis=%s cap=%s rate=%s msgs=%d e2e_rate=%.0f baton_cpu_ms=%.3f redis_cpu_ms=%.3f\n", n, rc ? rc : "single", cap, rate, m, m/(t1-t0), c*1000/hz/m, r*1000/hz/m }'
  cleanup; pids=()
}

for rep in $(seq "$REPS"); do
  run 1
  run "$NODES"
done
