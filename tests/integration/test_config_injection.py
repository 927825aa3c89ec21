"""Issue 14 item 1 end to end: the config-injection payloads against a real s2cs with the stunnel
and HAProxy backends, the proxies' environment, and client text echoed by a real s2cs (issue 14
item 4, issue 10 item 8).

Each s2cs checks tokens against a local stand-in for Globus Auth's introspection (reached
through globus-sdk's service-URL setting) so that SCISTREAM_CLIENT_SECRET is really in its
environment, as in the attack the issue shows. Every address is loopback: the payloads aim at a
canary server here, and a canary that accepts a connection fails the test.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from globus_standin import IntrospectionStandIn
from s2cs_process import Gateway, start_s2cs, stop_s2cs
from streams import DuplexServer, duplex_transfer, pattern_digest, wait_for

from scistream._proto import scistream_pb2 as pb
from scistream._proto import scistream_pb2_grpc
from scistream.s2cs.backends.nginx import DEFAULT_STREAM_MODULE

pytestmark = pytest.mark.timeout(120)

CLIENT_ID = "c42c0dac-0a52-408e-a04f-5d31bfe0aef8"  # s2cs's default client id
SECRET = "the-globus-client-secret-0123456789"
TOKEN = "tok-injection-test-0123456789abcdef"
SIZE = 1 << 20

STUNNEL = shutil.which("stunnel4") or shutil.which("stunnel")
HAPROXY = shutil.which("haproxy")
NGINX_READY = shutil.which("nginx") is not None and Path(DEFAULT_STREAM_MODULE).exists()


def stunnel_payload(canary: int, legit: int) -> str:
    """The issue's stunnel payload, addresses and ports changed only (all loopback here)."""
    return f"[::ffff:127.0.0.1%lo:1\nconnect = 127.0.0.1:{canary}\n;]:{legit}"


def nginx_payload(canary: int, legit: int, leak: int) -> str:
    """The same attack in nginx's syntax: close the server block, open one of its own."""
    block = f"server{{listen 127.0.0.1:{leak};proxy_pass 127.0.0.1:{canary};}}"
    return f"[::ffff:127.0.0.1%lo;}}{block}#]:{legit}"


def haproxy_payload(canary: int, legit: int, stats: int, leak: int) -> str:
    """An extra server, a new global section with an unauthenticated admin stats socket, and a
    frontend answering with the expanded client secret (the issue's HAProxy payload)."""
    return (
        f"[::ffff:127.0.0.1%lo:1\n    server evil 127.0.0.1:{canary}\n"
        f"global\n    stats socket ipv4@127.0.0.1:{stats} level admin\n"
        f"frontend leak\n    mode http\n    bind 127.0.0.1:{leak}\n"
        '    http-request return status 200 content-type text string "${SCISTREAM_CLIENT_SECRET}"\n'
        f"#]:{legit}"
    )


class GlobusStandIn(IntrospectionStandIn):
    """Answers Globus Auth's token introspection: TOKEN is active for s2cs's scope."""

    def __init__(self) -> None:
        answer = {
            "active": True,
            "sub": "a1a1a1a1-0000-0000-0000-000000000001",
            "username": "alice@example.org",
            "scope": f"openid https://auth.globus.org/scopes/{CLIENT_ID}/scistream",
            "aud": [CLIENT_ID],
            "exp": int(time.time()) + 3600,
        }
        super().__init__(lambda _path, token: answer if token == TOKEN else {"active": False})


@dataclass
class Target:
    """Where the gateway may connect (the producer app) and a canary it must never reach."""

    legit: DuplexServer
    canary: DuplexServer


@pytest.fixture
def targets() -> Iterator[Target]:
    legit = DuplexServer(send_bytes=SIZE, seed=7, expect_bytes=SIZE)
    canary = DuplexServer(send_bytes=16, seed=8)
    try:
        yield Target(legit, canary)
    finally:
        legit.close()
        canary.close()


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _md() -> list[tuple[str, str]]:
    return [("authorization", TOKEN)]


def _refused(call: Any, message: Any) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call(message, metadata=_md(), timeout=10)
    err: Any = info.value
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, err.details()
    details: str = err.details()
    assert details.isprintable() and len(details) < 400, details
    return details


def _proxy_children(s2cs_pid: int) -> list[int]:
    """The s2cs's direct children (its proxies: setpriv execs the proxy in place)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == s2cs_pid:
                out.append(int(entry))
    return out


def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        raw = f.read()
    return dict(item.decode().partition("=")[::2] for item in raw.split(b"\0") if item)


def _files_text(root: Path) -> str:
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_socket()]
    return "\n".join(p.read_text(errors="replace") for p in files)


def _stunnel_client(listener: str, key: bytes, uid: str, data: bytes) -> bytes:
    """A TLS 1.3 external-PSK client for the PROD stunnel listener (what a CONS gateway is)."""
    result = subprocess.run(
        ["openssl", "s_client", "-quiet", "-tls1_3", "-psk", key.hex(), "-psk_identity", uid,
         "-ciphersuites", "TLS_AES_128_GCM_SHA256", "-connect", listener],
        input=data,
        capture_output=True,
        timeout=20,
        check=False,
    )
    return result.stdout


@pytest.fixture
def auth_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    standin = GlobusStandIn()
    monkeypatch.setenv("SCISTREAM_CLIENT_SECRET", SECRET)
    monkeypatch.setenv("GLOBUS_SDK_ENVIRONMENT", "production")
    monkeypatch.setenv("GLOBUS_SDK_SERVICE_URL_AUTH", standin.url)
    try:
        yield
    finally:
        standin.close()


@pytest.fixture
def gateway(request: pytest.FixtureRequest, tmp_path: Path, auth_env: None) -> Iterator[Gateway]:
    kind: str = request.param
    security = "tls" if kind == "Stunnel" else "plain"  # HAProxy and nginx have no TLS-PSK
    gw = start_s2cs(
        tmp_path, kind.lower(), "--ssl", "False", "--type", kind, "--security", security,
        "--hello-timeout", "30", ports=4,
    )
    try:
        yield gw
    finally:
        stop_s2cs(gw.proc)
        text = gw.log.read_text(errors="replace")
        assert gw.proc.returncode == 0 and "Traceback" not in text, text[-3000:]


BACKENDS = [
    pytest.param(
        "Stunnel",
        marks=[pytest.mark.stunnel, pytest.mark.skipif(STUNNEL is None, reason="stunnel4 is not installed")],
    ),
    pytest.param(
        "Haproxy",
        marks=[pytest.mark.haproxy, pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")],
    ),
    pytest.param(
        "Nginx",
        marks=pytest.mark.skipif(
            not NGINX_READY, reason="nginx or its stream module (libnginx-mod-stream) is not installed"
        ),
    ),
]
#: The config file each backend writes in the session directory.
CONFIG_FILE = {"stunnel": "stunnel.conf", "haproxy": "haproxy.cfg", "nginx": "nginx.conf"}


@pytest.mark.parametrize("gateway", BACKENDS, indirect=True)
def test_injected_endpoints_are_refused_and_proxies_get_no_secret(
    gateway: Gateway, targets: Target, tmp_path: Path
) -> None:
    kind = gateway.log.stem  # start_s2cs names the log after the gateway: the backend here
    stunnel = kind == "stunnel"
    legit, canary = targets.legit, targets.canary
    stats, leak = _free_port(), _free_port()
    payload = {
        "stunnel": stunnel_payload(_port(canary.address), _port(legit.address)),
        "haproxy": haproxy_payload(_port(canary.address), _port(legit.address), stats, leak),
        "nginx": nginx_payload(_port(canary.address), _port(legit.address), leak),
    }[kind]
    uid = "inject-" + os.urandom(4).hex()
    state = tmp_path / f"state-{kind}"
    with grpc.insecure_channel(gateway.address) as channel:
        stub = scistream_pb2_grpc.ControlStub(channel)
        fut = stub.req.future(pb.Request(uid=uid, role="PROD", num_conn=1), metadata=_md(), timeout=40)
        # The hello with the payload is refused, and so is one hidden among good endpoints.
        details = _refused(stub.hello, pb.Hello(uid=uid, prod_listeners=[payload], role="PROD"))
        assert "\n" not in details and "'[::ffff:127.0.0.1%lo" in details  # quoted, escaped
        _refused(stub.hello, pb.Hello(uid=uid, prod_listeners=[legit.address, payload], role="PROD"))
        # The session still waits for its hello: the real one is taken.
        hello = pb.Hello(uid=uid, prod_listeners=[legit.address], role="PROD")
        stub.hello(hello, metadata=_md(), timeout=10)
        reply = fut.result()
        assert list(reply.prod_listeners) == [legit.address]
        # update (which a PROD flow copies from the hello) refuses it the same way.
        _refused(stub.update, pb.UpdateTargets(uid=uid, remote_listeners=[payload], role="PROD"))
        update = pb.UpdateTargets(uid=uid, remote_listeners=[legit.address], role="PROD")
        stub.update(update, metadata=_md(), timeout=20)

        # The config holds the one intended target; nothing of the payload is on disk.
        session_dir = state / "sessions" / uid
        conf = (session_dir / CONFIG_FILE[kind]).read_text()
        if stunnel:
            connects = [ln for ln in conf.splitlines() if ln.strip().startswith("connect")]
            assert connects == [f"connect = {legit.address}"], conf
        elif kind == "nginx":
            passes = [ln.split() for ln in conf.splitlines() if "proxy_pass" in ln]
            assert passes == [["proxy_pass", f"{legit.address};"]], conf
            assert conf.count("server {") == 1 and conf.count("listen ") == 1, conf
        else:
            servers = [ln.split() for ln in conf.splitlines() if ln.strip().startswith("server")]
            assert servers == [["server", "t0", legit.address]], conf
            assert conf.count("\nglobal") == 1 and "frontend leak" not in conf
            assert "stats socket ipv4" not in conf
        written = _files_text(state / "sessions")  # the configs and keys the proxies read
        assert str(_port(canary.address)) not in written and "SCISTREAM_CLIENT_SECRET" not in written

        # The proxy runs with PATH (and LANG) only: no client secret to expand or read.
        # (nginx writes its process title over its environment block, so /proc shows no
        # environment for it; it is started by the same code as the other two.)
        children = _proxy_children(gateway.proc.pid)
        assert len(children) == 1, children
        with open(f"/proc/{children[0]}/environ", "rb") as f:
            assert SECRET.encode() not in f.read()
        if kind != "nginx":
            env = _environ(children[0])
            assert set(env) <= {"PATH", "LANG"} and "PATH" in env, sorted(env)

        # Traffic reaches the producer and never the canary.
        if stunnel:
            data = os.urandom(SIZE)
            got = _stunnel_client(reply.listeners[0], reply.session_key, uid, data)
            assert hashlib.sha256(got).hexdigest() == pattern_digest(SIZE, 7), f"{len(got)} bytes back"
            assert wait_for(lambda: len(legit.received) >= 1, 10)
            assert legit.received[-1] == (SIZE, hashlib.sha256(data).hexdigest())
        else:
            _, received = duplex_transfer(reply.listeners[0], send_bytes=SIZE, seed=9, expect=SIZE)
            assert received == (SIZE, pattern_digest(SIZE, 7))
            assert not _listening(stats) and not _listening(leak)
        assert canary.accepted == 0, "the gateway connected to the payload's target"
        stub.release(pb.Release(uid=uid), metadata=_md(), timeout=10)

    log = gateway.log.read_text(errors="replace")
    for line in log.splitlines():
        assert not line.lstrip().startswith(("connect =", "server evil", "global", "frontend", "#]", ";]"))



FORGED = "FORGED 2026-12-04 00:00:00,000 INFO scistream.s2cs.manager: session x: released"


@pytest.mark.haproxy
@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")
def test_client_text_is_echoed_bounded_and_each_log_record_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SCISTREAM_CLIENT_SECRET", raising=False)
    log_file = tmp_path / "s2cs-file.log"
    gw = start_s2cs(
        tmp_path, "echo", "--ssl", "False", "--type", "Haproxy", "--security", "plain",
        "--log-file", str(log_file), ports=2,
    )
    big = "[::1%" + "x" * 900_000 + "]:1"
    try:
        with grpc.insecure_channel(gw.address) as channel:
            stub = scistream_pb2_grpc.ControlStub(channel)
            bad_uid = "abc\n" + FORGED
            for call, message in (
                (stub.hello, pb.Hello(uid=bad_uid, prod_listeners=["127.0.0.1:5074"], role="PROD")),
                (stub.req, pb.Request(uid=bad_uid, role="PROD", num_conn=1)),
                (stub.req, pb.Request(uid="echo-1", role="PROD\n" + FORGED + "\n" * 100_000, num_conn=1)),
                (stub.hello, pb.Hello(uid="echo-2", prod_listeners=[big], role="PROD")),
                (stub.hello, pb.Hello(uid="echo-3", prod_listeners=["127.0.0.1:1\n" + FORGED], role="PROD")),
                (stub.hello, pb.Hello(uid="echo-4\n", prod_listeners=["127.0.0.1:5074"], role="PROD")),
            ):
                _refused(call, message)
        # appctrl mock, as the issue sent it (unauthenticated): refused, nothing forged.
        mock = subprocess.run(
            ["appctrl", "mock", bad_uid, gw.address, "INVALID_TOKEN", "PROD", "127.0.0.1", "--ssl", "False"],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert mock.returncode != 0
        assert not [ln for ln in mock.stderr.splitlines() if ln.startswith("FORGED")], mock.stderr
    finally:
        stop_s2cs(gw.proc)
    assert gw.proc.returncode == 0
    audit = tmp_path / "state-echo" / "audit.log"
    for path in (gw.log, log_file, audit):
        text = path.read_text()
        assert len(text) < 64 * 1024, f"{path}: {len(text)} bytes for seven refused requests"
        assert "x" * 2000 not in text, path
        for line in text.splitlines():
            assert not line.startswith("FORGED"), f"{path}: a forged line: {line!r}"
            if "FORGED" in line:
                assert "\\nFORGED" in line, line
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    refused = [r for r in records if r.get("decision") == "refused"]
    assert len(refused) >= 6 and all(r["code"] == "INVALID_ARGUMENT" for r in refused)
    assert any(r["uid"] == bad_uid for r in refused)  # JSON keeps the text, escaped
    assert sum("FORGED" in ln and "INVALID_ARGUMENT" in ln for ln in log_file.read_text().splitlines()) >= 3
