"""Certificate mode with client certificates (gateways authenticating each other), both engines.

A TLS server leg with a CA file requires a client certificate that chains to
it; a TLS client leg with a certificate presents it. This is what the
gateway certificates of ``scistream certs --gateway`` (1.x clients) and the
per-session certificates of HAProxy/nginx PROD gateways rely on.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dputil import ServerFactory
from streams import Served, connect, wait_for
from test_tls_security import SECRET, assert_refused, recording_target

from scistream.certs import make_gateway_cert
from scistream.dataplane import EngineBase, Route, Tls, TlsMode, TlsRole


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("gw")
    rogue_dir = tmp_path_factory.mktemp("rogue")
    return {
        "prod": make_gateway_cert(d, "prod", ["127.0.0.1"]),
        "cons": make_gateway_cert(d, "cons", ["127.0.0.1"]),
        # Same shape, another CA: what a gateway of another federation holds.
        "rogue": make_gateway_cert(rogue_dir, "cons", ["127.0.0.1"]),
    }


def server_tls(gw: dict[str, Any]) -> Tls:
    p = gw["prod"]
    return Tls(role=TlsRole.SERVER, mode=TlsMode.CERT, cert_file=str(p.cert), key_file=str(p.key),
               ca_file=str(p.ca_cert))


def client_tls(gw: dict[str, Any], who: str | None) -> Tls:
    ca = str(gw["prod"].ca_cert)
    if who is None:
        return Tls(role=TlsRole.CLIENT, mode=TlsMode.CERT, ca_file=ca)
    c = gw[who]
    return Tls(role=TlsRole.CLIENT, mode=TlsMode.CERT, ca_file=ca, cert_file=str(c.cert), key_file=str(c.key))


def test_client_certificate_from_the_ca_gets_through(
    make_engine: Callable[..., EngineBase], stream_server: ServerFactory, gw: dict[str, Any]
) -> None:
    engine = make_engine()
    data = os.urandom(1 << 20)

    def handler(sock: socket.socket, served: Served) -> None:
        sock.sendall(data)

    target = stream_server(handler)
    inner = engine.add_route(Route("in", "127.0.0.1:0", (target.address,), tls=server_tls(gw)))
    outer = engine.add_route(Route("out", "127.0.0.1:0", (inner.bound,), tls=client_tls(gw, "cons")))
    h = hashlib.sha256()
    with connect(outer.bound) as c:
        c.settimeout(15)
        while chunk := c.recv(65536):
            h.update(chunk)
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()
    assert wait_for(lambda: engine.stats("in").routes["in"].bytes_from_target == len(data))


@pytest.mark.parametrize("who", [None, "rogue"])
def test_client_without_a_certificate_of_the_ca_is_refused(make_engine: Callable[..., EngineBase],
                                                           stream_server: ServerFactory,
                                                           gw: dict[str, Any], who: str | None) -> None:
    engine = make_engine()
    target = recording_target(stream_server)
    inner = engine.add_route(Route("in", "127.0.0.1:0", (target.address,), tls=server_tls(gw)))
    outer = engine.add_route(Route("out", "127.0.0.1:0", (inner.bound,), tls=client_tls(gw, who)))
    with connect(outer.bound) as c:
        c.settimeout(15)
        try:
            c.sendall(b"must not reach the producer\n")
            got = b""
            while chunk := c.recv(65536):
                got += chunk
        except OSError:
            got = b""
    assert SECRET not in got
    assert_refused(engine, "in", target)


def test_gateway_ca_is_reused_for_the_next_gateway(tmp_path: Path) -> None:
    a = make_gateway_cert(tmp_path, "a")
    ca_before = a.ca_cert.read_bytes()
    b = make_gateway_cert(tmp_path, "b")
    assert b.ca_cert.read_bytes() == ca_before
    assert a.cert.read_bytes() != b.cert.read_bytes()
    assert oct(b.key.stat().st_mode & 0o777) == "0o600"
