"""Backpressure (RELIABILITY 1): a consumer that stops reading while the producer writes flat
out costs the engine no more than its per-connection buffers; then every byte arrives.

The engine runs in its own process (engine_host.py) so that its RSS is measured alone."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from dputil import ServerFactory, size
from streams import GiB, MiB, Served, connect, send_stream, wait_for

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
CONNS = 4
PIPE = 1 << 20  # Tuning.pipe_size: the per-direction buffer of a plain leg
#: Per connection both directions may be full: 2 x PIPE (plus the pure engine's one 256 KiB read each).
PER_CONN_BUFFER = 2 * PIPE + 2 * (256 << 10)
STALL = float(os.environ.get("SCISTREAM_TEST_STALL", "5" if size(1, 0) else "2"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def test_slow_consumer_memory_bounded(engine_impl: str, stream_server: ServerFactory, spawn: Any,
                                      record_property: Any) -> None:
    per_conn = size(4 * GiB, 64 * MiB) // CONNS
    warm = min(16 * MiB, per_conn // 4)

    def producer(sock: socket.socket, served: Served) -> None:
        served.results["sent"] = send_stream(sock, per_conn, 100 + len(server.served))

    server = stream_server(producer)
    spec = {"impl": engine_impl, "tuning": {"pipe_size": PIPE, "tls_buffer_size": PIPE},
            "routes": [{"route_id": "bp", "listen": "127.0.0.1:0", "targets": [server.address]}]}
    host = spawn([sys.executable, str(HERE / "engine_host.py"), json.dumps(spec)],
                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    bound = json.loads(host.stdout.readline())["bound"]["bp"]

    warmed = threading.Barrier(CONNS + 1)
    resume = threading.Event()
    results: list[tuple[int, str]] = [(0, "")] * CONNS
    errors: list[BaseException] = []

    def consumer(i: int) -> None:
        try:
            with connect(bound, timeout=120) as sock:
                sock.shutdown(socket.SHUT_WR)
                digest, got = hashlib.sha256(), 0
                buf = bytearray(1 << 20)
                view = memoryview(buf)
                stalled = False
                while True:
                    if got >= warm and not stalled:
                        warmed.wait(60)
                        resume.wait(120)
                        stalled = True
                    n = sock.recv_into(view[: min(len(buf), warm - got)] if got < warm else view)
                    if n == 0:
                        break
                    digest.update(view[:n])
                    got += n
                results[i] = (got, digest.hexdigest())
        except BaseException as exc:
            errors.append(exc)
            if not warmed.broken:
                warmed.abort()

    threads = [threading.Thread(target=consumer, args=(i,)) for i in range(CONNS)]
    for t in threads:
        t.start()
    try:
        warmed.wait(60)
        base = rss_kib(host.pid)
        peak = base
        deadline = time.monotonic() + STALL
        while time.monotonic() < deadline:  # the producers push flat out; nobody reads
            peak = max(peak, rss_kib(host.pid))
            time.sleep(0.05)
    finally:
        resume.set()
        for t in threads:
            t.join(300)
    assert not errors, errors
    growth = (peak - base) * 1024
    bound_bytes = PER_CONN_BUFFER * CONNS + 4 * MiB
    record_property("rss_growth_mib", round(growth / MiB, 2))
    log.info("%s engine: RSS grew %.1f MiB during a %.0f s stall (limit %.1f MiB)",
             engine_impl, growth / MiB, STALL, bound_bytes / MiB)
    assert growth < bound_bytes, f"engine RSS grew {growth / MiB:.1f} MiB (limit {bound_bytes / MiB:.1f})"
    served = server.wait_served(CONNS, timeout=120)
    assert sorted(results) == sorted((per_conn, s.results["sent"]) for s in served)
    assert wait_for(lambda: _counts(host)["connections"] == 0, 10)
    host.stdin.write("quit\n")
    host.stdin.flush()
    assert host.wait(30) == 0


def _counts(host: subprocess.Popen[str]) -> dict[str, int]:
    assert host.stdin is not None and host.stdout is not None
    host.stdin.write("counts\n")
    host.stdin.flush()
    out: dict[str, int] = json.loads(host.stdout.readline())
    return out
