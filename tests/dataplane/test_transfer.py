"""Byte-exact transfers through routes, both directions at once, plain and TLS."""

from __future__ import annotations

import itertools
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from dputil import GiB, MiB, Served, StreamServer, connect, recv_stream, send_stream, size

from scistream.dataplane import EngineBase, Route, Tls, TlsMode, TlsRole


def duplex_server(stream_server: Callable[..., StreamServer], per_conn: int,
                  host: str = "127.0.0.1") -> StreamServer:
    """Each connection: send a distinct stream B while reading stream A to EOF."""
    seeds = itertools.count(1000)
    lock = threading.Lock()

    def handler(sock: socket.socket, served: Served) -> None:
        with lock:
            seed = next(seeds)
        with ThreadPoolExecutor(1) as pool:
            sent = pool.submit(send_stream, sock, per_conn, seed)
            served.results["got"] = recv_stream(sock)
            served.results["sent"] = sent.result(timeout=600)

    return stream_server(handler, host)


def run_duplex_clients(bound: str, n: int, per_conn: int) -> list[tuple[str, tuple[int, str]]]:
    """n clients each send a distinct stream A and read stream B; returns (sent A, got B)."""

    def one(i: int) -> tuple[str, tuple[int, str]]:
        with connect(bound, timeout=120) as sock:
            with ThreadPoolExecutor(1) as pool:
                sent = pool.submit(send_stream, sock, per_conn, i + 1)
                got = recv_stream(sock)
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


@pytest.mark.slow
@pytest.mark.parametrize("conns", [1, 16])
def test_plain_duplex_sha256(engine: EngineBase, stream_server: Callable[..., StreamServer], conns: int) -> None:
    total = size(2 * GiB, 64 * MiB)  # both directions, all connections together
    per_conn = total // (2 * conns)
    server = duplex_server(stream_server, per_conn)
    info = engine.add_route(Route("dup", "127.0.0.1:0", (server.address,)))
    clients = run_duplex_clients(info.bound, conns, per_conn)
    check_duplex(server, clients, per_conn)
    st = engine.stats("dup").routes["dup"]
    assert st.bytes_to_target == st.bytes_from_target == per_conn * conns
    assert st.connections_total == conns


def test_ipv6_listen_and_target(engine: EngineBase, stream_server: Callable[..., StreamServer]) -> None:
    per_conn = 4 * MiB
    server = duplex_server(stream_server, per_conn, host="::1")
    info = engine.add_route(Route("v6", "[::1]:0", (server.address,)))
    assert info.bound.startswith("[::1]:")
    check_duplex(server, run_duplex_clients(info.bound, 2, per_conn), per_conn)


def test_adopted_listen_fd(engine: EngineBase, stream_server: Callable[..., StreamServer]) -> None:
    per_conn = 2 * MiB
    server = duplex_server(stream_server, per_conn)
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    port = lsock.getsockname()[1]
    fd = lsock.detach()  # the engine owns it now
    info = engine.add_route(Route("fd", targets=(server.address,), listen_fd=fd))
    assert info.bound == f"127.0.0.1:{port}"
    check_duplex(server, run_duplex_clients(info.bound, 1, per_conn), per_conn)


def test_round_robin_targets(engine: EngineBase, stream_server: Callable[..., StreamServer]) -> None:
    servers = [duplex_server(stream_server, 1024) for _ in range(3)]
    info = engine.add_route(Route("rr", "127.0.0.1:0", tuple(s.address for s in servers)))
    for _ in range(7):  # sequentially, so connection k is the k-th accepted
        run_duplex_clients(info.bound, 1, 1024)
    assert [len(s.served) for s in servers] == [3, 2, 2]
    st = engine.stats("rr").routes["rr"]
    assert st.connections_total == 7
    assert st.targets == tuple(s.address for s in servers)


def tls_pair(engine: EngineBase, target: str, client_tls: Tls, server_tls: Tls,
             rate: int = 0) -> str:
    """Route 2 terminates TLS in front of ``target``; route 1 is plain in and TLS out to route 2.

    Returns route 1's address: what a plain client connects to."""
    inner = engine.add_route(Route("tls-in", "127.0.0.1:0", (target,), tls=server_tls))
    outer = engine.add_route(Route("tls-out", "127.0.0.1:0", (inner.bound,), tls=client_tls, rate_limit=rate))
    return outer.bound


def psk_tls(role: TlsRole, key: bytes = b"k" * 32, mode: TlsMode = TlsMode.PSK,
            identity: str = "scistream") -> Tls:
    return Tls(role=role, mode=mode, psk_identity=identity, psk_key=key)


@pytest.mark.slow
@pytest.mark.parametrize("conns", [1, 16])
def test_tls_cert_duplex_sha256(engine: EngineBase, stream_server: Callable[..., StreamServer],
                                certs: object, conns: int) -> None:
    total = size(512 * MiB, 32 * MiB)
    per_conn = total // (2 * conns)
    server = duplex_server(stream_server, per_conn)
    bound = tls_pair(
        engine, server.address,
        Tls(role=TlsRole.CLIENT, mode=TlsMode.CERT, ca_file=str(certs.ca)),  # type: ignore[attr-defined]
        Tls(role=TlsRole.SERVER, mode=TlsMode.CERT, cert_file=str(certs.cert),  # type: ignore[attr-defined]
            key_file=str(certs.key)))  # type: ignore[attr-defined]
    check_duplex(server, run_duplex_clients(bound, conns, per_conn), per_conn)


@pytest.mark.slow
@pytest.mark.parametrize("conns", [1, 16])
def test_tls_psk_duplex_sha256(make_native_engine: Callable[..., EngineBase],
                               stream_server: Callable[..., StreamServer], conns: int) -> None:
    engine = make_native_engine()
    total = size(2 * GiB, 64 * MiB)
    per_conn = total // (2 * conns)
    server = duplex_server(stream_server, per_conn)
    bound = tls_pair(engine, server.address, psk_tls(TlsRole.CLIENT), psk_tls(TlsRole.SERVER))
    check_duplex(server, run_duplex_clients(bound, conns, per_conn), per_conn)


def test_pure_engine_refuses_psk(make_engine: Callable[..., EngineBase], engine_impl: str) -> None:
    if engine_impl != "pure":
        pytest.skip("only the pure engine lacks TLS PSK")
    engine = make_engine()
    from scistream.dataplane import InvalidRoute

    with pytest.raises(InvalidRoute, match="cannot do TLS PSK"):
        engine.add_route(Route("p", "127.0.0.1:0", ("127.0.0.1:9",), tls=psk_tls(TlsRole.SERVER)))
    assert engine.routes() == []
