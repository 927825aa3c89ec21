"""s2cs says the true cause (issue 10 items 7 and 12): bad settings stop it at startup with one
line, a store it cannot write is UNAVAILABLE and NOT_SERVING until it can again, and the
clients repeat the s2cs's own sentence instead of guessing."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner
from grpc_health.v1 import health_pb2, health_pb2_grpc
from s2cs_support import ServerThread, new_uid

from scistream._proto import scistream_pb2 as pb
from scistream.certs import make_self_signed
from scistream.cli import main as scistream_main
from scistream.s2cs import preflight
from scistream.s2uc.cli import main as s2uc_main

pytestmark = pytest.mark.timeout(90)


# ------------------------------------------------------------------ startup


def test_listener_ip_must_be_an_address_of_this_host(monkeypatch: pytest.MonkeyPatch) -> None:
    preflight.check_listener_ip("127.0.0.1")
    preflight.check_listener_ip("localhost")
    with pytest.raises(preflight.PreflightError, match=r"10\.9\.9\.9 is not an address of this host"):
        preflight.check_listener_ip("10.9.9.9")
    with pytest.raises(preflight.PreflightError, match="neither an IP address nor a host name"):
        preflight.check_listener_ip("999.1.1.1")  # refused without asking a resolver

    def no_such_name(*_a: Any, **_k: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)  # `garbage` without a DNS query
    with pytest.raises(preflight.PreflightError, match="'garbage' is neither an IP address nor a host name"):
        preflight.check_listener_ip("garbage")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    cert, key = make_self_signed(d, ["127.0.0.1"], ["localhost"])
    _other_cert, other_key = make_self_signed(d, ["127.0.0.1"], [], name="other")
    garbage = d / "garbage.pem"
    garbage.write_text("not a PEM file\n")
    return {"cert": cert, "key": key, "other_key": other_key, "garbage": garbage}


def s2cs_exit(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run s2cs that must refuse to start; it must not get as far as listening."""
    argv = [sys.executable, "-m", "scistream.s2cs", "--port", "0", "--bind", "127.0.0.1", "--events", "off",
            "--state-dir", str(tmp_path / "state"), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False, cwd=tmp_path)


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--listener-ip", "10.9.9.9"], "s2cs: --listener-ip 10.9.9.9 is not an address of this host"),
        (["--listener-ip", "999.1.1.1"], "s2cs: --listener-ip '999.1.1.1' is neither an IP address"),
        (["--server_crt", "{garbage}", "--server_key", "{key}"], "is not a PEM certificate"),
        (["--server_crt", "{cert}", "--server_key", "{garbage}"], "is not a PEM private key"),
        (["--server_crt", "{cert}", "--server_key", "{other_key}"], "does not belong to the certificate"),
        (["--server_crt", "{cert}", "--server_key", "/nonexistent.key"], "/nonexistent.key: No such file"),
        (["--backend-option", "s2ds_timeout=nan"], "backend setting s2ds_timeout='nan' is not a number"),
        (["-t", "stunnel", "--backend-option", "stop_timeout=inf"], "stop_timeout must be a positive number"),
    ],
)
def test_bad_settings_stop_s2cs_at_start_with_one_line(
    tmp_path: Path, pki: dict[str, Path], args: list[str], expect: str
) -> None:
    args = [a.format(**{k: str(v) for k, v in pki.items()}) for a in args]
    if "--server_crt" not in args:
        args += ["--server_crt", str(pki["cert"]), "--server_key", str(pki["key"])]
    p = s2cs_exit(tmp_path, *args)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr and "listening on" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert expect in last, p.stderr
    if "server_" in expect or "PEM" in expect or "belong" in expect:
        named = [a for a in args if a.startswith("/")]
        assert any(n in last for n in named), "the error names the file"


# ------------------------------------------------------------------ a state dir that fills up


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path) -> None:
    with open(path, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(bytes(64 << 10))
            f.flush()


def health_of(channel: grpc.Channel) -> str:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def test_full_state_dir_is_unavailable_and_not_serving_until_freed(
    small_tmpfs: Path,
    s2cs_factory: Callable[..., ServerThread],
    stub_for: Callable[[ServerThread], Any],
) -> None:
    st = s2cs_factory(state_dir=str(small_tmpfs / "state"), hello_timeout=5.0)
    stub = stub_for(st)
    with grpc.insecure_channel(st.address) as ch:
        assert health_of(ch) == "SERVING"
        filler = small_tmpfs / "filler"
        fill(filler)
        with pytest.raises(grpc.RpcError) as err:
            stub.req(pb.Request(uid=new_uid(), role="PROD", num_conn=1, rate=0), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "cannot write its session store" in (err.value.details() or "")
        assert "full" in (err.value.details() or "")
        assert health_of(ch) == "NOT_SERVING"
        # Refused up front while it lasts, with the same sentence (no INTERNAL, no half session).
        with pytest.raises(grpc.RpcError) as err:
            stub.req(pb.Request(uid=new_uid(), role="PROD", num_conn=1, rate=0), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert st.manager.sessions == {}
        filler.unlink()
        deadline = time.monotonic() + 10
        while health_of(ch) != "SERVING":
            assert time.monotonic() < deadline, "health did not come back after the disk was freed"
            time.sleep(0.2)
        uid = new_uid()
        fut = stub.req.future(pb.Request(uid=uid, role="PROD", num_conn=1, rate=0), timeout=10)
        time.sleep(0.1)
        stub.hello(pb.Hello(uid=uid, prod_listeners=["127.0.0.1:7000"], role="PROD"), timeout=10)
        assert len(fut.result().listeners) == 1
    st.stop()


# ------------------------------------------------------------------ sentences that lie


def test_hello_timeout_is_reported_with_the_s2cs_own_deadline(
    s2cs_factory: Callable[..., ServerThread], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCISTREAM_HOME", str(tmp_path / "home"))
    st = s2cs_factory(hello_timeout=1.0)
    r = CliRunner().invoke(s2uc_main, ["prod-req", "--s2cs", st.address, "--no-ssl"], catch_exceptions=False)
    assert r.exit_code == 7, r.output
    line = r.stderr.strip().splitlines()[-1]
    assert "within 1 s" in line and "190" not in line, line


def test_an_s2cs_that_cannot_serve_is_not_called_unreachable(
    s2cs_factory: Callable[..., ServerThread], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scistream.s2cs.errors import ControlError

    class GlobusDown:
        enabled = True

        async def authenticate(self, token: str) -> Any:
            raise ControlError(grpc.StatusCode.UNAVAILABLE,
                               "the gateway cannot reach Globus Auth to check the token; try again later")

    monkeypatch.setenv("SCISTREAM_HOME", str(tmp_path / "home"))
    st = s2cs_factory(authenticator=GlobusDown())
    r = CliRunner().invoke(
        s2uc_main, ["check-status", "--s2cs", st.address, "--no-ssl"], catch_exceptions=False
    )
    assert r.exit_code == 1, r.output
    line = r.stderr.strip().splitlines()[-1]
    assert "cannot reach s2cs" not in line, line
    assert f"s2cs at {st.address} cannot serve status now: the gateway cannot reach Globus Auth" in line


def test_health_is_one_sentence_and_waits(s2cs_factory: Callable[..., ServerThread]) -> None:
    st = s2cs_factory()
    r = CliRunner().invoke(scistream_main, ["health", "--s2cs", st.address])
    assert r.exit_code == 0 and r.output.strip() == f"s2cs {st.address}: SERVING"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    r = CliRunner().invoke(scistream_main, ["health", "--s2cs", f"127.0.0.1:{port}", "--wait", "1"])
    assert r.exit_code == 1
    assert time.monotonic() - t0 >= 0.9
    assert r.stderr.strip().splitlines() == [
        f"scistream health: cannot reach s2cs at 127.0.0.1:{port}: connection refused "
        "(is s2cs running there, on that port?) (after waiting 1 s)"
    ]


def test_a_refused_req_is_not_followed_by_a_stray_hello(
    s2cs_factory: Callable[..., ServerThread], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """num_conn within s2uc's limit but beyond this s2cs's 3 data ports: the req is refused,
    and s2uc must not send the hello it would have sent beside it."""
    monkeypatch.setenv("SCISTREAM_HOME", str(tmp_path / "home"))
    lo = 20000 + os.getpid() % 10000
    st = s2cs_factory(port_range=(lo, lo + 2))
    r = CliRunner().invoke(s2uc_main, ["inbound-request", "--s2cs", st.address, "--no-ssl", "--remote_ip",
                                       "127.0.0.1", "--receiver_ports", "7000", "--num_conn", "5"],
                           catch_exceptions=False)
    assert r.exit_code != 0, r.output
    assert "num_conn must be between 1 and 3" in r.stderr, r.output
    time.sleep(0.3)
    assert st.manager.early == {} and st.manager.sessions == {}


def test_a_read_only_store_is_unavailable_with_a_sentence(tmp_path: Path) -> None:
    """The unwritable case (as root no file mode stops a write, so the store's connection is
    reopened read-only): UNAVAILABLE naming the cause, problem reported, cleared by a probe."""
    import sqlite3

    from scistream.s2cs.errors import ControlError
    from scistream.s2cs.store import SessionStore

    store = SessionStore(str(tmp_path / "s2cs.db"))
    heard: list[str | None] = []
    store.on_problem = heard.append
    store.save("a", {"uid": "a"}, b"")
    store._db.close()
    store._db = sqlite3.connect(f"file:{store.path}?mode=ro", uri=True, isolation_level=None)
    with pytest.raises(ControlError) as err:
        store.save("b", {"uid": "b"}, b"")
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert "cannot write its session store (attempt to write a readonly database)" in err.value.message
    with pytest.raises(ControlError):
        store.check_writable()
    assert heard == [store.problem] and store.problem
    assert store.probe() is True  # the directory itself takes writes: the problem is cleared
    assert heard[-1] is None and store.problem is None
    store.close()


def test_a_log_file_that_cannot_be_written_is_one_line_not_a_traceback_per_record(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import logging

    from scistream.s2cs.cli import _LogFileHandler

    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    handler = _LogFileHandler("/dev/full", encoding="utf-8")
    log = logging.getLogger("test-full-log")
    log.propagate = False
    log.addHandler(handler)
    try:
        for i in range(3):
            log.error("record %d", i)
    finally:
        log.removeHandler(handler)
        handler.close()
    err = capsys.readouterr().err
    assert err == "s2cs: cannot write the log file /dev/full: [Errno 28] No space left on device\n", err
