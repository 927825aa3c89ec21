"""appctrl against in-test control servers: 1.x mock hello, the library API, run, demo apps."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner, Result
from fake_s2cs import FakeS2cs, Running, serve

from scistream._proto import scistream_pb2 as pb
from scistream._proto import scistream_pb2_grpc as pb_grpc
from scistream.appctrl import apps
from scistream.appctrl.cli import main, substitute
from scistream.appctrl.controller import AppController, ReadySession, events_address
from scistream.certs import make_self_signed
from scistream.grpcutil import ControlError, ExitCode

pytestmark = pytest.mark.timeout(60)
UID = "4f8583bc-a4d3-11ee-9fd6-034d1fcbd7c3"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_self_signed(tmp_path_factory.mktemp("pki"), ["127.0.0.1"], ["localhost"])


@pytest.fixture
def gw(pki: tuple[Path, Path]) -> Iterator[Running]:
    with serve(FakeS2cs(), cert=pki[0], key=pki[1], events=True) as r:
        yield r


@pytest.fixture
def legacy(pki: tuple[Path, Path]) -> Iterator[Running]:
    with serve(FakeS2cs(extensions=False), cert=pki[0], key=pki[1]) as r:
        yield r


def stub(r: Running) -> pb_grpc.ControlStub:
    assert r.cert is not None
    ch = grpc.secure_channel(r.address, grpc.ssl_channel_credentials(r.cert.read_bytes()))
    return pb_grpc.ControlStub(ch)


def background(fn: object) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)  # type: ignore[arg-type]
    t.start()
    return t


def appctrl(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_mock_sends_the_1x_hello(gw: Running) -> None:
    got: dict[str, pb.Response] = {}
    t = background(
        lambda: got.setdefault("r", stub(gw).req(pb.Request(uid=UID, role="PROD", num_conn=2), timeout=20))
    )
    r = appctrl(
        "mock", UID, gw.address, "INVALID_TOKEN", "PROD", "192.168.10.10", "--server-cert", str(gw.cert)
    )
    t.join(10)
    assert r.exit_code == 0, r.output
    assert "Hello message sent successfully" in r.stdout
    hello = gw.fake.calls_of("hello")[0]
    assert list(hello.prod_listeners) == [f"192.168.10.10:{p}" for p in (5074, 5075, 5076, 37000, 47000)]
    assert hello.role == "PROD"
    assert [a for n, _, a in gw.fake.calls if n == "hello"] == ["INVALID_TOKEN"]
    assert list(got["r"].prod_listeners) == list(hello.prod_listeners)


def test_mock_retries_a_hello_that_beats_the_req_on_a_1x_server(legacy: Running) -> None:
    def late_req() -> None:
        time.sleep(0.6)
        stub(legacy).req(pb.Request(uid=UID, role="CONS", num_conn=1), timeout=20)

    t = background(late_req)
    r = appctrl(
        "mock",
        UID,
        legacy.address,
        "tok",
        "PROD",
        "10.0.0.1",
        "--ports",
        "80",
        "--server_cert",
        str(legacy.cert),
    )
    t.join(10)
    assert r.exit_code == 0, r.output
    assert "listeners: ['127.0.0.1:5100']" in r.stdout
    hellos = [a for n, _, a in legacy.fake.calls if n == "hello"]
    assert len(hellos) >= 2 and hellos[-1] == "tok"


def test_mock_errors_are_one_line(gw: Running, tmp_path: Path) -> None:
    r = appctrl(
        "mock",
        UID,
        "127.0.0.1:1",
        "INVALID_TOKEN",
        "PROD",
        "10.0.0.1",
        "--server-cert",
        str(gw.cert),
        "--timeout",
        "2",
    )
    assert r.exit_code == ExitCode.UNREACHABLE
    assert r.stderr.count("\n") == 1 and "cannot reach s2cs" in r.stderr
    r = appctrl(
        "mock",
        UID,
        gw.address,
        "INVALID_TOKEN",
        "PROD",
        "10.0.0.1",
        "--server-cert",
        str(tmp_path / "missing.crt"),
    )
    assert r.exit_code == ExitCode.USAGE and "not found" in r.stderr
    r = appctrl("mock", UID, gw.address, "INVALID_TOKEN", "PROD", "10.0.0.1", "--ports", "99999")
    assert r.exit_code == ExitCode.USAGE and "--ports" in r.stderr
    assert "Traceback" not in r.output


def test_library_three_lines_until_ready(gw: Running) -> None:
    def producer_side() -> None:
        s = stub(gw)
        s.req(pb.Request(uid=UID, role="PROD", num_conn=1), timeout=20)
        time.sleep(0.3)
        s.update(pb.UpdateTargets(uid=UID, remote_listeners=["127.0.0.1:7000"], role="PROD"), timeout=5)

    t = background(producer_side)

    async def go() -> ReadySession:
        async with AppController(gw.address, UID, role="PROD", server_cert=gw.cert) as ctl:
            await ctl.hello(["127.0.0.1:7000"])
            return await ctl.wait_ready(timeout=10)

    session = asyncio.run(go())
    t.join(10)
    assert session.state == "ready"
    assert session.listeners == ["127.0.0.1:5100"] and session.targets == ["127.0.0.1:7000"]
    assert session.security == "tls"


def test_library_against_1x_server_returns_the_hello_answer(legacy: Running) -> None:
    t = background(lambda: stub(legacy).req(pb.Request(uid=UID, role="CONS", num_conn=1), timeout=20))

    async def go() -> ReadySession:
        async with AppController(legacy.address, UID, role="CONS", server_cert=legacy.cert) as ctl:
            assert ctl.legacy
            await asyncio.sleep(0.2)
            await ctl.hello([])
            return await ctl.wait_ready(timeout=5)

    session = asyncio.run(go())
    t.join(10)
    assert (session.state, session.listeners) == ("unknown", ["127.0.0.1:5100"])


def test_wait_ready_fails_when_session_is_released(gw: Running) -> None:
    def req_then_release() -> None:
        s = stub(gw)
        s.req(pb.Request(uid=UID, role="PROD", num_conn=1), timeout=20)
        time.sleep(0.3)
        s.release(pb.Release(uid=UID), timeout=5)

    t = background(req_then_release)

    async def go() -> None:
        async with AppController(gw.address, UID, role="PROD", server_cert=gw.cert) as ctl:
            await ctl.hello(["127.0.0.1:7000"])
            await ctl.wait_ready(timeout=10)

    with pytest.raises(ControlError, match="released"):
        asyncio.run(go())
    t.join(10)


def test_run_substitutes_endpoints_and_releases(gw: Running, tmp_path: Path) -> None:
    out = tmp_path / "args.json"

    def consumer_side() -> None:
        s = stub(gw)
        s.req(pb.Request(uid=UID, role="CONS", num_conn=2), timeout=20)
        time.sleep(0.2)
        s.update(
            pb.UpdateTargets(uid=UID, remote_listeners=["10.0.0.1:5100"], role="CONS", session_key=b"k"),
            timeout=5,
        )

    t = background(consumer_side)
    script = "import json,sys; json.dump(sys.argv[1:], open(sys.argv[1], 'w')); sys.exit(3)"
    r = appctrl(
        "run",
        "--uid",
        UID,
        "--s2cs",
        gw.address,
        "--role",
        "CONS",
        "--server-cert",
        str(gw.cert),
        "--release",
        "--",
        sys.executable,
        "-c",
        script,
        str(out),
        "{listener}",
        "{listeners}",
        "{uid}",
        "{unknown}",
    )
    t.join(10)
    assert r.exit_code == 3, r.output
    assert json.loads(out.read_text()) == [
        str(out),
        "127.0.0.1:5100",
        "127.0.0.1:5100,127.0.0.1:5101",
        UID,
        "{unknown}",
    ]
    assert UID not in gw.fake.sessions  # --release


def test_substitute_is_single_pass() -> None:
    s = ReadySession(
        uid="{listener}",
        role="PROD",
        state="ready",
        listeners=["[::1]:5100"],
        prod_listeners=["127.0.0.1:7000"],
    )
    assert substitute(["{uid}", "{listener_host}:{listener_port}", "{prod_listener}"], s) == [
        "{listener}",
        "::1:5100",
        "127.0.0.1:7000",
    ]


def test_events_address_replaces_wildcards() -> None:
    assert events_address("tcp://*:7777", "gw.example.org:5000") == "tcp://gw.example.org:7777"
    assert events_address("tcp://0.0.0.0:7777", "[::1]:5000") == "tcp://[::1]:7777"
    assert events_address("ipc:///run/s2cs.ev", "x:1") == "ipc:///run/s2cs.ev"


def test_zmq_demo_apps_count_every_byte() -> None:
    import socket

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    result: dict[str, apps.Report] = {}
    t = background(
        lambda: result.setdefault(
            "p", apps.run_producer(f"127.0.0.1:{port}", count=300, size=3000, wait_subscriber=10)
        )
    )
    time.sleep(0.1)
    r = CliRunner().invoke(main, ["subscribe", f"127.0.0.1:{port}", "--timeout", "20", "--json"])
    t.join(20)
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert (rep["messages"], rep["bytes"], rep["lost"], rep["corrupt"], rep["expected"]) == (
        300,
        900000,
        0,
        0,
        300,
    )
    assert result["p"].bytes == 900000


def test_consumer_reports_loss_without_end_marker() -> None:
    r = CliRunner().invoke(main, ["subscribe", "127.0.0.1:1", "--timeout", "0.5"])
    assert r.exit_code == ExitCode.FAILURE
    assert "0 messages" in r.stdout


def test_iperf_commands_are_built_from_options() -> None:
    pytest.importorskip("shutil").which("iperf3") or pytest.skip("iperf3 not installed")
    assert apps.iperf_client_cmd("[::1]:5201", nbytes=1000, parallel=4)[1:] == [
        "-c",
        "::1",
        "-p",
        "5201",
        "-n",
        "1000",
        "-P",
        "4",
    ]
    assert apps.iperf_server_cmd(5201, bind="127.0.0.1")[1:] == ["-s", "-p", "5201", "-B", "127.0.0.1", "-1"]


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--listen", "nohost"], ExitCode.USAGE, "host:port"),
        (["--ready-timeout", "0.5"], ExitCode.TIMEOUT, "not ready within 0.5 s"),
        (["--s2cs", "bad address"], ExitCode.USAGE, "s2cs address"),
    ],
)
def test_run_errors_are_one_line(gw: Running, args: list[str], code: int, needle: str) -> None:
    base = ["run", "--uid", "u-err", "--s2cs", gw.address, "--server-cert", str(gw.cert)]
    r = appctrl(*base, *args, "--", "true")
    assert r.exit_code == code, r.output
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("appctrl: error:")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in r.output


def test_run_reports_a_command_that_cannot_start(gw: Running) -> None:
    def session() -> None:
        s = stub(gw)
        s.req(pb.Request(uid="u-cmd", role="CONS", num_conn=1), timeout=20)
        s.update(pb.UpdateTargets(uid="u-cmd", remote_listeners=["10.0.0.1:1"], session_key=b"k"), timeout=5)

    t = background(session)
    r = appctrl(
        "run",
        "--uid",
        "u-cmd",
        "--s2cs",
        gw.address,
        "--role",
        "CONS",
        "--server-cert",
        str(gw.cert),
        "--",
        "/nonexistent/app",
        "{listener}",
    )
    t.join(10)
    assert r.exit_code == ExitCode.FAILURE
    assert "cannot start '/nonexistent/app'" in r.stderr


def test_producer_without_subscriber_times_out_cleanly() -> None:
    import socket

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    r = CliRunner().invoke(main, ["run-producer", str(port), "--wait-subscriber", "0.3"])
    assert r.exit_code == ExitCode.TIMEOUT
    assert "no subscriber" in r.stderr


def test_mock_with_the_placeholder_sends_the_users_s2uc_login(
    gw: Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The VM tutorial types INVALID_TOKEN next to an `s2uc login`: against a gateway that
    checks tokens, the hello must carry that login's token (the scope from [scopes])."""
    from scistream.s2uc.tokens import TokenStore

    monkeypatch.setenv("SCISTREAM_HOME", str(tmp_path))
    (tmp_path / "s2uc.toml").write_text(f'[scopes]\n"{gw.address}" = "scope-abc"\n')
    login = {"access_token": "tok-of-the-login", "expires_at_seconds": time.time() + 3600}
    TokenStore().put("scope-abc", login)
    background(lambda: stub(gw).req(pb.Request(uid=UID, role="PROD", num_conn=1), timeout=20))
    r = appctrl("mock", UID, gw.address, "INVALID_TOKEN", "PROD", "127.0.0.1", "--server-cert", str(gw.cert))
    assert r.exit_code == 0, r.output
    assert [a for n, _, a in gw.fake.calls if n == "hello"] == ["tok-of-the-login"]

    # A token typed on the command line wins; no login for the s2cs: the placeholder as in 1.x.
    monkeypatch.setenv("SCISTREAM_HOME", str(tmp_path / "nobody-logged-in"))
    from scistream.appctrl.cli import _token

    assert _token("typed-token", gw.address) == "typed-token"
    assert _token("INVALID_TOKEN", gw.address) is None
