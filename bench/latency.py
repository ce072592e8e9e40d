"""Latency from 250 (reception event) to delivery (delivery event) per recipient, from Baton's
event log. Usage: latency.py events.jsonl"""
import json
import sys
from datetime import datetime


def ts(s):
    # RFC 3339 with up to nanoseconds; keep microseconds for fromisoformat.
    s = s.rstrip("Z")
    if "." in s:
        head, frac = s.split(".")
        s = f"{head}.{frac[:6]:0<6}"
    return datetime.fromisoformat(s).timestamp()


received, latencies = {}, []
with open(sys.argv[1]) as f:
    for line in f:
        e = json.loads(line)
        key = (e["message_id"], e["recipient"])
        if e["type"] == "reception":
            received[key] = ts(e["timestamp"])
        elif e["type"] == "delivery" and key in received:
            latencies.append(ts(e["timestamp"]) - received[key])
latencies.sort()
if not latencies:
    sys.exit("no deliveries in the event log")
def pct(p):
    return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000
print(f"latency_250_to_delivery n={len(latencies)} p50_ms={pct(50):.1f} p90_ms={pct(90):.1f} p99_ms={pct(99):.1f} max_ms={latencies[-1]*1000:.1f}")
