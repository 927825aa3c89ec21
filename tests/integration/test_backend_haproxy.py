"""The HAProxy backend with real HAProxy pairs: plain and certificate TLS, counters, supervision, cleanup."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from proxy_harness import (
    check_duplex,
    check_kill_detected,
    check_port_in_use,
    check_refused,
    check_removed,
    check_untrusted_server_is_refused,
    check_wan_leg_is_tls13_only,
    make_certs,
    running_pair,
)

pytestmark = [
    pytest.mark.haproxy,
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed"),
    pytest.mark.timeout(120),
]


def test_plain_pair_moves_exact_bytes_counts_them_and_cleans_up(tmp_path: Path) -> None:
    with running_pair("haproxy", "plain", tmp_path) as pair:
        check_duplex(pair, big=128 << 20)
        usage = pair.run(pair.prod.usage(pair.uid))
        assert usage.bytes_to_target == (128 << 20) + (1 << 20)  # type: ignore[attr-defined]
        assert usage.bytes_from_target == (128 << 20) + (1 << 20)  # type: ignore[attr-defined]
        assert usage.connections_total == 2  # type: ignore[attr-defined]
        check_removed(pair)


def test_tls_pair_with_operator_certificates(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "pki")
    with running_pair("haproxy", "tls", tmp_path, prod_extra=certs.extra(), cons_extra=certs.extra()) as pair:
        check_duplex(pair, big=64 << 20)
        check_wan_leg_is_tls13_only(pair)
        session_dir = Path(pair.prod.options.state_dir) / "sessions" / pair.uid
        assert (session_dir / "gateway.pem").stat().st_mode & 0o777 == 0o600
        check_removed(pair)


def test_tls_without_certificates_is_refused(tmp_path: Path) -> None:
    check_refused("haproxy", tmp_path / "p", "tls", "PROD", "configure tls_cert and tls_key")
    check_refused("haproxy", tmp_path / "c", "tls", "CONS", "configure tls_ca")


def test_compat_mode_is_refused(tmp_path: Path) -> None:
    check_refused("haproxy", tmp_path, "compat", "PROD", "1.x interop mode needs the stunnel or native")


def test_killed_child_is_detected(tmp_path: Path) -> None:
    with running_pair("haproxy", "plain", tmp_path, routes=1) as pair:
        check_kill_detected(pair)


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    check_port_in_use("haproxy", tmp_path)


def test_drain_remove_stops_an_idle_session(tmp_path: Path) -> None:
    with running_pair("haproxy", "plain", tmp_path, routes=1) as pair:
        pid = pair.prod.child_pid(pair.uid)  # type: ignore[attr-defined]
        pair.run(pair.prod.remove(pair.uid, drain=True))
        from proxy_harness import pid_gone

        assert pid_gone(pid)


def test_cons_refuses_an_unverifiable_prod_certificate(tmp_path: Path) -> None:
    check_untrusted_server_is_refused("haproxy", tmp_path)
