"""An s2cs as a real process on loopback, as users start it: for the tests that drive it
through its command line (seed tutorials, backend options)."""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from scistream.demo import free_port_range
from scistream.netns import stop_process


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
