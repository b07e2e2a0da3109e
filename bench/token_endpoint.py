#!/usr/bin/env python3
"""Stand-in OAuth2 token endpoint for bench/run.sh: answers every POST (the
password and refresh_token grants) with a ~1 KB access token that lasts a day.

Usage: token_endpoint.py PORT   (listens on 127.0.0.1 only)
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN = "bench." + "x" * 1018  # 1 KiB, like a JWT with a few claims


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        body = json.dumps({
            "access_token": TOKEN,
            "token_type": "bearer",
            "expires_in": 86400,
            "refresh_token": "bench-refresh",
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
