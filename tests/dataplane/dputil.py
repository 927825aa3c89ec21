"""Helpers of the data-plane tests: sizes, polling, SHA-256 streams, a threaded TCP server."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from random import Random
from typing import Any

import pytest

from scistream.dataplane import EngineBase, Route, Tls, TlsMode, TlsRole
from scistream.endpoints import parse_endpoint

_BLOCK = 1 << 20
BIG = os.environ.get("SCISTREAM_TEST_BIG", "1") != "0"
MiB = 1 << 20
GiB = 1 << 30


def size(full: int, small: int) -> int:
    """``full`` bytes in the default (CI) run, ``small`` with SCISTREAM_TEST_BIG=0."""
    return full if BIG else small


def wait_for(pred: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02) -> Any:
    """Poll ``pred`` until it is truthy; return its value, or the last one after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def connect(bound: str, timeout: float = 10.0) -> socket.socket:
    host, port = parse_endpoint(bound)
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def pattern_block(seed: int, size: int = _BLOCK) -> bytearray:
    """A pseudo-random block; streams stamp a counter into its first 8 bytes per chunk."""
    return bytearray(Random(seed).randbytes(size))


def send_stream(sock: socket.socket, total: int, seed: int, *, shutdown: bool = True) -> str:
    """Send ``total`` bytes of the seed's pattern; return their SHA-256 (hex).

    Every 1 MiB chunk differs (a counter in its first bytes), so a reordered,
    repeated or dropped chunk changes the digest. Hashing and sendall release
    the GIL, so several streams in threads run in parallel.
    """
    block = pattern_block(seed)
    view = memoryview(block)
    digest = hashlib.sha256()
    sent, index = 0, 0
    while sent < total:
        n = min(_BLOCK, total - sent)
        struct.pack_into("<Q", block, 0, index)
        sock.sendall(view[:n])
        digest.update(view[:n])
        sent += n
        index += 1
    if shutdown:
        sock.shutdown(socket.SHUT_WR)
    return digest.hexdigest()


def recv_stream(sock: socket.socket, limit: int | None = None) -> tuple[int, str]:
    """Read until EOF (or ``limit`` bytes); return (bytes read, SHA-256 hex)."""
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    digest = hashlib.sha256()
    got = 0
    while limit is None or got < limit:
        want = _BLOCK if limit is None else min(_BLOCK, limit - got)
        n = sock.recv_into(view[:want])
        if n == 0:
            break
        digest.update(view[:n])
        got += n
    return got, digest.hexdigest()


def pattern_digest(total: int, seed: int) -> str:
    """The SHA-256 of the first ``total`` bytes of the seed's stream (what send_stream sends)."""
    block = pattern_block(seed)
    digest = hashlib.sha256()
    done, index = 0, 0
    while done < total:
        n = min(_BLOCK, total - done)
        struct.pack_into("<Q", block, 0, index)
        digest.update(memoryview(block)[:n])
        done += n
        index += 1
    return digest.hexdigest()


@dataclass
class Served:
    """What one server-side connection saw: filled by the handler."""

    peer: tuple[str, int]
    results: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class StreamServer:
    """A TCP server on loopback running ``handler(sock, served)`` per connection in a thread."""

    def __init__(self, handler: Callable[[socket.socket, Served], None], host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(1024)
        port = self.sock.getsockname()[1]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.handler = handler
        self.served: list[Served] = []
        self.lock = threading.Lock()
        self.conn_socks: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.closing = False
        self.acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self.acceptor.start()

    def _accept_loop(self) -> None:
        while not self.closing:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            if self.closing:
                conn.close()
                return
            served = Served(peer)
            with self.lock:
                self.served.append(served)
                self.conn_socks.append(conn)
            t = threading.Thread(target=self._run, args=(conn, served), daemon=True)
            self.threads.append(t)
            t.start()

    def _run(self, conn: socket.socket, served: Served) -> None:
        try:
            self.handler(conn, served)
        except BaseException as exc:  # reported by the test through served.error
            served.error = exc
        finally:
            with contextlib.suppress(OSError):
                conn.close()
            served.done.set()

    def wait_served(self, n: int, timeout: float = 30.0) -> list[Served]:
        ok = wait_for(lambda: len(self.served) >= n and all(s.done.is_set() for s in self.served[:n]),
                      timeout)
        assert ok, f"only {len(self.served)} of {n} connections served in time"
        return self.served[:n]

    def close(self) -> None:
        self.closing = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with self.lock:
            for c in self.conn_socks:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
        self.acceptor.join(5)
        for t in self.threads:
            t.join(5)




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


def recv_prefix(sock: socket.socket) -> tuple[int, str, str]:
    """Read until EOF or reset: (bytes, SHA-256 hex, "eof" or "reset")."""
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    digest = hashlib.sha256()
    got = 0
    while True:
        try:
            n = sock.recv_into(view)
        except ConnectionResetError:
            return got, digest.hexdigest(), "reset"
        if n == 0:
            return got, digest.hexdigest(), "eof"
        digest.update(view[:n])
        got += n


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
        with ThreadPoolExecutor(1) as pool:
            sent = pool.submit(send_stream, sock, per_conn, seed, shutdown=half_close)
            served.results["got"] = recv_stream(sock, None if half_close else per_conn)
            served.results["sent"] = sent.result(timeout=600)

    return stream_server(handler, host)


def run_duplex_clients(bound: str, n: int, per_conn: int, *,
                       half_close: bool = True) -> list[tuple[str, tuple[int, str]]]:
    """n clients each send a distinct stream A and read stream B; returns (sent A, got B)."""

    def one(i: int) -> tuple[str, tuple[int, str]]:
        with connect(bound, timeout=120) as sock, ThreadPoolExecutor(1) as pool:
            sent = pool.submit(send_stream, sock, per_conn, i + 1, shutdown=half_close)
            got = recv_stream(sock, None if half_close else per_conn)
            return sent.result(timeout=600), got

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
