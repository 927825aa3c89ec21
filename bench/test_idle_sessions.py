"""Control-plane cost of many idle sessions: the CPU that s2cs and its s2ds burn while
they only carry routes, and how long a session takes to get ready at that size.

One producer-side gateway (native backend, TLS gRPC, as `scistream demo` starts it)
gets sessions of 2 connections (req in flight while the hello arrives, then update:
what `s2uc` and `appctrl` do) from several clients until it holds each size of
``BENCH_IDLE_SIZES`` (default 1000,5000), then sits idle for ``BENCH_IDLE_SECONDS``
(20) while the CPU time of its s2cs and s2ds is sampled from /proc. req->ready is
the time from sending the req until the update returned (routes live in s2ds), for
every session set up while growing to that size. Idle cost is polling: the usage
poll (every ``poll_interval``), expiry and snapshot; it should grow linearly.

Long (minutes) and port-hungry (each gateway wants ``2 x size`` consecutive free
ports), so it runs only when ``BENCH_IDLE_SIZES`` is set, best in a fresh network
namespace whose loopback has every port free::

    ip netns add idle && ip -n idle link set lo up
    BENCH_IDLE_SIZES=1000,5000 ip netns exec idle .venv/bin/pytest bench/test_idle_sessions.py -s --timeout 0
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Results
from gateways import controls, loopback_gateways

from scistream._proto import scistream_pb2 as pb
from scistream.demo import Demo
from scistream.grpcutil import ControlError

SIZES = tuple(int(s) for s in os.environ.get("BENCH_IDLE_SIZES", "1000,5000").split(",") if s)
IDLE_SECONDS = float(os.environ.get("BENCH_IDLE_SECONDS", "20"))
CONN = 2
CLIENTS = 6

pytestmark = pytest.mark.skipif(
    not os.environ.get("BENCH_IDLE_SIZES"), reason="set BENCH_IDLE_SIZES (e.g. 1000,5000) to run it"
)


@pytest.fixture(scope="module")
def gateway() -> Iterator[Demo]:
    with loopback_gateways(num_conn=max(SIZES) * CONN + 16) as demo:
        yield demo


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _grow(demo: Demo, count: int, latencies: list[float], errors: list[str]) -> None:
    """``count`` more producer-side sessions by CLIENTS clients; req->ready of each in ms."""
    lock = threading.Lock()
    shares = [count // CLIENTS + (1 if i < count % CLIENTS else 0) for i in range(CLIENTS)]

    def client(n: int) -> None:
        prod, cons = controls(demo)
        cons.close()
        try:
            for _ in range(n):
                uid = str(uuid.uuid1())
                t0 = time.perf_counter()
                try:
                    fut = prod.req_future(
                        pb.Request(uid=uid, role="PROD", num_conn=CONN, rate=10000, security="tls")
                    )
                    prod.call("hello", pb.Hello(uid=uid, prod_listeners=["127.0.0.1:9"], role="PROD"))
                    resp = prod.result(fut, "req")
                    prod.call(
                        "update",
                        pb.UpdateTargets(uid=uid, remote_listeners=list(resp.prod_listeners), role="PROD"),
                    )
                except (ControlError, OSError) as exc:  # counted, reported below
                    with lock:
                        errors.append(str(exc))
                    continue
                with lock:
                    latencies.append((time.perf_counter() - t0) * 1000)
        finally:
            prod.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in shares]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_idle_sessions(benchmark: Any, gateway: Demo, results: Results) -> None:
    fac = gateway.facilities["producer"]
    held = 0
    rows: list[dict[str, Any]] = []

    def run() -> None:
        nonlocal held
        for size in SIZES:
            latencies: list[float] = []
            errors: list[str] = []
            t0 = time.perf_counter()
            _grow(gateway, size - held, latencies, errors)
            grow_s = time.perf_counter() - t0
            held += len(latencies)
            time.sleep(2.0)  # let the last updates' work settle before measuring idle
            cpu0, w0 = fac.cpu_seconds(), time.perf_counter()
            time.sleep(IDLE_SECONDS)
            cpu = (fac.cpu_seconds() - cpu0) / (time.perf_counter() - w0) * 100
            row = {
                "sessions": held,
                "connections_each": CONN,
                "idle_cpu_percent": round(cpu, 3),
                "req_ready_p50_ms": round(_percentile(latencies, 0.5), 2) if latencies else None,
                "req_ready_p99_ms": round(_percentile(latencies, 0.99), 2) if latencies else None,
                "setup_per_s": round(len(latencies) / grow_s, 1),
                "failed": len(errors),
                "first_error": errors[0] if errors else "",
            }
            rows.append(row)
            print(f"\nidle-bench: {row}")

    benchmark.pedantic(run, rounds=1, iterations=1)
    for row in rows:
        results.add(
            "idle",
            {
                "name": f"{row['sessions']} idle sessions x {CONN} connections: s2cs+s2ds CPU %",
                "unit": "%",
                "values": [row["idle_cpu_percent"]],
                "note": (
                    f"req->ready p50 {row['req_ready_p50_ms']} ms, p99 {row['req_ready_p99_ms']} ms; "
                    f"{row['failed']} failed"
                ),
            },
        )
    benchmark.extra_info.update({"rows": rows})
    assert rows and all(r["failed"] == 0 for r in rows), rows
