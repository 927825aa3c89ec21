"""RELIABILITY 19: 10,000 short connections through one route (connect, send a few bytes, read
the echo, close), 100 open at a time. Afterwards the engine process holds the fds and threads
it held before, the route's connections_active gauge is back to 0 and every byte is counted.

The engine runs alone in tests/dataplane/engine_host.py so that /proc/<pid>/fd and
/proc/<pid>/task count the engine's own fds and threads, not the test's clients.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dputil import EchoLoop
from rbutil import ProcSample, sample, short_connections
from streams import wait_for

log = logging.getLogger(__name__)

CONNS = 10_000
BATCH = 100
PAYLOAD = 8
ENGINE_HOST = Path(__file__).parent.parent / "dataplane" / "engine_host.py"


class EngineHost:
    """engine_host.py with one plain route to ``target``, asked for its counters over stdin."""

    def __init__(self, spawn: Callable[..., subprocess.Popen[Any]], impl: str, target: str) -> None:
        spec = {
            "impl": impl,
            "tuning": {},
            "routes": [{"route_id": "short", "listen": "127.0.0.1:0", "targets": [target]}],
        }
        self.proc = spawn(
            [sys.executable, str(ENGINE_HOST), json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        line = self.stdout.readline()
        assert line, f"engine_host exited with {self.proc.wait(10)}"
        self.bound: str = json.loads(line)["bound"]["short"]

    def ask(self, what: str) -> dict[str, Any]:
        self.stdin.write(what + "\n")
        self.stdin.flush()
        out: dict[str, Any] = json.loads(self.stdout.readline())
        return out

    def route(self) -> dict[str, Any]:
        out: dict[str, Any] = self.ask("stats")["short"]
        return out

    def sample(self) -> ProcSample:
        return sample(self.proc.pid)

    def quit(self) -> int:
        self.stdin.write("quit\n")
        self.stdin.flush()
        return self.proc.wait(30)


def test_ten_thousand_short_connections(engine_impl: str, echo: EchoLoop, spawn: Any) -> None:
    host = EngineHost(spawn, engine_impl, echo.address)
    base = host.sample()
    base_counts = host.ask("counts")
    # A few connections first: a pool the engine creates once (the pure engine's asyncio
    # executor threads) is not a leak; everything after that must return to this level.
    short_connections(host.bound, BATCH, BATCH, PAYLOAD)
    assert wait_for(lambda: host.route()["connections_active"] == 0, 10), host.route()
    warm = host.sample()

    echoed = short_connections(host.bound, CONNS, BATCH, PAYLOAD)
    assert echoed == CONNS * PAYLOAD

    assert wait_for(lambda: host.route()["connections_active"] == 0, 20), host.route()
    assert wait_for(lambda: host.sample().fds == base.fds, 10), (host.sample(), base)
    assert wait_for(lambda: host.sample().threads == warm.threads, 10), (host.sample(), warm)
    after = host.sample()
    log.info(
        "%s engine after %d short connections: fds %d -> %d, threads %d -> %d (warm %d), "
        "RSS %.1f -> %.1f MiB, CPU %.2f s",
        engine_impl,
        CONNS,
        base.fds,
        after.fds,
        base.threads,
        after.threads,
        warm.threads,
        base.rss / 2**20,
        after.rss / 2**20,
        after.cpu - base.cpu,
    )
    if engine_impl == "native":
        # Worker threads are made once, at start: not one more after 10,000 connections.
        assert after.threads == base.threads, (after, base)
    st = host.route()
    total = CONNS + BATCH
    assert st["connections_total"] == total
    assert st["bytes_to_target"] == st["bytes_from_target"] == total * PAYLOAD
    assert st["errors"] == {}, st["errors"]
    assert echo.accepted == total
    counts = host.ask("counts")  # both engines count these
    assert counts == base_counts, (counts, base_counts)
    assert host.quit() == 0
