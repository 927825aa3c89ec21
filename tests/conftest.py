"""Fixtures shared by every test area: free ports and cleanup of processes a test starts.

Keep this file small and generic; area-specific fixtures live in tests/<area>/conftest.py.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
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
