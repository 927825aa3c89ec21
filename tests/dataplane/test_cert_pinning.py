"""A cert-mode client route trusts only its pinned CA and, when it names the server, only
that name (both engines).

The suite had only positive cert-mode tests: a client route that verified nothing would
have passed all of them. Here the target is a TLS server that speaks first, so a client
route that trusted it would hand its bytes on; it presents either a certificate from
another CA (an impostor) or the pinned CA's certificate under a name the route does not
ask for. Either way no byte may pass in either direction. The positive control uses the
same server with the right certificate and name.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dputil import RecordingTlsServer, ServerFactory, outcome
from streams import connect, wait_for

from scistream.certs import make_ca_and_leaf
from scistream.dataplane import EngineBase, Route, Tls, TlsMode, TlsRole

GREETING = b"target speaking first\n"
APP_BYTES = b"application bytes for the real server only\n"


class TlsTarget(RecordingTlsServer):
    """A TLS 1.3 server with the given certificate: greets after the handshake, records
    what it reads."""

    def __init__(self, stream_server: ServerFactory, cert: Path, key: Path) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        super().__init__(stream_server, ctx, GREETING, timeout=10)


@pytest.fixture
def pinned(tmp_path: Path) -> Any:
    return make_ca_and_leaf(tmp_path / "pinned", ["127.0.0.1"], ["localhost"], common_name="localhost",
                            days=1)


@pytest.fixture
def impostor(tmp_path: Path) -> Any:
    """Same names, same kind of certificate, another CA."""
    return make_ca_and_leaf(tmp_path / "impostor", ["127.0.0.1"], ["localhost"], common_name="localhost",
                            days=1)


def client_route(engine: EngineBase, target: str, ca: Path, server_name: str) -> str:
    tls = Tls(role=TlsRole.CLIENT, mode=TlsMode.CERT, ca_file=str(ca), server_name=server_name)
    return engine.add_route(Route("out", "127.0.0.1:0", (target,), tls=tls)).bound


def assert_greeted(app: socket.socket) -> None:
    """The route trusted the server: its greeting arrives whole through the route."""
    app.settimeout(10)
    got = b""
    while len(got) < len(GREETING) and (data := app.recv(4096)):
        got += data
    assert got == GREETING


def assert_refused(engine: EngineBase, bound: str, target: TlsTarget) -> None:
    with connect(bound) as app:
        with contextlib.suppress(OSError):
            app.sendall(APP_BYTES)
        assert outcome(app, timeout=10) in ("eof", "reset"), "the client route trusted the server"
    assert wait_for(lambda: engine.stats("out").routes["out"].errors.get("tls_handshake", 0) >= 1, 10), \
        engine.stats("out")
    assert wait_for(lambda: engine.stats("out").routes["out"].connections_active == 0, 10)
    (served,) = target.server.wait_served(1, timeout=15)
    assert target.handshakes == 0
    assert served.results.get("got", b"") == b""
    st = engine.stats("out").routes["out"]
    assert st.bytes_to_target == 0 and st.bytes_from_target == 0, st


def test_client_refuses_a_server_of_another_ca(make_engine: Callable[..., EngineBase],
                                               stream_server: ServerFactory, pinned: Any,
                                               impostor: Any) -> None:
    engine = make_engine()
    target = TlsTarget(stream_server, impostor.cert, impostor.key)
    assert_refused(engine, client_route(engine, target.server.address, pinned.ca_cert, "localhost"), target)


def test_client_refuses_the_pinned_ca_under_another_name(make_engine: Callable[..., EngineBase],
                                                         stream_server: ServerFactory, pinned: Any) -> None:
    engine = make_engine()
    target = TlsTarget(stream_server, pinned.cert, pinned.key)
    bound = client_route(engine, target.server.address, pinned.ca_cert, "gateway.example.org")
    assert_refused(engine, bound, target)


def test_client_accepts_the_pinned_ca_and_name(make_engine: Callable[..., EngineBase],
                                               stream_server: ServerFactory, pinned: Any) -> None:
    """The positive control of the two refusals above."""
    engine = make_engine()
    target = TlsTarget(stream_server, pinned.cert, pinned.key)
    with connect(client_route(engine, target.server.address, pinned.ca_cert, "localhost")) as app:
        assert_greeted(app)
        app.sendall(APP_BYTES)
        (served,) = target.server.wait_served(1, timeout=15)
    assert served.results["got"] == APP_BYTES


@pytest.fixture
def pinned_elsewhere(tmp_path: Path) -> Any:
    """A certificate of the pinned CA for another gateway's address and name only."""
    return make_ca_and_leaf(tmp_path / "elsewhere", ["192.0.2.7"], ["gw2.example.org"],
                            common_name="gw2.example.org", days=1)


def test_client_without_a_server_name_checks_the_target_address(
        make_engine: Callable[..., EngineBase], stream_server: ServerFactory,
        pinned_elsewhere: Any) -> None:
    """With no server name configured, the certificate must name the target the route
    dialled (127.0.0.1 here): one gateway of a shared CA cannot answer for another."""
    engine = make_engine()
    target = TlsTarget(stream_server, pinned_elsewhere.cert, pinned_elsewhere.key)
    assert_refused(engine, client_route(engine, target.server.address, pinned_elsewhere.ca_cert, ""), target)


def test_client_without_a_server_name_accepts_a_certificate_for_the_target(
        make_engine: Callable[..., EngineBase], stream_server: ServerFactory, pinned: Any) -> None:
    """The positive control: the pinned CA's certificate names 127.0.0.1, the dialled address."""
    engine = make_engine()
    target = TlsTarget(stream_server, pinned.cert, pinned.key)
    with connect(client_route(engine, target.server.address, pinned.ca_cert, "")) as app:
        assert_greeted(app)
