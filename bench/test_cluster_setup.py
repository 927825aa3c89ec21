"""Issue 12, control plane: session set-up on one gateway node (SQLite) against 1 and 3 nodes
sharing their sessions in etcd, in the same run, round robin (fresh processes per case).

A session is the producer facility's side of one stream as ``s2uc`` and ``appctrl`` drive
it: req (``BENCH_CLUSTER_CONN`` connections, TLS leg) in flight while its hello arrives,
then update to a dummy target (127.0.0.1:9: nothing connects, so no data moves). Timed:

* **set-up** = req + hello + update, sequential, one session at a time
  (``BENCH_CLUSTER_SEQ`` per case), every verb on one node, the node turning from
  session to session; on 3 nodes also **cross-node**: req on node i, hello on node i+1,
  update on node i+2, as a client and an appctrl pointed at different nodes would;
* **release**, sequential, timed on its own;
* **sessions/s** = whole cycles (set-up + release) completed per second by
  ``BENCH_CLUSTER_CLIENTS`` concurrent clients, each with its own channel to node
  j mod N, ``BENCH_CLUSTER_PER_CLIENT`` cycles each;
* CPU of the gateway's processes (every s2cs and s2ds) and of etcd's members over all
  the timed sessions of a case (sequential, cross-node and concurrent), per session, and
  etcd writes per session (its revision grows by one per write transaction).

Control channels are plain gRPC for every configuration (the cluster helpers start nodes
that way). Nothing here asserts a timing; failures are counted and reported.
"""

from __future__ import annotations

import os
import resource
import threading
import time
import uuid
from typing import Any

import pytest
from cluster import (
    Facility,
    Route,
    cpu_of,
    etcd_available,
    machine_busy_seconds,
    node_count,
    release,
    setup,
)
from conftest import ROUNDS, Results

CONFIGS = [
    c.strip()
    for c in os.environ.get("BENCH_CLUSTER_CONFIGS", "sqlite-1,etcd-1,etcd-3").split(",")
    if c.strip()
]
SEQ = int(os.environ.get("BENCH_CLUSTER_SEQ", "30"))
CLIENTS = int(os.environ.get("BENCH_CLUSTER_CLIENTS", "4"))
PER_CLIENT = int(os.environ.get("BENCH_CLUSTER_PER_CLIENT", "15"))
CONN = int(os.environ.get("BENCH_CLUSTER_CONN", "3"))
WARMUP = 3
CASES = [(r, c) for r in range(ROUNDS) for c in CONFIGS]


def _self_cpu() -> float:
    """CPU of this process (the clients' threads): ours too, when telling other jobs' share."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _uid() -> str:
    return "b" + uuid.uuid4().hex[:12]


def _sequential(route_of: Any, n: int, setups: list[float], releases: list[float], errors: list[str]) -> None:
    """``n`` sessions one after another; ``route_of(i)`` says which node takes which verb."""
    for i in range(n):
        uid = _uid()
        route = route_of(i)
        t0 = time.perf_counter()
        try:
            setup(route, uid, "PROD", CONN)
        except Exception as exc:  # counted and reported
            errors.append(f"set-up: {exc}")
            continue
        t1 = time.perf_counter()
        try:
            release(route, uid)
        except Exception as exc:
            errors.append(f"release: {exc}")
            continue
        setups.append((t1 - t0) * 1000)
        releases.append((time.perf_counter() - t1) * 1000)


def _concurrent(facility: Facility, errors: list[str]) -> tuple[int, float, list[float]]:
    """CLIENTS threads, client j on node j mod N with its own channels, PER_CLIENT whole
    cycles each: (cycles done, wall seconds, cycle latencies in ms)."""
    done: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(CLIENTS + 1)

    def client(j: int) -> None:
        stubs = facility.stubs()
        stub = stubs[j % len(stubs)]
        route = Route(stub, stub, stub, stub)
        start.wait()
        for _ in range(PER_CLIENT):
            uid = _uid()
            t0 = time.perf_counter()
            try:
                setup(route, uid, "PROD", CONN)
                release(route, uid)
            except Exception as exc:  # counted and reported
                with lock:
                    errors.append(f"cycle: {exc}")
                continue
            with lock:
                done.append((time.perf_counter() - t0) * 1000)

    threads = [threading.Thread(target=client, args=(j,)) for j in range(CLIENTS)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return len(done), time.perf_counter() - t0, done


@pytest.mark.parametrize(("rnd", "config"), CASES, ids=[f"r{r}-{c}" for r, c in CASES])
def test_cluster_setup(benchmark: Any, results: Results, rnd: int, config: str) -> None:
    if config != "sqlite-1" and not etcd_available():
        pytest.skip("etcd-server is not installed (./dev setup installs it)")
    nodes = node_count(config)
    # room for every concurrent session's connections on every node
    with Facility(config, ports=max(60, 2 * CLIENTS * CONN)) as facility:
        stubs = facility.stubs()
        errors: list[str] = []
        same: tuple[list[float], list[float]] = ([], [])
        cross: tuple[list[float], list[float]] = ([], [])

        def on_one(i: int) -> Route:
            s = stubs[i % nodes]
            return Route(s, s, s, s)

        def across(i: int) -> Route:
            return Route(stubs[i % nodes], stubs[(i + 1) % nodes], stubs[(i + 2) % nodes], stubs[i % nodes])

        warm: list[str] = []
        _sequential(on_one, WARMUP * nodes, [], [], warm)  # channels up, every s2ds spawned

        def run() -> tuple[int, float, list[float]]:
            _sequential(on_one, SEQ, *same, errors)
            if nodes > 1:
                _sequential(across, SEQ, *cross, errors)
            return _concurrent(facility, errors)

        pids = facility.processes()
        rev_before = facility.etcd_revision()
        before, busy_before, t0 = cpu_of(pids), machine_busy_seconds(), time.perf_counter()
        client_before = _self_cpu()
        cycles, wall, cycle_ms = benchmark.pedantic(run, rounds=1, iterations=1)
        after, busy_after, elapsed = cpu_of(pids), machine_busy_seconds(), time.perf_counter() - t0
        client = _self_cpu() - client_before
        writes = facility.etcd_revision() - rev_before
    used = {role: after[role] - before[role] for role in pids}
    sessions = len(same[0]) + len(cross[0]) + cycles  # the ones that completed
    gateway = sum(v for k, v in used.items() if not k.startswith("etcd:"))
    etcd = sum(v for k, v in used.items() if k.startswith("etcd:"))
    row = {
        "config": config,
        "round": rnd,
        "nodes": nodes,
        "num_conn": CONN,
        "setup_ms": same[0],
        "release_ms": same[1],
        "cross_setup_ms": cross[0],
        "cross_release_ms": cross[1],
        "clients": CLIENTS,
        "cycles": cycles,
        "cycle_ms": cycle_ms,
        "sessions_per_s": cycles / wall if wall else None,
        "failed": len(errors),
        "errors": errors[:5] + warm[:2],
        "gateway_cpu_ms_per_session": 1000 * gateway / sessions if sessions else None,
        "etcd_cpu_ms_per_session": 1000 * etcd / sessions if sessions and etcd else None,
        "cpu_s": used,
        "etcd_writes_per_session": writes / sessions if sessions and writes else None,
        "elapsed_s": elapsed,
        "machine_busy_s": busy_after - busy_before,
        "client_cpu_s": client,
    }
    results.add("cluster_setup", row)
    benchmark.extra_info.update({"sessions_per_s": row["sessions_per_s"], "failed": len(errors)})
