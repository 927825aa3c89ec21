"""Applications and checks inside an acceptance sandbox, run with the system python3 (stdlib
only: the user's environment has nothing else), e.g. ``python3 sandbox_tools.py fetch ...``.

  serve   --bind H --port P --size N --seed S   TCP server: every connection gets the same
                                                N deterministic bytes, then EOF
  expect  --size N --seed S                      prints the SHA-256 ``serve`` sends
  fetch   HOST:PORT [--rate B/s]                 reads to EOF; prints "sha256 HEX bytes N"
  globus  --port P                               a stand-in for Globus Auth (token exchange,
                                                 introspection, revocation) on loopback: the
                                                 sandbox cannot reach auth.globus.org
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import random
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def serve(args: argparse.Namespace) -> int:
    data = payload(args.size, args.seed)
    srv = socket.create_server((args.bind, args.port), reuse_port=False, backlog=64)
    print(
        f"serving {len(data)} bytes sha256 {hashlib.sha256(data).hexdigest()} on {args.bind}:{args.port}",
        flush=True,
    )

    def one(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # the fault tests break connections on purpose
            conn.sendall(data)

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=one, args=(conn,), daemon=True).start()


def expect(args: argparse.Namespace) -> int:
    print(hashlib.sha256(payload(args.size, args.seed)).hexdigest())
    return 0


def fetch(args: argparse.Namespace) -> int:
    host, port = args.endpoint.rsplit(":", 1)
    h = hashlib.sha256()
    n = 0
    t0 = time.monotonic()
    try:
        with socket.create_connection((host, int(port)), timeout=args.timeout) as s:
            while chunk := s.recv(1 << 16):
                h.update(chunk)
                n += len(chunk)
                if args.rate:
                    ahead = n / args.rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
    except OSError as exc:
        print(f"error {type(exc).__name__}: {exc} after bytes {n}", flush=True)
        return 1
    print(f"sha256 {h.hexdigest()} bytes {n}", flush=True)
    return 0


def globus(args: argparse.Namespace) -> int:
    """Just enough of Globus Auth for `s2uc login` (native app flow: code -> tokens) and for an
    s2cs checking tokens (introspection with its client id and secret)."""
    issued: dict[str, str] = {}  # access token -> scope

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, doc: dict[str, object], status: int = 200) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            form = parse_qs(self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode())
            path = self.path.rstrip("/")
            if path == "/v2/oauth2/token":
                # A code exchange names no scope (it was asked for at the authorize step).
                scope = form.get("scope", [""])[0] or args.scope
                token = f"tok-{len(issued)}-{random.getrandbits(64):x}"
                issued[token] = scope
                rs = scope.split("/scopes/")[-1].split("/")[0] if "/scopes/" in scope else "auth.globus.org"
                self._reply(
                    {
                        "access_token": token,
                        "refresh_token": f"r-{token}",
                        "expires_in": 3600,
                        "scope": scope,
                        "token_type": "Bearer",
                        "resource_server": rs,
                        "other_tokens": [],
                    }
                )
            elif path == "/v2/oauth2/token/introspect":
                token = form.get("token", [""])[0]
                if token not in issued:
                    self._reply({"active": False})
                    return
                rs = issued[token].split("/scopes/")[-1].split("/")[0]
                self._reply(
                    {
                        "active": True,
                        "sub": "00000000-0000-0000-0000-00000000a11c",
                        "username": "alice@example.org",
                        "scope": issued[token],
                        "aud": [rs],
                        "exp": int(time.time()) + 3600,
                        "client_id": "s2uc",
                    }
                )
            elif path == "/v2/oauth2/token/revoke":
                issued.pop(form.get("token", [""])[0], None)
                self._reply({"active": False})
            else:
                self._reply({"error": "not found"}, 404)

        def log_message(self, fmt: str, *a: object) -> None:
            print(f"globus stand-in: {self.command} {self.path}", flush=True)

    httpd = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"globus stand-in on http://127.0.0.1:{args.port}/", flush=True)
    httpd.serve_forever()
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--bind", default="127.0.0.1")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--size", type=int, required=True)
    s.add_argument("--seed", type=int, default=1)
    e = sub.add_parser("expect")
    e.add_argument("--size", type=int, required=True)
    e.add_argument("--seed", type=int, default=1)
    f = sub.add_parser("fetch")
    f.add_argument("endpoint")
    f.add_argument("--rate", type=float, default=0.0)
    f.add_argument("--timeout", type=float, default=20.0)
    g = sub.add_parser("globus")
    g.add_argument("--port", type=int, required=True)
    g.add_argument("--scope", default="")
    args = p.parse_args()
    return {"serve": serve, "expect": expect, "fetch": fetch, "globus": globus}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
