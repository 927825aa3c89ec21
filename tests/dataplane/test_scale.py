"""Many concurrent connections on one route: all served correctly, counters exact, and
everything returns to zero afterwards."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dputil import EchoLoop
from streams import connect, wait_for

from scistream.dataplane import EngineBase, Route
from scistream.endpoints import parse_endpoint

log = logging.getLogger(__name__)
CONNS = 1000
PAYLOAD = 48


@pytest.fixture
def enough_fds() -> Iterator[None]:
    """Client, echo server and (for the pure engine) both engine legs live in this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 5 * CONNS + 256
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def echo() -> Iterator[EchoLoop]:
    server = EchoLoop()
    yield server
    server.close()


def test_thousand_concurrent_connections(enough_fds: None, engine: EngineBase, echo: EchoLoop) -> None:
    info = engine.add_route(Route("many", "127.0.0.1:0", (echo.address,)))
    socks = []
    try:
        for _ in range(CONNS):
            socks.append(connect(info.bound, timeout=30))
        payloads = [(b"%08d" % i) * (PAYLOAD // 8) for i in range(CONNS)]
        for s, p in zip(socks, payloads, strict=True):
            s.sendall(p)
        for s, p in zip(socks, payloads, strict=True):
            got = b""
            while len(got) < PAYLOAD:
                chunk = s.recv(PAYLOAD - len(got))
                assert chunk, "connection closed early"
                got += chunk
            assert got == p
        st = engine.stats("many").routes["many"]
        assert st.connections_active == CONNS
        assert st.connections_total == CONNS
        assert st.bytes_to_target == st.bytes_from_target == CONNS * PAYLOAD
        assert st.errors.get("accept", 0) == 0
        assert echo.accepted == CONNS
        counts = engine.resource_counts()
        assert counts.connections == CONNS
    finally:
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()
    assert wait_for(lambda: engine.stats("many").routes["many"].connections_active == 0, 20), engine.stats()
    assert wait_for(lambda: engine.resource_counts().connections == 0, 10)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


NOFILE = 64


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
def test_fd_exhaustion_no_crash_no_spin(engine_impl: str, echo: EchoLoop, spawn: Any) -> None:
    """RELIABILITY 18: an engine limited to 64 fds meets 60 connections at once: it counts
    the failures, does not crash or busy-loop, and serves again once fds are free."""
    spec = {"impl": engine_impl, "tuning": {"workers": 1},
            "routes": [{"route_id": "fd", "listen": "127.0.0.1:0", "targets": [echo.address]}]}
    host = spawn(["prlimit", f"--nofile={NOFILE}:{NOFILE}", sys.executable,
                  str(Path(__file__).parent / "engine_host.py"), json.dumps(spec)],
                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    bound = json.loads(host.stdout.readline())["bound"]["fd"]

    def stats() -> dict[str, Any]:
        host.stdin.write("stats\n")
        host.stdin.flush()
        out: dict[str, Any] = json.loads(host.stdout.readline())["fd"]
        return out

    socks = []
    try:
        for _ in range(60):
            s = socket.create_connection(parse_endpoint(bound), timeout=10)
            s.sendall(b"ping")
            socks.append(s)
        assert wait_for(lambda: sum(stats()["errors"].values()) > 0, 10), stats()
        log.info("%s engine out of fds: %s", engine_impl, stats()["errors"])
        cpu0, t0 = _cpu_seconds(host.pid), time.monotonic()
        time.sleep(1.0)
        busy = (_cpu_seconds(host.pid) - cpu0) / (time.monotonic() - t0)
        assert busy < 0.5, f"the engine used {busy:.0%} of a CPU while out of fds"
        assert host.poll() is None, "the engine died when it ran out of fds"
    finally:
        for s in socks:
            s.close()
    assert wait_for(lambda: stats()["connections_active"] == 0, 20), repr(stats())[:3000]
    with socket.create_connection(parse_endpoint(bound), timeout=10) as s:  # recovered
        s.sendall(b"again")
        s.settimeout(10)
        assert s.recv(16) == b"again"
    host.stdin.write("quit\n")
    host.stdin.flush()
    assert host.wait(30) == 0
