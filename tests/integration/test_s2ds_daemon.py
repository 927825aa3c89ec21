"""s2ds serve: the control protocol over real sockets, real bytes through routes, shutdown behaviour."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import zmq
from s2ds_support import (
    S2DS,
    Daemon,
    echo_roundtrip,
    echo_server,
    need_native,
    refused,
    stop,
)
from streams import MiB, connect, wait_for

from scistream._proto import dataplane_pb2 as pb
from scistream.dataplane import AddressInUse, Route, RouteExists, RouteNotFound
from scistream.s2ds.client import S2dsClient, S2dsUnavailable
from scistream.s2ds.keys import keygen, load_keypair, load_public

T = TypeVar("T")


@pytest.fixture
def state_dir() -> Iterator[Path]:
    # Short path: an ipc:// socket path must fit in sun_path (108 bytes).
    d = Path(tempfile.mkdtemp(prefix="s2ds-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon(state_dir: Path, request: pytest.FixtureRequest) -> Iterator[Daemon]:
    """An s2ds with the default engine, or the one named by indirect parametrization."""
    engine: str | None = getattr(request, "param", None)
    if engine == "native":
        need_native("the native engine behind s2ds")
    d = Daemon(state_dir, *(["--engine", engine] if engine else []))
    try:
        d.wait_ready()
        yield d
    finally:
        d.stop()


def call(address: str, fn: Callable[[S2dsClient], Awaitable[T]], **kwargs: Any) -> T:
    async def go() -> T:
        async with S2dsClient(address, **kwargs) as c:
            return await fn(c)

    return asyncio.run(go())


def raw_command(address: str, cmd: bytes) -> pb.Reply:
    """Send bytes the typed client would never send (malformed specs)."""
    ctx = zmq.Context.instance()
    with ctx.socket(zmq.REQ) as s:
        s.linger = 0
        s.connect(address)
        s.send(cmd)
        assert s.poll(5000), "s2ds did not answer"
        return pb.Reply.FromString(s.recv())


BOTH_ENGINES = pytest.mark.parametrize("daemon", ["pure", "native"], indirect=True)


@BOTH_ENGINES
def test_routes_bytes_and_stats(daemon: Daemon) -> None:
    with echo_server() as echo:
        info = call(
            daemon.address,
            lambda c: c.add_route(
                Route("r1", listen="127.0.0.1:0", targets=(echo.address,), labels={"uid": "u1"})
            ),
        )
        assert info.bound.startswith("127.0.0.1:") and not info.bound.endswith(":0")
        routes = call(daemon.address, lambda c: c.routes())
        assert [(r.route.route_id, r.bound, dict(r.route.labels)) for r in routes] == [
            ("r1", info.bound, {"uid": "u1"})
        ]

        sent, got, n = echo_roundtrip(info.bound, 3 * MiB + 17)
        assert (got, n) == (sent, 3 * MiB + 17)

        stats = call(daemon.address, lambda c: c.stats("r1"))
        rs = stats.routes["r1"]
        assert stats.engine in ("pure", "native")
        assert wait_for(
            lambda: (
                call(daemon.address, lambda c: c.stats("r1")).routes["r1"].bytes_from_target == 3 * MiB + 17
            ),
            10,
        )
        assert rs.bytes_to_target == 3 * MiB + 17
        assert rs.connections_total == 1 and rs.labels == {"uid": "u1"}

        ping = call(daemon.address, lambda c: c.ping())
        assert ping["pid"] == daemon.proc.pid and ping["engine"] == stats.engine

        call(daemon.address, lambda c: c.remove_route("r1"))
        assert call(daemon.address, lambda c: c.routes()) == []
        assert refused(info.bound)


def test_error_codes(daemon: Daemon) -> None:
    with echo_server() as echo:
        route = Route("dup", listen="127.0.0.1:0", targets=(echo.address,))
        call(daemon.address, lambda c: c.add_route(route))
        with pytest.raises(RouteExists):
            call(daemon.address, lambda c: c.add_route(route))
        with pytest.raises(RouteNotFound):
            call(daemon.address, lambda c: c.remove_route("no-such-route"))
        with pytest.raises(RouteNotFound):
            call(daemon.address, lambda c: c.stats("no-such-route"))
        with pytest.raises(RouteNotFound):
            call(daemon.address, lambda c: c.retarget("no-such-route", [echo.address]))
        with socket.create_server(("127.0.0.1", 0)) as taken:
            busy = f"127.0.0.1:{taken.getsockname()[1]}"
            with pytest.raises(AddressInUse):
                call(
                    daemon.address, lambda c: c.add_route(Route("busy", listen=busy, targets=(echo.address,)))
                )

    # Malformed specs the typed client refuses to build: the daemon must refuse them too.
    for spec in (
        pb.RouteSpec(route_id="bad", listen="nonsense", targets=["127.0.0.1:1"]),
        pb.RouteSpec(route_id="bad", listen="127.0.0.1:0", targets=["127.0.0.1:99999"]),
        pb.RouteSpec(route_id="bad", listen="127.0.0.1:0", targets=[]),
        pb.RouteSpec(
            route_id="bad",
            listen="127.0.0.1:0",
            targets=["127.0.0.1:1"],
            tls=pb.TlsConfig(role="sideways", mode="psk"),
        ),
    ):
        reply = raw_command(daemon.address, pb.Command(add_route=pb.AddRoute(route=spec)).SerializeToString())
        assert (reply.ok, reply.error_code) == (False, "invalid"), reply
        assert reply.error and "\n" not in reply.error and "Traceback" not in reply.error
    reply = raw_command(daemon.address, b"\xff\x00garbage")
    assert (reply.ok, reply.error_code) == (False, "invalid")
    # Only the bad commands failed: the good route is still there.
    assert [r.route.route_id for r in call(daemon.address, lambda c: c.routes())] == ["dup"]


def test_second_daemon_refused_and_stale_socket_reclaimed(state_dir: Path) -> None:
    first = Daemon(state_dir)
    try:
        pid = first.wait_ready()["pid"]
        second = subprocess.run(
            [*S2DS, "serve", "--control", first.address],
            check=False,
            capture_output=True,
            text=True,
            timeout=20,
            env=dict(os.environ, SCISTREAM_STATE_DIR=str(state_dir)),
        )
        assert second.returncode == 1
        assert "already serving" in second.stderr and str(pid) in second.stderr
        assert "Traceback" not in second.stderr
        assert call(first.address, lambda c: c.ping())["pid"] == pid  # the first one is untouched
        first.proc.kill()  # a crash leaves the socket file behind
        first.proc.wait()
        assert (state_dir / "s2ds.sock").exists()
    finally:
        first.stop()
    third = Daemon(state_dir)
    try:
        assert third.wait_ready()["pid"] == third.proc.pid
        assert "stale control socket" in third.log()
    finally:
        third.stop()
    assert third.proc.returncode == 0


@BOTH_ENGINES
def test_sigterm_drains_under_load(daemon: Daemon) -> None:
    with echo_server() as echo:
        info = call(
            daemon.address,
            lambda c: c.add_route(Route("load", listen="127.0.0.1:0", targets=(echo.address,))),
        )
        result: dict[str, Any] = {}
        first_echo = threading.Event()

        def stream() -> None:
            # ~2 MiB over ~1.5 s: still in flight when the signal lands.
            result["r"] = echo_roundtrip(
                info.bound, 2 * MiB, chunk=32 << 10, pace=0.025, on_first_echo=first_echo.set
            )

        t = threading.Thread(target=stream)
        t.start()
        assert first_echo.wait(10)
        active = call(daemon.address, lambda c: c.stats("load")).routes["load"].connections_active
        assert active == 1  # the control loop answers while bytes flow
        daemon.proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: refused(info.bound), 3), "new connections still accepted while draining"
        t.join(30)
        assert not t.is_alive()
        sent, got, n = result["r"]
        assert (got, n) == (sent, 2 * MiB)
        assert daemon.proc.wait(10) == 0
        assert "draining" in daemon.log()


@BOTH_ENGINES
def test_second_signal_exits_promptly(daemon: Daemon) -> None:
    with echo_server() as echo:
        info = call(
            daemon.address,
            lambda c: c.add_route(Route("idle", listen="127.0.0.1:0", targets=(echo.address,))),
        )
        held = socket.create_connection(tuple(info.bound.rsplit(":", 1)), timeout=5)  # type: ignore[arg-type]
        try:
            held.sendall(b"x")
            assert held.recv(1) == b"x"  # the connection is established end to end and stays open
            daemon.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert daemon.proc.poll() is None  # still draining: the idle stream is not cut
            t0 = time.monotonic()
            daemon.proc.send_signal(signal.SIGINT)
            code = daemon.proc.wait(5)
            assert time.monotonic() - t0 < 2.0
            assert code == 128 + signal.SIGINT
        finally:
            held.close()


def test_curve_tcp_control(state_dir: Path) -> None:
    keys = state_dir / "keys"
    allowed = state_dir / "allowed"
    intruder = state_dir / "intruder"
    keygen(keys)
    keygen(intruder, ("client",))
    allowed.mkdir()
    shutil.copy(keys / "client.key", allowed / "client.key")
    for f in keys.iterdir():
        assert f.stat().st_mode & 0o777 == 0o600

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"

    plain = subprocess.run(
        [*S2DS, "serve", "--control", address],
        check=False,
        capture_output=True,
        text=True,
        timeout=20,
        env=dict(os.environ, SCISTREAM_STATE_DIR=str(state_dir)),
    )
    assert plain.returncode == 2 and "CURVE" in plain.stderr and len(plain.stderr.strip().splitlines()) == 1

    d = Daemon(
        state_dir,
        "--curve-secret-file",
        str(keys / "server.key_secret"),
        "--curve-client-keys",
        str(allowed),
        address=address,
    )
    try:
        server_public = load_public(keys / "server.key")
        good = {"curve_server_public": server_public, "curve_keys": load_keypair(keys / "client.key_secret")}
        assert d.wait_ready(**good)["pid"] == d.proc.pid
        assert call(address, lambda c: c.routes(), **good) == []
        bad = {
            "curve_server_public": server_public,
            "curve_keys": load_keypair(intruder / "client.key_secret"),
        }
        with pytest.raises(S2dsUnavailable):
            call(address, lambda c: c.routes(), timeout=1.0, **bad)
        out = subprocess.run(
            [
                *S2DS,
                "ctl",
                "--control",
                address,
                "--curve-server-key",
                str(keys / "server.key"),
                "--curve-client-key",
                str(keys / "client.key_secret"),
                "ping",
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["pid"] == d.proc.pid
    finally:
        d.stop()


def test_ctl_commands(daemon: Daemon) -> None:
    env = dict(os.environ, SCISTREAM_STATE_DIR=str(daemon.state_dir))  # ctl finds the default socket

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*S2DS, "ctl", *args], check=False, capture_output=True, text=True, timeout=20, env=env
        )

    with echo_server() as echo:
        info = call(
            daemon.address,
            lambda c: c.add_route(
                Route("c1", listen="127.0.0.1:0", targets=(echo.address,), labels={"uid": "x"})
            ),
        )
        listed = json.loads(ctl("list").stdout)
        assert listed == [
            {
                "route_id": "c1",
                "listen": "127.0.0.1:0",
                "bound": info.bound,
                "targets": [echo.address],
                "tls": None,
                "rate_limit": 0,
                "max_connections": 0,
                "labels": {"uid": "x"},
            }
        ]
        stats = json.loads(ctl("stats", "c1").stdout)
        assert stats["routes"]["c1"]["bound"] == info.bound
        assert json.loads(ctl("ping").stdout)["pid"] == daemon.proc.pid
        missing = ctl("stats", "nope")
        assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "nope" in missing.stderr
        assert json.loads(ctl("remove", "c1").stdout) == {"removed": "c1"}
        assert json.loads(ctl("list").stdout) == []
    stop(daemon.proc)
    gone = ctl("--timeout", "0.5", "ping")
    assert gone.returncode == 1 and "did not answer" in gone.stderr


def test_answers_while_a_drain_command_waits(daemon: Daemon) -> None:
    """The control socket serves every command as its own task: a Drain that waits for an
    open stream does not stop ping or stats from being answered."""
    with echo_server() as echo:
        info = call(
            daemon.address,
            lambda c: c.add_route(Route("d", listen="127.0.0.1:0", targets=(echo.address,))),
        )
        held = connect(info.bound)
        try:
            held.sendall(b"x")
            assert held.recv(1) == b"x"

            async def go() -> tuple[bool, int, float]:
                async with S2dsClient(daemon.address) as a, S2dsClient(daemon.address) as b:
                    drain = asyncio.create_task(a.drain(timeout=1.5))
                    await asyncio.sleep(0.2)
                    t0 = time.monotonic()
                    active = (await b.stats("d")).routes["d"].connections_active
                    took = time.monotonic() - t0
                    return await drain, active, took

            complete, active, took = asyncio.run(go())
            assert (complete, active) == (False, 1) and took < 1.0
            assert refused(info.bound)  # drained routes accept nothing new
        finally:
            held.close()
