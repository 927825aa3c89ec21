"""Data-leg authentication (RELIABILITY 11) and TLS 1.3 key update (RELIABILITY 21).

A wrong key, an anonymous AECDH client, TLS 1.2 against a 1.3-only listener and garbage
bytes: no byte is forwarded either way and each failure is counted as tls_handshake.
Positive controls with the same client tools show the refusals are not vacuous.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
from dputil import (
    ServerFactory,
    cert_tls,
    check_duplex,
    duplex_server,
    outcome,
    psk_tls,
    run_duplex_clients,
    size,
    tls_pair,
)
from streams import MiB, Served, StreamServer, connect, wait_for

from scistream.dataplane import (
    COMPAT_PSK_IDENTITY,
    EngineBase,
    InvalidRoute,
    Route,
    Tls,
    TlsMode,
    TlsRole,
    Tuning,
    compat_key_from_uid,
)

SECRET = b"target-secret-must-not-leak"
UID = "4f8583bc-a4d3-11ee-9fd6-034d1fcbd7c3"
KEY = b"0123456789abcdef0123456789abcdef"
IDENTITY = "scistream"

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def recording_target(stream_server: ServerFactory) -> StreamServer:
    """A target that speaks first (so a leak towards the client would show) and records
    every byte it receives."""

    def handler(sock: socket.socket, served: Served) -> None:
        sock.settimeout(15)
        served.results["got"] = b""
        try:
            sock.sendall(SECRET)
            # Until EOF, or the first line (s_client -quiet never closes by itself).
            while data := sock.recv(65536):
                served.results["got"] += data
                if b"\n" in data:
                    break
        except OSError as exc:
            served.results["error"] = repr(exc)

    return stream_server(handler)


def assert_refused(engine: EngineBase, route_id: str, target: StreamServer) -> None:
    assert wait_for(lambda: engine.stats(route_id).routes[route_id].errors.get("tls_handshake", 0) >= 1), \
        engine.stats(route_id)
    assert wait_for(lambda: engine.stats(route_id).routes[route_id].connections_active == 0, 10)
    st = engine.stats(route_id).routes[route_id]
    assert st.bytes_to_target == 0 and st.bytes_from_target == 0, st
    for s in target.served:
        s.done.wait(15)
        assert s.results.get("got", b"") == b"", "a byte reached the target"


def s_client(address: str, *args: str, stdin: bytes = b"GET-SOMETHING\n",
             ) -> subprocess.CompletedProcess[bytes]:
    host, _, port = address.rpartition(":")
    return subprocess.run(["openssl", "s_client", "-connect", f"{host}:{port}", "-quiet", *args],
                          input=stdin, capture_output=True, timeout=20, check=False)


@pytest.mark.parametrize("mode", [TlsMode.PSK, TlsMode.COMPAT])
def test_wrong_psk_refused(make_native_engine: Callable[..., EngineBase],
                           stream_server: ServerFactory, mode: TlsMode) -> None:
    engine = make_native_engine()
    target = recording_target(stream_server)
    identity = IDENTITY if mode is TlsMode.PSK else COMPAT_PSK_IDENTITY
    bound = tls_pair(engine, target.address,
                     psk_tls(TlsRole.CLIENT, key=b"w" * 32, mode=mode, identity=identity),
                     psk_tls(TlsRole.SERVER, key=KEY, mode=mode, identity=identity))
    with connect(bound) as c:
        c.sendall(b"payload that must not reach the target")
        assert outcome(c, timeout=10) in ("eof", "reset"), "the client got data through a wrong key"
    assert_refused(engine, "tls-in", target)
    assert engine.stats("tls-out").routes["tls-out"].errors.get("tls_handshake", 0) >= 1


@pytest.mark.parametrize("mode", ["psk", "compat", "cert"])
def test_garbage_refused(engine_impl: str, make_engine: Callable[..., EngineBase],
                         stream_server: ServerFactory, certs: Any, mode: str) -> None:
    if mode != "cert" and engine_impl != "native":
        pytest.skip("TLS PSK needs the native engine")
    engine = make_engine()
    target = recording_target(stream_server)
    tls = {"psk": psk_tls(TlsRole.SERVER, key=KEY),
           "compat": psk_tls(TlsRole.SERVER, key=compat_key_from_uid(UID), mode=TlsMode.COMPAT,
                             identity=COMPAT_PSK_IDENTITY),
           "cert": cert_tls(TlsRole.SERVER, certs)}[mode]
    info = engine.add_route(Route("in", "127.0.0.1:0", (target.address,), tls=tls))
    for junk in (os.urandom(4096), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x00\x05hello"):
        with connect(info.bound) as c:
            c.sendall(junk)
            c.shutdown(socket.SHUT_WR)
            c.settimeout(10)
            data = b""
            try:
                while chunk := c.recv(65536):
                    data += chunk
            except ConnectionResetError:
                pass
            assert SECRET not in data
    assert_refused(engine, "in", target)
    assert engine.stats("in").routes["in"].errors["tls_handshake"] == 3


@needs_openssl
def test_tls12_client_refused_by_psk_listener(make_native_engine: Callable[..., EngineBase],
                                              stream_server: ServerFactory) -> None:
    engine = make_native_engine()
    target = recording_target(stream_server)
    tls = psk_tls(TlsRole.SERVER, key=KEY)
    info = engine.add_route(Route("in", "127.0.0.1:0", (target.address,), tls=tls))
    # Positive control: the same tool with TLS 1.3 and the right key gets through.
    ok = s_client(info.bound, "-tls1_3", "-psk", KEY.hex(), "-psk_identity", IDENTITY,
                  "-ciphersuites", "TLS_AES_128_GCM_SHA256")
    assert SECRET in ok.stdout, ok.stderr.decode(errors="replace")
    assert wait_for(lambda: engine.stats("in").routes["in"].connections_active == 0, 10)
    before = engine.stats("in").routes["in"]
    target.served.clear()
    bad = s_client(info.bound, "-tls1_2", "-psk", KEY.hex(), "-psk_identity", IDENTITY,
                   "-cipher", "PSK:@SECLEVEL=0")
    assert SECRET not in bad.stdout
    assert bad.returncode != 0
    assert wait_for(lambda: engine.stats("in").routes["in"].errors.get("tls_handshake", 0) >= 1)
    after = engine.stats("in").routes["in"]
    assert after.bytes_to_target == before.bytes_to_target
    assert after.bytes_from_target == before.bytes_from_target
    for s in target.served:
        assert s.results.get("got", b"") == b""


def test_tls12_client_refused_by_cert_listener(engine: EngineBase, stream_server: ServerFactory,
                                              certs: Any) -> None:
    target = recording_target(stream_server)
    tls = cert_tls(TlsRole.SERVER, certs)
    info = engine.add_route(Route("in", "127.0.0.1:0", (target.address,), tls=tls))
    host, _, port = info.bound.rpartition(":")
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection((host, int(port)), timeout=10) as raw, pytest.raises(ssl.SSLError):
        ctx.wrap_socket(raw, server_hostname=host)
    assert_refused(engine, "in", target)
    # Positive control: TLS 1.3 with the pinned CA works and reaches the target.
    ctx13 = ssl.create_default_context(cafile=str(certs.ca))
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            ctx13.wrap_socket(raw, server_hostname=host) as tls:
        assert tls.version() == "TLSv1.3"
        got = b""
        while len(got) < len(SECRET):
            got += tls.recv(64)
        assert got == SECRET


@needs_openssl
def test_anonymous_client_refused_in_compat_mode(make_native_engine: Callable[..., EngineBase],
                                                 stream_server: ServerFactory) -> None:
    """A 1.x gateway lets an AECDH-NULL-SHA client in; our 1.x interop mode must not."""
    engine = make_native_engine()
    target = recording_target(stream_server)
    key = compat_key_from_uid(UID)
    tls = psk_tls(TlsRole.SERVER, key=key, mode=TlsMode.COMPAT, identity=COMPAT_PSK_IDENTITY)
    info = engine.add_route(Route("in", "127.0.0.1:0", (target.address,), tls=tls))
    anon = s_client(info.bound, "-tls1_2", "-cipher", "AECDH-NULL-SHA:aNULL:@SECLEVEL=0")
    assert SECRET not in anon.stdout
    assert_refused(engine, "in", target)
    # Positive control: the same tool with the 1.x PSK gets through.
    ok = s_client(info.bound, "-tls1_2", "-cipher", "PSK:@SECLEVEL=0", "-psk", key.hex(),
                  "-psk_identity", COMPAT_PSK_IDENTITY)
    assert SECRET in ok.stdout, ok.stderr.decode(errors="replace")


@needs_openssl
@pytest.mark.parametrize("mode", [TlsMode.PSK, TlsMode.COMPAT])
def test_psk_client_refuses_a_certificate_server(make_native_engine: Callable[..., EngineBase],
                                                 spawn: Any, free_port: Any, certs: Any, tmp_path: Any,
                                                 mode: TlsMode) -> None:
    """A server that does not know the key may ignore the PSK and authenticate with a
    certificate instead (any certificate: it is not checked in PSK mode). Our PSK client must
    end such a handshake: no byte of the stream may reach that server."""
    engine = make_native_engine()
    port = free_port()
    out = tmp_path / "s_server.out"
    version = ["-tls1_3"] if mode is TlsMode.PSK else ["-tls1_2", "-cipher", "ALL:@SECLEVEL=0"]
    with out.open("wb") as sink:
        server = spawn(["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(certs.cert),
                        "-key", str(certs.key), "-quiet", *version], stdin=subprocess.PIPE, stdout=sink,
                       stderr=subprocess.STDOUT)
    assert wait_for(lambda: _listening(port) or server.poll() is not None, 10) and server.poll() is None
    identity = IDENTITY if mode is TlsMode.PSK else COMPAT_PSK_IDENTITY
    key = KEY if mode is TlsMode.PSK else compat_key_from_uid(UID)
    info = engine.add_route(Route("out", "127.0.0.1:0", (f"127.0.0.1:{port}",),
                                  tls=psk_tls(TlsRole.CLIENT, key=key, mode=mode, identity=identity)))
    with connect(info.bound) as c:
        c.sendall(SECRET + b"\n")
        assert outcome(c, timeout=10) in ("eof", "reset")
    assert wait_for(lambda: engine.stats("out").routes["out"].errors.get("tls_handshake", 0) >= 1, 10)
    assert SECRET not in out.read_bytes()
    # Positive control: the same server takes a client that accepts any certificate.
    s_client(f"127.0.0.1:{port}", *version, "-no_ign_eof", stdin=b"control-line\n")
    assert wait_for(lambda: b"control-line" in out.read_bytes(), 10), out.read_bytes()[-500:]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def test_psk_mode_refuses_suites_without_sha256(make_native_engine: Callable[..., EngineBase]) -> None:
    """The PSK is bound to SHA-256: a suite list with no SHA-256 suite can never carry it."""
    engine = make_native_engine()
    sha384_only = Tls(role=TlsRole.SERVER, mode=TlsMode.PSK, psk_identity=IDENTITY, psk_key=KEY,
                      ciphers="TLS_AES_256_GCM_SHA384")
    with pytest.raises(InvalidRoute, match="SHA-256"):
        engine.add_route(Route("sha384", "127.0.0.1:0", ("127.0.0.1:9",), tls=sha384_only))


@pytest.mark.slow
def test_tls13_key_update_keeps_bytes_exact(make_native_engine: Callable[..., EngineBase],
                                            stream_server: ServerFactory) -> None:
    engine = make_native_engine(Tuning(tls_key_update_bytes=1 * MiB))
    per_conn = size(128 * MiB, 16 * MiB)
    server = duplex_server(stream_server, per_conn)
    bound = tls_pair(engine, server.address, psk_tls(TlsRole.CLIENT), psk_tls(TlsRole.SERVER))
    check_duplex(server, run_duplex_clients(bound, 2, per_conn), per_conn)
    for rid in ("tls-in", "tls-out"):
        assert engine.stats(rid).routes[rid].errors.get("io", 0) == 0


def _kernel_has_tls_ulp() -> bool:
    try:
        with open("/proc/sys/net/ipv4/tcp_available_ulp") as f:
            return "tls" in f.read().split()
    except OSError:
        return False


def test_kernel_tls_detected_or_user_space_fallback(make_native_engine: Callable[..., EngineBase],
                                                    stream_server: ServerFactory,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """With no key update due (tls_key_update_bytes 0) the engine asks for kernel TLS: it
    probes the kernel once, says what it found, and moves the bytes exactly either way. On a
    kernel without CONFIG_TLS (this CI VM) that is the user-space fallback (gather BIO)."""
    caplog.set_level("INFO", logger="scistream.dataplane.native")
    engine = make_native_engine(Tuning(tls_key_update_bytes=0))
    per_conn = size(32 * MiB, 4 * MiB)
    server = duplex_server(stream_server, per_conn)
    bound = tls_pair(engine, server.address, psk_tls(TlsRole.CLIENT), psk_tls(TlsRole.SERVER))
    check_duplex(server, run_duplex_clients(bound, 2, per_conn), per_conn)
    engine.stats()  # drains the engine's log into logging
    lines = [r.getMessage() for r in caplog.records if "kernel TLS" in r.getMessage()]
    assert len(lines) == 2, lines  # one per TLS route
    if not _kernel_has_tls_ulp():
        assert all("not available" in line for line in lines), lines
