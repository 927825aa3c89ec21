"""The nginx backend with real nginx pairs: plain and certificate TLS, counters, supervision, cleanup."""

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

from scistream.s2cs.backends.nginx import DEFAULT_STREAM_MODULE

pytestmark = [
    pytest.mark.skipif(
        shutil.which("nginx") is None or not Path(DEFAULT_STREAM_MODULE).exists(),
        reason="nginx or its stream module (libnginx-mod-stream) is not installed",
    ),
    pytest.mark.timeout(120),
]


def test_plain_pair_moves_exact_bytes_and_cleans_up(tmp_path: Path) -> None:
    with running_pair("nginx", "plain", tmp_path) as pair:
        check_duplex(pair, big=128 << 20)
        session_dir = Path(pair.prod.options.state_dir) / "sessions" / pair.uid
        assert {p.name for p in session_dir.iterdir()} <= {
            ".proxy-backend",
            "nginx.conf",
            "nginx.pid",
            "proxy.log",
        }
        check_removed(pair)


def test_tls_pair_with_operator_certificates(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "pki")
    with running_pair("nginx", "tls", tmp_path, prod_extra=certs.extra(), cons_extra=certs.extra()) as pair:
        check_duplex(pair, big=64 << 20)
        check_wan_leg_is_tls13_only(pair)
        check_removed(pair)


def test_tls_without_certificates_is_refused(tmp_path: Path) -> None:
    check_refused("nginx", tmp_path / "p", "tls", "PROD", "configure tls_cert and tls_key")
    check_refused("nginx", tmp_path / "c", "tls", "CONS", "configure tls_ca")


def test_compat_mode_is_refused(tmp_path: Path) -> None:
    check_refused("nginx", tmp_path, "compat", "PROD", "1.x interop mode needs the stunnel or native")


def test_killed_child_is_detected(tmp_path: Path) -> None:
    """SIGKILL of the nginx master: its worker (same process group) is swept too, freeing the ports."""
    with running_pair("nginx", "plain", tmp_path, routes=1) as pair:
        check_kill_detected(pair)


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    check_port_in_use("nginx", tmp_path)


def test_drain_remove_stops_an_idle_session(tmp_path: Path) -> None:
    with running_pair("nginx", "plain", tmp_path, routes=1) as pair:
        pid = pair.prod.child_pid(pair.uid)  # type: ignore[attr-defined]
        pair.run(pair.prod.remove(pair.uid, drain=True))
        from proxy_harness import pid_gone

        assert pid_gone(pid)


def test_cons_refuses_an_unverifiable_prod_certificate(tmp_path: Path) -> None:
    check_untrusted_server_is_refused("nginx", tmp_path)
