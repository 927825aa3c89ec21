"""Fixtures of the data-plane suite: every test runs on both engines.

``engine`` / ``make_engine`` are parametrized over the pure and the native
engine. The native one is skipped when it is not built, except under
SCISTREAM_REQUIRE_NATIVE=1 (CI), where a missing native engine fails.
Every engine a test creates is checked at teardown: connections back to zero,
and once its routes are removed, every resource count back to its baseline.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from streams import Served, StreamServer, wait_for

from scistream.dataplane import Engine, EngineBase, ResourceCounts, Tuning, native_available


def _counts_match(now: ResourceCounts, base: ResourceCounts) -> bool:
    for name in ("fds", "pipes", "ssl_objects", "connections"):
        a, b = getattr(now, name), getattr(base, name)
        if a != -1 and b != -1 and a != b:
            return False
    return True


@pytest.fixture(params=["pure", "native"])
def engine_impl(request: pytest.FixtureRequest) -> str:
    impl: str = request.param
    if impl == "native" and not native_available():
        if os.environ.get("SCISTREAM_REQUIRE_NATIVE") == "1":
            pytest.fail("SCISTREAM_REQUIRE_NATIVE=1 but the native engine is not built")
        pytest.skip("the native engine is not built (no C compiler or libssl-dev at install time)")
    return impl


@pytest.fixture
def native_impl() -> str:
    """For tests that only the native engine can run (TLS PSK)."""
    if not native_available():
        if os.environ.get("SCISTREAM_REQUIRE_NATIVE") == "1":
            pytest.fail("SCISTREAM_REQUIRE_NATIVE=1 but the native engine is not built")
        pytest.skip("the native engine is not built; TLS PSK needs it")
    return "native"


def _check_and_close(eng: EngineBase, base: ResourceCounts) -> None:
    try:
        active = wait_for(lambda: all(r.connections_active == 0 for r in eng.stats().routes.values()), 10)
        assert active, f"connections still active at teardown: {eng.stats()}"
        for info in eng.routes():
            eng.remove_route(info.route.route_id)
        counts = wait_for(lambda: _counts_match(eng.resource_counts(), base), 10)
        assert counts, f"resources not back to baseline: {eng.resource_counts()} vs {base}"
    finally:
        eng.close()


@pytest.fixture
def make_engine(engine_impl: str) -> Iterator[Callable[..., EngineBase]]:
    """Factory: ``make_engine(tuning=None, impl=None)``; each engine is checked and closed at teardown."""
    made: list[tuple[EngineBase, ResourceCounts]] = []

    def factory(tuning: Tuning | None = None, impl: str | None = None) -> EngineBase:
        eng = Engine(tuning, impl=impl or engine_impl)
        made.append((eng, eng.resource_counts()))
        return eng

    yield factory
    errors = []
    for eng, base in made:
        try:
            _check_and_close(eng, base)
        except AssertionError as exc:
            errors.append(str(exc))
    assert not errors, "; ".join(errors)


@pytest.fixture
def engine(make_engine: Callable[..., EngineBase]) -> EngineBase:
    return make_engine()


@pytest.fixture
def make_native_engine(native_impl: str) -> Iterator[Callable[..., EngineBase]]:
    made: list[tuple[EngineBase, ResourceCounts]] = []

    def factory(tuning: Tuning | None = None) -> EngineBase:
        eng = Engine(tuning, impl=native_impl)
        made.append((eng, eng.resource_counts()))
        return eng

    yield factory
    for eng, base in made:
        _check_and_close(eng, base)


@pytest.fixture
def stream_server() -> Iterator[Callable[..., StreamServer]]:
    servers: list[StreamServer] = []

    def factory(handler: Callable[[socket.socket, Served], None], host: str = "127.0.0.1") -> StreamServer:
        s = StreamServer(handler, host)
        servers.append(s)
        return s

    yield factory
    for s in servers:
        s.close()


@dataclass(frozen=True)
class CertSet:
    ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertSet:
    """A CA and a server certificate for 127.0.0.1, ::1 and localhost (EC P-256)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out = tmp_path_factory.mktemp("certs")
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "scistream test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    paths = CertSet(out / "ca.pem", out / "server.pem", out / "server.key")
    paths.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.cert.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    paths.key.chmod(0o600)
    return paths
