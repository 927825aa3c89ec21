"""Config renderers of the subprocess backends: the security-relevant lines, refusals, and no secrets."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scistream.s2cs.backends.base import BackendError, RoutePlan, SessionPlan
from scistream.s2cs.backends.haproxy import parse_show_stat
from scistream.s2cs.backends.proxyconf import (
    CertFiles,
    check_uid,
    haproxy_config,
    nginx_config,
    render_psk_key,
    stunnel_config,
    stunnel_psk_file,
)
from scistream.s2cs.backends.supervisor import failure_reason, last_log_line

KEY = bytes(range(32))
UID = "4f8583bc-a4d3-11ee-9fd6-034d1fcbd7c3"
ROUTES = (
    RoutePlan(f"{UID}/0", "10.0.0.1:5100", "192.168.1.5:5074"),
    RoutePlan(f"{UID}/1", "10.0.0.1:5101", "192.168.1.5:5075"),
)
CERTS = CertFiles(
    cert="/etc/gw/cert.pem",
    key="/etc/gw/key.pem",
    ca="/etc/gw/ca.pem",
    server_name="gw.example.org",
    combined_pem="/state/sessions/x/gateway.pem",
)


def plan(
    role: str = "PROD", security: str = "tls", *, key: bytes = KEY, identity: str = UID, rate: int = 0
) -> SessionPlan:
    return SessionPlan(UID, role, ROUTES, security, identity, key, rate)  # type: ignore[arg-type]


def directives(text: str, section: str) -> dict[str, str]:
    """key = value lines of one [section] of a stunnel config."""
    out: dict[str, str] = {}
    current = ""
    for line in text.splitlines():
        if line.startswith("["):
            current = line.strip("[]")
        elif "=" in line and current == section:
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


# -- stunnel ---------------------------------------------------------------------------------


def test_stunnel_prod_tls_is_a_tls13_psk_server_with_sha256_suites() -> None:
    text = stunnel_config(plan("PROD"), psk_file="/s/psk.txt")
    assert "foreground = yes" in text
    for i, route in enumerate(ROUTES):
        d = directives(text, f"r{i}")
        assert d["accept"] == route.listen and d["connect"] == route.target
        assert d["client"] == "no"
        assert d["sslVersionMin"] == "TLSv1.3"
        assert "SHA384" not in d["ciphersuites"] and "TLS_AES_128_GCM_SHA256" in d["ciphersuites"]
        assert d["PSKsecrets"] == "/s/psk.txt"
        assert "PSKidentity" not in d
        assert int(d["TIMEOUTidle"]) >= 24 * 3600  # 1.x cut idle streams after 50 s
    assert KEY.hex() not in text


def test_stunnel_cons_tls_is_the_client_with_the_session_identity() -> None:
    d = directives(stunnel_config(plan("CONS"), psk_file="/s/psk.txt"), "r1")
    assert d["client"] == "yes" and d["PSKidentity"] == UID and d["connect"] == ROUTES[1].target


def test_stunnel_compat_offers_psk_suites_only_never_anonymous() -> None:
    d = directives(stunnel_config(plan("CONS", "compat", identity="client1"), psk_file="/p"), "r0")
    assert d["sslVersionMax"] == "TLSv1.2" and d["PSKidentity"] == "client1"
    suites = d["ciphers"].split(":")
    assert suites and all("PSK" in s for s in suites)
    assert not any(bad in d["ciphers"] for bad in ("aNULL", "eNULL", "AECDH", "ADH", "ALL", "DEFAULT"))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_stunnel_compat_cipher_list_expands_to_psk_authenticated_suites_only() -> None:
    d = directives(stunnel_config(plan("PROD", "compat", identity="client1"), psk_file="/p"), "r0")
    out = subprocess.run(
        ["openssl", "ciphers", "-v", d["ciphers"] + ":@SECLEVEL=0"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout.splitlines()
    out = [line for line in out if "TLSv1.3" not in line]  # compat caps the version at TLS 1.2
    assert out and all("Au=PSK" in line for line in out), out
    assert any(line.startswith("PSK-NULL-SHA256 ") for line in out)


def test_stunnel_refuses_plain_sessions() -> None:
    with pytest.raises(BackendError, match="plain"):
        stunnel_config(plan("PROD", "plain", key=b"", identity=""), psk_file="/p")


def test_psk_file_holds_the_key_bytes_as_hex() -> None:
    assert stunnel_psk_file(plan()) == f"{UID}:{KEY.hex()}\n"


@given(st.binary(min_size=16, max_size=64))
def test_tls_key_text_decodes_to_exactly_the_key_bytes(key: bytes) -> None:
    # stunnel decodes an all-hex key text, so this is the key it uses.
    assert bytes.fromhex(render_psk_key(key)) == key


def test_compat_uid_key_is_written_as_1x_writes_it() -> None:
    uid_key = UID.replace("-", "").encode()
    assert render_psk_key(uid_key, compat=True) == UID.replace("-", "")
    assert render_psk_key(bytes.fromhex(uid_key.decode()), compat=True) == UID.replace("-", "")


def test_short_keys_and_bad_identities_are_refused() -> None:
    with pytest.raises(BackendError, match="16 bytes"):
        render_psk_key(b"\x01" * 15)
    with pytest.raises(BackendError, match="identity"):
        stunnel_psk_file(plan(identity="a:b"))
    with pytest.raises(BackendError, match="identity"):
        stunnel_psk_file(plan(identity=""))


@pytest.mark.parametrize("uid", ["", "../etc", "a/b", ".hidden", "a b", "x\n[r9]"])
def test_unsafe_uids_are_refused(uid: str) -> None:
    with pytest.raises(BackendError):
        check_uid(uid)


# -- HAProxy ---------------------------------------------------------------------------------


def test_haproxy_plain_is_tcp_with_forced_splice_and_no_idle_cut() -> None:
    text = haproxy_config(plan("PROD", "plain", key=b"", identity=""), stats_socket="stats.sock")
    for line in (
        "mode tcp",
        "option splice-request",
        "option splice-response",
        "tune.pipesize 1048576",
        "stats socket unix@stats.sock mode 600",
    ):
        assert line in text
    timeouts = {
        line.split()[1]: line.split()[2] for line in text.splitlines() if line.strip().startswith("timeout")
    }
    assert int(timeouts["client"].rstrip("s")) >= 24 * 3600
    assert int(timeouts["server"].rstrip("s")) >= 24 * 3600
    assert "bind 10.0.0.1:5100\n" in text and "server t1 192.168.1.5:5075\n" in text
    legs = [line for line in text.splitlines() if line.strip().startswith(("bind", "server"))]
    assert legs and not any(" ssl" in line for line in legs)


def test_haproxy_tls_prod_binds_tls13_with_the_operator_certificate() -> None:
    text = haproxy_config(plan("PROD"), stats_socket="s", certs=CERTS)
    assert (
        "bind 10.0.0.1:5100 ssl crt /state/sessions/x/gateway.pem ssl-min-ver TLSv1.3 "
        "ca-file /etc/gw/ca.pem verify required" in text
    )
    assert KEY.hex() not in text


def test_haproxy_tls_cons_verifies_the_prod_certificate() -> None:
    text = haproxy_config(plan("CONS"), stats_socket="s", certs=CERTS)
    line = next(line for line in text.splitlines() if line.strip().startswith("server t0"))
    assert "ssl ssl-min-ver TLSv1.3 verify required ca-file /etc/gw/ca.pem" in line
    assert "verifyhost gw.example.org" in line


def test_haproxy_refuses_compat_and_certificate_less_tls() -> None:
    with pytest.raises(BackendError, match=r"1\.x interop mode needs the stunnel or native backend"):
        haproxy_config(plan("PROD", "compat"), stats_socket="s")
    with pytest.raises(BackendError, match="tls_cert and tls_key"):
        haproxy_config(plan("PROD"), stats_socket="s")
    with pytest.raises(BackendError, match="tls_ca"):
        haproxy_config(plan("CONS"), stats_socket="s", certs=CertFiles(cert="c", key="k"))


def test_show_stat_sums_frontends() -> None:
    csv_text = (
        "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout\n"
        "r0,FRONTEND,,,1,2,100,3,1000,2000\n"
        "t0,t0,0,0,1,2,,3,1000,2000\n"
        "t0,BACKEND,0,0,1,2,,3,1000,2000\n"
        "r1,FRONTEND,,,0,1,100,1,10,20\n"
    )
    usage = parse_show_stat(csv_text)
    assert (usage.bytes_to_target, usage.bytes_from_target) == (1010, 2020)
    assert (usage.connections_active, usage.connections_total) == (1, 4)


# -- nginx -----------------------------------------------------------------------------------


def test_nginx_plain_runs_in_the_foreground_under_the_session_dir() -> None:
    text = nginx_config(
        plan("PROD", "plain", key=b"", identity=""),
        pid_file="/s/nginx.pid",
        stream_module="/usr/lib/nginx/modules/ngx_stream_module.so",
    )
    for line in (
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;",
        "daemon off;",
        "pid /s/nginx.pid;",
        "error_log stderr notice;",
        "proxy_buffer_size 1m;",
        "listen 10.0.0.1:5101 so_keepalive=on;",
        "proxy_pass 192.168.1.5:5075;",
        "proxy_half_close on;",
    ):
        assert line in text
    timeout = next(line for line in text.splitlines() if "proxy_timeout" in line)
    assert int(timeout.split()[1].rstrip("s;")) >= 24 * 3600
    assert "ssl" not in text and "_rate" not in text


def test_nginx_enforces_the_session_rate_per_connection() -> None:
    text = nginx_config(
        plan("PROD", "plain", key=b"", identity="", rate=10_000_000), pid_file="p", stream_module=""
    )
    assert "proxy_upload_rate 5000000;" in text and "proxy_download_rate 5000000;" in text


def test_nginx_tls_both_sides() -> None:
    prod = nginx_config(plan("PROD"), pid_file="p", stream_module="", certs=CERTS)
    assert "listen 10.0.0.1:5100 ssl so_keepalive=on;" in prod
    assert "ssl_protocols TLSv1.3;" in prod and "ssl_verify_client on;" in prod
    cons = nginx_config(plan("CONS"), pid_file="p", stream_module="", certs=CERTS)
    for line in (
        "proxy_ssl on;",
        "proxy_ssl_protocols TLSv1.3;",
        "proxy_ssl_verify on;",
        "proxy_ssl_trusted_certificate /etc/gw/ca.pem;",
        "proxy_ssl_name gw.example.org;",
    ):
        assert line in cons
    with pytest.raises(BackendError, match=r"1\.x interop"):
        nginx_config(plan("CONS", "compat"), pid_file="p", stream_module="")


def test_ipv6_endpoints_are_written_in_each_proxys_syntax() -> None:
    p6 = SessionPlan("v6", "PROD", (RoutePlan("v6/0", "[::1]:5100", "[::1]:5074"),), "plain")
    assert "bind ipv6@::1:5100" in haproxy_config(p6, stats_socket="s")
    n = nginx_config(p6, pid_file="p", stream_module="")
    assert "listen [::1]:5100 so_keepalive=on;" in n and "proxy_pass [::1]:5074;" in n


# -- log reading -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("log", "reason"),
    [
        (
            "[.] Reading configuration\n"
            "[.] Binding service [r0] to 127.0.0.1:5100: Address already in use (98)\n"
            "[!] Binding service [r0] failed\n[ ] Initializing inetd mode configuration\n",
            "Binding service [r0] to 127.0.0.1:5100: Address already in use (98)",
        ),
        (
            "[NOTICE]   (1) : haproxy version is 2.6\n"
            "[ALERT]    (1) : Binding [x:7] for frontend r0: cannot bind "
            "socket (Address already in use) for [127.0.0.1:5100]\n[ALERT]    (1) : Exiting.\n",
            "Binding [x:7] for frontend r0: cannot bind socket (Address already in use) for [127.0.0.1:5100]",
        ),
        (
            "2026/11/23 11:00:01 [emerg] 5#5: bind() to 127.0.0.1:5100 failed (98: Address already in use)\n",
            "bind() to 127.0.0.1:5100 failed (98: Address already in use)",
        ),
    ],
)
def test_failure_reason_is_the_proxys_first_error_line(tmp_path: Path, log: str, reason: str) -> None:
    path = tmp_path / "proxy.log"
    path.write_text(log)
    assert failure_reason(path) == reason
    assert last_log_line(path) in log.strip().splitlines()[-1]


def test_log_readers_tolerate_a_missing_log(tmp_path: Path) -> None:
    assert failure_reason(tmp_path / "nope") == "" and last_log_line(tmp_path / "nope") == ""
