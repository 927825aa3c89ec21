"""Byte-exact transfers through routes, both directions at once, plain and TLS."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest
from dputil import (
    ServerFactory,
    cert_tls,
    check_duplex,
    duplex_server,
    psk_tls,
    run_duplex_clients,
    size,
    tls_pair,
)
from streams import GiB, MiB

from scistream.dataplane import Engine, EngineBase, InvalidRoute, Route, TlsRole, Tuning


@pytest.mark.slow
@pytest.mark.parametrize("conns", [1, 16])
def test_plain_duplex_sha256(engine: EngineBase, stream_server: ServerFactory, conns: int) -> None:
    total = size(2 * GiB, 64 * MiB)  # both directions, all connections together
    per_conn = total // (2 * conns)
    server = duplex_server(stream_server, per_conn)
    info = engine.add_route(Route("dup", "127.0.0.1:0", (server.address,)))
    clients = run_duplex_clients(info.bound, conns, per_conn)
    check_duplex(server, clients, per_conn)
    st = engine.stats("dup").routes["dup"]
    assert st.bytes_to_target == st.bytes_from_target == per_conn * conns
    assert st.connections_total == conns


def test_ipv6_listen_and_target(engine: EngineBase, stream_server: ServerFactory) -> None:
    per_conn = 4 * MiB
    server = duplex_server(stream_server, per_conn, host="::1")
    info = engine.add_route(Route("v6", "[::1]:0", (server.address,)))
    assert info.bound.startswith("[::1]:")
    check_duplex(server, run_duplex_clients(info.bound, 2, per_conn), per_conn)


def test_adopted_listen_fd(engine: EngineBase, stream_server: ServerFactory) -> None:
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


def test_round_robin_targets(engine: EngineBase, stream_server: ServerFactory) -> None:
    servers = [duplex_server(stream_server, 1024) for _ in range(3)]
    info = engine.add_route(Route("rr", "127.0.0.1:0", tuple(s.address for s in servers)))
    for _ in range(7):  # sequentially, so connection k is the k-th accepted
        run_duplex_clients(info.bound, 1, 1024)
    assert [len(s.served) for s in servers] == [3, 2, 2]
    st = engine.stats("rr").routes["rr"]
    assert st.connections_total == 7
    assert st.targets == tuple(s.address for s in servers)


@pytest.mark.slow
@pytest.mark.parametrize("conns", [1, 16])
def test_tls_cert_duplex_sha256(engine: EngineBase, stream_server: ServerFactory,
                                certs: object, conns: int) -> None:
    total = size(512 * MiB, 32 * MiB)
    per_conn = total // (2 * conns)
    server = duplex_server(stream_server, per_conn)
    bound = tls_pair(
        engine, server.address,
        cert_tls(TlsRole.CLIENT, certs), cert_tls(TlsRole.SERVER, certs))
    check_duplex(server, run_duplex_clients(bound, conns, per_conn), per_conn)


@pytest.mark.slow
@pytest.mark.parametrize("conns", [1, 16])
def test_tls_psk_duplex_sha256(make_native_engine: Callable[..., EngineBase],
                               stream_server: ServerFactory, conns: int) -> None:
    engine = make_native_engine()
    total = size(2 * GiB, 64 * MiB)
    per_conn = total // (2 * conns)
    server = duplex_server(stream_server, per_conn)
    bound = tls_pair(engine, server.address, psk_tls(TlsRole.CLIENT), psk_tls(TlsRole.SERVER))
    check_duplex(server, run_duplex_clients(bound, conns, per_conn), per_conn)


def test_pure_engine_refuses_psk() -> None:
    """Python's ssl has no external-PSK API: the pure engine says so instead of misbehaving."""
    with Engine(impl="pure") as engine:
        with pytest.raises(InvalidRoute, match="cannot do TLS PSK"):
            engine.add_route(Route("p", "127.0.0.1:0", ("127.0.0.1:9",), tls=psk_tls(TlsRole.SERVER)))
        assert engine.routes() == []
        assert engine.resource_counts().fds == 0


def test_tuning_knobs(make_engine: Callable[..., EngineBase], stream_server: ServerFactory) -> None:
    """Every socket knob set at once still moves bytes exactly (unknown congestion names are
    best effort, never an error)."""
    tuning = Tuning(sndbuf=1 << 20, rcvbuf=1 << 20, nodelay=False, congestion="cubic",
                    notsent_lowat=128 << 10, tcp_user_timeout=10_000, backlog=64,
                    pipe_size=256 << 10, tls_buffer_size=64 << 10, connect_timeout=5.0)
    engine = make_engine(tuning)
    per_conn = 8 * MiB
    server = duplex_server(stream_server, per_conn)
    info = engine.add_route(Route("k", "127.0.0.1:0", (server.address,)))
    check_duplex(server, run_duplex_clients(info.bound, 4, per_conn), per_conn)
