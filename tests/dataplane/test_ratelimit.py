"""The per-route token bucket: a rate R over ~10 s lands within 5 %, counting both directions."""

from __future__ import annotations

import time

from dputil import ServerFactory, check_duplex, duplex_server, run_duplex_clients
from streams import MiB

from scistream.dataplane import EngineBase, Route

RATE = 8 * MiB  # bytes/s, both directions together
SECONDS = 10


def test_rate_limit_accuracy(engine: EngineBase, stream_server: ServerFactory) -> None:
    per_dir = RATE * SECONDS // 4  # two connections, each sending and receiving this much
    server = duplex_server(stream_server, per_dir)
    info = engine.add_route(Route("rl", "127.0.0.1:0", (server.address,), rate_limit=RATE))
    t0 = time.monotonic()
    clients = run_duplex_clients(info.bound, 2, per_dir)
    elapsed = time.monotonic() - t0
    check_duplex(server, clients, per_dir)
    measured = 4 * per_dir / elapsed
    assert abs(measured / RATE - 1) < 0.05, f"{measured / MiB:.2f} MiB/s for a {RATE / MiB:.0f} MiB/s cap"
