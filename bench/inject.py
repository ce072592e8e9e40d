"""API injection benchmark: one POST /api/v1/inject with 10,000 recipients, personalised
(10,000 messages) and not (one message), against a release build with fsync on and
delivery held. Prints recipients accepted per second and server CPU per recipient.
Usage: python3 bench/inject.py [RECIPIENTS] [ROUNDS]"""
import json, os, shutil, subprocess, sys, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
DATA = "/tmp/baton-inject-bench"
CONFIG = "/tmp/baton-inject-bench.toml"
HTTP = "127.0.0.1:8026"


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def post(body):
    req = urllib.request.Request(f"http://{HTTP}/api/v1/inject", data=body,
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=600) as r:
        return r.status, json.loads(r.read())


def run(personal):
    shutil.rmtree(DATA, ignore_errors=True)
    server = subprocess.Popen([f"{ROOT}/target/release/baton", "serve", "--config", CONFIG],
                              stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://{HTTP}/api/v1/queue", timeout=1)
                break
            except Exception:
                time.sleep(0.1)
        recipients = [{"email": f"r{i}@example.net", "substitutions": {"n": i}} for i in range(N)]
        text = "Dear customer {{n}},\nhere is your statement.\n" if personal else "Dear customer,\nhere is your statement.\n"
        body = json.dumps({
            "envelope_sender": "bulk@example.com",
            "content": {"from": "Bulk <bulk@example.com>", "subject": "Statement", "text_body": text},
            "recipients": recipients,
        }).encode()
        cpu0, t0 = cpu_seconds(server.pid), time.perf_counter()
        status, answer = post(body)
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds(server.pid) - cpu0
        assert status == 202 and len(answer["ids"]) == (N if personal else 1), answer
        return N / elapsed, cpu * 1000 / N
    finally:
        server.terminate()
        server.wait()


with open(CONFIG, "w") as f:
    f.write(f'hostname = "bench.localdomain"\ndata_dir = "{DATA}"\n'
            '[[listener]]\naddress = "127.0.0.1:2528"\nrole = "mx"\n'
            f'[http]\naddress = "{HTTP}"\n[delivery]\nhold = true\n')
for personal in (True, False):
    rates, cpus = [], []
    for _ in range(ROUNDS):
        rate, cpu = run(personal)
        rates.append(rate)
        cpus.append(cpu)
    rates.sort(); cpus.sort()
    kind = "personalised (one message each)" if personal else "shared (one message)"
    print(f"{kind}: recipients={N} median_rcpts_per_s={rates[len(rates)//2]:.0f} "
          f"median_cpu_ms_per_rcpt={cpus[len(cpus)//2]:.4f} runs={[round(r) for r in rates]}")
