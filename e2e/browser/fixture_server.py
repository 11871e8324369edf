#!/usr/bin/env python3
"""Serves pilot's dashboard page with the bookinfo fixture, no pilot needed.

    fixture_server.py PORT [--empty] [--fail-after N]

GET /dashboard      pilot/src/dashboard/index.html, read afresh on every request
GET /api/graph      fixture/graph.json with generatedAt set to now
GET /api/services   fixture/services.json
GET /api/proxies    fixture/proxies.json

--empty         serve a graph without traffic (the page's empty state)
--fail-after N  answer the API with 503 after N graph requests (the page's
                "pilot unreachable" state)

Listens on 127.0.0.1 only.
"""

import argparse
import json
import pathlib
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DASHBOARD = pathlib.Path(__file__).resolve().parents[2] / "pilot" / "src" / "dashboard"
FIXTURE = DASHBOARD / "fixture"


class Handler(BaseHTTPRequestHandler):
    options = None
    graph_requests = 0

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path in ("/", "/dashboard/"):
            self.send_response(302)
            self.send_header("Location", "/dashboard")
            self.end_headers()
            return
        if path == "/dashboard":
            self.reply(200, "text/html; charset=utf-8", (DASHBOARD / "index.html").read_bytes())
            return
        api = {"/api/graph": "graph.json", "/api/services": "services.json", "/api/proxies": "proxies.json"}
        if path not in api:
            self.reply(404, "text/plain", b"not found\n")
            return
        if path == "/api/graph":
            Handler.graph_requests += 1
        fail_after = self.options.fail_after
        if fail_after is not None and Handler.graph_requests > fail_after:
            self.reply(503, "text/plain", b"unavailable\n")
            return
        body = json.loads((FIXTURE / api[path]).read_text())
        if path == "/api/graph":
            body["generatedAt"] = int(time.time() * 1000)
            if self.options.empty:
                body["nodes"], body["edges"] = [], []
        if path == "/api/services" and self.options.empty:
            for service in body:
                service.update(rps=0.0, errorRate=None, p99Ms=None)
        self.reply(200, "application/json", json.dumps(body).encode())

    def reply(self, status, content_type, body):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("port", type=int)
    parser.add_argument("--empty", action="store_true")
    parser.add_argument("--fail-after", type=int, default=None, metavar="N")
    Handler.options = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", Handler.options.port), Handler)
    print(f"dashboard: http://127.0.0.1:{server.server_address[1]}/dashboard", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
