"""The HAProxy and nginx backends with real proxy pairs: plain and certificate TLS, counters,
supervision, cleanup.

Both run the same checks of proxy_harness; each test runs once per kind, skipped where that
proxy is not installed (nginx also needs its stream module). The HAProxy cases carry the
``haproxy`` marker.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from proxy_harness import (
    PROXY_KINDS,
    check_duplex,
    check_kill_detected,
    check_port_in_use,
    check_refused,
    check_removed,
    check_untrusted_server_is_refused,
    check_wan_leg_is_tls13_only,
    make_certs,
    pid_gone,
    running_pair,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=PROXY_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    """The backend kind under test: "haproxy" or "nginx"."""
    value: str = request.param
    return value


def test_plain_pair_moves_exact_bytes_and_cleans_up(kind: str, tmp_path: Path) -> None:
    with running_pair(kind, "plain", tmp_path) as pair:
        check_duplex(pair, big=128 << 20)
        if kind == "haproxy":
            # HAProxy's counters: both routes' bytes each way, one connection per route.
            usage = pair.run(pair.prod.usage(pair.uid))
            assert usage.bytes_to_target == (128 << 20) + (1 << 20)  # type: ignore[attr-defined]
            assert usage.bytes_from_target == (128 << 20) + (1 << 20)  # type: ignore[attr-defined]
            assert usage.connections_total == 2  # type: ignore[attr-defined]
        else:
            session_dir = Path(pair.prod.options.state_dir) / "sessions" / pair.uid
            assert {p.name for p in session_dir.iterdir()} <= {
                ".proxy-backend",
                "nginx.conf",
                "nginx.pid",
                "proxy.log",
            }
        check_removed(pair)


def test_tls_pair_with_operator_certificates(kind: str, tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "pki")
    with running_pair(kind, "tls", tmp_path, prod_extra=certs.extra(), cons_extra=certs.extra()) as pair:
        check_duplex(pair, big=64 << 20)
        check_wan_leg_is_tls13_only(pair)
        if kind == "haproxy":
            # HAProxy reads certificate and key from one combined file, which holds the key.
            session_dir = Path(pair.prod.options.state_dir) / "sessions" / pair.uid
            assert (session_dir / "gateway.pem").stat().st_mode & 0o777 == 0o600
        check_removed(pair)


def test_tls_without_certificates_is_refused(kind: str, tmp_path: Path) -> None:
    check_refused(kind, tmp_path / "p", "tls", "PROD", "configure tls_cert and tls_key")
    check_refused(kind, tmp_path / "c", "tls", "CONS", "configure tls_ca")


def test_compat_mode_is_refused(kind: str, tmp_path: Path) -> None:
    check_refused(kind, tmp_path, "compat", "PROD", "1.x interop mode needs the stunnel or native")


def test_killed_child_is_detected(kind: str, tmp_path: Path) -> None:
    """SIGKILL of the proxy (for nginx, its master: the worker, in the same process group, is
    swept too, freeing the ports)."""
    with running_pair(kind, "plain", tmp_path, routes=1) as pair:
        check_kill_detected(pair)


def test_port_in_use_is_a_clear_error(kind: str, tmp_path: Path) -> None:
    check_port_in_use(kind, tmp_path)


def test_drain_remove_stops_an_idle_session(kind: str, tmp_path: Path) -> None:
    with running_pair(kind, "plain", tmp_path, routes=1) as pair:
        pid = pair.prod.child_pid(pair.uid)  # type: ignore[attr-defined]
        pair.run(pair.prod.remove(pair.uid, drain=True))
        assert pid_gone(pid)


def test_cons_refuses_an_unverifiable_prod_certificate(kind: str, tmp_path: Path) -> None:
    check_untrusted_server_is_refused(kind, tmp_path)
