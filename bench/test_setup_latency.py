"""Control-plane cost: how long a two-sided session takes to set up, and how many per second.

Two s2cs (native backend, each with its s2ds) on loopback with TLS control
channels, as `scistream demo` starts them. One set-up = on the producer's s2cs
hello + req + update, then on the consumer's s2cs hello + req + update (with the
session key), i.e. everything `s2uc stream` does minus process start-up. Our
s2cs accepts the hello before the req, so no client needs to sleep; SciStream
1.x's client sleeps 0.5 s before each hello (>= 1 s per two-sided set-up).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import Results
from gateways import controls, loopback_gateways, release_session, setup_session

from scistream.demo import Demo
from scistream.s2uc import flows

SEQUENTIAL = 30
THREADS = 4
PER_THREAD = 15
HELD = 300  # RELIABILITY 24: 300 sessions x 2 connections, all held at once
HELD_CONN = 2
HELD_CLIENTS = 6


@pytest.fixture(scope="module")
def gateways() -> Iterator[Demo]:
    # the data port range of each s2cs: room for every held session
    with loopback_gateways(num_conn=HELD * HELD_CONN + 16) as demo:
        yield demo


def test_setup_latency(benchmark: Any, gateways: Demo, results: Results) -> None:
    prod, cons = controls(gateways)
    setups: list[float] = []
    releases: list[float] = []

    def run() -> None:
        for _ in range(SEQUENTIAL):
            uid = str(uuid.uuid1())
            t0 = time.perf_counter()
            setup_session(prod, cons, uid)
            t1 = time.perf_counter()
            release_session(prod, cons, uid)
            setups.append((t1 - t0) * 1000)
            releases.append((time.perf_counter() - t1) * 1000)

    try:
        benchmark.pedantic(run, rounds=1, iterations=1)
    finally:
        prod.close()
        cons.close()
    results.add(
        "latency",
        {
            "name": "two-sided set-up (hello+req+update x2, TLS gRPC)",
            "unit": "ms",
            "values": setups,
            "note": "1.x client: >= 1000 ms (sleeps 0.5 s per side)",
        },
    )
    results.add("latency", {"name": "two-sided release", "unit": "ms", "values": releases, "note": ""})
    benchmark.extra_info.update({"setup_ms_median": sorted(setups)[len(setups) // 2]})


def run_clients(demo: Demo, counts: list[int], one: Callable[[flows.Control, flows.Control], None]) -> float:
    """Client i (its own thread and gRPC channels to both s2cs) calls ``one`` counts[i]
    times; returns the wall-clock seconds until every client is done."""

    def client(n: int) -> None:
        prod, cons = controls(demo)
        try:
            for _ in range(n):
                one(prod, cons)
        finally:
            prod.close()
            cons.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in counts]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def test_sessions_per_second(benchmark: Any, gateways: Demo, results: Results) -> None:
    done = [0]
    errors: list[str] = []
    lock = threading.Lock()

    def one(prod: flows.Control, cons: flows.Control) -> None:
        uid = str(uuid.uuid1())
        try:
            setup_session(prod, cons, uid)
            release_session(prod, cons, uid)
        except Exception as exc:  # counted, reported below
            errors.append(str(exc))
            return
        with lock:
            done[0] += 1

    elapsed = benchmark.pedantic(
        run_clients, args=(gateways, [PER_THREAD] * THREADS, one), rounds=1, iterations=1
    )
    rate = done[0] / elapsed
    results.add(
        "latency",
        {
            "name": f"sessions set up and released per second ({THREADS} clients)",
            "unit": "/s",
            "values": [rate],
            "note": f"{done[0]} ok, {len(errors)} failed",
        },
    )
    benchmark.extra_info.update({"sessions_per_s": rate, "errors": len(errors)})


def test_hundreds_of_sessions_held_at_once(benchmark: Any, gateways: Demo, results: Results) -> None:
    """RELIABILITY 24: 300 two-sided sessions of 2 connections each set up by 6 clients and
    all held at once (1,200 listeners over the two s2cs), then released."""
    setups: list[float] = []
    errors: list[str] = []
    uids: list[str] = []
    lock = threading.Lock()

    def one(prod: flows.Control, cons: flows.Control) -> None:
        uid = str(uuid.uuid1())
        t0 = time.perf_counter()
        try:
            setup_session(prod, cons, uid, HELD_CONN)
        except Exception as exc:  # counted, reported below
            errors.append(str(exc))
            return
        with lock:
            setups.append((time.perf_counter() - t0) * 1000)
            uids.append(uid)

    counts = [HELD // HELD_CLIENTS + (1 if i < HELD % HELD_CLIENTS else 0) for i in range(HELD_CLIENTS)]
    try:
        benchmark.pedantic(run_clients, args=(gateways, counts, one), rounds=1, iterations=1)
    finally:
        prod, cons = controls(gateways)
        try:
            for uid in uids:
                release_session(prod, cons, uid)
        finally:
            prod.close()
            cons.close()
    results.add(
        "latency",
        {
            "name": f"{HELD} sessions x {HELD_CONN} connections held at once ({HELD_CLIENTS} clients)",
            "unit": "ms",
            "values": setups,
            "note": f"{len(setups)} ok, {len(errors)} failed",
        },
    )
    benchmark.extra_info.update({"held_ok": len(setups), "held_failed": len(errors)})
