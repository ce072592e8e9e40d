"""Scheduler at scale (issue "Shape"): queue RCPTS recipients spread over DOMAINS destinations,
then measure the memory per queued recipient, the restart time (spool recovery and queue
rebuild) and how fast the queue manager settles a full pass over every recipient.

    python3 bench/scheduler.py            # RCPTS=1000000 DOMAINS=100000 PER_MSG=100

Loopback only. Uses target/release/baton (cargo build --release first).
"""
import os, shutil, signal, socket, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATON = os.path.join(ROOT, "target/release/baton")
RCPTS = int(os.environ.get("RCPTS", 1_000_000))
DOMAINS = int(os.environ.get("DOMAINS", 100_000))
PER_MSG = int(os.environ.get("PER_MSG", 100))
PORT = int(os.environ.get("PORT", 2529))
WORK = os.environ.get("WORK", "/tmp/baton-sched-bench")


def config(hold):
    return f"""hostname = "bench.localdomain"
data_dir = "{WORK}/data"
[[listener]]
address = "127.0.0.1:{PORT}"
[relay]
networks = ["127.0.0.0/8"]
[dns]
nameservers = ["127.0.0.1:9"]
[delivery]
hold = {str(hold).lower()}
retry_min = "1h"
[[route]]
domain = "*"
smarthost = "127.0.0.1:9"
"""


def start(hold):
    path = f"{WORK}/baton-{hold}.toml"
    with open(path, "w") as f:
        f.write(config(hold))
    log = open(f"{WORK}/baton.log", "a")
    t0 = time.time()
    p = subprocess.Popen([BATON, "serve", "--config", path], stderr=log)
    while True:
        try:
            socket.create_connection(("127.0.0.1", PORT)).close()
            break
        except OSError:
            if p.poll() is not None:
                sys.exit("baton exited; see " + f"{WORK}/baton.log")
            time.sleep(0.01)
    return p, time.time() - t0


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def inject():
    s = socket.create_connection(("127.0.0.1", PORT))
    f = s.makefile("rb")

    def replies(n):
        for _ in range(n):
            while True:
                line = f.readline()
                if not line:
                    sys.exit("connection closed")
                if line[3:4] != b"-":
                    if not line.startswith((b"2", b"3")):
                        sys.exit(f"refused: {line!r}")
                    break

    replies(1)
    s.sendall(b"EHLO bench\r\n")
    replies(1)
    sent = 0
    msg = 0
    while sent < RCPTS:
        n = min(PER_MSG, RCPTS - sent)
        cmds = [b"MAIL FROM:<a@bench.test>\r\n"]
        for i in range(sent, sent + n):
            cmds.append(f"RCPT TO:<u{i}@d{i % DOMAINS}.test>\r\n".encode())
        cmds.append(b"DATA\r\n")
        s.sendall(b"".join(cmds))
        replies(n + 2)
        s.sendall(f"Subject: m{msg}\r\n\r\nhello\r\n.\r\n".encode())
        replies(1)
        sent += n
        msg += 1
    s.sendall(b"QUIT\r\n")
    s.close()
    return msg


def count_events(kind):
    n = 0
    try:
        with open(f"{WORK}/data/events/events.jsonl", "rb") as f:
            for line in f:
                if kind in line:
                    n += 1
    except FileNotFoundError:
        pass
    return n


def main():
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    p, _ = start(True)
    base = rss_kb(p.pid)
    t0 = time.time()
    msgs = inject()
    inject_s = time.time() - t0
    time.sleep(1)
    full = rss_kb(p.pid)
    per_rcpt = (full - base) * 1024 / RCPTS
    print(f"queued {RCPTS} recipients in {msgs} messages over {DOMAINS} domains in {inject_s:.1f} s "
          f"({RCPTS / inject_s:.0f} rcpt/s)")
    print(f"memory: {base} kB idle, {full} kB with the queue: {per_rcpt:.0f} bytes per queued recipient")
    p.send_signal(signal.SIGTERM)
    p.wait()
    spool = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(f"{WORK}/data/spool") for f in fs)
    print(f"spool on disk: {spool / 1e6:.1f} MB ({spool / RCPTS:.0f} bytes per recipient)")

    # Restart, held: recovery and queue rebuild only.
    p, restart_s = start(True)
    print(f"restart (recover {RCPTS} recipients, rebuild the queue, listen): {restart_s:.2f} s, "
          f"RSS {rss_kb(p.pid)} kB")
    p.send_signal(signal.SIGTERM)
    p.wait()

    # Restart, delivering to a smarthost that refuses: every recipient is dispatched, its job
    # fails, and the outcome is applied and logged: one full scheduling pass.
    before = count_events(b'"transient_failure"')
    t0 = time.time()
    p, _ = start(False)
    while count_events(b'"transient_failure"') - before < RCPTS:
        if time.time() - t0 > 600:
            print("pass not finished in 600 s")
            break
        time.sleep(0.5)
    pass_s = time.time() - t0
    print(f"one scheduling pass (dispatch, failed delivery, outcome recorded and logged) over "
          f"{RCPTS} recipients: {pass_s:.1f} s = {RCPTS / pass_s:.0f} recipient decisions/s, "
          f"RSS {rss_kb(p.pid)} kB")
    p.send_signal(signal.SIGTERM)
    p.wait()


if __name__ == "__main__":
    main()
