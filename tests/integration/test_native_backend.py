"""The native backend against a real s2ds it spawns: apply / usage / remove, restarts, TLS pairs."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from s2ds_support import S2DS, Daemon, echo_roundtrip, echo_server, need_native, refused
from streams import MiB, connect, wait_for

from scistream.dataplane import compat_key_from_uid
from scistream.s2cs.backends import create_backend
from scistream.s2cs.backends.base import BackendError, BackendOptions, RoutePlan, SessionPlan
from scistream.s2cs.backends.native import NativeBackend, stop_spawned_s2ds


@pytest.fixture
def state_dirs() -> Iterator[list[Path]]:
    """Two s2cs state dirs (two gateway nodes); every s2ds spawned in them is stopped by pid."""
    dirs = [Path(tempfile.mkdtemp(prefix="s2cs-")) for _ in range(2)]
    try:
        yield dirs
    finally:
        for d in dirs:
            stop_spawned_s2ds(str(d))
            shutil.rmtree(d, ignore_errors=True)


def free_ports(n: int) -> list[int]:
    socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(n)]
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def options(state: Path, **kw: object) -> BackendOptions:
    return BackendOptions(state_dir=str(state), listener_ip="127.0.0.1", **kw)  # type: ignore[arg-type]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_apply_usage_restart_remove(state_dirs: list[Path]) -> None:
    state = state_dirs[0]
    uid = str(uuid.uuid4())
    with echo_server() as e1, echo_server() as e2:
        p0, p1 = free_ports(2)
        plan = SessionPlan(
            uid=uid,
            role="PROD",
            security="plain",
            routes=(
                RoutePlan(f"{uid}/0", f"127.0.0.1:{p0}", e1.address),
                RoutePlan(f"{uid}/1", f"127.0.0.1:{p1}", e2.address),
            ),
        )

        async def first_life() -> int:
            b = create_backend("Native", options(state))
            assert isinstance(b, NativeBackend)
            await b.start()
            pid = int((state / "s2ds.pid").read_text())
            assert (state / "s2ds.pid").stat().st_mode & 0o777 == 0o600
            await b.apply(plan)
            for port in (p0, p1):
                sent, got, n = await asyncio.to_thread(echo_roundtrip, f"127.0.0.1:{port}", MiB + port % 7)
                assert (got, n) == (sent, MiB + port % 7)
            usage = await b.usage(uid)
            expected = 2 * MiB + p0 % 7 + p1 % 7
            assert usage.bytes_to_target == expected and usage.connections_total == 2
            assert await b.running_sessions() == {uid}

            # A stream held open survives re-applying the same plan (nothing is recreated).
            held = connect(f"127.0.0.1:{p0}")
            held.sendall(b"a")
            assert held.recv(1) == b"a"
            await b.apply(plan)
            usage = await b.usage(uid)
            assert usage.connections_active == 1 and len(usage.connections) == 1
            assert usage.connections[0].listener == f"127.0.0.1:{p0}"
            held.sendall(b"b")
            assert held.recv(1) == b"b"

            # Only the target changed: the route is retargeted, the held stream keeps going.
            moved = SessionPlan(
                uid=uid,
                role="PROD",
                security="plain",
                routes=(RoutePlan(f"{uid}/0", f"127.0.0.1:{p0}", e2.address), plan.routes[1]),
            )
            before = e2.accepted
            await b.apply(moved)
            sent, got, _ = await asyncio.to_thread(echo_roundtrip, f"127.0.0.1:{p0}", 1000)
            assert got == sent and e2.accepted == before + 1
            held.sendall(b"c")
            assert held.recv(1) == b"c"
            held.close()

            # One route fewer: the dropped one stops listening.
            await b.apply(SessionPlan(uid=uid, role="PROD", security="plain", routes=moved.routes[:1]))
            assert await asyncio.to_thread(refused, f"127.0.0.1:{p1}")
            await b.close()  # leaves s2ds (and the session) running
            return pid

        pid = asyncio.run(first_life())
        assert pid_alive(pid)
        sent, got, _ = echo_roundtrip(f"127.0.0.1:{p0}", 4096)  # streams outlive the control server
        assert got == sent

        async def second_life() -> None:
            b = NativeBackend(options(state))
            await b.start()  # finds the running daemon instead of spawning one
            assert int((state / "s2ds.pid").read_text()) == pid
            assert await b.running_sessions() == {uid}
            await b.remove(uid, drain=True)
            await b.remove(uid)  # no session: no error
            assert await b.running_sessions() == set()
            assert (await b.usage(uid)).bytes_to_target is None
            await b.close()

        asyncio.run(second_life())
        assert refused(f"127.0.0.1:{p0}")
    # The daemon it spawned carried no route when the backend closed: it was stopped with it.
    assert stop_spawned_s2ds(str(state)) is False
    assert not pid_alive(pid)
    assert not (state / "s2ds.pid").exists()


def test_apply_is_all_or_nothing_and_rate_is_split(state_dirs: list[Path]) -> None:
    state = state_dirs[0]
    uid = str(uuid.uuid4())
    with echo_server() as echo, socket.create_server(("127.0.0.1", 0)) as taken:
        (p0,) = free_ports(1)
        busy = taken.getsockname()[1]
        bad = SessionPlan(
            uid=uid,
            role="CONS",
            security="plain",
            rate_limit=1000,
            routes=(
                RoutePlan(f"{uid}/0", f"127.0.0.1:{p0}", echo.address),
                RoutePlan(f"{uid}/1", f"127.0.0.1:{busy}", echo.address),
            ),
        )

        async def run() -> None:
            b = NativeBackend(options(state))
            await b.start()
            with pytest.raises(BackendError, match="in use"):
                await b.apply(bad)
            assert await b.running_sessions() == set()  # route 0 was taken back
            good = SessionPlan(
                uid=uid,
                role="CONS",
                security="plain",
                rate_limit=1000,
                routes=(*bad.routes[:1], RoutePlan(f"{uid}/1", "127.0.0.1:0", echo.address)),
            )
            await b.apply(good)
            infos = {i.route.route_id: i.route for i in await b.client.routes()}
            assert {r.rate_limit for r in infos.values()} == {500}
            labels = {"uid": uid, "role": "CONS", "security": "plain"}
            assert all(dict(r.labels) == labels for r in infos.values())
            await b.remove(uid)
            await b.close()

        asyncio.run(run())


def test_no_spawn_reports_missing_daemon(state_dirs: list[Path]) -> None:
    async def run() -> None:
        b = NativeBackend(options(state_dirs[0], spawn_s2ds=False))
        with pytest.raises(BackendError, match="no s2ds answers"):
            await b.start()

    asyncio.run(run())
    assert not (state_dirs[0] / "s2ds.pid").exists()


@pytest.mark.parametrize("security", ["tls", "compat"])
def test_tls_session_pair(state_dirs: list[Path], security: str) -> None:
    """A PROD gateway and a CONS gateway (two s2ds) carry a stream over a PSK TLS leg."""
    need_native("a TLS session between two gateways")
    uid = str(uuid.uuid4())
    key = os.urandom(32) if security == "tls" else b""
    identity = uid if security == "tls" else "client1"
    with echo_server() as producer:
        prod_port, cons_port = free_ports(2)
        prod = SessionPlan(
            uid=uid,
            role="PROD",
            security=security,
            psk_identity=identity,
            psk_key=key,  # type: ignore[arg-type]
            routes=(RoutePlan(f"{uid}/0", f"127.0.0.1:{prod_port}", producer.address),),
        )
        cons = SessionPlan(
            uid=uid,
            role="CONS",
            security=security,
            psk_identity=identity,
            psk_key=key,  # type: ignore[arg-type]
            routes=(RoutePlan(f"{uid}/0", f"127.0.0.1:{cons_port}", f"127.0.0.1:{prod_port}"),),
        )

        async def run() -> None:
            bp, bc = NativeBackend(options(state_dirs[0])), NativeBackend(options(state_dirs[1]))
            await bp.start()
            await bc.start()
            await bp.apply(prod)
            await bc.apply(cons)
            await bc.apply(cons)  # idempotent with a key s2ds never echoes
            (info,) = await bc.client.routes()
            assert info.route.tls is not None and info.route.tls.psk_key == b""
            listed = subprocess.run(
                [*S2DS, "ctl", "--control", bc.address, "list"],
                check=True,
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout
            assert json.loads(listed)[0]["tls"]["mode"] == ("psk" if security == "tls" else "compat")
            secret = key or compat_key_from_uid(uid)
            assert secret.hex() not in listed and secret.decode("latin-1") not in listed
            sent, got, n = await asyncio.to_thread(echo_roundtrip, f"127.0.0.1:{cons_port}", 2 * MiB)
            assert (got, n) == (sent, 2 * MiB)
            assert (await bp.usage(uid)).bytes_to_target == 2 * MiB
            for b in (bp, bc):
                await b.remove(uid)
                await b.close()

        asyncio.run(run())
    if key:
        for d in state_dirs:
            assert wait_for(lambda d=d: (d / "s2ds.log").exists(), 10)
            assert key.hex() not in (d / "s2ds.log").read_text()


def test_crashed_s2ds_is_replaced_and_sessions_reapplied(state_dirs: list[Path]) -> None:
    state = state_dirs[0]
    uid = str(uuid.uuid4())
    with echo_server() as echo:
        (port,) = free_ports(1)
        plan = SessionPlan(
            uid=uid,
            role="PROD",
            security="plain",
            routes=(RoutePlan(f"{uid}/0", f"127.0.0.1:{port}", echo.address),),
        )

        async def run() -> tuple[int, int]:
            b = NativeBackend(options(state, extra={"s2ds_timeout": "1"}))
            await b.start()
            await b.apply(plan)
            first = int((state / "s2ds.pid").read_text())
            os.kill(first, signal.SIGKILL)  # a crash: the routes die with the daemon
            assert wait_for(lambda: not pid_alive(first) or _zombie(first), 5)
            assert await b.running_sessions() == set()  # a new daemon answers: nothing is live
            second = int((state / "s2ds.pid").read_text())
            await b.apply(plan)  # what s2cs's reconciliation does
            sent, got, _ = await asyncio.to_thread(echo_roundtrip, f"127.0.0.1:{port}", 10_000)
            assert got == sent
            await b.remove(uid)
            await b.close()
            return first, second

        first, second = asyncio.run(run())
        assert first != second
    # The replacement carried no route when the backend closed: it was stopped with it.
    assert not pid_alive(second) and stop_spawned_s2ds(str(state)) is False


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_start_uses_a_daemon_that_is_starting_up(state_dirs: list[Path]) -> None:
    """s2ds started by its own unit (systemd, the demo) and s2cs started at once: s2cs uses
    that daemon instead of racing it with one of its own."""
    state = state_dirs[0]
    outside = Daemon(state)
    try:
        lock = state / "s2ds.sock.lock"
        assert wait_for(lambda: lock.exists() and lock.read_text().strip() == str(outside.proc.pid), 20)

        async def run() -> int:
            b = NativeBackend(options(state))
            await b.start()
            pid = int((await b.client.ping())["pid"])
            await b.close()
            return pid

        assert asyncio.run(run()) == outside.proc.pid
        assert not (state / "s2ds.pid").exists()  # nothing was spawned
    finally:
        outside.stop()
    assert outside.proc.returncode == 0
    assert lock.read_text() == ""  # a clean exit leaves no pid behind


def test_spawned_s2ds_gets_none_of_the_s2cs_secrets(
    state_dirs: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The s2ds that s2cs spawns carries route keys, never the Globus client secret or a token."""
    from scistream.s2cs.backends.native import spawn_s2ds

    monkeypatch.setenv("SCISTREAM_CLIENT_SECRET", "client-secret-canary")
    monkeypatch.setenv("GLOBUS_ACCESS_TOKEN", "token-canary")
    state = state_dirs[0]
    pid = spawn_s2ds(f"ipc://{state}/s2ds.sock", str(state))
    (state / "s2ds.pid").write_text(str(pid))
    with open(f"/proc/{pid}/environ", "rb") as f:
        environ = f.read()
    assert b"canary" not in environ
    assert f"SCISTREAM_STATE_DIR={state.absolute()}".encode() in environ.split(b"\0")
