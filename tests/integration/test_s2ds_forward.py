"""s2ds forward: the standalone forwarder end to end (plain, TLS cert, TLS PSK pair), and its input errors."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from s2ds_support import (
    S2DS,
    Forward,
    echo_roundtrip,
    echo_server,
    make_certs,
    need_native,
    refused,
    stop,
)
from streams import MiB, connect, wait_for


def test_plain_forward_with_stats() -> None:
    with echo_server() as echo:
        fwd = Forward("--listen", "127.0.0.1:0", "--to", echo.address, "--stats", "--stats-interval", "0.2")
        try:
            sent, got, n = echo_roundtrip(fwd.bound, 2 * MiB + 3)
            assert (got, n) == (sent, 2 * MiB + 3)
            assert wait_for(lambda: any("2.10 MB" in line for line in fwd.lines[1:]), 5), fwd.lines
        finally:
            code = fwd.finish()
        assert code == 0, fwd.stderr
        assert "Traceback" not in fwd.stderr


def test_forward_round_robin_and_rate_option() -> None:
    with echo_server() as a, echo_server() as b:
        fwd = Forward("--listen", "127.0.0.1:0", "--to", f"{a.address},{b.address}", "--rate", "1Gbit")
        try:
            assert "125000000 B/s" in fwd.lines[0]
            for _ in range(4):
                sent, got, _n = echo_roundtrip(fwd.bound, 4096)
                assert got == sent
            assert (a.accepted, b.accepted) == (2, 2)
        finally:
            assert fwd.finish() == 0


def test_forward_tls_cert_pair(tmp_path: Path) -> None:
    ca, cert, key = make_certs(tmp_path)
    with echo_server() as echo:
        server = Forward(
            "--listen",
            "127.0.0.1:0",
            "--to",
            echo.address,
            "--tls",
            "server",
            "--cert",
            str(cert),
            "--key",
            str(key),
        )
        try:
            client = Forward(
                "--listen",
                "127.0.0.1:0",
                "--to",
                server.bound,
                "--tls",
                "client",
                "--ca",
                str(ca),
                "--server-name",
                "localhost",
            )
            try:
                sent, got, n = echo_roundtrip(client.bound, MiB + 1)
                assert (got, n) == (sent, MiB + 1)
            finally:
                assert client.finish() == 0, client.stderr
        finally:
            assert server.finish() == 0, server.stderr


@pytest.mark.parametrize("mode", ["psk-file", "uid"])
def test_forward_tls_psk_pair(tmp_path: Path, mode: str) -> None:
    need_native("a TLS PSK forwarder pair")
    if mode == "psk-file":
        psk = tmp_path / "psk.txt"
        psk.write_text(f"other:{'x' * 32}\nsession1:{os.urandom(24).hex()}\n")
        psk.chmod(0o600)
        tls_args = ["--psk-file", str(psk), "--psk-identity", "session1"]
    else:
        tls_args = ["--psk-from-uid", str(uuid.uuid4())]
    with echo_server() as echo:
        server = Forward("--listen", "127.0.0.1:0", "--to", echo.address, "--tls", "server", *tls_args)
        try:
            client = Forward("--listen", "127.0.0.1:0", "--to", server.bound, "--tls", "client", *tls_args)
            try:
                sent, got, n = echo_roundtrip(client.bound, 2 * MiB + 5)
                assert (got, n) == (sent, 2 * MiB + 5)
            finally:
                assert client.finish() == 0, client.stderr
        finally:
            assert server.finish() == 0, server.stderr
    for text in (client.stderr, server.stderr):
        assert "Traceback" not in text


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--listen", "nowhere", "--to", "127.0.0.1:9"], "not of the form host:port"),
        (["--listen", "127.0.0.1:0", "--to", "127.0.0.1:99999"], "out of range"),
        (["--listen", "127.0.0.1:0", "--to", "127.0.0.1:9", "--rate", "fast"], "not a rate"),
        (
            [
                "--listen",
                "127.0.0.1:0",
                "--to",
                "127.0.0.1:9",
                "--tls",
                "server",
                "--psk-file",
                "/nonexistent/psk",
            ],
            "cannot read PSK file",
        ),
        (["--listen", "127.0.0.1:0", "--to", "127.0.0.1:9", "--psk-from-uid", "abc"], "need --tls"),
        (["--listen", "127.0.0.1:0", "--to", "127.0.0.1:9", "--workers", "-1"], "must not be negative"),
        (["--listen", "127.0.0.1:0"], "--to"),
    ],
)
def test_forward_bad_input(args: list[str], needle: str) -> None:
    out = subprocess.run([*S2DS, "forward", *args], check=False, capture_output=True, text=True, timeout=20)
    assert out.returncode == 2, out
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert needle in out.stderr and out.stderr.startswith("s2ds: error:")


def test_forward_address_in_use_is_one_line() -> None:
    with echo_server() as echo:
        fwd = Forward("--listen", "127.0.0.1:0", "--to", echo.address)
        try:
            out = subprocess.run(
                [*S2DS, "forward", "--listen", fwd.bound, "--to", echo.address],
                check=False,
                capture_output=True,
                text=True,
                timeout=20,
            )
            errors = [ln for ln in out.stderr.splitlines() if "error" in ln.lower()]
            assert out.returncode == 1 and len(errors) == 1, out.stderr
            assert errors[0].startswith("s2ds: error:") and "in use" in errors[0]
            assert "Traceback" not in out.stderr
        finally:
            assert fwd.finish() == 0
            stop(fwd.proc)


def test_forward_ctrl_c_drains_then_second_signal_exits() -> None:
    with echo_server() as echo:
        fwd = Forward("--listen", "127.0.0.1:0", "--to", echo.address)
        try:
            first_echo = threading.Event()
            result: dict[str, tuple[str, str, int]] = {}

            def stream() -> None:
                result["r"] = echo_roundtrip(
                    fwd.bound, MiB, chunk=32 << 10, pace=0.03, on_first_echo=first_echo.set
                )

            t = threading.Thread(target=stream)
            t.start()
            assert first_echo.wait(10)
            fwd.proc.send_signal(signal.SIGINT)
            assert wait_for(lambda: refused(fwd.bound), 3)
            t.join(30)
            sent, got, n = result["r"]
            assert (got, n) == (sent, MiB)
            assert fwd.proc.wait(10) == 0
        finally:
            stop(fwd.proc)

        fwd = Forward("--listen", "127.0.0.1:0", "--to", echo.address)
        held = connect(fwd.bound)
        try:
            held.sendall(b"x")
            assert held.recv(1) == b"x"
            fwd.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            assert fwd.proc.poll() is None  # an idle stream is not cut by the drain
            t0 = time.monotonic()
            code = fwd.finish(signal.SIGTERM, timeout=5)
            assert time.monotonic() - t0 < 2.0 and code == 128 + signal.SIGTERM
        finally:
            held.close()


def test_forward_signal_right_after_listening_line_drains() -> None:
    """The handlers are in place before "listening on" is printed: a SIGTERM sent the moment
    the line is read drains (exit 0); it never kills the forwarder with the default action."""
    with echo_server() as echo:
        for _ in range(5):
            fwd = Forward("--listen", "127.0.0.1:0", "--to", echo.address)
            try:
                fwd.proc.send_signal(signal.SIGTERM)
                assert fwd.proc.wait(10) == 0
            finally:
                stop(fwd.proc)


STUNNEL = shutil.which("stunnel4") or shutil.which("stunnel")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.stunnel
@pytest.mark.parametrize("our_side", ["client", "server"])
def test_forward_compat_interoperates_with_a_1x_stunnel(tmp_path: Path, our_side: str) -> None:
    """`s2ds forward --psk-from-uid` speaks to a stunnel configured exactly as SciStream 1.x does
    (client1:<uid without dashes>, ciphers = eNULL), in either role."""
    need_native("TLS 1.2 PSK against stunnel")
    if STUNNEL is None:
        pytest.skip("stunnel4 is not installed")
    uid = str(uuid.uuid4())
    psk = tmp_path / "legacy.psk"
    psk.write_text(f"client1:{uid.replace('-', '')}\n")
    psk.chmod(0o600)
    ours: Forward | None = None
    with echo_server() as echo, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        legacy_port = s.getsockname()[1]
        s.close()
        if our_side == "client":
            # compute node: our forwarder; gateway: a 1.x stunnel server in front of the app
            legacy_cfg = f"accept = 127.0.0.1:{legacy_port}\nconnect = {echo.address}\n"
        else:
            # gateway: our forwarder (TLS server); compute node: a 1.x stunnel client
            ours = Forward(
                "--listen", "127.0.0.1:0", "--to", echo.address, "--tls", "server", "--psk-from-uid", uid
            )
            legacy_cfg = f"client = yes\naccept = 127.0.0.1:{legacy_port}\nconnect = {ours.bound}\n"
        conf = tmp_path / "legacy.conf"
        conf.write_text(
            "foreground = yes\npid =\ndebug = 5\n[legacy]\n"
            + legacy_cfg
            + f"ciphers = eNULL\nsslVersionMax = TLSv1.2\nPSKsecrets = {psk}\nsecurityLevel = 0\n"
        )
        log = (tmp_path / "legacy.log").open("wb")
        legacy = subprocess.Popen([STUNNEL, str(conf)], stdout=log, stderr=subprocess.STDOUT)
        try:
            assert wait_for(lambda: port_open(legacy_port) or legacy.poll() is not None, 10)
            if our_side == "client":
                ours = Forward(
                    "--listen",
                    "127.0.0.1:0",
                    "--to",
                    f"127.0.0.1:{legacy_port}",
                    "--tls",
                    "client",
                    "--psk-from-uid",
                    uid,
                )
                entry = ours.bound
            else:
                entry = f"127.0.0.1:{legacy_port}"
            sent, got, n = echo_roundtrip(entry, MiB)
            assert (got, n) == (sent, MiB), (tmp_path / "legacy.log").read_text()
            assert ours.finish() == 0, ours.stderr
        finally:
            stop(legacy)
            log.close()
            if ours is not None:
                stop(ours.proc)
        legacy_log = (tmp_path / "legacy.log").read_text()
        assert "AECDH" not in legacy_log  # a PSK suite was agreed on, never the anonymous one
