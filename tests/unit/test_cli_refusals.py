"""What the clients refuse before anything is sent, and the one line (never a traceback) each
bad input gets: issue 10 items 9, 10 and 11."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from fake_s2cs import FakeS2cs, Running, serve

from scistream.appctrl.cli import main as appctrl_main
from scistream.certs import make_self_signed
from scistream.grpcutil import ExitCode
from scistream.s2uc.cli import main as s2uc_main

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_self_signed(tmp_path_factory.mktemp("pki"), ["127.0.0.1"], ["localhost"])


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SCISTREAM_HOME", str(tmp_path / "home"))
    for var in list(os.environ):
        if var.startswith(("SCISTREAM_S2UC_", "SCISTREAM_APPCTRL_")):
            monkeypatch.delenv(var)
    return tmp_path / "home"


@pytest.fixture
def gw(pki: tuple[Path, Path]) -> Iterator[Running]:
    with serve(FakeS2cs(), cert=pki[0], key=pki[1]) as r:
        yield r


def invoke(main: object, *args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)  # type: ignore[arg-type]


def one_line(r: Result) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in r.output
    assert lines, r.output
    return lines[-1]


def inbound(gw: Running, *extra: str) -> Result:
    return invoke(s2uc_main, "inbound-request", "--server_cert", str(gw.cert), "--s2cs", gw.address,
                  "--remote_ip", "127.0.0.1", "--receiver_ports", "7000", "--num_conn", "1", *extra)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--rate", "99999999999999999999"], "--rate"),
        (["--rate", "-1"], "--rate"),
        (["--num_conn", "65"], "--num_conn"),
        (["--rate-limit", "99999999999999999999999T"], "larger than any link"),
        (["--rate-limit", "0.5"], "below 1 byte/s"),
        (["--timeout", "nan"], "--timeout"),
        (["--timeout", "inf"], "--timeout"),
    ],
)
def test_s2uc_refuses_what_s2cs_would_before_sending(gw: Running, extra: list[str], needle: str) -> None:
    r = inbound(gw, *extra)
    assert r.exit_code == ExitCode.USAGE, r.output
    assert needle in one_line(r)
    assert gw.fake.calls == [], "nothing may reach the s2cs"


def test_s2uc_refuses_a_uid_s2cs_would_refuse(gw: Running) -> None:
    r = invoke(s2uc_main, "stream", "--prod-s2cs", gw.address, "--cons-s2cs", gw.address, "--server_cert",
               str(gw.cert), "--producer", "127.0.0.1:7000", "--uid", "bad\nuid")
    assert r.exit_code == ExitCode.USAGE
    assert "is not a session id" in one_line(r)
    assert gw.fake.calls == []


@pytest.mark.parametrize(
    ("role", "ip", "needle"),
    [
        ("BOSS", "127.0.0.1", "role 'BOSS' is not PROD"),
        ("PROD", "999.1.1.1", "'999.1.1.1' is not a host name or address"),
        ("PROD", "a_b", "'a_b' is not a host name or address"),
    ],
)
def test_appctrl_mock_refuses_before_the_hello(gw: Running, role: str, ip: str, needle: str) -> None:
    r = invoke(appctrl_main, "mock", "4f8583bc-a4d3-11ee-9fd6-034d1fcbd7c3", gw.address, "INVALID_TOKEN",
               role, ip, "--server-cert", str(gw.cert))
    assert r.exit_code == ExitCode.USAGE, r.output
    assert needle in one_line(r)
    assert gw.fake.calls == [], "no stray hello may be stored"


def test_appctrl_mock_takes_either_role_in_any_case(gw: Running) -> None:
    for role, sent in (("cons", "CONS"), ("Prod", "PROD")):
        r = invoke(appctrl_main, "mock", f"u-{sent}", gw.address, "INVALID_TOKEN", role, "127.0.0.1",
                   "--ports", "7000", "--server-cert", str(gw.cert))
        assert r.exit_code == 0, r.output
        assert gw.fake.calls_of("hello")[-1].role == sent


def test_appctrl_run_producer_on_a_busy_port_is_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = invoke(appctrl_main, "run-producer", str(port), "--wait-subscriber", "1")
    assert r.exit_code == ExitCode.FAILURE
    line = one_line(r)
    assert line == f"appctrl: error: cannot listen on 127.0.0.1:{port}: Address already in use", line


@pytest.mark.parametrize("port", ["abc", "99999", "999.1.1.1:5"])
def test_appctrl_run_producer_bad_port_is_a_usage_error(port: str) -> None:
    r = invoke(appctrl_main, "run-producer", port)
    assert r.exit_code == ExitCode.USAGE
    assert "Traceback" not in r.output and r.stderr.strip()


def s2ds(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scistream.s2ds", *args], capture_output=True, text=True,
                          timeout=30, check=False)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["forward", "--listen", "127.0.0.1:0", "--to", "127.0.0.1:9", "--pipe-size", "100G"],
         "pipe_size 107374182400 is too large"),
        (["forward", "--listen", "127.0.0.1:0", "--to", "127.0.0.1:9", "--workers", "99999999999"],
         "workers 99999999999 is too large"),
        (["forward", "--listen", "127.0.0.1:0", "--to", "127.0.0.1:9", "--idle-timeout", "1e300"],
         "idle_timeout"),
        (["forward", "--listen", "127.0.0.1:0", "--to", "127.0.0.1:9", "--rate", "99999999999999999999G"],
         "rate_limit"),
        (["forward", "--listen", "127.0.0.1:0", "--to", "127.0.0.1:9", "--stats", "--stats-interval", "inf"],
         "--stats-interval"),
        (["ctl", "--control", "garbage", "stats"], "--control 'garbage': use ipc://PATH or tcp://HOST:PORT"),
        (["ctl", "--control", "ipc://", "stats"], "use ipc://PATH"),
        (["ctl", "--timeout", "nan", "stats"], "--timeout"),
    ],
)
def test_s2ds_bad_numbers_and_addresses_are_one_line(args: list[str], needle: str) -> None:
    p = s2ds(*args)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], p.stderr


def test_key_file_is_0600_and_its_directory_is_left_alone(gw: Running, tmp_path: Path) -> None:
    folder = tmp_path / "work"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    key = folder / "k.key"
    r = inbound(gw, "--key-file", str(key))
    assert r.exit_code == 0, r.output
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755


def test_unwritable_key_file_is_refused_before_the_request(gw: Running, tmp_path: Path) -> None:
    r = inbound(gw, "--key-file", str(tmp_path))  # a directory
    assert r.exit_code == ExitCode.USAGE and "is a directory" in one_line(r)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = inbound(gw, "--key-file", str(blocker / "k.key"))  # below a regular file
    assert r.exit_code == ExitCode.USAGE and "is not a directory" in one_line(r)
    assert gw.fake.calls == []


@pytest.mark.parametrize("seed", ["-5", str(2**64)])
def test_demo_seed_out_of_range_is_a_usage_error(seed: str) -> None:
    from scistream.cli import main as scistream_main

    r = CliRunner().invoke(scistream_main, ["demo", "--seed", seed])
    assert r.exit_code == 2, r.output
    assert "Invalid value for '--seed'" in r.output and "Traceback" not in r.output


def test_demo_nodes_without_root_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from scistream.cli import main as scistream_main

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    r = CliRunner().invoke(scistream_main, ["demo", "--nodes", "3"])
    assert r.exit_code == ExitCode.USAGE, r.output
    assert "--nodes needs root" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(scistream_main, ["demo", "--nodes", "6"])  # 1..5
    assert r.exit_code == ExitCode.USAGE and "Invalid value for '--nodes'" in r.output


class _Rpc(Exception):
    def __init__(self, code: object, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> object:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("code", "details", "expect"),
    [
        # gRPC's own words: the s2cs was not reached.
        (
            "UNAVAILABLE",
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: "
            "Failed to connect to remote host: Connection refused",
            "cannot reach s2cs at gw:5000: connection refused",
        ),
        ("UNAVAILABLE", "Socket closed", "s2cs at gw:5000 closed the connection"),
        # The s2cs's own sentences, whatever words they contain.
        ("UNAVAILABLE", "the gateway cannot reach Globus Auth to check the token; try again later",
         "s2cs at gw:5000 cannot serve req now: the gateway cannot reach Globus Auth"),
        ("UNAVAILABLE", "the data plane could not set up the routes: connection refused",
         "s2cs at gw:5000 cannot serve req now: the data plane could not set up the routes"),
        ("DEADLINE_EXCEEDED", "no hello for session 'u' arrived within 20 s; its ports were released",
         "s2cs at gw:5000: no hello for session 'u' arrived within 20 s"),
        ("DEADLINE_EXCEEDED", "Deadline Exceeded", "the application's hello did not arrive within 190 s"),
    ],
)
def test_errors_repeat_the_s2cs_own_sentence(code: str, details: str, expect: str) -> None:
    import grpc

    from scistream.grpcutil import describe_rpc_error

    err = describe_rpc_error(_Rpc(getattr(grpc.StatusCode, code), details), "gw:5000", "req",  # type: ignore[arg-type]
                             timeout=190)
    assert expect in err.message, err.message


@pytest.mark.parametrize("port", ["²", "٣", "5074,²"])
def test_non_ascii_digits_are_no_port_numbers(port: str) -> None:
    """str.isdigit() takes '²' (int() then raises) and int() takes Arabic-Indic digits: a port
    list is ASCII digits only, and anything else is a usage error, never a traceback."""
    from scistream.grpcutil import ControlError, port_list

    with pytest.raises(ControlError) as err:
        port_list(port, "--receiver_ports")
    assert err.value.exit_code == ExitCode.USAGE


def test_s2uc_store_refuses_a_uid_with_a_trailing_newline(tmp_path: Path) -> None:
    """``$`` matches before a final newline: the uid check must match the whole uid."""
    from scistream.grpcutil import ControlError
    from scistream.s2uc.store import SessionStore

    with pytest.raises(ControlError):
        SessionStore(tmp_path).get("abc\n")
