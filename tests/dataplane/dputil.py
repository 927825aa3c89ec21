"""Helpers of the data-plane tests: sizes, engine routes (plain and TLS legs), many duplex
streams through one route, a cheap echo server.

Streams, servers and polling are the shared ones of tests/streams.py.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import ssl
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from streams import Served, StreamServer, duplex_transfer, serve_duplex

from scistream.dataplane import EngineBase, Route, Tls, TlsMode, TlsRole

BIG = os.environ.get("SCISTREAM_TEST_BIG", "1") != "0"


def size(full: int, small: int) -> int:
    """``full`` bytes in the default (CI) run, ``small`` with SCISTREAM_TEST_BIG=0."""
    return full if BIG else small


def echo_handler(sock: socket.socket, served: Served) -> None:
    """Echo until EOF, then close (counting what passed)."""
    n = 0
    while True:
        data = sock.recv(65536)
        if not data:
            break
        sock.sendall(data)
        n += len(data)
    served.results["echoed"] = n


def outcome(sock: socket.socket, timeout: float = 10.0) -> str:
    """How a connection ends for a reader: "eof", "reset", "timeout" or "data"."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(65536)
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "timeout"
    return "eof" if not data else "data"


def psk_tls(role: TlsRole, key: bytes = b"k" * 32, mode: TlsMode = TlsMode.PSK,
            identity: str = "scistream") -> Tls:
    return Tls(role=role, mode=mode, psk_identity=identity, psk_key=key)


def cert_tls(role: TlsRole, certs: Any) -> Tls:
    if role is TlsRole.SERVER:
        return Tls(role=role, mode=TlsMode.CERT, cert_file=str(certs.cert), key_file=str(certs.key))
    return Tls(role=role, mode=TlsMode.CERT, ca_file=str(certs.ca))


def tls_pair(engine: EngineBase, target: str, client_tls: Tls, server_tls: Tls, rate: int = 0,
             prefix: str = "tls") -> str:
    """Route ``<prefix>-in`` terminates TLS in front of ``target``; ``<prefix>-out`` is plain in
    and TLS out to it. Returns the plain address a client connects to (like the two gateways)."""
    inner = engine.add_route(Route(f"{prefix}-in", "127.0.0.1:0", (target,), tls=server_tls))
    outer = engine.add_route(Route(f"{prefix}-out", "127.0.0.1:0", (inner.bound,), tls=client_tls,
                                   rate_limit=rate))
    return outer.bound


#: How a test's bytes cross the engine: one plain route, or two routes with a TLS leg between.
LEG_KINDS = ("plain", "tls-cert", "tls-psk")


def build_path(engine: EngineBase, impl: str, kind: str, target: str, certs: Any) -> str:
    """Routes of ``kind`` in front of ``target``; the address a client connects to."""
    if kind == "plain":
        return engine.add_route(Route("plain", "127.0.0.1:0", (target,))).bound
    if kind == "tls-cert":
        return tls_pair(engine, target, cert_tls(TlsRole.CLIENT, certs), cert_tls(TlsRole.SERVER, certs))
    if impl != "native":
        pytest.skip("TLS PSK needs the native engine")
    return tls_pair(engine, target, psk_tls(TlsRole.CLIENT), psk_tls(TlsRole.SERVER))


def error_count(engine: EngineBase, kind: str) -> int:
    return sum(r.errors.get(kind, 0) for r in engine.stats().routes.values())


ServerFactory = Callable[..., StreamServer]


def duplex_server(stream_server: ServerFactory, per_conn: int,
                  host: str = "127.0.0.1", *, half_close: bool = True) -> StreamServer:
    """Each connection: send a distinct stream B while reading stream A to EOF (or,
    without ``half_close``, exactly ``per_conn`` bytes of it, sending no FIN)."""
    seeds = itertools.count(1000)
    lock = threading.Lock()

    def handler(sock: socket.socket, served: Served) -> None:
        with lock:
            seed = next(seeds)
        serve_duplex(sock, served, per_conn, seed, None if half_close else per_conn)

    return stream_server(handler, host)


def run_duplex_clients(bound: str, n: int, per_conn: int, *,
                       half_close: bool = True) -> list[tuple[str, tuple[int, str]]]:
    """n clients each send a distinct stream A and read stream B; returns (sent A, got B)."""

    def one(i: int) -> tuple[str, tuple[int, str]]:
        return duplex_transfer(bound, send_bytes=per_conn, seed=i + 1,
                               expect=None if half_close else per_conn, timeout=120)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def check_duplex(server: StreamServer, clients: list[tuple[str, tuple[int, str]]], per_conn: int) -> None:
    served = server.wait_served(len(clients), timeout=120)
    for s in served:
        assert s.error is None, f"server side failed: {s.error!r}"
    # Distinct seeds make every stream's digest unique, so equal multisets mean
    # every stream arrived whole, in order, on its own connection.
    assert all(got[0] == per_conn for _, got in clients)
    assert all(s.results["got"][0] == per_conn for s in served)
    assert sorted(a for a, _ in clients) == sorted(s.results["got"][1] for s in served)
    assert sorted(b[1] for _, b in clients) == sorted(s.results["sent"] for s in served)


class EchoLoop:
    """A single-threaded epoll echo server: cheap for thousands of connections."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        import selectors

        self.sel = selectors.DefaultSelector()
        self.lsock = socket.socket()
        self.lsock.bind((host, 0))
        self.lsock.listen(4096)
        self.lsock.setblocking(False)
        self.address = f"{host}:{self.lsock.getsockname()[1]}"
        self.sel.register(self.lsock, selectors.EVENT_READ)
        self.accepted = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import selectors

        while not self.stop.is_set():
            for key, _ in self.sel.select(0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self.lsock:
                    with contextlib.suppress(BlockingIOError):
                        while True:
                            conn, _ = self.lsock.accept()
                            conn.setblocking(False)
                            self.sel.register(conn, selectors.EVENT_READ)
                            self.accepted += 1
                    continue
                try:
                    data = sock.recv(65536)
                except (BlockingIOError, ConnectionError):
                    data = b""
                if data:
                    sock.setblocking(True)  # small payloads: a blocking sendall is fine
                    sock.sendall(data)
                    sock.setblocking(False)
                else:
                    self.sel.unregister(sock)
                    sock.close()
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self.sel.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


def secret_target(stream_server: ServerFactory, secret: bytes) -> StreamServer:
    """Speaks ``secret`` first (a leak towards the client would show) and records what it
    receives, up to the first newline, in ``results["got"]``."""

    def handler(sock: socket.socket, served: Served) -> None:
        sock.settimeout(15)
        served.results["got"] = b""
        sock.sendall(secret)
        while data := sock.recv(65536):
            served.results["got"] += data
            if b"\n" in data:
                break

    return stream_server(handler)


class RecordingTlsServer:
    """A TLS server on ``ctx`` that counts completed handshakes, then greets and records what
    it reads in ``results["got"]``: up to the first newline when ``one_line``, else until EOF
    or ``read_timeout`` seconds of silence. A failed handshake records nothing."""

    def __init__(self, stream_server: ServerFactory, ctx: ssl.SSLContext, greeting: bytes, *,
                 timeout: float, one_line: bool = True, read_timeout: float | None = None) -> None:
        self.handshakes = 0

        def handler(sock: socket.socket, served: Served) -> None:
            sock.settimeout(timeout)
            served.results["got"] = b""
            try:
                tls = ctx.wrap_socket(sock, server_side=True)
            except (ssl.SSLError, OSError):
                return
            self.handshakes += 1
            with tls, contextlib.suppress(OSError):
                tls.sendall(greeting)
                if read_timeout is not None:
                    tls.settimeout(read_timeout)
                while data := tls.recv(65536):
                    served.results["got"] += data
                    if one_line and b"\n" in data:
                        break

        self.server: StreamServer = stream_server(handler)
