#!/usr/bin/env bash
# Accept-rate benchmark (issue "Receive"): smtp-source -> Baton, fsync on, messages counted once
# acknowledged with 250; beside Postfix accepting the same load, measured in the same run by
# ../shared/peer-bench/compare.sh (Postfix and Baton alternate, REPS times each).
#
#   bench/accept.sh                   # N=20000 SESSIONS=20 SIZE=1000 REPS=3
#
# Baton has no delivery yet, so it is measured on acceptance alone; Postfix's inject figure is
# compare.sh's (smtp-source finishing into Postfix while Postfix also relays to smtp-sink).
# Last line: medians, e.g. "direct=... postfix_inject=... baton_accept=... ratio=... baton_cpu_ms=..."
# Loopback only; run as root (compare.sh installs and configures Postfix).
set -euo pipefail

N=${N:-20000}
REPS=${REPS:-3}
SESSIONS=${SESSIONS:-20}
SIZE=${SIZE:-1000}
PORT=${PORT:-2527}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEER=${PEER:-$ROOT/../shared/peer-bench/compare.sh}
OUT=${OUT:-/tmp/baton-accept-bench}
HZ=$(getconf CLK_TCK)

log() { echo "[$(date +%T)] $*" >&2; }
median() { sort -g | awk '{a[NR]=$1} END{ if(NR==0){print "NA"; exit} if(NR%2) print a[(NR+1)/2]; else printf "%.1f\n",(a[NR/2]+a[NR/2+1])/2 }'; }
ticks() { awk '{ sub(/^.*\) /,""); print $12+$13 }' "/proc/$1/stat"; }

mkdir -p "$OUT"
: > "$OUT/postfix.txt"
: > "$OUT/baton.txt"
(cd "$ROOT" && cargo build --release -q)

baton_run() {
  local dir="$OUT/data" cfg="$OUT/bench.toml"
  rm -rf "$dir"
  cat > "$cfg" <<TOML
hostname = "bench.localdomain"
data_dir = "$dir"
[[listener]]
address = "127.0.0.1:$PORT"
role = "mx"
[relay]
networks = ["127.0.0.0/8"]
[limits]
max_connections_per_ip = 1000
TOML
  "$ROOT/target/release/baton" serve --config "$cfg" 2> "$OUT/baton.log" &
  local pid=$!
  for _ in $(seq 100); do ss -ltn "sport = :$PORT" | grep -q LISTEN && break; sleep 0.05; done
  local c0 t0 t1 c1
  c0=$(ticks "$pid"); t0=$(date +%s.%N)
  /usr/sbin/smtp-source -s "$SESSIONS" -m "$N" -l "$SIZE" -f a@example.com -t b@example.net "127.0.0.1:$PORT"
  t1=$(date +%s.%N); c1=$(ticks "$pid")
  local rss; rss=$(awk '/^VmHWM:/{print $2}' "/proc/$pid/status")
  kill "$pid"; wait "$pid" || true
  local queued; queued=$(grep -c ' queued ' "$OUT/baton.log" || true)
  [ "$queued" = "$N" ] || { log "baton queued $queued of $N"; exit 1; }
  local stored; stored=$("$ROOT/target/release/baton" queue list --json --config "$cfg" | grep -c '"id"')
  [ "$stored" = "$N" ] || { log "spool holds $stored of $N"; exit 1; }
  awk -v n="$N" -v a="$t0" -v b="$t1" -v c=$((c1 - c0)) -v hz="$HZ" -v rss="$rss" \
    'BEGIN{ printf "%.0f %.3f %d\n", n/(b-a), 1000*c/hz/n, rss }' | tee -a "$OUT/baton.txt" >&2
}

for r in $(seq "$REPS"); do
  log "rep $r: postfix (compare.sh, 1 rep)"
  N=$N REPS=1 SESSIONS=$SESSIONS SIZE=$SIZE OUTDIR="$OUT/peer" bash "$PEER" | tail -1 | tee -a "$OUT/postfix.txt" >&2
  log "rep $r: baton"
  baton_run
done

field() { tr ' ' '\n' < "$OUT/postfix.txt" | awk -F= -v k="$1" '$1==k{print $2}' | median; }
D=$(field direct); PI=$(field postfix_inject); PE=$(field postfix_e2e); PC=$(field postfix_cpu_ms)
BA=$(awk '{print $1}' "$OUT/baton.txt" | median)
BC=$(awk '{print $2}' "$OUT/baton.txt" | median)
BR=$(awk '{print $3}' "$OUT/baton.txt" | median)
echo "# medians of $REPS runs, N=$N, sessions=$SESSIONS, size=$SIZE (msgs/s; CPU-ms per message)" >&2
echo "direct=$D postfix_inject=$PI postfix_e2e=$PE postfix_cpu_ms=$PC baton_accept=$BA baton_cpu_ms=$BC baton_rss_kb=$BR ratio_accept=$(awk -v a="$BA" -v b="$PI" 'BEGIN{printf "%.2f", (b>0)?a/b:0}')"
