"""Fixtures shared by every test area: free ports and cleanup of processes a test starts.

Keep this file small and generic; area-specific fixtures live in tests/<area>/conftest.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest


def _free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout)


@pytest.fixture
def free_port() -> Callable[..., int]:
    """``free_port(host="127.0.0.1")``: a TCP port the kernel just handed out (racy by nature:
    prefer binding port 0 yourself where the code under test allows it)."""
    return _free_port


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[Any]]]:
    """``spawn(cmd, **popen_kwargs)``: start a process that is terminated (then killed) and
    reaped at teardown, by its own PID only, even when the test fails."""
    procs: list[subprocess.Popen[Any]] = []

    def start(cmd: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        proc: subprocess.Popen[Any] = subprocess.Popen(cmd, **kwargs)
        procs.append(proc)
        return proc

    yield start
    for proc in reversed(procs):
        _stop(proc)


def _processes_mentioning(text: str) -> dict[int, str]:
    """Live processes (not zombies, not this one) whose command line contains ``text``."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in cmdline and state not in ("Z", "X"):
            found[int(entry)] = cmdline
    return found


@pytest.fixture(scope="session", autouse=True)
def _no_process_outlives_the_suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every daemon a test starts names a file under this session's temp dir (state dir,
    socket, config). Whatever still does at the end leaked: stop it (it is ours) and fail."""
    base = str(tmp_path_factory.getbasetemp())
    yield
    leaked = _processes_mentioning(base)
    for pid in leaked:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _processes_mentioning(base):
        time.sleep(0.1)
    for pid in _processes_mentioning(base):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not leaked, "processes started by tests outlived the suite: " + "; ".join(
        f"{pid}: {cmd[:160]}" for pid, cmd in leaked.items()
    )
