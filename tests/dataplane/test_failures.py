"""How connections end: half-close, reset, a dying producer, refused and silent targets,
full routes and idle timeouts (RELIABILITY 2, 3, 4)."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from dputil import (
    LEG_KINDS,
    ServerFactory,
    build_path,
    check_duplex,
    duplex_server,
    echo_handler,
    error_count,
    outcome,
    run_duplex_clients,
)
from streams import MiB, Served, connect, pattern_digest, recv_prefix, recv_stream, send_stream, wait_for

from scistream.dataplane import EngineBase, Route, Tuning

HERE = Path(__file__).parent
#: "Promptly": an EOF or reset must cross the engine well within this (seconds).
PROMPT = 2.0


def rst_close(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("kind", LEG_KINDS)
@pytest.mark.parametrize("first", ["client", "server"])
def test_half_close(engine: EngineBase, engine_impl: str, stream_server: ServerFactory, certs: Any,
                    kind: str, first: str) -> None:
    """The first side to finish sends FIN; the other side's data keeps flowing after it."""
    before, after = 256 << 10, 4 * MiB

    def handler(sock: socket.socket, served: Served) -> None:
        sock.settimeout(30)
        if first == "client":
            served.results["got"] = recv_stream(sock)
            served.results["eof_at"] = time.monotonic()
            served.results["sent"] = send_stream(sock, after, 7)
        else:
            served.results["sent"] = send_stream(sock, before, 5)  # then FIN
            served.results["got"] = recv_stream(sock)

    server = stream_server(handler)
    bound = build_path(engine, engine_impl, kind, server.address, certs)
    with connect(bound, timeout=30) as c:
        if first == "client":
            sent = send_stream(c, before, 3)
            fin_at = time.monotonic()
            got = recv_stream(c)
            (s,) = server.wait_served(1)
            assert s.error is None
            assert s.results["got"] == (before, sent)
            assert s.results["eof_at"] - fin_at < PROMPT, "EOF did not cross the engine promptly"
            assert got == (after, s.results["sent"])
        else:
            got = recv_stream(c)  # to the server's FIN
            assert got == (before, pattern_digest(before, 5))
            sent = send_stream(c, after, 9)
            (s,) = server.wait_served(1)
            assert s.error is None
            assert s.results["got"] == (after, sent)
        assert c.recv(1) == b""  # and the connection then ends cleanly both ways


@pytest.mark.parametrize("kind", LEG_KINDS)
@pytest.mark.parametrize("who", ["client", "server"])
def test_reset_propagates_as_reset(engine: EngineBase, engine_impl: str, stream_server: ServerFactory,
                                   certs: Any, kind: str, who: str) -> None:
    exchanged = threading.Event()

    def handler(sock: socket.socket, served: Served) -> None:
        assert sock.recv(5) == b"hello"
        sock.sendall(b"world")
        if who == "server":
            exchanged.wait(10)
            rst_close(sock)
            served.results["outcome"] = "sent-rst"
        else:
            served.results["outcome"] = outcome(sock, timeout=10)

    server = stream_server(handler)
    bound = build_path(engine, engine_impl, kind, server.address, certs)
    c = connect(bound)
    c.sendall(b"hello")
    assert c.recv(5) == b"world"
    if who == "client":
        rst_close(c)
        (s,) = server.wait_served(1, timeout=15)
        assert s.results["outcome"] == "reset"
    else:
        exchanged.set()
        try:
            assert outcome(c, timeout=10) == "reset"
        finally:
            c.close()
        server.wait_served(1)
    assert wait_for(lambda: error_count(engine, "reset") >= 1), engine.stats()
    assert wait_for(lambda: all(r.connections_active == 0 for r in engine.stats().routes.values()))


def test_producer_dies_mid_stream(engine: EngineBase, stream_server: ServerFactory, spawn: Any) -> None:
    """The consumer of a killed producer gets an exact prefix; the route's other streams go on,
    and a new connection works."""
    producer = spawn([sys.executable, str(HERE / "producer.py"), "11"], stdout=subprocess.PIPE)
    port = int(producer.stdout.readline())
    per_conn = 32 * MiB
    good_a, good_b = duplex_server(stream_server, per_conn), duplex_server(stream_server, per_conn)
    # Round robin: connection 0 -> the dying producer, 1 -> good_a, 2 -> good_b.
    targets = (f"127.0.0.1:{port}", good_a.address, good_b.address)
    info = engine.add_route(Route("p", "127.0.0.1:0", targets))
    consumer = connect(info.bound, timeout=30)
    assert wait_for(lambda: engine.stats("p").routes["p"].bytes_from_target > 0), "the producer never sent"
    with ThreadPoolExecutor(2) as pool:
        prefix = pool.submit(recv_prefix, consumer)
        other = pool.submit(run_duplex_clients, info.bound, 1, per_conn)
        assert wait_for(lambda: engine.stats("p").routes["p"].connections_total == 2)
        time.sleep(0.2)
        producer.kill()
        producer.wait(10)
        got, digest, _ = prefix.result(timeout=30)
        consumer.close()
        check_duplex(good_a, other.result(timeout=120), per_conn)
    assert got > 0
    assert digest == pattern_digest(got, 11), "the consumer's bytes are not an exact prefix of the stream"
    check_duplex(good_b, run_duplex_clients(info.bound, 1, per_conn), per_conn)


def test_refused_target(engine: EngineBase, free_port: Callable[..., int]) -> None:
    info = engine.add_route(Route("r", "127.0.0.1:0", (f"127.0.0.1:{free_port()}",)))
    for _ in range(3):
        with connect(info.bound) as c:
            c.sendall(b"nobody will read this")
            assert outcome(c, timeout=10) in ("eof", "reset")
    st = wait_for(lambda: (s := engine.stats("r").routes["r"]).connections_active == 0 and s, 5)
    assert st, engine.stats()
    assert st.errors.get("connect_refused") == 3
    assert st.connections_total == 3
    assert st.bytes_to_target == 0


def test_silent_target_times_out(make_engine: Callable[..., EngineBase]) -> None:
    """A target whose accept queue is full drops SYNs: the connect times out and is counted."""
    engine = make_engine(Tuning(connect_timeout=1.0))
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(0)
    fillers = []
    try:
        for _ in range(3):  # fill the accept queue (nobody accepts)
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(silent.getsockname())
            fillers.append(f)
        time.sleep(0.1)
        port = silent.getsockname()[1]
        info = engine.add_route(Route("t", "127.0.0.1:0", (f"127.0.0.1:{port}",)))
        with connect(info.bound) as c:
            t0 = time.monotonic()
            assert outcome(c, timeout=10) in ("eof", "reset")
            assert time.monotonic() - t0 < 1.0 + PROMPT
        assert wait_for(lambda: error_count(engine, "connect_timeout") == 1), engine.stats()
    finally:
        for f in fillers:
            f.close()
        silent.close()


def test_max_connections(engine: EngineBase, stream_server: ServerFactory) -> None:
    server = stream_server(echo_handler)
    info = engine.add_route(Route("m", "127.0.0.1:0", (server.address,), max_connections=2))
    held = [connect(info.bound) for _ in range(2)]
    try:
        for i, c in enumerate(held):
            c.sendall(b"ping%d" % i)
            assert c.recv(16) == b"ping%d" % i
        with connect(info.bound) as extra:
            assert outcome(extra, timeout=10) in ("eof", "reset")
        assert error_count(engine, "max_connections") == 1
    finally:
        held.pop().close()
    assert wait_for(lambda: engine.stats("m").routes["m"].connections_active == 1)
    with connect(info.bound) as again:  # room again
        again.sendall(b"pong")
        assert again.recv(16) == b"pong"
    for c in held:
        c.close()


def test_idle_timeout_cuts_idle_streams(make_engine: Callable[..., EngineBase],
                                        stream_server: ServerFactory) -> None:
    engine = make_engine(Tuning(idle_timeout=0.5))
    server = stream_server(echo_handler)
    info = engine.add_route(Route("i", "127.0.0.1:0", (server.address,)))
    with connect(info.bound) as c:
        c.sendall(b"x")
        assert c.recv(1) == b"x"
        t0 = time.monotonic()
        assert outcome(c, timeout=10) in ("eof", "reset")
        assert 0.4 < time.monotonic() - t0 < 0.5 + PROMPT
    assert wait_for(lambda: error_count(engine, "idle_timeout") == 1), engine.stats()


def test_no_idle_timeout_by_default(engine: EngineBase, stream_server: ServerFactory) -> None:
    server = stream_server(echo_handler)
    info = engine.add_route(Route("i", "127.0.0.1:0", (server.address,)))
    with connect(info.bound) as c:
        c.sendall(b"x")
        assert c.recv(1) == b"x"
        assert outcome(c, timeout=1.5) == "timeout"  # still open after a quiet spell
        c.sendall(b"y")
        assert c.recv(1) == b"y"
