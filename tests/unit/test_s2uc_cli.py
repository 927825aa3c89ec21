"""s2uc against in-test control servers: 1.x flows, our extensions, 1.x-shaped servers, every error."""

from __future__ import annotations

import json
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner, Result
from fake_s2cs import FakeS2cs, Running, serve

from scistream._proto import scistream_pb2 as pb
from scistream._proto import scistream_pb2_grpc as pb_grpc
from scistream.certs import make_self_signed
from scistream.grpcutil import ExitCode
from scistream.s2uc.cli import main
from scistream.s2uc.flows import MOCK_UID

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    d = tmp_path_factory.mktemp("pki")
    cert, key = make_self_signed(d, ["127.0.0.1"], ["localhost"])
    other, _ = make_self_signed(d, ["127.0.0.1"], [], name="other")
    return cert, key, other


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "home"
    monkeypatch.setenv("SCISTREAM_HOME", str(h))
    for var in (
        "SCISTREAM_S2UC_S2CS",
        "SCISTREAM_S2UC_SCOPE",
        "SCISTREAM_S2UC_CONFIG",
        "SCISTREAM_S2UC_SERVER_CERT",
    ):
        monkeypatch.delenv(var, raising=False)
    return h


@pytest.fixture
def prod(pki: tuple[Path, Path, Path]) -> Iterator[Running]:
    with serve(FakeS2cs(listener_ip="127.0.0.1"), cert=pki[0], key=pki[1]) as r:
        yield r


@pytest.fixture
def cons(pki: tuple[Path, Path, Path]) -> Iterator[Running]:
    with serve(FakeS2cs(listener_ip="127.0.0.2", first_port=6100), cert=pki[0], key=pki[1]) as r:
        yield r


@pytest.fixture
def legacy(pki: tuple[Path, Path, Path]) -> Iterator[Running]:
    with serve(FakeS2cs(extensions=False), cert=pki[0], key=pki[1]) as r:
        yield r


def s2uc(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def inbound(gw: Running, *extra: str, ports: str = "7000", num_conn: str = "1") -> Result:
    """``s2uc inbound-request`` against ``gw`` for a producer on 127.0.0.1 at ``ports``."""
    return s2uc(
        "inbound-request",
        "--server_cert",
        str(gw.cert),
        "--s2cs",
        gw.address,
        "--remote_ip",
        "127.0.0.1",
        "--receiver_ports",
        ports,
        "--num_conn",
        num_conn,
        *extra,
    )


def one_error_line(result: Result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_inbound_request_sc24_lines_and_key_stored(prod: Running, home: Path) -> None:
    r = s2uc(
        "inbound-request",
        f"--server_cert={prod.cert}",
        "--remote_ip",
        "172.31.3.153",
        "--s2cs",
        prod.address,
        "--receiver_ports",
        "80",
        "--num_conn",
        "1",
    )
    assert r.exit_code == 0, r.output
    out = r.stdout.splitlines()
    assert out[0] == "uid; s2cs; access_token; role"
    uid = out[1].split()[0]
    assert out[1] == f"{uid} {prod.address} INVALID_TOKEN PROD"
    for line in (
        "sending client request message",
        "started client request",
        "waiting for hello message",
        "sending for hello message",
        "Hello message sent successfully",
    ):
        assert line in out
    assert out[-1] == 'listeners: "127.0.0.1:5100"'
    hello = prod.fake.calls_of("hello")[0]
    assert list(hello.prod_listeners) == ["172.31.3.153:80"] and hello.role == "PROD"
    update = prod.fake.calls_of("update")[0]
    assert list(update.remote_listeners) == ["172.31.3.153:80"]
    req = prod.fake.calls_of("req")[0]
    assert (req.role, req.num_conn, req.rate) == ("PROD", 1, 10000)
    rec = home / "sessions" / f"{uid}.json"
    assert stat.S_IMODE(rec.stat().st_mode) == 0o600
    assert stat.S_IMODE(rec.parent.stat().st_mode) == 0o700
    assert json.loads(rec.read_text())["session_key"] == prod.fake.sessions[uid].session_key.hex()
    assert prod.fake.sessions[uid].session_key.hex() not in r.output  # the key is never printed


def test_underscore_spelling_defaults_and_mock(prod: Running) -> None:
    r = s2uc(
        "inbound_request",
        "--server-cert",
        str(prod.cert),
        "--remote-ip",
        "10.0.0.5",
        "--s2cs",
        prod.address,
        "--mock",
        "True",
    )
    assert r.exit_code == 0, r.output
    assert f"{MOCK_UID} {prod.address}" in r.stdout
    hello = prod.fake.calls_of("hello")[0]
    assert list(hello.prod_listeners) == [f"10.0.0.5:{p}" for p in (5074, 5075, 5076, 37000, 47000)]
    assert prod.fake.calls_of("req")[0].num_conn == 5
    assert r.stdout.count("listeners: ") == 5


def test_outbound_request_takes_key_from_store(prod: Running, cons: Running) -> None:
    r = inbound(prod, num_conn="2")
    assert r.exit_code == 0, r.output
    uid = r.stdout.splitlines()[1].split()[0]
    r2 = s2uc(
        "outbound-request",
        "--server_cert",
        str(cons.cert),
        "--remote_ip",
        "127.0.0.1",
        "--s2cs",
        cons.address,
        "--receiver_ports",
        "5201",
        "--num_conn",
        "2",
        uid,
        "127.0.0.1:5100",
        "127.0.0.1:5101",
    )
    assert r2.exit_code == 0, r2.output
    update = cons.fake.calls_of("update")[0]
    assert update.session_key == prod.fake.sessions[uid].session_key
    assert list(update.remote_listeners) == ["127.0.0.1:5100", "127.0.0.1:5101"]
    assert cons.fake.calls_of("req")[0].security == "tls"
    # 1.x's outbound-request sends its hello with role PROD: so do we.
    assert cons.fake.calls_of("hello")[0].role == "PROD"
    assert 'listeners: "127.0.0.2:6100"' in r2.stdout


def test_cons_req_with_key_file_and_appctrl_style_hello(prod: Running, cons: Running, tmp_path: Path) -> None:
    keyfile = tmp_path / "k.hex"
    keyfile.write_text("ab" * 32 + "\n")
    uid = "b6ed52b6-a3a9-11ef-946b-0242ac110003"
    # cons-req waits for the application controller's hello: send it from a thread.
    import threading

    def hello_later() -> None:
        time.sleep(0.3)
        with grpc.secure_channel(cons.address, grpc.ssl_channel_credentials(cons.cert.read_bytes())) as ch:
            pb_grpc.ControlStub(ch).hello(
                pb.Hello(uid=uid, role="PROD", prod_listeners=["127.0.0.1:5074"]), timeout=5
            )

    t = threading.Thread(target=hello_later)
    t.start()
    r = s2uc(
        "cons-req",
        "--s2cs",
        cons.address,
        "--server_cert",
        str(cons.cert),
        "--key-file",
        str(keyfile),
        "--num_conn",
        "1",
        uid,
        "192.168.20.10:5074",
    )
    t.join()
    assert r.exit_code == 0, r.output
    assert cons.fake.calls_of("update")[0].session_key == bytes.fromhex("ab" * 32)


def test_stream_sets_up_both_sides_and_release_tears_both_down(
    prod: Running, cons: Running, home: Path
) -> None:
    r = s2uc(
        "stream",
        "--prod-s2cs",
        prod.address,
        "--cons-s2cs",
        cons.address,
        "--server_cert",
        str(prod.cert),
        "--producer",
        "127.0.0.1:7000",
        "--num_conn",
        "2",
        "--json",
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    uid = doc["uid"]
    assert doc["connect"] == ["127.0.0.2:6100", "127.0.0.2:6101"]
    assert prod.fake.sessions[uid].session_key == cons.fake.sessions[uid].session_key != b""
    assert list(cons.fake.calls_of("update")[0].remote_listeners) == ["127.0.0.1:5100", "127.0.0.1:5101"]
    assert (home / "sessions" / f"{uid}.json").exists()
    r2 = s2uc("release", uid, "--server_cert", str(prod.cert))
    assert r2.exit_code == 0, r2.output
    assert r2.stdout.count("Release completed") == 2
    assert uid not in prod.fake.sessions and uid not in cons.fake.sessions
    assert not (home / "sessions" / f"{uid}.json").exists()


def test_stream_rolls_back_producer_side_when_consumer_side_fails(
    prod: Running, pki: tuple[Path, Path, Path]
) -> None:
    with serve(FakeS2cs(token="secret"), cert=pki[0], key=pki[1]) as picky:
        r = s2uc(
            "stream",
            "--prod-s2cs",
            prod.address,
            "--cons-s2cs",
            picky.address,
            "--server_cert",
            str(prod.cert),
            "--producer",
            "127.0.0.1:7000",
            "--num_conn",
            "1",
        )
    assert r.exit_code == ExitCode.AUTH
    assert "producer side released" in one_error_line(r)
    assert prod.fake.sessions == {}


def test_release_several_s2cs_reports_each(prod: Running, cons: Running) -> None:
    s2uc(
        "stream",
        "--prod-s2cs",
        prod.address,
        "--cons-s2cs",
        cons.address,
        "--server_cert",
        str(prod.cert),
        "--producer",
        "127.0.0.1:7000",
        "--uid",
        "u-1",
        "--num_conn",
        "1",
    )
    r = s2uc(
        "release", "u-1", "--s2cs", prod.address, "--s2cs", cons.address, "--server_cert", str(prod.cert)
    )
    assert r.exit_code == 0, r.output
    r = s2uc("release", "u-1", "--s2cs", prod.address, "--server_cert", str(prod.cert))
    assert r.exit_code == ExitCode.NOT_FOUND
    assert "u-1" in one_error_line(r)


def test_check_status_and_list(prod: Running) -> None:
    inbound(prod, "--mock", "True")
    r = s2uc("check-status", MOCK_UID, "--s2cs", prod.address, "--server_cert", str(prod.cert), "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc[0]["state"] == "ready" and doc[0]["targets"] == ["127.0.0.1:7000"]
    assert doc[0]["connections"][0]["bytes_to_target"] == 1234
    r = s2uc("check_status", "--s2cs", prod.address, "--server_cert", str(prod.cert))
    assert r.exit_code == 0, r.output
    assert MOCK_UID[:8] in r.stdout and "ready" in r.stdout
    r = s2uc("list", "--s2cs", prod.address, "--server_cert", str(prod.cert))
    assert r.exit_code == 0 and "ready" in r.stdout
    r = s2uc("list", "--local", "--json")
    assert json.loads(r.stdout)[0]["uid"] == MOCK_UID
    r = s2uc("check-status", "nope", "--s2cs", prod.address, "--server_cert", str(prod.cert))
    assert r.exit_code == ExitCode.NOT_FOUND
    assert "nope" in one_error_line(r)


def test_legacy_server_core_flows_work_and_extensions_degrade(legacy: Running) -> None:
    r = inbound(legacy, ports="80")
    assert r.exit_code == 0, r.output
    assert 'listeners: "127.0.0.1:5100"' in r.stdout
    assert "returned no data-channel key (SciStream 1.x?)" in r.stderr
    uid = r.stdout.splitlines()[1].split()[0]
    r = s2uc("check-status", uid, "--s2cs", legacy.address, "--server_cert", str(legacy.cert))
    assert r.exit_code == ExitCode.UNSUPPORTED
    assert "this s2cs (SciStream 1.x) has no status command" in one_error_line(r)
    r = s2uc("list", "--s2cs", legacy.address, "--server_cert", str(legacy.cert))
    assert r.exit_code == ExitCode.UNSUPPORTED
    r = s2uc("release", uid, "--s2cs", legacy.address, "--server_cert", str(legacy.cert))
    assert r.exit_code == 0, r.output


def test_legacy_outbound_without_key_says_so(legacy: Running) -> None:
    r = s2uc(
        "outbound-request",
        "--server_cert",
        str(legacy.cert),
        "--remote_ip",
        "127.0.0.1",
        "--s2cs",
        legacy.address,
        "--receiver_ports",
        "5201",
        "--num_conn",
        "1",
        "b6ed52b6-a3a9-11ef-946b-0242ac110003",
        "44.205.7.224:5201",
    )
    assert r.exit_code == 0, r.output
    assert "no data-channel key" in r.stderr
    assert list(legacy.fake.calls_of("update")[0].remote_listeners) == ["44.205.7.224:5201"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--num_conn", "0"], 2, "num_conn"),
        (["--receiver_ports", "80,x", "--remote_ip", "1.2.3.4"], ExitCode.USAGE, "receiver_ports"),
        (["--remote_ip", "not an ip!"], ExitCode.USAGE, "remote_ip"),
        (["--s2cs", "nocolon"], ExitCode.USAGE, "host:port"),
        (["--server_cert", "/nonexistent.crt"], ExitCode.USAGE, "not found"),
        (["--rate-limit", "fast"], ExitCode.USAGE, "rate-limit"),
        (["--security", "rot13"], 2, "security"),
        (["--scope", "abc"], ExitCode.AUTH, "s2uc login --scope abc"),
    ],
)
def test_bad_input_is_one_clear_line(prod: Running, args: list[str], code: int, needle: str) -> None:
    base = ["inbound-request", "--s2cs", prod.address, "--server_cert", str(prod.cert), "--timeout", "3"]
    r = s2uc(*base, *args)
    assert r.exit_code == code, r.output
    assert needle in r.stderr
    assert "Traceback" not in r.output


def test_unreachable_wrong_cert_plaintext_and_auth_failures(
    prod: Running, pki: tuple[Path, Path, Path]
) -> None:
    r = s2uc("check-status", "--s2cs", f"127.0.0.1:{_free_port()}", "--server_cert", str(prod.cert))
    assert r.exit_code == ExitCode.UNREACHABLE
    assert "cannot reach s2cs" in one_error_line(r)
    r = s2uc("check-status", "--s2cs", prod.address, "--server_cert", str(pki[2]))
    assert r.exit_code == ExitCode.UNREACHABLE
    assert "does not match --server_cert" in one_error_line(r)
    r = s2uc("check-status", "--s2cs", prod.address, "--ssl", "False", "--timeout", "3")
    assert r.exit_code == ExitCode.UNREACHABLE
    one_error_line(r)
    with serve(FakeS2cs(token="secret"), cert=pki[0], key=pki[1]) as picky:
        r = s2uc("check-status", "--s2cs", picky.address, "--server_cert", str(pki[0]))
        assert r.exit_code == ExitCode.AUTH
        assert "rejected the credentials" in one_error_line(r)
        assert picky.fake.calls[0][2] == "INVALID_TOKEN"


def test_hello_never_arrives_is_a_timeout(prod: Running) -> None:
    prod.fake.hello_wait = 30
    r = s2uc("prod-req", "--s2cs", prod.address, "--server_cert", str(prod.cert), "--timeout", "1")
    assert r.exit_code == ExitCode.TIMEOUT
    assert "hello did not arrive within 1 s" in one_error_line(r)


def test_plaintext_server_with_no_ssl(tmp_path: Path) -> None:
    with serve(FakeS2cs()) as plain:
        r = s2uc(
            "inbound-request",
            "--s2cs",
            plain.address,
            "--no-ssl",
            "--remote_ip",
            "127.0.0.1",
            "--receiver_ports",
            "80",
            "--num_conn",
            "1",
        )
        assert r.exit_code == 0, r.output
        r = s2uc("list", "--s2cs", plain.address, "--ssl", "False")
        assert r.exit_code == 0, r.output


def test_env_and_config_file_defaults_and_scope_mapping(
    prod: Running, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "s2uc.toml").write_text(
        f'[defaults]\nserver_cert = "{prod.cert}"\n[check-status]\ns2cs = "{prod.address}"\n'
        f'[scopes]\n"{prod.address}" = "scope-1"\n'
    )
    (home / "tokens.json").write_text(
        json.dumps(
            {
                "scope-1": {
                    "access_token": "tok-1",
                    "refresh_token": "r",
                    "expires_at_seconds": time.time() + 3600,
                }
            }
        )
    )
    r = s2uc("check-status")
    assert r.exit_code == 0, r.output
    assert prod.fake.calls[-1][2] == "tok-1"
    assert "tok-1" not in r.output
    monkeypatch.setenv("SCISTREAM_S2UC_S2CS", f"127.0.0.1:{_free_port()}")
    r = s2uc("check-status")  # the environment beats the file
    assert r.exit_code == ExitCode.UNREACHABLE
    (home / "s2uc.toml").write_text("[defaults\n")
    r = s2uc("list", "--local")
    assert r.exit_code == ExitCode.USAGE and "not valid TOML" in r.stderr


def test_key_file_recorded_sides_and_status_of_both(prod: Running, cons: Running, tmp_path: Path) -> None:
    keyfile = tmp_path / "out" / "session.key"
    r = inbound(prod, "--key-file", str(keyfile))
    assert r.exit_code == 0, r.output
    uid = r.stdout.splitlines()[1].split()[0]
    assert keyfile.read_text().strip() == prod.fake.sessions[uid].session_key.hex()
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
    # No endpoints after the uid: the producer side's recorded listeners are the targets.
    r = s2uc(
        "cons-req",
        "--server_cert",
        str(cons.cert),
        "--s2cs",
        cons.address,
        "--remote_ip",
        "127.0.0.1",
        "--num_conn",
        "1",
        uid,
    )
    assert r.exit_code == 0, r.output
    assert list(cons.fake.calls_of("update")[0].remote_listeners) == ["127.0.0.1:5100"]
    r = s2uc("check-status", uid, "--server_cert", str(prod.cert), "--json")
    assert r.exit_code == 0, r.output
    assert sorted((d["s2cs"], d["role"]) for d in json.loads(r.stdout)) == sorted(
        [(prod.address, "PROD"), (cons.address, "CONS")]
    )
    r = s2uc("cons-req", "--server_cert", str(cons.cert), "--s2cs", cons.address, "never-seen")
    assert r.exit_code == ExitCode.USAGE and "listener" in r.stderr


def test_watch_refreshes_until_ctrl_c(prod: Running, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    inbound(prod, "--mock", "True")
    env = dict(os.environ, COLUMNS="200")
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scistream.s2uc.cli",
            "check-status",
            "--watch",
            "--interval",
            "0.2",
            "--s2cs",
            prod.address,
            "--server_cert",
            str(prod.cert),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.time() + 20
        while time.time() < deadline and len(prod.fake.calls_of("status")) < 3:
            time.sleep(0.1)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, err
    assert len(prod.fake.calls_of("status")) >= 3
    assert MOCK_UID in out and "Traceback" not in err


def test_failed_update_gives_the_session_back(cons: Running) -> None:
    r = s2uc(
        "outbound-request",
        "--server_cert",
        str(cons.cert),
        "--s2cs",
        cons.address,
        "--remote_ip",
        "127.0.0.1",
        "--num_conn",
        "1",
        "no-key-uid",
        "127.0.0.1:5100",
    )
    assert r.exit_code == ExitCode.FAILURE
    assert "no data-channel key" in r.stderr  # said before trying
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("s2uc: error:")]
    assert len(err) == 1 and "needs the session key" in err[0] and "(session no-key-uid released)" in err[0]
    assert cons.fake.sessions == {}
    assert [n for n, _, _ in cons.fake.calls][-2:] == ["update", "release"]
