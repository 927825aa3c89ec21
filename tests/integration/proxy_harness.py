"""Shared pieces of the subprocess-backend tests: a PROD+CONS pair of one backend kind in front of
producer stand-ins, and the checks every backend must pass (exact duplex bytes, cleanup,
supervision, refusals, certificates).

Streams, the producer stand-in (``DuplexServer``), the consumer (``duplex_transfer``) and
polling are the shared ones of tests/streams.py. Every process and socket started here is
stopped by its owner's ``close``/context exit, also on failure; ports come from the kernel
(bind port 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from streams import DuplexServer, MiB, duplex_transfer, pattern_digest, wait_for

from scistream.certs import make_ca_and_leaf
from scistream.s2cs.backends import create_backend
from scistream.s2cs.backends.base import Backend, BackendOptions, RoutePlan, Security, SessionPlan
from scistream.s2cs.backends.nginx import DEFAULT_STREAM_MODULE

# The proxy kinds a test runs against, for ``@pytest.fixture(params=PROXY_KINDS)``: each is
# skipped where its proxy is not installed (nginx also needs its stream module); the HAProxy
# case carries the ``haproxy`` marker.
PROXY_KINDS = [
    pytest.param(
        "haproxy",
        marks=[
            pytest.mark.haproxy,
            pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed"),
        ],
    ),
    pytest.param(
        "nginx",
        marks=pytest.mark.skipif(
            shutil.which("nginx") is None or not Path(DEFAULT_STREAM_MODULE).exists(),
            reason="nginx or its stream module (libnginx-mod-stream) is not installed",
        ),
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pid_gone(pid: int) -> bool:
    """True when the process no longer exists at all (exited *and* reaped: no zombie)."""
    return not os.path.exists(f"/proc/{pid}")


def group_gone(pgid: int) -> bool:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # field 5 of stat: pgrp
            return False
    return True


@dataclass
class Pair:
    """A PROD and a CONS backend of one kind, each with its own state dir, for one session."""

    kind: str
    security: Security
    runner: asyncio.Runner
    prod: Backend
    cons: Backend
    uid: str
    servers: list[DuplexServer]
    client_endpoints: list[str]
    prod_endpoints: list[str] = field(default_factory=list)

    def run(self, coro: object) -> object:
        return self.runner.run(coro)  # type: ignore[arg-type]


def make_backend(kind: str, state_dir: Path, extra: dict[str, str] | None = None) -> Backend:
    return create_backend(
        kind, BackendOptions(state_dir=str(state_dir), listener_ip="127.0.0.1", extra=extra or {})
    )


def plans(
    uid: str, security: Security, targets: list[str], *, key: bytes, identity: str
) -> tuple[SessionPlan, SessionPlan, list[str], list[str]]:
    prod_ports = [free_port() for _ in targets]
    cons_ports = [free_port() for _ in targets]
    prod_eps = [f"127.0.0.1:{p}" for p in prod_ports]
    cons_eps = [f"127.0.0.1:{p}" for p in cons_ports]
    if security == "plain":
        identity, key = "", b""
    prod_routes = tuple(RoutePlan(f"{uid}/{i}", prod_eps[i], t) for i, t in enumerate(targets))
    prod = SessionPlan(uid, "PROD", prod_routes, security, identity, key)
    cons = SessionPlan(
        uid,
        "CONS",
        tuple(RoutePlan(f"{uid}/{i}", cons_eps[i], prod_eps[i]) for i in range(len(targets))),
        security,
        identity,
        key,
    )
    return prod, cons, prod_eps, cons_eps


@contextlib.contextmanager
def running_pair(
    kind: str,
    security: Security,
    tmp_path: Path,
    *,
    routes: int = 2,
    server_bytes: int = MiB,
    prod_extra: dict[str, str] | None = None,
    cons_extra: dict[str, str] | None = None,
    uid: str = "",
    key: bytes = b"",
    identity: str = "",
) -> Iterator[Pair]:
    uid = uid or "sess-" + os.urandom(4).hex()
    if security == "compat":
        key = key or uid.replace("-", "").encode().ljust(32, b"0")
        identity = identity or "client1"
    else:
        key = key or os.urandom(32).hex().encode()
        identity = identity or uid
    servers = [DuplexServer(send_bytes=server_bytes, seed=1000 + i) for i in range(routes)]
    runner = asyncio.Runner()
    prod = make_backend(kind, tmp_path / "prod", prod_extra)
    cons = make_backend(kind, tmp_path / "cons", cons_extra)
    prod_plan, cons_plan, prod_eps, cons_eps = plans(
        uid, security, [s.address for s in servers], key=key, identity=identity
    )
    try:
        runner.run(prod.start())
        runner.run(cons.start())
        runner.run(prod.apply(prod_plan))
        runner.run(cons.apply(cons_plan))
        yield Pair(kind, security, runner, prod, cons, uid, servers, cons_eps, prod_eps)
    finally:
        for b in (cons, prod):
            with contextlib.suppress(Exception):
                runner.run(b.close())
        runner.close()
        for s in servers:
            s.close()


def check_duplex(pair: Pair, *, big: int) -> None:
    """Route i reaches server i; route 0 carries ``big`` bytes each way, the others 1 MiB; SHA-256 exact.

    Both ends count the bytes instead of waiting for a half-close: HAProxy 2.6 and
    stunnel 5.68 were seen here to drop the tail of one direction when the other
    half-closes in the middle of a saturating two-way transfer (a single HAProxy hop
    with a default config does it too). Half-close is the native engine's promise,
    tested in tests/dataplane; this checks that the proxies carry the bytes exactly."""
    for i, endpoint in enumerate(pair.client_endpoints):
        _check_route(i, endpoint, pair.servers[i], big if i == 0 else MiB)


def _check_route(i: int, endpoint: str, server: DuplexServer, size: int) -> None:
    server.send_bytes = size
    server.expect_bytes = size
    _, got = duplex_transfer(endpoint, send_bytes=size, seed=7 + i, expect=size)
    assert got == (size, pattern_digest(size, server.seed)), f"route {i}: bytes from the producer differ"
    assert wait_for(lambda: len(server.received) >= 1, 10), f"route {i}: the producer saw no connection"
    assert server.received[-1] == (size, pattern_digest(size, 7 + i)), f"route {i}: bytes to producer differ"
    assert not server.errors


def check_removed(pair: Pair) -> None:
    """remove() leaves no child (exited and reaped, its group too) and no session files."""
    procs = []
    for b in (pair.prod, pair.cons):
        pid = b.child_pid(pair.uid)  # type: ignore[attr-defined]
        assert pid is not None and not pid_gone(pid)
        procs.append(pid)
    for b in (pair.cons, pair.prod):
        pair.run(b.remove(pair.uid))
        assert pair.run(b.running_sessions()) == set()
    for pid in procs:
        assert pid_gone(pid), f"proxy pid {pid} still exists (running or zombie) after remove"
        assert wait_for(functools.partial(group_gone, pid), 5), f"processes of group {pid} survived remove"
    for b in (pair.prod, pair.cons):
        session_dir = Path(b.options.state_dir) / "sessions" / pair.uid
        assert not session_dir.exists(), f"{session_dir} left behind"


@dataclass(frozen=True)
class CertSet:
    ca: Path
    cert: Path
    key: Path
    server_name: str = "gateway.test"

    def extra(self) -> dict[str, str]:
        extra = {"tls_ca": str(self.ca), "tls_server_name": self.server_name}
        extra |= {"tls_cert": str(self.cert), "tls_key": str(self.key)}
        return extra


def make_certs(directory: Path, server_name: str = "gateway.test") -> CertSet:
    """A throwaway CA and one leaf (serverAuth + clientAuth, SAN DNS + 127.0.0.1) signed by it."""
    made = make_ca_and_leaf(
        directory, ["127.0.0.1"], [server_name], common_name=server_name, days=1, client_auth=True
    )
    return CertSet(made.ca_cert, made.cert, made.key, server_name)


def check_kill_detected(pair: Pair) -> None:
    """SIGKILL of the PROD proxy: reaped, its whole group gone, reported, and remove() still cleans up."""
    import signal

    failures: list[tuple[str, str]] = []
    pair.prod.on_session_failed = lambda uid, msg: failures.append((uid, msg))  # type: ignore[attr-defined]
    pid = pair.prod.child_pid(pair.uid)  # type: ignore[attr-defined]
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: pid_gone(pid), 5), "the killed proxy was not reaped"
    assert wait_for(lambda: group_gone(pid), 5), "processes of the killed proxy's group survived"
    assert wait_for(lambda: not pair.run(pair.prod.running_sessions()), 5)
    error = pair.prod.session_error(pair.uid)  # type: ignore[attr-defined]
    assert error and "exited unexpectedly" in error
    assert failures and failures[0][0] == pair.uid
    usage = pair.run(pair.prod.usage(pair.uid))
    assert usage.errors.get("proxy_exited") == 1  # type: ignore[attr-defined]
    pair.run(pair.prod.remove(pair.uid))
    assert not (Path(pair.prod.options.state_dir) / "sessions" / pair.uid).exists()


def check_port_in_use(
    kind: str,
    tmp_path: Path,
    security: Security = "plain",
    extra: dict[str, str] | None = None,
    key: bytes = b"",
) -> str:
    """A listener port held by someone else: BackendError naming the cause, nothing left behind."""
    from scistream.s2cs.backends.base import BackendError

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    runner = asyncio.Runner()
    backend = make_backend(kind, tmp_path, extra)
    try:
        plan = SessionPlan(
            "busy",
            "PROD",
            (RoutePlan("busy/0", f"127.0.0.1:{port}", "127.0.0.1:9"),),
            security,
            "busy" if key else "",
            key,
        )
        try:
            runner.run(backend.apply(plan))
        except BackendError as exc:
            message = str(exc)
        else:
            raise AssertionError("apply() succeeded on a port in use")
        assert f"{kind} for session busy failed to start" in message
        assert "already in use" in message.lower(), message
        assert runner.run(backend.running_sessions()) == set()
        assert not (tmp_path / "sessions" / "busy").exists()
        return message
    finally:
        runner.run(backend.close())
        runner.close()
        blocker.close()


def check_refused(
    kind: str,
    tmp_path: Path,
    security: Security,
    role: str,
    expected: str,
    extra: dict[str, str] | None = None,
) -> None:
    """apply() of a plan the backend cannot carry: BackendError saying ``expected``; no child, no files."""
    from scistream.s2cs.backends.base import BackendError

    runner = asyncio.Runner()
    backend = make_backend(kind, tmp_path, extra)
    try:
        plan = SessionPlan(
            "nope",
            role,
            (RoutePlan("nope/0", f"127.0.0.1:{free_port()}", "127.0.0.1:9"),),
            security,
            "nope",
            os.urandom(32).hex().encode(),
        )
        try:
            runner.run(backend.apply(plan))
        except BackendError as exc:
            assert expected in str(exc), str(exc)
        else:
            raise AssertionError(f"{kind} accepted a {security} plan it cannot carry")
        assert runner.run(backend.running_sessions()) == set()
        assert not (tmp_path / "sessions" / "nope").exists()
    finally:
        runner.run(backend.close())
        runner.close()


def check_wan_leg_is_tls13_only(pair: Pair) -> None:
    """Plain TCP and TLS 1.2 clients on the PROD listener never reach the producer."""
    import subprocess

    listener = pair.prod_endpoints[0]
    before = pair.servers[0].accepted
    host, port = listener.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s, contextlib.suppress(OSError):
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        s.settimeout(5)
        s.recv(100)
    subprocess.run(
        ["openssl", "s_client", "-tls1_2", "-connect", listener],
        input=b"x",
        capture_output=True,
        timeout=15,
        check=False,
    )
    time.sleep(0.2)
    assert pair.servers[0].accepted == before, "a non-TLS-1.3 client reached the producer"


def check_untrusted_server_is_refused(kind: str, tmp_path: Path) -> None:
    """A CONS whose CA did not sign the PROD certificate sends nothing to the producer."""
    certs = make_certs(tmp_path / "pki")
    other = make_certs(tmp_path / "other-pki")
    cons_extra = certs.extra() | {"tls_ca": str(other.ca)}
    with running_pair(
        kind, "tls", tmp_path, routes=1, prod_extra=certs.extra(), cons_extra=cons_extra
    ) as pair:
        try:
            _, (n, _) = duplex_transfer(
                pair.client_endpoints[0], send_bytes=4096, seed=1, timeout=10, check_send=False
            )
        except ConnectionError:
            n = 0
        assert n == 0, "the consumer got data through a PROD gateway its CA did not sign"
        server = pair.servers[0]
        # nginx checks the peer only after its handshake completes, so the PROD side may
        # open (and at once lose) a connection to the producer; no byte may arrive there.
        assert wait_for(lambda: len(server.received) == server.accepted, 5)
        assert all(n == 0 for n, _ in server.received), "the consumer's bytes reached the producer"
