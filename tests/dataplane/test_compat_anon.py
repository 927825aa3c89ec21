"""The 1.x interoperability mode never speaks an anonymous suite, whatever cipher list the
caller passes (issue 14, item 5).

The default compat list holds PSK suites only, so a test with the default list cannot see
whether the engine also strips anonymous suites from a caller's own list. These tests pass
lists that name anonymous suites (``eNULL`` has AECDH-NULL-SHA, ``ALL`` has ADH/AECDH) and
check both directions: an anonymous client is refused by a compat listener (no byte either
way), and a compat client route refuses an anonymous server (none of the application's bytes
leave). Removing ``!aNULL`` from the engine's compat cipher string makes them fail.

The pure engine has no TLS PSK at all; for it the check is that a compat route is refused
rather than silently built some other way.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable

import pytest
from dputil import RecordingTlsServer, ServerFactory, secret_target
from streams import StreamServer, connect, wait_for

from scistream.dataplane import (
    COMPAT_PSK_IDENTITY,
    EngineBase,
    EngineError,
    Route,
    RouteStats,
    Tls,
    TlsMode,
    TlsRole,
    compat_key_from_uid,
)

SECRET = b"producer-bytes-an-anonymous-peer-must-not-read"
UID = "7d0f4a52-3c1b-11ef-8a5e-0242ac120002"
KEY = compat_key_from_uid(UID)
ANON = "aNULL:@SECLEVEL=0"

#: Caller cipher lists: empty (the mode's default), one that holds AECDH-NULL-SHA, one
#: that holds every anonymous suite OpenSSL has.
CALLER_LISTS = ["", "eNULL", "ALL:@SECLEVEL=0"]

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def compat(role: TlsRole, ciphers: str) -> Tls:
    return Tls(role=role, mode=TlsMode.COMPAT, psk_identity=COMPAT_PSK_IDENTITY, psk_key=KEY,
               ciphers=ciphers)


def anonymous_python_client(address: str) -> bytes:
    """TLS 1.2 offering only anonymous suites; returns what it read (b"" when refused)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(ANON)
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw) as tls:
                tls.sendall(b"anonymous hello\n")
                got = b""
                while len(got) < len(SECRET) and (data := tls.recv(4096)):
                    got += data
                return got
        except (ssl.SSLError, OSError):
            return b""


def s_client(address: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["openssl", "s_client", "-connect", address, "-quiet", "-tls1_2", *args],
                          input=b"client line\n", capture_output=True, timeout=20, check=False)


def assert_nothing_crossed(engine: EngineBase, route_id: str, target: StreamServer, failures: int) -> None:
    def stats() -> RouteStats:
        return engine.stats(route_id).routes[route_id]

    assert wait_for(lambda: stats().errors.get("tls_handshake", 0) >= failures, 10), stats()
    assert wait_for(lambda: stats().connections_active == 0, 10), stats()
    assert stats().bytes_to_target == 0 and stats().bytes_from_target == 0, stats()
    for s in target.served:
        s.done.wait(15)
        assert s.results.get("got", b"") == b"", "a byte of the anonymous client reached the target"


@needs_openssl
@pytest.mark.parametrize("ciphers", CALLER_LISTS, ids=["default", "eNULL", "ALL"])
def test_compat_listener_refuses_anonymous_client(make_native_engine: Callable[..., EngineBase],
                                                  stream_server: ServerFactory, ciphers: str) -> None:
    engine = make_native_engine()
    target = secret_target(stream_server, SECRET)
    tls = compat(TlsRole.SERVER, ciphers)
    info = engine.add_route(Route("in", "127.0.0.1:0", (target.address,), tls=tls))
    assert anonymous_python_client(info.bound) == b""
    anon = s_client(info.bound, "-cipher", ANON)
    assert SECRET not in anon.stdout
    assert_nothing_crossed(engine, "in", target, failures=2)
    # Positive control: with this very cipher list the 1.x PSK client gets the bytes, so
    # the refusals above are the anonymous suite's, not a listener that refuses everyone.
    ok = s_client(info.bound, "-cipher", "PSK:@SECLEVEL=0", "-psk", KEY.hex(),
                  "-psk_identity", COMPAT_PSK_IDENTITY)
    assert SECRET in ok.stdout, ok.stderr.decode(errors="replace")


class AnonymousServer(RecordingTlsServer):
    """A TLS 1.2 server with no certificate and only anonymous suites, recording what it
    reads after a handshake (the bytes a compat client would leak to an impostor)."""

    def __init__(self, stream_server: ServerFactory) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(ANON)
        # the greeting, so a client that trusted it sees a byte
        super().__init__(stream_server, ctx, b"impostor speaking\n", timeout=15, one_line=False,
                         read_timeout=2)


@pytest.mark.parametrize("ciphers", CALLER_LISTS, ids=["default", "eNULL", "ALL"])
def test_compat_client_refuses_anonymous_server(make_native_engine: Callable[..., EngineBase],
                                                stream_server: ServerFactory, ciphers: str) -> None:
    engine = make_native_engine()
    rogue = AnonymousServer(stream_server)
    info = engine.add_route(Route("out", "127.0.0.1:0", (rogue.server.address,),
                                  tls=compat(TlsRole.CLIENT, ciphers)))
    with connect(info.bound) as app:
        app.settimeout(10)
        try:
            app.sendall(b"consumer data for the real producer gateway only\n")
            assert app.recv(4096) == b"", "the compat client route trusted an anonymous server"
        except (ConnectionResetError, BrokenPipeError):
            pass
    route = engine.stats("out").routes["out"]
    assert wait_for(lambda: engine.stats("out").routes["out"].errors.get("tls_handshake", 0) >= 1, 10), route
    assert wait_for(lambda: engine.stats("out").routes["out"].connections_active == 0, 10)
    served = rogue.server.wait_served(1, timeout=15)
    assert rogue.handshakes == 0
    assert served[0].results.get("got", b"") == b""
    assert engine.stats("out").routes["out"].bytes_to_target == 0


@pytest.mark.parametrize("ciphers", CALLER_LISTS, ids=["default", "eNULL", "ALL"])
@pytest.mark.parametrize("role", [TlsRole.SERVER, TlsRole.CLIENT])
def test_pure_engine_refuses_compat_routes(make_engine: Callable[..., EngineBase], engine_impl: str,
                                           role: TlsRole, ciphers: str) -> None:
    if engine_impl != "pure":
        pytest.skip("the native engine's compat mode is covered above")
    engine = make_engine()
    with pytest.raises(EngineError):
        engine.add_route(Route("c", "127.0.0.1:0", ("127.0.0.1:9",), tls=compat(role, ciphers)))
    assert engine.routes() == []
