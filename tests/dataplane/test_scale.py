"""Many concurrent connections on one route: all served correctly, counters exact, and
everything returns to zero afterwards."""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Iterator

import pytest
from dputil import EchoLoop, connect, wait_for

from scistream.dataplane import EngineBase, Route

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
        assert counts.connections in (CONNS, -1)
    finally:
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()
    assert wait_for(lambda: engine.stats("many").routes["many"].connections_active == 0, 20), engine.stats()
    assert wait_for(lambda: engine.resource_counts().connections in (0, -1), 10)
