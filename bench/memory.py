"""Queue memory and restart (issue "Endure", item 1): CALLS API calls of 10,000 personalised
recipients each (one message per recipient), delivery held; then the server's RSS and peak
RSS; then a restart: how long until SMTP answers, how long until the whole queue is back
(GET /api/v1/queue counts every recipient), and RSS and peak RSS after it.

    python3 bench/memory.py          # CALLS=100 (1,000,000 recipients); BATON=target/release/baton

Loopback only; fsync on.
"""
import json, os, shutil, socket, subprocess, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATON = os.environ.get("BATON", os.path.join(ROOT, "target/release/baton"))
CALLS = int(os.environ.get("CALLS", 100))
PER_CALL = 10_000
WORK = os.environ.get("WORK", "/tmp/baton-memory-bench")
HTTP = "127.0.0.1:8032"
SMTP = ("127.0.0.1", 2543)


def status_kb(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def api(path, body=None):
    req = urllib.request.Request(f"http://{HTTP}{path}", data=body,
                                 headers={"Content-Type": "application/json"},
                                 method="POST" if body else "GET")
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def smtp_answers():
    try:
        with socket.create_connection(SMTP, timeout=0.2) as s:
            s.settimeout(5)
            return s.recv(100).startswith(b"220")
    except OSError:
        return False


def queued():
    try:
        r = api("/api/v1/queue")["recipients"]
        return sum(r.values())
    except Exception:
        return -1


def start():
    p = subprocess.Popen([BATON, "serve", "--config", f"{WORK}/baton.toml"],
                         stderr=open(f"{WORK}/baton.log", "a"))
    t0 = time.perf_counter()
    while not smtp_answers():
        if p.poll() is not None:
            raise SystemExit(f"baton exited; see {WORK}/baton.log")
        time.sleep(0.01)
    return p, time.perf_counter() - t0


def main():
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    with open(f"{WORK}/baton.toml", "w") as f:
        f.write(f'hostname = "bench.localdomain"\ndata_dir = "{WORK}/data"\n'
                f'[[listener]]\naddress = "{SMTP[0]}:{SMTP[1]}"\nrole = "mx"\n'
                f'[http]\naddress = "{HTTP}"\n[delivery]\nhold = true\n')
    total = CALLS * PER_CALL
    p, _ = start()
    peak_inject = 0
    t0 = time.perf_counter()
    for call in range(CALLS):
        recipients = [{"email": f"r{call * PER_CALL + i}@example.net",
                       "substitutions": {"n": call * PER_CALL + i}} for i in range(PER_CALL)]
        api("/api/v1/inject", json.dumps({
            "envelope_sender": "bulk@example.com",
            "content": {"from": "Bulk <bulk@example.com>", "subject": "Statement",
                        "text_body": "Dear customer {{n}},\nhere is your statement.\n"},
            "recipients": recipients,
        }).encode())
        peak_inject = max(peak_inject, status_kb(p.pid, "VmRSS"))
    inject_s = time.perf_counter() - t0
    assert queued() == total, queued()
    t0 = time.perf_counter()
    queued()
    summary_s = time.perf_counter() - t0
    rss, hwm = status_kb(p.pid, "VmRSS"), status_kb(p.pid, "VmHWM")
    p.terminate()
    p.wait()
    p, smtp_s = start()
    t0 = time.perf_counter()
    while queued() != total:
        time.sleep(0.05)
    back_s = smtp_s + time.perf_counter() - t0
    rss2, hwm2 = status_kb(p.pid, "VmRSS"), status_kb(p.pid, "VmHWM")
    p.terminate()
    p.wait()
    mb = lambda kb: f"{kb / 1024:.0f}MB"
    print(f"recipients={total} inject_s={inject_s:.1f} rss={mb(rss)} peak={mb(hwm)} "
          f"restart_smtp_s={smtp_s:.2f} restart_queue_s={back_s:.2f} "
          f"rss_after_restart={mb(rss2)} peak_during_recovery={mb(hwm2)} "
          f"bytes_per_rcpt={rss * 1024 // total} queue_summary_s={summary_s:.2f}")


if __name__ == "__main__":
    main()
