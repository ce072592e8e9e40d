"""A webhook receiver for benchmarks: answers 200 to every POST, counts the events it got.
Usage: python3 bench/webhook_sink.py PORT COUNT_FILE"""
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, count_file = int(sys.argv[1]), sys.argv[2]
total = 0

class Hook(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        global total
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        total += len(json.loads(body))
        with open(count_file, "w") as f:
            f.write(str(total))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", port), Hook).serve_forever()
