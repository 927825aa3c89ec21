"""The native engine's TLS reader takes records however TCP cuts them.

The engine reads ahead for OpenSSL itself (csrc/tlsbio.c, the record reader BIO): one
recv() fills its buffer and OpenSSL takes each record's header and body out of it. A
record's header or body split over two reads, or many records in one, must come out
byte-exact; a cut in the middle of a record must end the connection, never hang it or
pass on bytes that were not authenticated. A relay between the two routes re-cuts the
TLS leg's bytes into pieces of random sizes (1 byte up to several records).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from random import Random
from typing import Any

import pytest
from dputil import ServerFactory, cert_tls, duplex_server, psk_tls
from streams import MiB, Served, connect, duplex_transfer, pattern_digest, wait_for

from scistream.dataplane import EngineBase, Route, Tls, TlsRole, Tuning

TIMEOUT = 30.0
#: The sizes the relay cuts the TLS leg into: headers (5 bytes) and records (16,406) split
#: anywhere, and runs of several records at once.
CUTS = (1, 2, 3, 4, 5, 6, 7, 100, 4096, 16_405, 16_406, 16_407, 40_000, 70_000)


def relay_cut(rng: Random, src: socket.socket, dst: socket.socket, limit: int | None = None) -> int:
    """Copy src to dst in pieces of random sizes from CUTS, each sent alone (TCP_NODELAY, a
    short pause now and then so that the reader finds a piece at a time); stop after
    ``limit`` bytes if given. Returns the bytes copied."""
    pending = bytearray()
    copied = 0
    while limit is None or copied < limit:
        if not pending:
            chunk = src.recv(262_144)
            if not chunk:
                break
            pending += chunk
        n = min(rng.choice(CUTS), len(pending))
        if limit is not None:
            n = min(n, limit - copied)
        dst.sendall(pending[:n])
        del pending[:n]
        copied += n
        if rng.random() < 0.05:
            time.sleep(0.001)
    return copied


def plain_copy(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while chunk := src.recv(262_144):
            dst.sendall(chunk)
        dst.shutdown(socket.SHUT_WR)


def cutting_relay(stream_server: ServerFactory, target: str, seed: int,
                  limit: int | None = None) -> str:
    """A TCP relay to ``target`` that re-cuts the client-to-server bytes (up to ``limit``,
    then it closes both sockets); the other way is copied as it comes."""

    def handler(sock: socket.socket, served: Served) -> None:
        host, port = target.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as up:
            sock.settimeout(TIMEOUT)
            up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            back = threading.Thread(target=plain_copy, args=(up, sock), daemon=True)
            back.start()
            served.results["copied"] = relay_cut(Random(seed), sock, up, limit)
            if limit is None:
                up.shutdown(socket.SHUT_WR)
            else:  # the cut: shutdown, as a close() leaves the socket to the thread reading it
                for s in (up, sock):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)
            back.join(TIMEOUT)

    return stream_server(handler).address


def leg(kind: str, role: TlsRole, certs: Any) -> Tls:
    return psk_tls(role) if kind == "tls-psk" else cert_tls(role, certs)


def routes_through(engine: EngineBase, kind: str, certs: Any, target: str,
                   stream_server: ServerFactory, seed: int, limit: int | None = None) -> str:
    inner = engine.add_route(Route("in", "127.0.0.1:0", (target,), tls=leg(kind, TlsRole.SERVER, certs)))
    relay = cutting_relay(stream_server, inner.bound, seed, limit)
    outer = engine.add_route(Route("out", "127.0.0.1:0", (relay,), tls=leg(kind, TlsRole.CLIENT, certs)))
    return outer.bound


@pytest.mark.parametrize("kind", ["tls-psk", "tls-cert"])
def test_records_cut_anywhere_arrive_exact(kind: str, make_native_engine: Callable[..., EngineBase],
                                          stream_server: ServerFactory, certs: Any) -> None:
    # A key update every 256 KiB: KeyUpdate messages are cut like the rest.
    engine = make_native_engine(Tuning(tls_key_update_bytes=256 * 1024))
    per_conn = 3 * MiB + 12_345
    server = duplex_server(stream_server, per_conn)
    bound = routes_through(engine, kind, certs, server.address, stream_server, seed=13)
    sent, got = duplex_transfer(bound, send_bytes=per_conn, seed=7, timeout=TIMEOUT)
    served = server.wait_served(1, timeout=TIMEOUT)[0]
    assert served.error is None, served.error
    assert served.results["got"] == (per_conn, sent) == (per_conn, pattern_digest(per_conn, 7))
    assert got == (per_conn, served.results["sent"])
    assert sum(r.errors.get("io", 0) for r in engine.stats().routes.values()) == 0


@pytest.mark.parametrize("cut_at", [3, 16_406 * 40 + 2, 16_406 * 40 + 9_000])
def test_a_cut_inside_a_record_ends_the_connection(cut_at: int,
                                                   make_native_engine: Callable[..., EngineBase],
                                                   stream_server: ServerFactory, certs: Any) -> None:
    """The relay closes both sockets after ``cut_at`` bytes of the TLS leg: inside the
    handshake, inside a record's header, inside a record's body. The producer must see its
    stream end (EOF or reset) with no byte it was not sent, and the engine let go of both
    connections."""
    engine = make_native_engine(Tuning())
    got: dict[str, Any] = {}

    def producer(sock: socket.socket, served: Served) -> None:
        sock.settimeout(TIMEOUT)
        data = bytearray()
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            got["reset"] = True
        got["data"] = bytes(data)

    target = stream_server(producer)
    bound = routes_through(engine, "tls-psk", certs, target.address, stream_server, seed=5, limit=cut_at)
    payload = Random(3).randbytes(2 * MiB)
    with connect(bound, timeout=TIMEOUT) as sock, contextlib.suppress(OSError):
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # the consumer's side ends too (EOF or reset), not hangs
    if cut_at > 3:  # past the handshake: the producer was reached, and its stream ended
        assert wait_for(lambda: "data" in got, timeout=TIMEOUT), "the producer's stream never ended"
        assert payload.startswith(got["data"]), "bytes reached the producer that were not sent"
        assert len(got["data"]) < len(payload)
    assert wait_for(lambda: all(r.connections_active == 0 for r in engine.stats().routes.values()),
                    timeout=TIMEOUT), engine.stats()
