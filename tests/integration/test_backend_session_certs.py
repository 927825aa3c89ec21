"""HAProxy and nginx with the per-session certificates a PROD s2cs mints (no operator PKI).

Real proxy pairs: exact bytes both ways over mutual TLS 1.3 with pinned
self-signed certificates; a client holding another session's certificate, or
none, gets nothing from the PROD listener; the key files exist only 0600 in
the session directory while the session runs and are gone after remove, after
a failed start, and after a restart that finds them left behind.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
from proxy_harness import (
    PROXY_KINDS,
    check_duplex,
    check_port_in_use,
    check_removed,
    check_wan_leg_is_tls13_only,
    make_backend,
    running_pair,
)

from scistream.certs import SessionCredentials, mint_session_credentials
from scistream.s2cs.backends.supervisor import OWNER_FILE

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=PROXY_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


def tls_read(listener: str, creds: SessionCredentials | None) -> bytes:
    """What a direct TLS client of the PROD listener reads, presenting ``creds``' client
    certificate (or none)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if creds is not None:
        with tempfile.TemporaryDirectory() as d:
            cert, key = Path(d) / "c.crt", Path(d) / "c.key"
            cert.write_bytes(creds.client_cert)
            key.write_bytes(creds.client_key)
            ctx.load_cert_chain(str(cert), str(key))
    host, port = listener.rsplit(":", 1)
    got = b""
    try:
        with socket.create_connection((host, int(port)), timeout=10) as raw, ctx.wrap_socket(raw) as tls:
            tls.sendall(b"x" * 16)
            while len(got) < 1 << 16 and (chunk := tls.recv(65536)):
                got += chunk
    except (ssl.SSLError, OSError):
        pass
    return got


def test_minted_certificates_carry_exact_bytes_and_pin_the_peer(kind: str, tmp_path: Path) -> None:
    creds = mint_session_credentials("sess-minted")
    # The PROD backend gets the whole bundle, the CONS side what the requester carries.
    with running_pair(kind, "tls", tmp_path, routes=2, uid="sess-minted", key=creds.encode()) as pair:
        cons_key = creds.for_consumer().encode()
        cons_plan = pair.cons._sessions[pair.uid].plan  # type: ignore[attr-defined]
        pair.run(pair.cons.apply(replace(cons_plan, psk_key=cons_key)))
        check_duplex(pair, big=32 << 20)
        check_wan_leg_is_tls13_only(pair)
        prod_dir = Path(pair.prod.options.state_dir) / "sessions" / pair.uid
        cons_dir = Path(pair.cons.options.state_dir) / "sessions" / pair.uid
        for d in (prod_dir, cons_dir):
            keys = [p for p in d.iterdir() if p.name.startswith("own.")]
            assert keys and all(p.stat().st_mode & 0o777 == 0o600 for p in keys)
        # The CONS side never holds the listener's key.
        assert creds.server_key not in b"".join(p.read_bytes() for p in cons_dir.iterdir() if p.is_file())
        before = pair.servers[0].accepted
        assert tls_read(pair.prod_endpoints[0], None) == b""
        assert tls_read(pair.prod_endpoints[0], mint_session_credentials("other-session")) == b""
        assert pair.servers[0].accepted == before, "a client without the session certificate got through"
        # Positive control: the same client with the session's certificate reads the producer.
        assert len(tls_read(pair.prod_endpoints[0], creds)) > 0
        check_removed(pair)


def test_minted_key_files_go_when_the_proxy_fails_to_start(kind: str, tmp_path: Path) -> None:
    check_port_in_use(kind, tmp_path, security="tls", key=mint_session_credentials("busy").encode())


def test_minted_key_files_left_by_a_killed_s2cs_are_swept_at_start(kind: str, tmp_path: Path) -> None:
    stale = tmp_path / "sessions" / "sess-gone"
    stale.mkdir(parents=True)
    (stale / OWNER_FILE).write_text(kind + "\n")
    (stale / "own.key").write_bytes(mint_session_credentials("sess-gone").client_key)
    backend = make_backend(kind, tmp_path)
    asyncio.run(backend.start())
    assert not stale.exists()
