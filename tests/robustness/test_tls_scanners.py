"""RELIABILITY 20: a TLS scanner (sslscan from Debian) finds nothing medium or worse on our TLS
listeners: the data plane's TLS 1.3 PSK mode (the default), its certificate mode (both
engines), its 1.x compat mode, and s2cs's TLS gRPC control port.

"Medium or worse" (tlsprobe.findings): SSLv2/SSLv3/TLS 1.0/TLS 1.1 accepted; a NULL, EXPORT,
RC4, DES, 3DES or anonymous suite, or one under 128 bits or rated below strong by sslscan;
DHE under 2048 bits, ECDHE under 224 bits or a group under 112 bits of security; heartbleed;
insecure renegotiation; compression; a certificate signed with MD5/SHA-1, an RSA key under
2048 bits, or expired.

sslscan cannot speak PSK, so against the PSK listeners it shows what a scanner without the key
gets (nothing at all in PSK mode); a raw ClientHello probe (tlsprobe) then lists exactly which
suites each listener picks at SSLv3..TLS 1.2. The compat mode is the one documented exception
(PROTOCOL.md): TLS 1.2 and the four PSK suites a SciStream 1.x stunnel can agree on, among
them PSK-NULL-SHA256 (authenticated, not encrypted) and never an anonymous suite.
A positive control shows the scanner and the reading of its report do flag a weak server.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import ssl
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dputil import EchoLoop, cert_tls, psk_tls
from rbutil import short_connections
from s2cs_support import FakeBackend, ServerThread, make_config
from tlsprobe import (
    ANON_SUITES,
    SSLV3,
    TLS10,
    TLS11,
    TLS12,
    Scan,
    accepted_suites,
    findings,
    run_sslscan,
    server_choice,
)

from scistream.dataplane import (
    COMPAT_PSK_IDENTITY,
    EngineBase,
    Route,
    TlsMode,
    TlsRole,
    compat_key_from_uid,
)

log = logging.getLogger(__name__)

pytestmark = pytest.mark.skipif(
    shutil.which("sslscan") is None, reason="needs sslscan (Debian package sslscan; ./dev installs it)"
)

#: What the compat mode must accept, and nothing more: TLS 1.2 with the PSK suites of
#: COMPAT_TLS12_CIPHERS (ECDHE-PSK-AES128-CBC-SHA256, PSK-AES128-GCM-SHA256,
#: PSK-AES256-GCM-SHA384, PSK-NULL-SHA256).
COMPAT_SUITES = {0xC037, 0x00A8, 0x00A9, 0x00B0}
UID = "4f8583bc-a4d3-11ee-9fd6-034d1fcbd7c3"


def tls_listener(engine: EngineBase, tls: Any, target: str) -> str:
    """A TLS server route in front of ``target`` (reached only after a full handshake)."""
    return engine.add_route(Route("scanned", "127.0.0.1:0", (target,), tls=tls)).bound


def key_holder_gets_through(engine: EngineBase, address: str, client_tls: Any) -> None:
    """The listener is live: a client with the key (a TLS client route) gets its bytes echoed."""
    front = engine.add_route(Route("key-holder", "127.0.0.1:0", (address,), tls=client_tls)).bound
    assert short_connections(front, 3) == 3 * 8


def old_versions_refused(address: str) -> None:
    for version in (SSLV3, TLS10, TLS11):
        assert accepted_suites(address, version) == set(), f"{version:#06x} accepted"


def report(what: str, scan: Scan) -> None:
    log.info(
        "sslscan %s: protocols %s; ciphers %s; groups %s",
        what,
        sorted(scan.enabled()),
        [f"{c.version} {c.name}" for c in scan.ciphers],
        [f"{v} {n}" for v, n, _ in scan.groups],
    )


@pytest.fixture
def weak_server(certs: Any) -> Iterator[str]:
    """Positive control: a TLS server that accepts TLS 1.0 and every suite OpenSSL still has."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(certs.cert), str(certs.key))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0 is what this server is for
        ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ALL:COMPLEMENTOFALL:@SECLEVEL=0")
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.settimeout(0.2)
    stop = threading.Event()

    def handshake(conn: socket.socket) -> None:
        conn.settimeout(5)
        with contextlib.suppress(OSError), conn, ctx.wrap_socket(conn, server_side=True):
            pass

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=handshake, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"127.0.0.1:{lsock.getsockname()[1]}"
    stop.set()
    thread.join(5)
    lsock.close()


def test_scanner_flags_a_weak_server(weak_server: str, tmp_path: Path) -> None:
    scan = run_sslscan(weak_server, tmp_path)
    found = findings(scan)
    log.info("weak server: %s", found)
    assert "TLSv1.0 enabled" in found and "TLSv1.1 enabled" in found
    assert "TLSv1.2 AECDH-NULL-SHA (0 bits, null)" in found
    # The raw probe sees the same: TLS 1.0, and an anonymous suite.
    assert accepted_suites(weak_server, TLS10)
    assert server_choice(weak_server, TLS12, ANON_SUITES) is not None


def test_psk_listener(make_native_engine: Callable[..., EngineBase], echo: EchoLoop, tmp_path: Path) -> None:
    engine = make_native_engine()
    address = tls_listener(engine, psk_tls(TlsRole.SERVER), echo.address)
    scan = run_sslscan(address, tmp_path)
    report("TLS 1.3 PSK listener", scan)
    assert findings(scan) == []
    # Without the key a scanner gets no handshake at all: no certificate, no suite, no version.
    assert scan.enabled() == set() and not scan.ciphers and not scan.certificates
    old_versions_refused(address)
    assert accepted_suites(address, TLS12) == set()
    assert engine.stats("scanned").routes["scanned"].errors.get("tls_handshake", 0) > 0, (
        "the scanner never reached the listener"
    )
    key_holder_gets_through(engine, address, psk_tls(TlsRole.CLIENT))


def test_compat_listener(
    make_native_engine: Callable[..., EngineBase], echo: EchoLoop, tmp_path: Path
) -> None:
    engine = make_native_engine()
    tls = psk_tls(TlsRole.SERVER, compat_key_from_uid(UID), TlsMode.COMPAT, COMPAT_PSK_IDENTITY)
    address = tls_listener(engine, tls, echo.address)
    scan = run_sslscan(address, tmp_path)
    report("compat listener", scan)
    assert findings(scan) == []
    assert scan.enabled() == {"TLSv1.2"}
    old_versions_refused(address)
    assert accepted_suites(address, TLS12) == COMPAT_SUITES
    # The 1.x hole stays closed: AECDH-NULL-SHA and every other anonymous suite are refused.
    assert server_choice(address, TLS12, ANON_SUITES) is None
    key_holder_gets_through(
        engine,
        address,
        psk_tls(TlsRole.CLIENT, compat_key_from_uid(UID), TlsMode.COMPAT, COMPAT_PSK_IDENTITY),
    )


def test_cert_listener(
    make_engine: Callable[..., EngineBase], engine_impl: str, certs: Any, echo: EchoLoop, tmp_path: Path
) -> None:
    engine = make_engine()
    address = tls_listener(engine, cert_tls(TlsRole.SERVER, certs), echo.address)
    scan = run_sslscan(address, tmp_path)
    report(f"{engine_impl} certificate listener", scan)
    assert findings(scan) == []
    assert scan.enabled() == {"TLSv1.3"}
    assert {c.name for c in scan.ciphers} <= {
        "TLS_AES_128_GCM_SHA256",
        "TLS_AES_256_GCM_SHA384",
        "TLS_CHACHA20_POLY1305_SHA256",
    }
    old_versions_refused(address)
    assert accepted_suites(address, TLS12) == set()


def test_s2cs_control_port(tmp_path: Path, certs: Any) -> None:
    cfg = make_config(tmp_path, ssl=True, server_crt=str(certs.cert), server_key=str(certs.key))
    st = ServerThread(cfg, FakeBackend())
    try:
        scan = run_sslscan(st.address, tmp_path)
        report("s2cs control port", scan)
        assert findings(scan) == []
        assert scan.enabled() <= {"TLSv1.2", "TLSv1.3"} and "TLSv1.3" in scan.enabled()
        old_versions_refused(st.address)
        # The raw probe (which also offers PSK and anonymous suites) agrees with sslscan.
        tls12 = accepted_suites(st.address, TLS12)
        assert tls12 == {c.id for c in scan.ciphers if c.version == "TLSv1.2"}
        assert server_choice(st.address, TLS12, ANON_SUITES) is None
    finally:
        st.stop()
