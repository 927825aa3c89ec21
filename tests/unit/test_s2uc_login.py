"""s2uc login/logout/check-auth against a local HTTP stand-in for Globus Auth.

globus-sdk finds Globus Auth through GLOBUS_SDK_SERVICE_URL_AUTH; the stand-in
answers the token, refresh and revocation endpoints the native-app flow uses.
"""

from __future__ import annotations

import json
import stat
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from click.testing import CliRunner

from scistream.grpcutil import ExitCode
from scistream.s2uc.cli import main
from scistream.s2uc.tokens import CLIENT_ID

pytestmark = pytest.mark.timeout(60)
SCOPE = "26c25f3c-c4b7-4107-8a25-df96898a24fe"


class FakeAuth:
    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, list[str]]]] = []
        self.issued = 0
        self.revoked: list[str] = []
        self.valid_codes = {"good-code"}

    def token_response(self, scope_id: str) -> dict[str, Any]:
        self.issued += 1
        return {
            "access_token": f"AT-{self.issued}",
            "refresh_token": f"RT-{self.issued}",
            "expires_in": 172800,
            "resource_server": scope_id,
            "scope": f"https://auth.globus.org/scopes/{scope_id}/scistream",
            "token_type": "Bearer",
            "other_tokens": [],
        }


@pytest.fixture
def auth(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeAuth]:
    fake = FakeAuth()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
            form = parse_qs(body)
            fake.requests.append((self.path, form))
            status, doc = 400, {"errors": [{"code": "BAD_REQUEST"}]}
            if self.path.rstrip("/") == "/v2/oauth2/token/revoke":
                fake.revoked.append(form["token"][0])
                status, doc = 200, {"active": False}
            elif self.path.rstrip("/") == "/v2/oauth2/token":
                grant = form.get("grant_type", [""])[0]
                if (grant == "authorization_code" and form.get("code", [""])[0] in fake.valid_codes) or (
                    grant == "refresh_token" and form.get("refresh_token", [""])[0].startswith("RT-")
                ):
                    status, doc = 200, fake.token_response(SCOPE)
                else:
                    status, doc = (
                        401,
                        {
                            "errors": [{"code": "UNAUTHORIZED", "detail": "invalid grant"}],
                            "error": "invalid_grant",
                        },
                    )
            data = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    monkeypatch.setenv("GLOBUS_SDK_SERVICE_URL_AUTH", f"http://127.0.0.1:{server.server_address[1]}/")
    monkeypatch.setenv("SCISTREAM_HOME", str(tmp_path / "home"))
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


def tokens_file(tmp_path: Path) -> Path:
    return tmp_path / "home" / "tokens.json"


def test_login_stores_tokens_privately_and_check_auth_hides_them(auth: FakeAuth, tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["login", "--scope", SCOPE], input="good-code\n")
    assert r.exit_code == 0, r.output
    assert f"client_id={CLIENT_ID}" in r.output
    assert "scopes%2F26c25f3c-c4b7-4107-8a25-df96898a24fe%2Fscistream" in r.output
    path = tokens_file(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert json.loads(path.read_text())[SCOPE]["access_token"] == "AT-1"
    form = auth.requests[0][1]
    assert form["grant_type"] == ["authorization_code"] and "code_verifier" in form
    r = CliRunner().invoke(main, ["check-auth", "--scope", SCOPE])
    assert r.exit_code == 0 and "AT-1" not in r.output and "Logged in" in r.output
    r = CliRunner().invoke(main, ["check_auth", "--scope", SCOPE, "--show-token"])
    assert f"Access Token for scope '{SCOPE}': AT-1" in r.output
    r = CliRunner().invoke(main, ["login", "--scope", SCOPE])
    assert "already logged in" in r.output and auth.issued == 1


def test_bad_code_is_one_line(auth: FakeAuth, tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["login", "--scope", SCOPE], input="wrong\n")
    assert r.exit_code == ExitCode.AUTH
    assert r.stderr.startswith("s2uc: error: Globus Auth refused the authorization code: 401")
    assert "Traceback" not in r.output
    assert not tokens_file(tmp_path).exists()


def test_expired_token_is_refreshed_before_use(auth: FakeAuth, tmp_path: Path) -> None:
    CliRunner().invoke(main, ["login", "--scope", SCOPE], input="good-code\n")
    path = tokens_file(tmp_path)
    data = json.loads(path.read_text())
    data[SCOPE]["expires_at_seconds"] = int(time.time()) - 10
    path.write_text(json.dumps(data))
    r = CliRunner().invoke(main, ["check-auth", "--scope", SCOPE, "--show-token"])
    assert r.exit_code == 0, r.output
    assert r.output.strip().endswith("AT-2")
    assert auth.requests[-1][1]["grant_type"] == ["refresh_token"]
    # A refresh token Globus refuses: log in again, said in one line.
    data = json.loads(path.read_text())
    data[SCOPE].update(expires_at_seconds=1, refresh_token="revoked")
    path.write_text(json.dumps(data))
    r = CliRunner().invoke(main, ["check-auth", "--scope", SCOPE])
    assert r.exit_code == ExitCode.AUTH and f"s2uc login --scope {SCOPE}" in r.stderr


def test_logout_revokes_and_deletes(auth: FakeAuth, tmp_path: Path) -> None:
    CliRunner().invoke(main, ["login", "--scope", SCOPE], input="good-code\n")
    r = CliRunner().invoke(main, ["logout"])
    assert r.exit_code == 0 and "Successfully logged out!" in r.output
    assert sorted(auth.revoked) == ["AT-1", "RT-1"]
    assert not tokens_file(tmp_path).exists()
    r = CliRunner().invoke(main, ["check-auth", "--scope", SCOPE])
    assert r.exit_code == ExitCode.AUTH and "not logged in" in r.stderr
    r = CliRunner().invoke(main, ["logout"])  # nothing to do is fine
    assert r.exit_code == 0
