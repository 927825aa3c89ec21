"""Route life cycle while streaming: retarget, remove with and without drain, engine drain,
command errors and per-connection stats."""

from __future__ import annotations

import hashlib
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from dputil import ServerFactory, check_duplex, duplex_server, echo_handler, outcome, run_duplex_clients
from streams import MiB, Served, connect, pattern_block, pattern_digest, recv_stream, send_stream, wait_for

from scistream.dataplane import (
    ERROR_KINDS,
    AddressInUse,
    Engine,
    EngineBase,
    EngineError,
    InvalidRoute,
    ResourceCounts,
    Route,
    RouteExists,
    RouteNotFound,
)
from scistream.endpoints import parse_endpoint

HALF = 4 * MiB


def gated_server(stream_server: ServerFactory, gate: threading.Event) -> tuple[str, list[Served]]:
    """Sends HALF bytes, waits for ``gate``, sends HALF more, then FIN: a stream we can hold
    in mid-flight while the test changes the route."""

    def handler(sock: socket.socket, served: Served) -> None:
        send_stream(sock, HALF, 21, shutdown=False)
        served.results["first_half_sent"] = True
        gate.wait(30)
        # The second half continues the same pattern, so the whole is one stream of 2*HALF.
        block = pattern_block(21)
        for i in range(HALF // MiB, 2 * HALF // MiB):
            struct.pack_into("<Q", block, 0, i)
            sock.sendall(block)
        sock.shutdown(socket.SHUT_WR)
        served.results["rest"] = recv_stream(sock)

    server = stream_server(handler)
    return server.address, server.served


def test_retarget_while_streaming(engine: EngineBase, stream_server: ServerFactory) -> None:
    gate = threading.Event()
    old, _ = gated_server(stream_server, gate)
    new = duplex_server(stream_server, 1 * MiB)
    info = engine.add_route(Route("rt", "127.0.0.1:0", (old,)))
    with connect(info.bound, timeout=30) as c, ThreadPoolExecutor(1) as pool:
        c.shutdown(socket.SHUT_WR)
        got = pool.submit(recv_stream, c)
        assert wait_for(lambda: engine.stats("rt").routes["rt"].bytes_from_target >= HALF)
        engine.retarget("rt", [new.address])
        assert engine.stats("rt").routes["rt"].targets == (new.address,)
        assert [r.route.targets for r in engine.routes()] == [(new.address,)]
        check_duplex(new, run_duplex_clients(info.bound, 1, 1 * MiB), 1 * MiB)  # new connection: new target
        gate.set()
        assert got.result(timeout=30) == (2 * HALF, pattern_digest(2 * HALF, 21))  # old one kept streaming


def read_some(sock: socket.socket, digest: Any, limit: int | None) -> int:
    """Read up to ``limit`` bytes (None: to EOF) into ``digest``; return how many."""
    got = 0
    while limit is None or got < limit:
        data = sock.recv(min(1 << 20, limit - got) if limit is not None else 1 << 20)
        if not data:
            break
        digest.update(data)
        got += len(data)
    return got


@pytest.mark.parametrize("drain", [True, False])
def test_remove_route_while_streaming(engine: EngineBase, stream_server: ServerFactory, drain: bool) -> None:
    gate = threading.Event()
    target, _ = gated_server(stream_server, gate)
    info = engine.add_route(Route("rm", "127.0.0.1:0", (target,)))
    host, port = parse_endpoint(info.bound)
    with connect(info.bound, timeout=30) as c:
        c.shutdown(socket.SHUT_WR)
        digest = hashlib.sha256()
        assert read_some(c, digest, HALF) == HALF  # mid-stream: the target waits for the gate
        engine.remove_route("rm", drain=drain)
        assert engine.routes() == []
        with pytest.raises(RouteNotFound):
            engine.stats("rm")
        with pytest.raises(ConnectionRefusedError):  # the listener is closed at once
            socket.create_connection((host, port), timeout=5).close()
        gate.set()
        if drain:
            assert HALF + read_some(c, digest, None) == 2 * HALF
            assert digest.hexdigest() == pattern_digest(2 * HALF, 21)
        else:
            # Closed now: the stream ends (EOF or reset) without the second half.
            c.settimeout(10)
            ends = "data"
            while ends == "data":
                ends = outcome(c, timeout=10)
            assert ends in ("eof", "reset")
    assert wait_for(lambda: engine.resource_counts().connections == 0, 10), engine.resource_counts()


def test_drain(engine: EngineBase, stream_server: ServerFactory) -> None:
    gate = threading.Event()
    target, _ = gated_server(stream_server, gate)
    info = engine.add_route(Route("dr", "127.0.0.1:0", (target,)))
    host, port = parse_endpoint(info.bound)
    with connect(info.bound, timeout=30) as c, ThreadPoolExecutor(1) as pool:
        c.shutdown(socket.SHUT_WR)
        got = pool.submit(recv_stream, c)
        assert wait_for(lambda: engine.stats("dr").routes["dr"].bytes_from_target >= HALF)
        assert engine.drain(timeout=0.3) is False  # one stream still running
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, port), timeout=5).close()
        gate.set()
        assert engine.drain(timeout=20) is True
        assert got.result(timeout=30) == (2 * HALF, pattern_digest(2 * HALF, 21))


def test_close_under_a_drain_and_stats(native_impl: str, stream_server: ServerFactory) -> None:
    """close() while other threads are inside the engine (a drain waiting for an open stream,
    stats with connection lists): the drain gives up with False, close waits for the calls in
    progress, and every later call says the engine is closed (never a freed engine)."""
    server = stream_server(echo_handler)
    engine = Engine(impl=native_impl)  # not the fixture: its teardown reads stats, which now refuse
    try:
        info = engine.add_route(Route("c", "127.0.0.1:0", (server.address,)))
        stop = threading.Event()

        def storm() -> int:
            n = 0
            while not stop.is_set():
                try:
                    engine.stats(connections=True)
                except EngineError:
                    break
                n += 1
            return n

        with connect(info.bound, timeout=10) as c, ThreadPoolExecutor(3) as pool:
            c.sendall(b"x")
            assert c.recv(1) == b"x"
            drain = pool.submit(engine.drain)  # no timeout: only the close ends it
            storms = [pool.submit(storm) for _ in range(2)]
            time.sleep(0.2)
            engine.close()
            assert drain.result(timeout=5) is False
            stop.set()
            assert all(f.result(timeout=5) > 0 for f in storms)
            assert outcome(c, timeout=10) in ("eof", "reset")
        for call in (lambda: engine.drain(0), engine.stats,
                     lambda: engine.add_route(Route("d", "127.0.0.1:0", (server.address,)))):
            with pytest.raises(EngineError, match="closed"):
                call()
        assert engine.resource_counts() == ResourceCounts(fds=0, pipes=0, ssl_objects=0, connections=0)
    finally:
        engine.close()


def test_command_errors(engine: EngineBase, stream_server: ServerFactory) -> None:
    server = stream_server(echo_handler)
    info = engine.add_route(Route("a", "127.0.0.1:0", (server.address,)))
    with pytest.raises(RouteExists):
        engine.add_route(Route("a", "127.0.0.1:0", (server.address,)))
    with pytest.raises(AddressInUse):
        engine.add_route(Route("b", info.bound, (server.address,)))
    for call in (lambda: engine.remove_route("nope"), lambda: engine.retarget("nope", [server.address]),
                 lambda: engine.stats("nope")):
        with pytest.raises(RouteNotFound):
            call()
    with pytest.raises((ValueError, InvalidRoute)):
        engine.retarget("a", ["not an endpoint"])
    with pytest.raises(InvalidRoute):
        Route("c", "127.0.0.1:0", ())
    assert [r.route.route_id for r in engine.routes()] == ["a"]
    with connect(info.bound) as c:  # the failed commands left the route working
        c.sendall(b"still here")
        assert c.recv(32) == b"still here"


def test_connection_stats(engine: EngineBase, stream_server: ServerFactory) -> None:
    server = stream_server(echo_handler)
    info = engine.add_route(Route("s", "127.0.0.1:0", (server.address,), labels={"uid": "u1"}))
    with connect(info.bound) as c:
        c.sendall(b"x" * 1000)
        got = b""
        while len(got) < 1000:
            got += c.recv(1000)
        st = wait_for(lambda: (r := engine.stats("s", connections=True).routes["s"]).connections and r)
        assert st.connections_active == 1
        assert st.labels == {"uid": "u1"}
        (conn,) = st.connections
        assert conn.target == server.address
        assert conn.peer == f"127.0.0.1:{c.getsockname()[1]}"
        assert conn.bytes_to_target == conn.bytes_from_target == 1000
        assert set(st.errors) <= set(ERROR_KINDS)
    assert engine.stats().engine in ("pure", "native")
