"""Disk use behind one waiting message (issue "Endure", item 2): one message to a destination
that refuses connections (it stays deferred), then MESSAGES personalised messages through the
API that are delivered to a sink; the journal's size and segment count at the end and at their
peak. Segments are 1 MiB, as in the issue's figures; fsync on.

    python3 bench/pinned.py                    # MESSAGES=50000, BATON=target/release/baton

Loopback only: the sink listens on 127.0.0.2, the refusing host is 127.0.0.3.
"""
import asyncio, json, os, shutil, subprocess, sys, threading, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATON = os.environ.get("BATON", os.path.join(ROOT, "target/release/baton"))
MESSAGES = int(os.environ.get("MESSAGES", 50_000))
WORK = os.environ.get("WORK", "/tmp/baton-pinned-bench")
HTTP = "127.0.0.1:8031"
SINK = ("127.0.0.2", 2541)
BATCH = 10_000


async def sink_session(reader, writer):
    writer.write(b"220 sink\r\n")
    in_data = False
    while line := await reader.readline():
        if in_data:
            if line == b".\r\n":
                in_data = False
                writer.write(b"250 ok\r\n")
            continue
        verb = line[:4].upper()
        if verb == b"DATA":
            in_data = True
            writer.write(b"354 go\r\n")
        elif verb == b"QUIT":
            writer.write(b"221 bye\r\n")
            break
        elif verb == b"EHLO":
            writer.write(b"250-sink\r\n250 PIPELINING\r\n")
        else:
            writer.write(b"250 ok\r\n")
        await writer.drain()
    writer.close()


def run_sink():
    async def main():
        server = await asyncio.start_server(sink_session, *SINK)
        async with server:
            await server.serve_forever()
    asyncio.run(main())


def api(path, body=None):
    req = urllib.request.Request(f"http://{HTTP}{path}", data=body,
                                 headers={"Content-Type": "application/json"},
                                 method="POST" if body else "GET")
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def inject(domain, n, start):
    recipients = [{"email": f"r{start + i}@{domain}", "substitutions": {"n": start + i}}
                  for i in range(n)]
    api("/api/v1/inject", json.dumps({
        "envelope_sender": "bulk@example.com",
        "content": {"from": "Bulk <bulk@example.com>", "subject": "Statement",
                    "text_body": "Dear customer {{n}},\nhere is your statement.\n" * 8},
        "recipients": recipients,
    }).encode())


def journal():
    d = f"{WORK}/data/spool/journal"
    sizes = [os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)]
    return sum(sizes), len(sizes)


def main():
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    with open(f"{WORK}/baton.toml", "w") as f:
        f.write(f'hostname = "bench.localdomain"\ndata_dir = "{WORK}/data"\n'
                '[[listener]]\naddress = "127.0.0.1:2542"\nrole = "mx"\n'
                f'[http]\naddress = "{HTTP}"\n[spool]\nsegment_size = "1MiB"\n'
                '[[route]]\ndomain = "stuck.test"\nsmarthost = "127.0.0.3:2541"\n'
                f'[[route]]\ndomain = "*"\nsmarthost = "{SINK[0]}:{SINK[1]}"\n')
    threading.Thread(target=run_sink, daemon=True).start()
    server = subprocess.Popen([BATON, "serve", "--config", f"{WORK}/baton.toml"],
                              stderr=open(f"{WORK}/baton.log", "w"))
    try:
        for _ in range(100):
            try:
                api("/api/v1/queue")
                break
            except Exception:
                time.sleep(0.1)
        inject("stuck.test", 1, 0)
        peak = (0, 0)
        t0 = time.perf_counter()
        for start in range(0, MESSAGES, BATCH):
            inject("ok.test", min(BATCH, MESSAGES - start), start)
            peak = max(peak, journal())
        while True:
            waiting = api("/api/v1/queue")["recipients"]
            peak = max(peak, journal())
            if waiting["queued"] + waiting["active"] + waiting["deferred"] <= 1:
                break
            time.sleep(0.5)
        elapsed = time.perf_counter() - t0
        time.sleep(2.5)  # done records are synced within a second; segments go after
        size, segments = journal()
        print(f"binary={BATON} messages={MESSAGES} seconds={elapsed:.1f} "
              f"journal_end={size / 2**20:.1f}MiB segments_end={segments} "
              f"journal_peak={peak[0] / 2**20:.1f}MiB segments_peak={peak[1]}")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
