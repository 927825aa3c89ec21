"""An s2cs as a real process on loopback, as users start it: for the tests that drive it
through its command line (seed tutorials, backend options), and the commands users type
against it (``run``, ``background``) with a test's environment."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from scistream.demo import free_port_range
from scistream.netns import stop_process
from scistream.s2cs.backends.native import stop_spawned_s2ds


@dataclass
class Gateway:
    address: str
    proc: subprocess.Popen[bytes]
    log: Path


def start_s2cs(workdir: Path, name: str, *args: str, ports: int = 12) -> Gateway:
    """``s2cs --port 0`` on 127.0.0.1 with its own state dir and a free data port range of
    ``ports``; returns once it listens (its log says where), or raises with the log's tail."""
    lo, hi = free_port_range(ports)
    log = workdir / f"{name}.log"
    env = dict(os.environ, SCISTREAM_STATE_DIR=str(workdir / f"state-{name}"))
    env.pop("SCISTREAM_BACKEND_OPTION", None)
    argv = [
        "s2cs",
        "--port",
        "0",
        "--bind",
        "127.0.0.1",
        "--listener-ip",
        "127.0.0.1",
        "--port_range",
        f"{lo}-{hi}",
        *args,
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))
        if m:
            return Gateway(f"127.0.0.1:{m.group(1)}", proc, log)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    stop_s2cs(proc)
    raise RuntimeError(f"s2cs {name} did not start: {log.read_text(errors='replace')[-2000:]}")


def stop_s2cs(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (s2cs drains and exits 0), then SIGKILL if it has not within 15 s."""
    stop_process(proc, timeout=15)


@dataclass
class PairEnv:
    """A gateway_pair as the user's commands see it: the working directory, the control
    channel's certificate, both s2cs and the environment."""

    dir: Path
    cert: Path
    prod: Gateway
    cons: Gateway
    env: dict[str, str]


@contextmanager
def gateway_pair(workdir: Path, *args: str) -> Iterator[tuple[Gateway, Gateway, dict[str, str]]]:
    """A "prod" and a "cons" s2cs started with ``args``, and the environment the user's
    commands run in (a SCISTREAM_HOME of their own, no SCISTREAM_S2UC_* defaults). Both stop
    on the way out, and with them the s2ds each left running on purpose."""
    prod = start_s2cs(workdir, "prod", *args)
    try:
        cons = start_s2cs(workdir, "cons", *args)
    except Exception:
        stop_s2cs(prod.proc)
        raise
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCISTREAM_S2UC_")}
    env["SCISTREAM_HOME"] = str(workdir / "home")
    try:
        yield prod, cons, env
    finally:
        for g in (prod, cons):
            stop_s2cs(g.proc)
        for name in ("prod", "cons"):
            stop_spawned_s2ds(str(workdir / f"state-{name}"))


class CommandEnv(Protocol):
    """Where a test's user commands run: the working directory and the environment."""

    dir: Path
    env: dict[str, str]


def run(e: CommandEnv, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), capture_output=True, text=True, env=e.env, cwd=e.dir, timeout=timeout, check=False
    )


def background(e: CommandEnv, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e.env, cwd=e.dir
    )
