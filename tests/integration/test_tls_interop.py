"""`s2ds forward` against other TLS 1.3 PSK implementations in *their* default configuration.

A user who replaces a hand-written stunnel on one side keeps stunnel (or an openssl tool) on
the other, configured with nothing but the key. The PSK of all of them is bound to SHA-256,
and their clients list TLS_AES_256_GCM_SHA384 first: our server must still pick a SHA-256
suite (issue 13). Matrix, each with the bytes checked by SHA-256 both ways:

* our server <- stunnel client (only ``PSKsecrets`` + ``sslVersionMin = TLSv1.3``), and with
  each TLS 1.3 suite listed first;
* our server <- ``openssl s_client -tls1_3 -psk_identity client1 -psk KEY``, default order and
  each suite listed first (``-ciphersuites``);
* our client -> stunnel server defaults, and -> ``openssl s_server -tls1_3 -psk KEY -nocert``
  (its order, each suite first with ``-serverpref``, and a HelloRetryRequest);
* the 1.x compat mode (TLS 1.2 PSK) against stunnel's TLS 1.2 defaults, both directions.

Every process a test starts is stopped by pid in a ``finally``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from s2ds_support import Forward, echo_roundtrip, echo_server, need_native, stop
from streams import MiB, Served, StreamServer, wait_bound

pytestmark = [
    pytest.mark.skipif(shutil.which("stunnel") is None, reason="needs stunnel4 (Debian package stunnel4)"),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI"),
]

SUITES = ("TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256", "TLS_CHACHA20_POLY1305_SHA256")
IDENTITY = "client1"


def first(suite: str) -> str:
    """All three TLS 1.3 suites with ``suite`` first."""
    return ":".join([suite, *(s for s in SUITES if s != suite)])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def psk_file(tmp_path: Path) -> tuple[Path, str]:
    """A PSKsecrets file shared by both ends: (path, key as hex)."""
    key = os.urandom(32).hex()
    path = tmp_path / "psk.txt"
    path.write_text(f"{IDENTITY}:{key}\n")
    path.chmod(0o600)
    return path, key


@contextlib.contextmanager
def forward(*args: str) -> Iterator[Forward]:
    fwd = Forward("--listen", "127.0.0.1:0", *args)
    try:
        yield fwd
    finally:
        code = fwd.finish()
        assert code == 0, fwd.stderr
        assert "Traceback" not in fwd.stderr


@contextlib.contextmanager
def stunnel(tmp: Path, *, client: bool, connect: str, options: list[str]) -> Iterator[str]:
    """A foreground stunnel with one service; yields its accept address."""
    port = free_port()
    name = f"stunnel-{'c' if client else 's'}-{time.monotonic_ns()}"
    lines = ["foreground = yes", "pid =", "debug = 5", "[svc]", f"accept = 127.0.0.1:{port}",
             f"connect = {connect}", *(["client = yes"] if client else []), *options]
    conf = tmp / f"{name}.conf"
    conf.write_text("\n".join(lines) + "\n")
    log = tmp / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(["stunnel", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_bound(port, proc)
        yield f"127.0.0.1:{port}"
    finally:
        stop(proc)


def through(address: str, total: int = 2 * MiB + 7) -> None:
    """An echo round trip through ``address``: what comes back is what was sent."""
    sent, got, n = echo_roundtrip(address, total)
    assert (got, n) == (sent, total)


def tls13(psk: Path) -> list[str]:
    """stunnel's TLS 1.3 PSK settings and nothing else: its default suites and their order."""
    return [f"PSKsecrets = {psk}", "sslVersionMin = TLSv1.3"]


# --------------------------------------------------------------------------- our server
@pytest.mark.parametrize("suite_first", [None, *SUITES])
def test_stunnel_client_to_our_server(tmp_path: Path, psk_file: tuple[Path, str],
                                      suite_first: str | None) -> None:
    need_native("TLS 1.3 PSK")
    psk, _ = psk_file
    extra = [f"ciphersuites = {first(suite_first)}"] if suite_first else []
    server_args = ("--tls", "server", "--psk-file", str(psk))
    with echo_server() as echo, forward("--to", echo.address, *server_args) as ours, \
            stunnel(tmp_path, client=True, connect=ours.bound, options=tls13(psk) + extra) as front:
        through(front)


class Sink:
    """A target that reads exactly ``expect`` bytes, then sends ``reply`` and closes;
    ``received`` is the SHA-256 of what it read."""

    def __init__(self, expect: int, reply: bytes) -> None:
        self.expect, self.reply = expect, reply
        self.received = ""
        self.server = StreamServer(self._handle, "127.0.0.1")

    def _handle(self, sock: socket.socket, served: Served) -> None:
        sock.settimeout(30)
        h, n = hashlib.sha256(), 0
        while n < self.expect and (data := sock.recv(min(1 << 16, self.expect - n))):
            h.update(data)
            n += len(data)
        self.received = h.hexdigest() if n == self.expect else f"short: {n}"
        sock.sendall(self.reply)


def text_payload(n: int, seed: int) -> bytes:
    """n bytes of lowercase hex lines (no line an openssl tool would read as a command)."""
    out = bytearray()
    block = hashlib.sha256(str(seed).encode()).hexdigest().encode()
    while len(out) < n:
        out += block + b"\n"
        block = hashlib.sha256(block).hexdigest().encode()
    return bytes(out[:n])


@pytest.mark.parametrize("suite_first", [None, *SUITES])
def test_openssl_s_client_to_our_server(tmp_path: Path, psk_file: tuple[Path, str],
                                        suite_first: str | None) -> None:
    need_native("TLS 1.3 PSK")
    psk, key = psk_file
    up, down = text_payload(MiB // 2, 1), text_payload(MiB // 2 + 3, 2)
    sink = Sink(len(up), down)
    try:
        with forward("--to", sink.server.address, "--tls", "server", "--psk-file", str(psk)) as ours:
            argv = ["openssl", "s_client", "-connect", ours.bound, "-tls1_3", "-psk_identity", IDENTITY,
                    "-psk", key, "-quiet", "-nocommands"]
            if suite_first:
                argv += ["-ciphersuites", first(suite_first)]
            client = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE)
            try:
                out, err = client.communicate(up, timeout=30)
            finally:
                stop(client)
        assert sink.received == hashlib.sha256(up).hexdigest(), err
        assert hashlib.sha256(out).hexdigest() == hashlib.sha256(down).hexdigest(), err
    finally:
        sink.server.close()


# --------------------------------------------------------------------------- our client
def test_our_client_to_stunnel_server(tmp_path: Path, psk_file: tuple[Path, str]) -> None:
    need_native("TLS 1.3 PSK")
    psk, _ = psk_file
    with echo_server() as echo, \
            stunnel(tmp_path, client=False, connect=echo.address, options=tls13(psk)) as gw, \
            forward("--to", gw, "--tls", "client", "--psk-file", str(psk)) as ours:
        through(ours.bound)


def s_server_exchange(front: str, server: subprocess.Popen[bytes], up: bytes, down: bytes) -> bytes:
    """Through our client route at ``front`` to ``server`` (s_server): send ``up``, let the
    server send ``down`` (its stdin), half-close; returns what arrived from the server."""
    assert server.stdin is not None
    with socket.create_connection(tuple(front.rsplit(":", 1)), timeout=30) as sock:  # type: ignore[arg-type]
        got = bytearray()
        reader = threading.Thread(target=lambda: got.extend(recv_until(sock, len(down))))
        reader.start()
        sock.sendall(up)
        server.stdin.write(down)
        server.stdin.flush()
        reader.join(30)
        sock.shutdown(socket.SHUT_WR)
        return bytes(got)


def recv_until(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n and (data := sock.recv(1 << 16)):
        buf += data
    return bytes(buf)


@pytest.mark.parametrize("variant", ["default", *SUITES, "hello-retry"])
def test_our_client_to_openssl_s_server(tmp_path: Path, psk_file: tuple[Path, str], variant: str) -> None:
    """s_server in its order (it follows the client's), with each suite first and its own
    preference on, and with a group our client does not send a key share for first, which
    forces a HelloRetryRequest (the second ClientHello must still carry the PSK)."""
    need_native("TLS 1.3 PSK")
    psk, key = psk_file
    port = free_port()
    argv = ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-tls1_3", "-psk_identity", IDENTITY,
            "-psk", key, "-nocert", "-quiet", "-naccept", "1"]
    if variant in SUITES:
        argv += ["-ciphersuites", first(variant), "-serverpref"]
    elif variant == "hello-retry":
        argv += ["-groups", "P-256"]
    out_path = tmp_path / "s_server.out"
    up, down = text_payload(MiB // 2, 3), text_payload(MiB // 2 + 5, 4)
    with out_path.open("wb") as out:
        server = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_bound(port, server)
        with forward("--to", f"127.0.0.1:{port}", "--tls", "client", "--psk-file", str(psk)) as ours:
            got = s_server_exchange(ours.bound, server, up, down)
            server.wait(15)
    finally:
        stop(server)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(down).hexdigest()
    assert hashlib.sha256(out_path.read_bytes()).hexdigest() == hashlib.sha256(up).hexdigest(), \
        out_path.read_bytes()[-300:]


# --------------------------------------------------------------------------- 1.x compat
def compat_psk(tmp: Path, uid: str) -> Path:
    """What a SciStream 1.x gateway writes for ``uid``."""
    path = tmp / "compat-psk.txt"
    path.write_text(f"{IDENTITY}:{uid.replace('-', '')}\n")
    path.chmod(0o600)
    return path


def test_compat_server_with_stunnel_tls12_defaults(tmp_path: Path) -> None:
    need_native("TLS 1.2 PSK")
    uid = str(uuid.uuid4())
    tls12 = [f"PSKsecrets = {compat_psk(tmp_path, uid)}", "sslVersionMax = TLSv1.2"]
    with echo_server() as echo, \
            forward("--to", echo.address, "--tls", "server", "--psk-from-uid", uid) as ours, \
            stunnel(tmp_path, client=True, connect=ours.bound, options=tls12) as front:
        through(front)


def test_compat_client_with_stunnel_tls12_defaults(tmp_path: Path) -> None:
    need_native("TLS 1.2 PSK")
    uid = str(uuid.uuid4())
    tls12 = [f"PSKsecrets = {compat_psk(tmp_path, uid)}", "sslVersionMax = TLSv1.2"]
    with echo_server() as echo, stunnel(tmp_path, client=False, connect=echo.address, options=tls12) as gw, \
            forward("--to", gw, "--tls", "client", "--psk-from-uid", uid) as ours:
        through(ours.bound)
