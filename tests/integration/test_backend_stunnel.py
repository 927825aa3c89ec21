"""The stunnel backend with real stunnel pairs: TLS 1.3 PSK, 1.x interop, supervision, cleanup."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from proxy_harness import check_duplex, check_removed, free_port, make_backend, pid_gone, plans, running_pair
from streams import DuplexServer, duplex_transfer, pattern_digest, wait_for

from scistream.s2cs.backends.base import BackendError, RoutePlan, SessionPlan

STUNNEL = shutil.which("stunnel4") or shutil.which("stunnel")
pytestmark = [
    pytest.mark.stunnel,
    pytest.mark.skipif(STUNNEL is None, reason="stunnel4 is not installed"),
    pytest.mark.timeout(120),
]


@pytest.mark.parametrize("security", ["tls", "compat"])
def test_pair_moves_exact_bytes_both_ways_and_remove_cleans_up(
    tmp_path: Path, security: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with running_pair("stunnel", security, tmp_path) as pair:  # type: ignore[arg-type]
        session_dir = Path(pair.prod.options.state_dir) / "sessions" / pair.uid
        assert session_dir.stat().st_mode & 0o777 == 0o700
        for f in session_dir.iterdir():
            assert f.stat().st_mode & 0o777 == 0o600, f
        check_duplex(pair, big=64 << 20)
        assert pair.run(pair.prod.running_sessions()) == {pair.uid}
        log = (session_dir / "proxy.log").read_text()
        key = (session_dir / "psk.txt").read_text().split(":", 1)[1].strip()
        assert key not in log
        check_removed(pair)
    assert key not in caplog.text and bytes.fromhex(key).hex() not in caplog.text


def test_apply_is_idempotent_and_replaces_a_changed_plan(tmp_path: Path) -> None:
    with running_pair("stunnel", "tls", tmp_path, routes=1) as pair:
        pid = pair.prod.child_pid(pair.uid)  # type: ignore[attr-defined]
        plan = pair.prod._sessions[pair.uid].plan  # type: ignore[attr-defined]
        pair.run(pair.prod.apply(plan))
        assert pair.prod.child_pid(pair.uid) == pid  # type: ignore[attr-defined]
        other = DuplexServer(send_bytes=4096, seed=55)
        try:
            route = RoutePlan(plan.routes[0].route_id, plan.routes[0].listen, other.address)
            moved = SessionPlan(plan.uid, plan.role, (route,), plan.security, plan.psk_identity, plan.psk_key)
            pair.run(pair.prod.apply(moved))
            assert pid_gone(pid)
            _, got = duplex_transfer(pair.client_endpoints[0], send_bytes=4096, seed=3)
            assert got == (4096, pattern_digest(4096, 55))
        finally:
            other.close()


def test_wrong_key_reaches_nothing(tmp_path: Path) -> None:
    server = DuplexServer(send_bytes=4096, seed=1)
    runner = asyncio.Runner()
    prod = make_backend("stunnel", tmp_path / "p")
    cons = make_backend("stunnel", tmp_path / "c")
    try:
        prod_plan, cons_plan, _, cons_eps = plans(
            "k1", "tls", [server.address], key=os.urandom(32).hex().encode(), identity="k1"
        )
        wrong = SessionPlan("k1", "CONS", cons_plan.routes, "tls", "k1", os.urandom(32).hex().encode())
        runner.run(prod.apply(prod_plan))
        runner.run(cons.apply(wrong))
        try:
            _, (n, _) = duplex_transfer(cons_eps[0], send_bytes=4096, seed=2, timeout=10, check_send=False)
        except ConnectionError:
            n = 0
        assert n == 0
        assert server.accepted == 0, "a client with the wrong key reached the producer"
    finally:
        runner.run(cons.close())
        runner.run(prod.close())
        runner.close()
        server.close()


def _s_client(args: list[str], data: bytes = b"hello\n") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["openssl", "s_client", "-quiet", "-no_ign_eof", *args],
        input=data,
        capture_output=True,
        timeout=15,
        check=False,
    )


def test_compat_listener_refuses_anonymous_null_cipher(tmp_path: Path) -> None:
    """1.x's ``ciphers = eNULL`` let anyone in with AECDH-NULL-SHA; compat mode must not."""
    probe = ["-tls1_2", "-cipher", "AECDH-NULL-SHA:@SECLEVEL=0"]
    with running_pair("stunnel", "compat", tmp_path, routes=1) as pair:
        listener = pair.prod_endpoints[0]
        result = _s_client([*probe, "-connect", listener])
        assert result.returncode != 0
        assert pair.servers[0].accepted == 0, "an anonymous client reached the producer"
    # The probe itself works: a 1.x-style stunnel (ciphers = eNULL) lets it through.
    server = DuplexServer(send_bytes=16, seed=9)
    port = free_port()
    conf = tmp_path / "legacy.conf"
    conf.write_text(
        textwrap.dedent(f"""\
        foreground = yes
        pid =
        [legacy]
        accept = 127.0.0.1:{port}
        connect = {server.address}
        ciphers = eNULL
        sslVersionMax = TLSv1.2
        PSKsecrets = {tmp_path / "legacy.psk"}
        securityLevel = 0
        """)
    )
    (tmp_path / "legacy.psk").write_text("client1:" + "ab" * 16 + "\n")
    legacy = subprocess.Popen(
        [STUNNEL or "stunnel", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        assert wait_for(lambda: _port_open(port), 10)
        result = _s_client([*probe, "-connect", f"127.0.0.1:{port}"])
        assert wait_for(lambda: server.accepted == 1, 5), result.stderr.decode()[-500:]
    finally:
        legacy.terminate()
        legacy.wait(10)
        server.close()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_compat_interoperates_with_a_1x_stunnel(tmp_path: Path) -> None:
    """Our compat CONS against a 1.x-configured PROD stunnel (eNULL, client1, uid key).

    They agree on a PSK suite (PSK-NULL-SHA256), never the anonymous one."""
    uid = "4f8583bc-a4d3-11ee-9fd6-034d1fcbd7c3"
    key = uid.replace("-", "")
    server = DuplexServer(send_bytes=1 << 20, seed=4)
    port = free_port()
    (tmp_path / "legacy.psk").write_text(f"client1:{key}\n")
    conf = tmp_path / "legacy.conf"
    conf.write_text(
        textwrap.dedent(f"""\
        foreground = yes
        pid =
        debug = 6
        [legacy]
        accept = 127.0.0.1:{port}
        connect = {server.address}
        ciphers = eNULL
        sslVersionMax = TLSv1.2
        PSKsecrets = {tmp_path / "legacy.psk"}
        securityLevel = 0
        """)
    )
    legacy_log = tmp_path / "legacy.log"
    with legacy_log.open("wb") as logf:
        legacy = subprocess.Popen([STUNNEL or "stunnel", str(conf)], stdout=logf, stderr=subprocess.STDOUT)
    runner = asyncio.Runner()
    cons = make_backend("stunnel", tmp_path / "c")
    try:
        assert wait_for(lambda: _port_open(port), 10)
        cport = free_port()
        plan = SessionPlan(
            uid,
            "CONS",
            (RoutePlan(uid + "/0", f"127.0.0.1:{cport}", f"127.0.0.1:{port}"),),
            "compat",
            "client1",
            key.encode(),
        )
        runner.run(cons.apply(plan))
        _, got = duplex_transfer(f"127.0.0.1:{cport}", send_bytes=1 << 20, seed=5)
        assert got == (1 << 20, pattern_digest(1 << 20, 4))
        assert wait_for(lambda: server.received == [(1 << 20, pattern_digest(1 << 20, 5))], 5)
        negotiated = [line for line in legacy_log.read_text().splitlines() if "ciphersuite" in line]
        assert negotiated and all("PSK" in line and "AECDH" not in line for line in negotiated), negotiated
    finally:
        runner.run(cons.close())
        runner.close()
        legacy.terminate()
        legacy.wait(10)
        server.close()


def test_killed_child_is_detected_and_reported(tmp_path: Path) -> None:
    with running_pair("stunnel", "tls", tmp_path, routes=1) as pair:
        failures: list[tuple[str, str]] = []
        pair.prod.on_session_failed = lambda uid, msg: failures.append((uid, msg))  # type: ignore[attr-defined]
        pid = pair.prod.child_pid(pair.uid)  # type: ignore[attr-defined]
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: pid_gone(pid), 5), "the killed stunnel was not reaped"
        assert wait_for(lambda: not pair.run(pair.prod.running_sessions()), 5)
        error = pair.prod.session_error(pair.uid)  # type: ignore[attr-defined]
        assert error and "exited unexpectedly" in error
        assert failures and failures[0][0] == pair.uid
        usage = pair.run(pair.prod.usage(pair.uid))
        assert usage.errors.get("proxy_exited") == 1  # type: ignore[attr-defined]
        pair.run(pair.prod.remove(pair.uid))
        assert not (Path(pair.prod.options.state_dir) / "sessions" / pair.uid).exists()


def test_port_in_use_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    runner = asyncio.Runner()
    backend = make_backend("stunnel", tmp_path)
    try:
        plan = SessionPlan(
            "busy",
            "PROD",
            (RoutePlan("busy/0", f"127.0.0.1:{port}", "127.0.0.1:9"),),
            "tls",
            "busy",
            os.urandom(32).hex().encode(),
        )
        with pytest.raises(BackendError) as err:
            runner.run(backend.apply(plan))
        assert "stunnel for session busy failed to start" in str(err.value)
        assert str(port) in str(err.value) or "bind" in str(err.value).lower()
        assert runner.run(backend.running_sessions()) == set()
        assert not (tmp_path / "sessions" / "busy").exists()
    finally:
        runner.run(backend.close())
        runner.close()
        blocker.close()


_ORPHAN_SCRIPT = """
import asyncio, os, sys
from proxy_harness import make_backend
from scistream.s2cs.backends.base import RoutePlan, SessionPlan
from pathlib import Path
async def main():
    b = make_backend("stunnel", Path(sys.argv[1]))
    await b.apply(SessionPlan("orph", "PROD", (RoutePlan("orph/0", sys.argv[2], "127.0.0.1:9"),),
                              "tls", "orph", os.urandom(32).hex().encode()))
    print(b.child_pid("orph"), flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""


def test_child_dies_with_a_killed_s2cs(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: kill -9 of the controlling process leaves no orphan proxy."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), *sys.path]))
    host = subprocess.Popen(
        [sys.executable, "-c", _ORPHAN_SCRIPT, str(tmp_path), f"127.0.0.1:{free_port()}"],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert host.stdout is not None
        line = host.stdout.readline()
        assert line.strip().isdigit(), "the host process did not start a session"
        child = int(line)
        assert not pid_gone(child)
        host.kill()
        host.wait(10)
        assert wait_for(lambda: pid_gone(child), 10), "stunnel survived the death of its s2cs"
    finally:
        if host.poll() is None:
            host.kill()
            host.wait(10)


def test_tls_listener_speaks_tls13_with_exactly_the_plan_key_bytes(tmp_path: Path) -> None:
    """A client holding the raw key bytes (as the native engine does) gets in by TLS 1.3, not TLS 1.2."""
    key = os.urandom(32)
    with running_pair("stunnel", "tls", tmp_path, routes=1, key=key, identity="sess-ident") as pair:
        listener = pair.prod_endpoints[0]
        pair.servers[0].send_bytes = 16
        ok = _s_client(
            [
                "-tls1_3",
                "-psk_identity",
                "sess-ident",
                "-psk",
                key.hex(),
                "-ciphersuites",
                "TLS_AES_128_GCM_SHA256",
                "-connect",
                listener,
            ]
        )
        assert wait_for(lambda: pair.servers[0].accepted == 1, 5), ok.stderr.decode()[-500:]
        old = _s_client(
            [
                "-tls1_2",
                "-cipher",
                "PSK",
                "-psk_identity",
                "sess-ident",
                "-psk",
                key.hex(),
                "-connect",
                listener,
            ]
        )
        assert old.returncode != 0
        assert pair.servers[0].accepted == 1, "a TLS 1.2 client reached the producer of a tls session"


def test_start_removes_what_a_killed_s2cs_left_and_nothing_else(tmp_path: Path) -> None:
    stale = tmp_path / "sessions" / "old-session"
    stale.mkdir(parents=True)
    (stale / ".proxy-backend").write_text("stunnel\n")
    (stale / "psk.txt").write_text("old:" + "00" * 32)
    foreign = tmp_path / "sessions" / "native-session"
    foreign.mkdir()
    (foreign / "state").write_text("not ours")
    runner = asyncio.Runner()
    backend = make_backend("stunnel", tmp_path)
    try:
        runner.run(backend.start())
        assert not stale.exists()
        assert (foreign / "state").read_text() == "not ours"
    finally:
        runner.run(backend.close())
        runner.close()


def test_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    runner = asyncio.Runner()
    backend = make_backend("stunnel", tmp_path, {"stunnel_bin": "/nonexistent/stunnel"})
    try:
        with pytest.raises(BackendError, match="not found; install the stunnel4 package"):
            runner.run(backend.start())
    finally:
        runner.run(backend.close())
        runner.close()
