"""Helpers of the s2ds and native-backend tests: a daemon launcher, an echo server, an echo round trip.

Streams, the threaded server, ``connect`` and ``wait_for`` come from tests/streams.py; the echo
server is a streams.StreamServer with an echo handler, and a round trip through it is a
streams.duplex_transfer of the seeded stream that must come back unchanged.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from streams import MiB, Served, StreamServer, connect, duplex_transfer, wait_for

from scistream.certs import make_ca_and_leaf
from scistream.dataplane import native_available
from scistream.s2ds.server import probe

S2DS = [sys.executable, "-m", "scistream.s2ds"]


def need_native(what: str) -> None:
    """Skip a test that needs the native engine, or fail under SCISTREAM_REQUIRE_NATIVE=1."""
    if native_available():
        return
    if os.environ.get("SCISTREAM_REQUIRE_NATIVE") == "1":
        pytest.fail(f"SCISTREAM_REQUIRE_NATIVE=1 but the native engine is not built ({what})")
    pytest.skip(f"{what} needs the native engine (TLS PSK), which is not built")


def stop(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """Terminate (then kill) and reap one process we started."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout)


class Daemon:
    """One `s2ds serve` subprocess with its own state dir; stopped by pid at teardown."""

    def __init__(self, state_dir: Path, *args: str, address: str | None = None) -> None:
        self.state_dir = state_dir
        self.address = address or f"ipc://{state_dir / 's2ds.sock'}"
        self.log_path = state_dir / f"s2ds-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, SCISTREAM_STATE_DIR=str(state_dir))
        self.proc = subprocess.Popen(
            [*S2DS, "serve", "--control", self.address, *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def wait_ready(self, timeout: float = 20.0, **probe_kwargs: Any) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"s2ds exited ({self.proc.returncode}): {self.log()}")
            return probe(self.address, 0.3, **probe_kwargs)

        info = wait_for(ready, timeout)
        assert info, f"s2ds did not answer within {timeout} s: {self.log()}"
        return info

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop(self.proc)
        self._log.close()


#: The seed of the stream an echo round trip sends (and must get back).
ECHO_SEED = 0xEC40


def echo_roundtrip(
    endpoint: str,
    total: int,
    *,
    chunk: int = MiB,
    pace: float = 0.0,
    on_first_echo: Callable[[], None] | None = None,
    timeout: float = 30.0,
) -> tuple[str, str, int]:
    """Send ``total`` bytes of the seeded stream through ``endpoint`` to an echo server.

    Returns (sha256 sent, sha256 received, bytes received). ``chunk`` is the size of each
    write and ``pace`` sleeps after each so a stream stays in flight for a while;
    ``on_first_echo`` is called once, when the first echoed bytes arrive.
    """
    first: list[Callable[[], None]] = [on_first_echo] if on_first_echo is not None else []

    def progress(_got: int) -> None:
        if first:
            first.pop()()

    sent, (received, got) = duplex_transfer(
        endpoint, send_bytes=total, seed=ECHO_SEED, timeout=timeout, write_size=chunk, pace=pace,
        progress=progress,
    )
    return sent, got, received


def refused(endpoint: str) -> bool:
    """True if a new connection to ``endpoint`` is refused, or closed before any byte passes."""
    try:
        sock = connect(endpoint, timeout=2.0)
    except OSError:
        return True
    with sock:
        sock.settimeout(2.0)
        try:
            sock.sendall(b"ping")
            return sock.recv(16) == b""
        except OSError:
            return True


def _echo(sock: socket.socket, served: Served) -> None:
    """Echo a connection until EOF, then half-close it."""
    while data := sock.recv(1 << 16):
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def echo_server(host: str = "127.0.0.1") -> Iterator[StreamServer]:
    """A StreamServer that echoes every connection; ``accepted`` counts the connections."""
    srv = StreamServer(_echo, host)
    try:
        yield srv
    finally:
        srv.close()


def make_certs(out: Path) -> tuple[Path, Path, Path]:
    """(ca, cert, key) PEM files: a CA and a server certificate for 127.0.0.1 / localhost."""
    made = make_ca_and_leaf(out, ["127.0.0.1"], ["localhost"], common_name="localhost", days=1)
    return made.ca_cert, made.cert, made.key


class Forward:
    """One `s2ds forward` subprocess; ``bound`` is parsed from its first stdout line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*S2DS, "forward", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self.stderr = ""
        first = self.proc.stdout.readline() if self.proc.stdout else ""
        if not first.startswith("listening on "):
            stop(self.proc)
            raise AssertionError(
                f"s2ds forward did not start: {first!r} {self.proc.stderr.read() if self.proc.stderr else ''}"
            )
        self.bound = first.split()[2]
        self.lines.append(first)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def finish(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        finally:
            stop(self.proc)
            self.stderr = self.proc.stderr.read() if self.proc.stderr else ""
            self._reader.join(2)
        return code
