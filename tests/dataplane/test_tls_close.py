"""A half-close crosses a TLS leg even with a TLS 1.3 key update due (RELIABILITY 21).

The native engine rotates its sending key after ``tls_key_update_bytes``; OpenSSL sends the
KeyUpdate only at the SSL's next write or read, and refuses SSL_shutdown until it has. When
the update fell due on a direction's last record and its FIN came before anything else
touched that SSL, the engine took the refusal for a sent close_notify: that direction's EOF
was lost, and a peer reading to EOF waited for ever (seen as a rare hang of
test_tls13_key_update_keeps_bytes_exact under load). A threshold of 1 byte puts a key update
after every record, so one is always due when the FIN arrives: each direction below ends
while the other way is idle, so no read sends the KeyUpdate first.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from random import Random
from typing import Any

import pytest
from dputil import ServerFactory, build_path, error_count
from streams import MiB, Served, connect, wait_for

from scistream.dataplane import EngineBase, Tuning

TIMEOUT = 15.0  # per socket operation; the whole test takes well under a second


def read_to_eof(sock: socket.socket, what: str) -> bytes:
    got = bytearray()
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except TimeoutError:
        pytest.fail(f"{what}: no EOF within {TIMEOUT} s after {len(got)} bytes")
    return bytes(got)


def read_exactly(sock: socket.socket, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        if not chunk:
            break
        got += chunk
    return bytes(got)


@pytest.mark.parametrize("kind", ["tls-psk", "tls-cert"])
def test_half_close_with_a_key_update_due_reaches_the_peer(
        kind: str, make_native_engine: Callable[..., EngineBase], stream_server: ServerFactory,
        certs: Any) -> None:
    engine = make_native_engine(Tuning(tls_key_update_bytes=1))
    rng = Random(21)
    first, rest, reply = rng.randbytes(64 * 1024), rng.randbytes(MiB + 1234), rng.randbytes(MiB // 2 + 77)
    got_first = threading.Event()

    def handler(sock: socket.socket, served: Served) -> None:
        # Silent until the client's EOF: nothing flows back that could send a pending KeyUpdate.
        sock.settimeout(TIMEOUT)
        head = read_exactly(sock, len(first))
        got_first.set()
        served.results["got"] = head + read_to_eof(sock, "server reading the client's stream")
        sock.sendall(reply)
        sock.shutdown(socket.SHUT_WR)

    server = stream_server(handler)
    bound = build_path(engine, "native", kind, server.address, certs)
    with connect(bound, timeout=TIMEOUT) as sock:
        sock.sendall(first)
        assert got_first.wait(TIMEOUT), "the first bytes did not cross the TLS leg"
        # Both engines go idle: the server-to-client way has read its empty socket, so the
        # FIN below is the next thing either SSL on that leg sees after the last record.
        time.sleep(0.2)
        sock.sendall(rest)
        sock.shutdown(socket.SHUT_WR)
        back = read_to_eof(sock, "client reading the server's reply")
    served = server.wait_served(1, timeout=TIMEOUT)[0]
    assert served.error is None, f"server side failed: {served.error!r}"
    assert served.results["got"] == first + rest
    assert back == reply
    assert error_count(engine, "io") == 0


@pytest.mark.parametrize("kind", ["tls-psk", "tls-cert"])
def test_reset_after_the_peers_close_notify_passes_on_as_reset(
        kind: str, make_native_engine: Callable[..., EngineBase], stream_server: ServerFactory,
        certs: Any) -> None:
    """Once a TLS peer's close_notify is in, OpenSSL reports any failed send as "zero return":
    the reset that follows must still be taken for a reset (RELIABILITY 3), not an unknown TLS
    failure. The server half-closes (close_notify on the TLS leg), then resets while the
    client still sends."""
    engine = make_native_engine(Tuning())

    def handler(sock: socket.socket, served: Served) -> None:
        sock.settimeout(TIMEOUT)
        assert read_exactly(sock, 5) == b"hello"
        sock.sendall(b"world")
        sock.shutdown(socket.SHUT_WR)
        read_exactly(sock, MiB)  # the client streams on through both engines
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    server = stream_server(handler)
    bound = build_path(engine, "native", kind, server.address, certs)
    with connect(bound, timeout=TIMEOUT) as sock:
        sock.sendall(b"hello")
        assert read_to_eof(sock, "client reading the server's half-closed reply") == b"world"
        block = bytes(64 * 1024)
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:
                sock.sendall(block)
    server.wait_served(1, timeout=TIMEOUT)
    assert wait_for(lambda: all(r.errors.get("reset", 0) >= 1 for r in engine.stats().routes.values())), \
        engine.stats()
    assert error_count(engine, "io") == 0, engine.stats()
