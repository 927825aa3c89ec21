"""The s2cs command line: 1.x spellings, config file and env, errors; control-channel TLS;
a real `s2cs` process stopped by SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from typing import Any

import grpc
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from s2cs_support import FakeBackend, ServerThread, bindable, free_range, make_config, new_uid

from scistream._proto import scistream_pb2 as pb
from scistream._proto import scistream_pb2_grpc
from scistream.s2cs import cli
from scistream.s2cs.config import ServerConfig, listener_ip_problem


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[ServerConfig]:
    """Replace the server with a recorder: each CLI run appends the config it built."""
    seen: list[ServerConfig] = []

    async def fake_serve(config: ServerConfig) -> int:
        seen.append(config)
        return 0

    import scistream.s2cs.server as server_mod

    monkeypatch.setattr(server_mod, "serve", fake_serve)
    for var in list(os.environ):
        if var.startswith("SCISTREAM_") and var != "SCISTREAM_STATE_DIR":
            monkeypatch.delenv(var)
    return seen


def run(args: list[str], env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(cli.main, args, env=env, catch_exceptions=False)


def test_tutorial_command_lines(captured: list[ServerConfig], tmp_path: Any) -> None:
    # SC24 tutorial
    r = run(
        [
            "--server_crt=/x/server.crt",
            "--server_key=/x/server.key",
            "--type=StunnelSubprocess",
            "--verbose",
            "--listener_ip=172.17.0.2",
        ]
    )
    assert r.exit_code == 0, r.output
    c = captured[-1]
    assert (c.server_crt, c.server_key, c.backend_type, c.listener_ip) == (
        "/x/server.crt",
        "/x/server.key",
        "StunnelSubprocess",
        "172.17.0.2",
    )
    assert c.port == 5000 and c.port_range == (5100, 5200) and c.ssl and not c.client_secret
    # VM tutorial: --listener-ip, --port=, -t style, and a bare --client-secret as the last argument
    r = run(
        [
            "--verbose",
            "--port=5007",
            "--listener-ip=192.168.30.10",
            "--type=Haproxy",
            "--client-id",
            "abc",
            "--client-secret",
        ],
        env={"SCISTREAM_CLIENT_SECRET": "shh"},
    )
    assert r.exit_code == 0, r.output
    c = captured[-1]
    assert (c.port, c.listener_ip, c.backend_type, c.client_id, c.client_secret) == (
        5007,
        "192.168.30.10",
        "Haproxy",
        "abc",
        "shh",
    )
    r = run(
        [
            "--v",
            "-t",
            "nginx",
            "--port_range",
            "6000-6010",
            "--ssl",
            "False",
            "--client_id",
            "i",
            "--client_secret",
            "s",
        ]
    )
    assert r.exit_code == 0, r.output
    c = captured[-1]
    assert (c.port_range, c.ssl, c.backend_type, c.client_secret) == ((6000, 6010), False, "nginx", "s")
    r = run(
        ["--port-range", "7000-7001", "--client-secret", "--verbose"], env={"SCISTREAM_CLIENT_SECRET": "e"}
    )
    assert r.exit_code == 0 and captured[-1].client_secret == "e"


def test_bad_options_exit_2(captured: list[ServerConfig]) -> None:
    r = CliRunner().invoke(cli.main, ["--type", "Mock"])
    assert r.exit_code == 2 and "valid types" in r.output and "stunnel" in r.output
    r = CliRunner().invoke(cli.main, ["--client-secret"])
    assert r.exit_code == 2 and "SCISTREAM_CLIENT_SECRET" in r.output
    r = CliRunner().invoke(cli.main, ["--port-range", "5200-5100"])
    assert r.exit_code == 2 and "LOW" in r.output
    r = CliRunner().invoke(cli.main, ["--allow-target", "not-a-net"])
    assert r.exit_code == 2
    assert not captured and "Traceback" not in r.output


def test_modes_config_file_and_env(captured: list[ServerConfig], tmp_path: Any) -> None:
    r = run(["--scistream1-compat"])
    assert captured[-1].default_security == "compat" and captured[-1].compat_allowed
    r = run([])
    assert captured[-1].default_security == "tls" and not captured[-1].compat_allowed
    assert captured[-1].metrics_port is None and captured[-1].events == "ipc"
    cfg = tmp_path / "s2cs.toml"
    cfg.write_text(
        '[s2cs]\nlistener_ip = "10.1.1.1"\nport-range = "9000-9009"\nhello_timeout = 5\n'
        'allow_target = ["10.0.0.0/8"]\ntype = "stunnel"\n'
    )
    r = run(["--config", str(cfg)], env={"SCISTREAM_PORT": "6001"})
    assert r.exit_code == 0, r.output
    c = captured[-1]
    assert (c.listener_ip, c.port_range, c.hello_timeout, c.allow_targets, c.backend_type, c.port) == (
        "10.1.1.1",
        (9000, 9009),
        5.0,
        ["10.0.0.0/8"],
        "stunnel",
        6001,
    )
    r = run(["--config", str(cfg), "--listener-ip", "10.2.2.2"])  # the command line wins
    assert captured[-1].listener_ip == "10.2.2.2"
    assert captured[-1].handshake_timeout == 10.0
    r = run(["--handshake-timeout", "2.5"])
    assert r.exit_code == 0 and captured[-1].handshake_timeout == 2.5
    r = run([], env={"SCISTREAM_HANDSHAKE_TIMEOUT": "4"})
    assert r.exit_code == 0 and captured[-1].handshake_timeout == 4.0
    assert CliRunner().invoke(cli.main, ["--handshake_timeout", "0"]).exit_code == 2
    cfg.write_text("bogus_key = 1\n")
    r = CliRunner().invoke(cli.main, ["--config", str(cfg)])
    assert r.exit_code == 2 and "bogus_key" in r.output


def test_backend_options_from_command_line_env_and_file(captured: list[ServerConfig], tmp_path: Any) -> None:
    r = run(
        [
            "-t",
            "Haproxy",
            "--backend-option",
            "tls_cert=/etc/gw.pem",
            "--backend_option=tls_key=/etc/gw.key",
            "--backend-option",
            "tls-server-name=gw.example.org",  # dashes read as underscores
            "--backend-option",
            "s2ds_args=--workers 2 --pipe-size=4M",  # the first '=' splits
        ]
    )
    assert r.exit_code == 0, r.output
    assert captured[-1].backend_extra == {
        "tls_cert": "/etc/gw.pem",
        "tls_key": "/etc/gw.key",
        "tls_server_name": "gw.example.org",
        "s2ds_args": "--workers 2 --pipe-size=4M",
    }
    assert run([]).exit_code == 0 and captured[-1].backend_extra == {}

    # A config file's table, then $SCISTREAM_BACKEND_OPTION, then the command line: merged per key.
    cfg = tmp_path / "s2cs.toml"
    cfg.write_text(
        '[s2cs]\ntype = "nginx"\n\n[backend_options]\ntls_cert = "/file/gw.pem"\n'
        'tls_key = "/file/gw.key"\nnginx_workers = 4\nstart_timeout = 2.5\n'
    )
    env = {"SCISTREAM_BACKEND_OPTION": "tls_key=/env/gw.key 'tls_ca=/env/my ca.pem'"}
    r = run(["--config", str(cfg), "--backend-option", "nginx_workers=8"], env=env)
    assert r.exit_code == 0, r.output
    assert captured[-1].backend_type == "nginx"
    assert captured[-1].backend_extra == {
        "tls_cert": "/file/gw.pem",
        "tls_key": "/env/gw.key",
        "tls_ca": "/env/my ca.pem",
        "nginx_workers": "8",
        "start_timeout": "2.5",
    }
    # The other spellings of the table: inside [s2cs], at the top of a file without [s2cs],
    # and the option's own name with a list of KEY=VALUE.
    for text in (
        '[s2cs]\ntype = "haproxy"\n[s2cs.backend_options]\ntls_ca = "/ca.pem"\n',
        'type = "haproxy"\n[backend_options]\ntls_ca = "/ca.pem"\n',
        'type = "haproxy"\nbackend_option = ["tls_ca=/ca.pem"]\n',
    ):
        cfg.write_text(text)
        r = run(["--config", str(cfg)])
        assert r.exit_code == 0, (text, r.output)
        assert captured[-1].backend_extra == {"tls_ca": "/ca.pem"}, text

    seen = len(captured)
    for argv, env, expect in (
        (["--backend-option", "tls_cert"], {}, "is not KEY=VALUE"),
        (["--backend-option", "=x"], {}, "is not KEY=VALUE"),
        ([], {"SCISTREAM_BACKEND_OPTION": "tls_cert"}, "SCISTREAM_BACKEND_OPTION"),
        ([], {"SCISTREAM_BACKEND_OPTION": "tls_cert='/x"}, "shell quoting"),
    ):
        r = CliRunner().invoke(cli.main, argv, env=env)
        assert r.exit_code == 2 and expect in r.output, (argv, env, r.output)
    for text, expect in (
        ("[backend_options]\ntls_ca = true\n", "must be a string or a number"),
        ("[backend_options]\ntls_ca = [1]\n", "must be a string or a number"),
        ("backend_options = 3\n", "must be a table"),
        ('backend_option = "tls_ca=/x"\n', "must be a list"),
        ('backend_option = ["tls_ca"]\n', "is not KEY=VALUE"),
        ('[s2cs]\n[s2cs.backend_options]\na = "1"\n[backend_options]\nb = "2"\n', "once"),
    ):
        cfg.write_text(text)
        r = CliRunner().invoke(cli.main, ["--config", str(cfg)])
        assert r.exit_code == 2 and expect in r.output, (text, r.output)
    assert len(captured) == seen and "Traceback" not in r.output


@pytest.fixture
def cert_pair(tmp_path: Any) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    crt, keyf = tmp_path / "server.crt", tmp_path / "server.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyf.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    os.chmod(keyf, 0o600)
    return str(crt), str(keyf)


def test_control_channel_tls_round_trip(tmp_path: Any, cert_pair: tuple[str, str]) -> None:
    crt, key = cert_pair
    st = ServerThread(make_config(tmp_path, ssl=True, server_crt=crt, server_key=key), FakeBackend())
    try:
        with open(crt, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())  # pin, as s2uc --server_cert
        with grpc.secure_channel(st.address, creds) as ch:
            stub = scistream_pb2_grpc.ControlStub(ch)
            uid = new_uid()
            fut = stub.req.future(pb.Request(uid=uid, role="PROD", num_conn=1), timeout=10)
            stub.hello(pb.Hello(uid=uid, prod_listeners=["127.0.0.1:5074"]), timeout=5)
            assert len(fut.result().session_key) == 32
            stub.release(pb.Release(uid=uid), timeout=5)
        # a plaintext client gets nowhere
        with grpc.insecure_channel(st.address) as ch, pytest.raises(grpc.RpcError):
            scistream_pb2_grpc.ControlStub(ch).server_info(pb.ServerInfoRequest(), timeout=2)
    finally:
        st.stop()


def _partial_client_hello() -> bytes:
    """The first half of a real TLS ClientHello (a handshake that stalls mid-message)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[0] == 0x16  # a handshake record
    return hello[: len(hello) // 2]


def test_stalled_control_handshakes_are_closed(tmp_path: Any, cert_pair: tuple[str, str]) -> None:
    crt, key = cert_pair
    timeout, slack = 1.0, 5.0
    cfg = make_config(tmp_path, ssl=True, server_crt=crt, server_key=key, handshake_timeout=timeout)
    st = ServerThread(cfg, FakeBackend())
    stalled: list[socket.socket] = []
    try:
        host, port = st.address.rsplit(":", 1)
        started = time.monotonic()
        silent = socket.create_connection((host, int(port)), timeout=5)  # never sends a ClientHello
        half = socket.create_connection((host, int(port)), timeout=5)
        stalled += [silent, half]
        half.sendall(_partial_client_hello())
        for sock in stalled:
            sock.settimeout(timeout + slack)
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(4096) == b""  # closed by s2cs, not by our timeout
            took = time.monotonic() - started
            assert timeout * 0.5 < took < timeout + slack, took
        # The control port still serves a client that completes its handshake.
        with open(crt, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        with grpc.secure_channel(st.address, creds) as ch:
            info = scistream_pb2_grpc.ControlStub(ch).server_info(pb.ServerInfoRequest(), timeout=5)
            assert info.version
    finally:
        for sock in stalled:
            sock.close()
        st.stop()


def test_missing_cert_is_one_clear_line(tmp_path: Any) -> None:
    env = dict(os.environ, SCISTREAM_STATE_DIR=str(tmp_path / "st"))
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "scistream.s2cs",
            "--port",
            "0",
            "--bind",
            "127.0.0.1",
            "--server_crt",
            str(tmp_path / "nope.crt"),
            "--type",
            "stunnel",
        ],
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert p.returncode == 1
    last = p.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("s2cs: cannot read the control-channel certificate") and "Traceback" not in p.stderr
    )
    assert not (tmp_path / "app.log").exists()


def test_startup_failures_are_one_clear_line(tmp_path: Any) -> None:
    busy = socket.create_server(("127.0.0.1", 0))
    try:
        env = dict(os.environ, SCISTREAM_STATE_DIR=str(tmp_path / "st"))
        base = [
            sys.executable,
            "-m",
            "scistream.s2cs",
            "--bind",
            "127.0.0.1",
            "--ssl",
            "False",
            "-t",
            "stunnel",
        ]
        for extra, expect in (
            (["--port", "0", "--backend-option", "tls_cert=/x.pem"], "unknown backend option 'tls_cert'"),
            (
                ["--port", "0", "-t", "haproxy", "--backend-option", "tls_crt=/x.pem"],
                "unknown backend option 'tls_crt' (did you mean 'tls_cert'?) for --type haproxy; "
                "valid keys: connect_timeout, drain_timeout, haproxy_bin,",
            ),
            (
                ["--port", "0", "-t", "haproxy", "--backend-option", f"tls_cert={tmp_path / 'no.pem'}"],
                "the haproxy data plane could not start: HAProxy setting tls_cert:",
            ),
            (
                ["--port", "0", "-t", "nginx", "--backend-option", "idle_timeout=soon"],
                "the nginx data plane could not start: backend setting idle_timeout='soon' is not a number",
            ),
            (["--port", "0", "--listener-ip", "0.0.0.0"], "--listener-ip 0.0.0.0 is not an address peers"),
            (["--port", "0", "--listener_ip", ""], "--listener-ip is empty: it is not an address peers"),
            (["--port", "0", "--events", "7"], "--events '7': use ipc://PATH"),
            (["--port", "0", "--events", "tcp://127.0.0.1:0"], "a tcp:// events address"),
            (["--port", str(busy.getsockname()[1])], "cannot listen on"),
            (["--port", "0", "--state-dir", "/proc/nope"], "cannot create the state directory"),
        ):
            p = subprocess.run(
                [*base, *extra],
                capture_output=True,
                check=False,
                text=True,
                timeout=60,
                env=env,
                cwd=tmp_path,
            )
            assert p.returncode == 1, p.stderr
            assert p.stderr.strip().splitlines()[-1].startswith(f"s2cs: {expect}"), p.stderr
            assert "Traceback" not in p.stderr
    finally:
        busy.close()


@pytest.mark.parametrize(
    ("listener_ip", "refused"),
    [
        ("0.0.0.0", True),
        ("::", True),
        ("[::]", True),
        ("::ffff:0.0.0.0", True),
        ("", True),
        (" ", True),
        ("192.0.2.10", False),
        ("2001:db8::10", False),
        ("127.0.0.1", False),
        ("gateway.example.org", False),
    ],
)
def test_unspecified_listener_ip_is_refused(listener_ip: str, refused: bool) -> None:
    problem = listener_ip_problem(listener_ip)
    if not refused:
        assert problem is None
        return
    assert problem is not None and "not an address peers can connect to" in problem
    assert "SCISTREAM_LISTENER_IP" in problem and "--listener-ip 192.0.2.10" in problem


def test_server_refuses_an_unspecified_listener_ip_before_starting(tmp_path: Any) -> None:
    from scistream.s2cs.server import S2CSServer, StartupError

    server = S2CSServer(make_config(tmp_path, listener_ip="::"), backend=FakeBackend())
    with pytest.raises(StartupError, match="--listener-ip :: is not an address peers can connect to"):
        asyncio.run(server.start())
    assert not (tmp_path / "state").exists()  # refused before anything was created


def test_real_process_sigterm_exit_0(tmp_path: Any) -> None:
    # The stunnel backend needs no daemon: a real s2cs with a real (idle) backend.
    state = tmp_path / "state"
    lo, hi = free_range(10)
    env = dict(os.environ, SCISTREAM_STATE_DIR=str(state))
    proc = subprocess.Popen(
        [
            "s2cs",
            "--port",
            "0",
            "--bind",
            "127.0.0.1",
            "--ssl",
            "False",
            "-t",
            "Stunnel",
            "--port-range",
            f"{lo}-{hi}",
            "--listener-ip",
            "127.0.0.1",
            "--hello-timeout",
            "30",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        port = 0
        deadline = time.time() + 30
        assert proc.stderr is not None
        while time.time() < deadline and not port:
            line = proc.stderr.readline()
            if "listening on 127.0.0.1:" in line:
                port = int(line.split("listening on 127.0.0.1:")[1].split()[0])
            assert line or proc.poll() is None
        assert port
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            h = health_pb2_grpc.HealthStub(ch)
            assert h.Check(health_pb2.HealthCheckRequest(service="scistream.Control"), timeout=5).status == 1
            stub = scistream_pb2_grpc.ControlStub(ch)
            uid = new_uid()
            pending = stub.req.future(pb.Request(uid=uid, role="PROD", num_conn=2), timeout=20)
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
            with pytest.raises(grpc.RpcError):
                pending.result()  # told, not left hanging
        rest = proc.stderr.read()
        assert "Traceback" not in rest and "s2cs stopped" in rest
        assert all(bindable(p) for p in range(lo, hi + 1))
        assert not (tmp_path / "app.log").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if proc.stderr:
            proc.stderr.close()


OPTION_NAMES = [
    "--port",
    "--listener_ip",
    "--port-range",
    "--type",
    "--ssl",
    "--security",
    "--hello-timeout",
    "--metrics-port",
    "--allow-target",
    "--client-id",
    "--events",
    "--idle-timeout",
    "--backend-option",
    "--handshake-timeout",
]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.tuples(st.sampled_from(OPTION_NAMES), st.text(max_size=20)), max_size=4),
    st.text(max_size=200),
)
def test_fuzz_options_and_config_file(
    captured: list[ServerConfig], tmp_path: Any, opts: list[tuple[str, str]], toml_text: str
) -> None:
    cfg = tmp_path / "fuzz.toml"
    cfg.write_text(toml_text)
    args = [x for pair in opts for x in pair]
    for argv in (args, ["--config", str(cfg)]):
        r = CliRunner().invoke(cli.main, argv)
        assert r.exit_code in (0, 2), (argv, r.output, r.exception)
        assert "Traceback" not in r.output
