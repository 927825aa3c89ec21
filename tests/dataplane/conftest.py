"""Fixtures of the data-plane suite: every test runs on both engines.

``engine`` / ``make_engine`` are parametrized over the pure and the native
engine. The native one is skipped when it is not built, except under
SCISTREAM_REQUIRE_NATIVE=1 (CI), where a missing native engine fails.
Every engine a test creates is checked at teardown: connections back to zero,
and once its routes are removed, every resource count back to its baseline.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from streams import Served, StreamServer, wait_for

from scistream.certs import make_ca_and_leaf
from scistream.dataplane import Engine, EngineBase, ResourceCounts, Tuning, native_available


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
        counts = wait_for(lambda: eng.resource_counts() == base, 10)
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
    made = make_ca_and_leaf(
        tmp_path_factory.mktemp("certs"), ["127.0.0.1", "::1"], ["localhost"], common_name="localhost", days=1
    )
    return CertSet(made.ca_cert, made.cert, made.key)
