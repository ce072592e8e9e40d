"""Writes N events (half receptions, half deliveries, thirty days up to now, oldest first) to
data/events/events.jsonl under the current directory, for bench/stats.sh."""
import sys, datetime
n = int(sys.argv[1])
end = datetime.datetime.now(datetime.timezone.utc)
span = 30 * 86400  # thirty days of history, oldest first
start = end - datetime.timedelta(seconds=span)
with open('data/events/events.jsonl', 'w') as f:  # under the current directory
    for i in range(n):
        t = start + datetime.timedelta(seconds=span * i / n)
        ts = t.strftime('%Y-%m-%dT%H:%M:%S.') + f"{t.microsecond // 1000:03d}Z"
        mid = f"{i // 2:016X}"
        d = i % 97
        if i % 2 == 0:
            f.write(f'{{"id":"b1-{i}","type":"reception","timestamp":"{ts}","message_id":"{mid}","recipient":"user{i}@dest{d}.test","sender":"news@sender.test","size":1200,"campaign":"c{d % 7}"}}\n')
        else:
            f.write(f'{{"id":"b1-{i}","type":"delivery","timestamp":"{ts}","message_id":"{mid}","recipient":"user{i-1}@dest{d}.test","sender":"news@sender.test","code":250,"status":"2.0.0","response":"2.0.0 Ok: queued as ABCDEF0123","remote_mta":"mx.dest{d}.test [127.0.0.2]","attempt":1,"size":1200,"latency_ms":{i % 900},"source":"ip1"}}\n')
