"""Interop with Debian's stunnel4 on the TLS leg, in both directions: our TLS client route
to a stunnel PSK server, and a stunnel client to our TLS server route.

Modes: ``secure`` (TLS 1.3 external PSK, TLS_AES_128_GCM_SHA256), ``compat`` (what a
SciStream 1.x gateway runs: TLS <= 1.2, identity client1, key = the uid without dashes,
``ciphers = PSK``) and ``compat-enull`` (the 1.x config's literal ``ciphers = eNULL`` with
``securityLevel = 0``, which against us can only agree on PSK-NULL-SHA256). The PSK bytes
are the text of the PSKsecrets line, or the bytes it spells when it is all hex digits
(stunnel 5.68 decodes it).

The transfers count bytes rather than half-closing mid-way: stunnel 5.68 (like HAProxy
2.6) can drop the tail of one direction when the other half-closes during a saturating
two-way transfer. Half-close through our own engine is tested in test_failures.py.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dputil import ServerFactory, check_duplex, duplex_server, run_duplex_clients, size
from streams import MiB, wait_bound

from scistream.dataplane import (
    COMPAT_PSK_IDENTITY,
    EngineBase,
    Route,
    Tls,
    TlsMode,
    TlsRole,
    compat_key_from_uid,
)
from scistream.dataplane.api import psk_key_from_text

pytestmark = [
    pytest.mark.stunnel,
    pytest.mark.skipif(shutil.which("stunnel") is None, reason="needs stunnel4 (Debian package stunnel4)"),
]

UID = "4f8583bc-a4d3-11ee-9fd6-034d1fcbd7c3"
SECURE_IDENTITY = "scistream-test"
SECURE_KEY = "a-pre-shared-key-of-32-characters"


def stunnel_conf(tmp: Path, *, client: bool, accept: int, connect: str, mode: str) -> Path:
    identity, key = ((SECURE_IDENTITY, SECURE_KEY) if mode == "secure"
                     else (COMPAT_PSK_IDENTITY, UID.replace("-", "")))
    secrets = tmp / "psk.txt"
    secrets.write_text(f"{identity}:{key}\n")
    secrets.chmod(0o600)
    lines = ["foreground = yes", "pid =", "debug = 4", "", "[data]",
             f"accept = 127.0.0.1:{accept}", f"connect = {connect}", f"PSKsecrets = {secrets}"]
    if client:
        lines += ["client = yes", f"PSKidentity = {identity}"]
    if mode == "secure":
        lines += ["sslVersionMin = TLSv1.3", "ciphersuites = TLS_AES_128_GCM_SHA256"]
    else:
        lines += ["sslVersionMax = TLSv1.2"]
        # OpenSSL 3 hides NULL suites below security level 0, so a 1.x eNULL config needs it.
        lines += ["ciphers = PSK"] if mode == "compat" else ["ciphers = eNULL", "securityLevel = 0"]
    conf = tmp / ("client.conf" if client else "server.conf")
    conf.write_text("\n".join(lines) + "\n")
    return conf


def our_tls(role: TlsRole, mode: str) -> Tls:
    if mode == "secure":
        return Tls(role=role, mode=TlsMode.PSK, psk_identity=SECURE_IDENTITY,
                   psk_key=psk_key_from_text(SECURE_KEY))
    return Tls(role=role, mode=TlsMode.COMPAT, psk_identity=COMPAT_PSK_IDENTITY,
               psk_key=compat_key_from_uid(UID))


MODES = ["secure", "compat", "compat-enull"]


@pytest.mark.parametrize("mode", MODES)
def test_our_client_to_stunnel_server(make_native_engine: Callable[..., EngineBase],
                                      stream_server: ServerFactory, spawn: Any, free_port: Any,
                                      tmp_path: Path, mode: str) -> None:
    engine = make_native_engine()
    per_conn = size(32 * MiB, 4 * MiB)
    server = duplex_server(stream_server, per_conn, half_close=False)
    port = free_port()
    conf = stunnel_conf(tmp_path, client=False, accept=port, connect=server.address, mode=mode)
    proc = spawn(["stunnel", str(conf)], stdout=(tmp_path / "stunnel.log").open("w"), stderr=-2)
    wait_bound(port, proc)
    tls = our_tls(TlsRole.CLIENT, mode)
    info = engine.add_route(Route("out", "127.0.0.1:0", (f"127.0.0.1:{port}",), tls=tls))
    check_duplex(server, run_duplex_clients(info.bound, 2, per_conn, half_close=False), per_conn)
    assert engine.stats("out").routes["out"].errors.get("tls_handshake", 0) == 0


@pytest.mark.parametrize("mode", MODES)
def test_stunnel_client_to_our_server(make_native_engine: Callable[..., EngineBase],
                                      stream_server: ServerFactory, spawn: Any, free_port: Any,
                                      tmp_path: Path, mode: str) -> None:
    engine = make_native_engine()
    per_conn = size(32 * MiB, 4 * MiB)
    server = duplex_server(stream_server, per_conn, half_close=False)
    info = engine.add_route(Route("in", "127.0.0.1:0", (server.address,), tls=our_tls(TlsRole.SERVER, mode)))
    port = free_port()
    conf = stunnel_conf(tmp_path, client=True, accept=port, connect=info.bound, mode=mode)
    proc = spawn(["stunnel", str(conf)], stdout=(tmp_path / "stunnel.log").open("w"), stderr=-2)
    wait_bound(port, proc)
    check_duplex(server, run_duplex_clients(f"127.0.0.1:{port}", 2, per_conn, half_close=False), per_conn)
    assert engine.stats("in").routes["in"].errors.get("tls_handshake", 0) == 0
