"""Seeded SHA-256 streams and a duplex producer/consumer pair, for every test that moves bytes.

One stream format: the seed's pseudo-random 1 MiB block, with a chunk counter stamped into
the first 8 bytes of each 1 MiB chunk, so a reordered, repeated or dropped chunk changes the
digest. ``send_stream`` sends one, ``recv_stream`` hashes what arrives, ``pattern_digest``
says what the first N bytes hash to.

A duplex transfer sends a stream each way at once. With ``expect=None`` each side reads to
EOF and half-closes after sending; with ``expect=N`` each side reads exactly N bytes and
sends no FIN (for proxies whose half-close is not under test). ``StreamServer`` runs a
handler per connection in a thread; ``DuplexServer`` is the producer stand-in built on it,
``duplex_transfer`` the consumer.

Imported as ``streams`` by tests/dataplane, tests/robustness, tests/integration and tests/s2cs: tests/ is
on sys.path because tests/conftest.py lives there (pytest's default "prepend" import mode).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from random import Random
from typing import Any

from scistream.endpoints import parse_endpoint

MiB = 1 << 20
GiB = 1 << 30
_BLOCK = MiB
#: How long a duplex side waits for the other's result once its own read is done.
_SEND_RESULT_TIMEOUT = 600.0


def wait_for(pred: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02) -> Any:
    """Poll ``pred`` until it is truthy; return its value, or the last one after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def wait_bound(port: int, proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """Wait until ``proc`` (a proxy such as stunnel) has taken 127.0.0.1:``port``, without
    connecting to it (a probe connection would start a TLS session through the peer): binding
    the port fails once it is taken."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{proc.args!r} exited early ({proc.returncode})"
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return
                raise
        time.sleep(0.05)
    raise AssertionError(f"{proc.args!r} is not listening on {port} after {timeout} s")


def connect(address: str, timeout: float = 10.0) -> socket.socket:
    """A TCP connection (Nagle off) to ``host:port`` or ``[v6]:port``."""
    host, port = parse_endpoint(address)
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def pattern_block(seed: int, size: int = _BLOCK) -> bytearray:
    """A pseudo-random block; streams stamp a counter into its first 8 bytes per chunk."""
    return bytearray(Random(seed).randbytes(size))


def _pattern_chunks(total: int, seed: int) -> Iterator[memoryview]:
    """The first ``total`` bytes of the seed's stream in 1 MiB chunks, chunk i stamped with i.
    The chunks share one buffer: use each before asking for the next."""
    block = pattern_block(seed)
    view = memoryview(block)
    for index, start in enumerate(range(0, total, _BLOCK)):
        struct.pack_into("<Q", block, 0, index)
        yield view[:min(_BLOCK, total - start)]


def send_stream(sock: socket.socket, total: int, seed: int, *, shutdown: bool = True,
                write_size: int = _BLOCK, pace: float = 0.0) -> str:
    """Send ``total`` bytes of the seed's stream (then a FIN, with ``shutdown``); return their SHA-256 (hex).

    Every 1 MiB chunk differs (a counter in its first bytes), so a reordered,
    repeated or dropped chunk changes the digest. Hashing and sendall release
    the GIL, so several streams in threads run in parallel. ``write_size`` and
    ``pace`` (seconds slept after each write) only change how the same bytes are
    written, to keep a stream in flight for a while.
    """
    digest = hashlib.sha256()
    for chunk in _pattern_chunks(total, seed):
        for start in range(0, len(chunk), write_size):
            sock.sendall(chunk[start:start + write_size])
            if pace:
                time.sleep(pace)
        digest.update(chunk)
    if shutdown:
        sock.shutdown(socket.SHUT_WR)
    return digest.hexdigest()


def recv_stream(sock: socket.socket, limit: int | None = None, *,
                progress: Callable[[int], None] | None = None) -> tuple[int, str]:
    """Read until EOF (or ``limit`` bytes); return (bytes read, SHA-256 hex).

    ``progress`` is called with the bytes read so far after every read, for a test that
    watches a transfer in flight."""
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
        if progress is not None:
            progress(got)
    return got, digest.hexdigest()


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


def pattern_digest(total: int, seed: int) -> str:
    """The SHA-256 of the first ``total`` bytes of the seed's stream (what send_stream sends)."""
    digest = hashlib.sha256()
    for chunk in _pattern_chunks(total, seed):
        digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Served:
    """What one server-side connection saw: filled by the handler."""

    peer: tuple[str, int]
    results: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


Handler = Callable[[socket.socket, Served], None]


class StreamServer:
    """A TCP server on loopback running ``handler(sock, served)`` per connection in a thread.

    A handler's exception is kept in its connection's ``Served.error``; the socket is closed
    when the handler returns. ``close`` stops accepting and shuts down open connections.
    """

    def __init__(self, handler: Handler, host: str = "127.0.0.1") -> None:
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

    @property
    def accepted(self) -> int:
        """How many connections were accepted so far."""
        return len(self.served)

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


@contextlib.contextmanager
def _sending(sock: socket.socket, send_bytes: int, seed: int, expect: int | None,
             **pacing: Any) -> Iterator[Future[str]]:
    """Send the seed's stream on ``sock`` from a thread (FIN after it when ``expect`` is None;
    ``pacing``: send_stream's write_size and pace) while the body reads; a failing body wakes
    the sender first, by shutting the socket down."""
    with ThreadPoolExecutor(1) as pool:
        sending = pool.submit(send_stream, sock, send_bytes, seed, shutdown=expect is None, **pacing)
        try:
            yield sending
        except BaseException:
            # A refused or reset connection ends the read early: wake the sender (its
            # error is expected there) so that it stops before the socket is closed.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            raise


def serve_duplex(sock: socket.socket, served: Served, send_bytes: int, seed: int,
                 expect: int | None = None) -> None:
    """A producer's side of a duplex transfer, as a StreamServer handler: results "got" =
    (bytes read, SHA-256), set once the read ends, and "sent" = SHA-256 of the bytes sent."""
    with _sending(sock, send_bytes, seed, expect) as sending:
        served.results["got"] = recv_stream(sock, expect)
        served.results["sent"] = sending.result(timeout=_SEND_RESULT_TIMEOUT)


class DuplexServer(StreamServer):
    """A producer stand-in: every connection gets ``serve_duplex`` with this server's
    ``send_bytes``, ``seed`` and ``expect_bytes`` as they are when it arrives (a test may
    change them between connections), on a socket with ``timeout``."""

    def __init__(self, *, send_bytes: int, seed: int, expect_bytes: int | None = None,
                 host: str = "127.0.0.1", timeout: float | None = 60.0) -> None:
        self.send_bytes = send_bytes
        self.seed = seed
        #: None: read each connection to EOF, half-close after sending; a number: read
        #: exactly that many bytes, send no FIN.
        self.expect_bytes = expect_bytes
        self.timeout = timeout
        super().__init__(self._serve, host)

    def _serve(self, sock: socket.socket, served: Served) -> None:
        sock.settimeout(self.timeout)
        serve_duplex(sock, served, self.send_bytes, self.seed, self.expect_bytes)

    def _connections(self) -> list[Served]:
        with self.lock:
            return list(self.served)

    @property
    def received(self) -> list[tuple[int, str]]:
        """(bytes, SHA-256) each connection's reader got, for the connections whose read ended."""
        return [s.results["got"] for s in self._connections() if "got" in s.results]

    @property
    def errors(self) -> list[BaseException]:
        """The errors of connections that failed (a read or send error, a timeout)."""
        return [s.error for s in self._connections() if s.error is not None]


def duplex_transfer(address: str, *, send_bytes: int, seed: int, expect: int | None = None,
                    timeout: float = 60.0, check_send: bool = True, write_size: int = _BLOCK,
                    pace: float = 0.0, progress: Callable[[int], None] | None = None
                    ) -> tuple[str, tuple[int, str]]:
    """A consumer's side of a duplex transfer: connect to ``address`` (``timeout`` per socket
    operation) and send ``send_bytes`` of the seed's stream while hashing what arrives.
    Returns (SHA-256 sent, (bytes read, SHA-256 read)).

    A read error (refused, reset) is raised. So is a send error, unless ``check_send`` is off,
    for a connection that may be refused, where only what was read matters: then the SHA-256
    sent is "" when the send failed.

    ``write_size`` and ``pace`` are send_stream's, ``progress`` recv_stream's."""
    with (connect(address, timeout=timeout) as sock,
          _sending(sock, send_bytes, seed, expect, write_size=write_size, pace=pace) as sending):
        got = recv_stream(sock, expect, progress=progress)
        try:
            return sending.result(timeout=_SEND_RESULT_TIMEOUT), got
        except OSError:
            if check_send:
                raise
            return "", got


#: The seed of the stream a Producer sends.
PRODUCER_SEED = 0x9D0D


class Producer(StreamServer):
    """A producer application: a TCP server that sends ``total`` bytes of the seeded stream to
    each client, then a FIN; a connection's ``results["sent"]`` is the SHA-256 it sent."""

    def __init__(self, total: int, seed: int = PRODUCER_SEED, *, pace: float = 0.0,
                 host: str = "127.0.0.1") -> None:
        self.total = total
        self.seed = seed
        self.pace = pace  # s slept after each 1 MiB write: a stream that stays in flight
        super().__init__(self._send, host)
        self.port = int(self.sock.getsockname()[1])

    def _send(self, sock: socket.socket, served: Served) -> None:
        served.results["sent"] = send_stream(sock, self.total, self.seed, pace=self.pace)


class Consumer:
    """A consumer application: connects and reads to EOF, hashing, in a thread.

    ``received`` grows as bytes arrive (a test watches the transfer in flight); ``sha`` is
    the SHA-256 (hex) of what was read, once the read ended."""

    def __init__(self, endpoint: str, timeout: float = 60.0) -> None:
        self.sock = connect(endpoint, timeout)
        self.sha = ""
        self.received = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _progress(self, got: int) -> None:
        self.received = got

    def _run(self) -> None:
        try:
            with self.sock:
                self.received, self.sha = recv_stream(self.sock, progress=self._progress)
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
