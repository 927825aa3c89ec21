"""A local stand-in for Globus Auth's token introspection, for the tests that check tokens.

It is reached through globus-sdk's own service-URL setting (GLOBUS_SDK_SERVICE_URL_AUTH), so
the real ConfidentialAppAuthClient code runs. What each token introspects to is the caller's
``answer``; the stand-in counts calls and keeps their Authorization headers.

Imported as ``globus_standin`` by tests/s2cs and tests/integration: tests/ is on sys.path
because tests/conftest.py lives there (as for streams.py).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

#: ``answer(path, token)``: the introspection document for ``token`` POSTed to ``path``, or
#: None for a 404 (a path Globus Auth does not serve).
Answer = Callable[[str, str], "dict[str, Any] | None"]


class IntrospectionStandIn:
    """An HTTP server on 127.0.0.1 answering each POST's form ``token`` with ``answer``."""

    def __init__(self, answer: Answer) -> None:
        self.hits = 0
        self.auth_headers: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                outer.hits += 1
                outer.auth_headers.append(self.headers.get("Authorization", ""))
                body = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()
                token = parse_qs(body).get("token", [""])[0]
                doc = answer(self.path, token)
                if doc is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                data = json.dumps(doc).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
