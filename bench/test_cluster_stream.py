"""Issue 12, data plane: the aggregate Gbit/s of ONE session whose connections the producer
facility's gateway spreads over 1, 2 and 3 nodes (etcd, placement spread), with the TLS leg
to the consumer facility's gateway (one plain s2cs), bytes verified, CPU per GB.

Per case a fresh private namespace (lo up, reno: BENCHMARKING.md) holding everything:
etcd's 3 members, the nodes (each its own s2cs, s2ds and 127.0.0.<i+1> address), the
consumer's gateway and the load (cluster_stream.py, run there by ``ip netns exec``). One
namespace rather than one per node: on one machine the nodes would share the same 2 cores
either way, and a veth hop per node would add the kernel's forwarding cost to every byte,
which is not what spreading a session over nodes changes. ``sqlite-1`` (one plain s2cs, no
etcd) is the single-node reference of the same run.

Knobs: ``BENCH_SECONDS`` (per case), ``BENCH_ROUNDS``, ``BENCH_CLUSTER_STREAM_CONFIGS``
(``sqlite-1,etcd-1,etcd-2,etcd-3``), ``BENCH_CLUSTER_CONN_PER_NODE`` (2: num_conn = 2 per
node, so each node carries the same share as nodes are added) or
``BENCH_CLUSTER_CONN_TOTAL`` (the same total num_conn for every configuration instead).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cluster import etcd_available
from conftest import ROUNDS, SECONDS, Results

from scistream.netns import PrivateNamespace

CONFIGS = [
    c.strip()
    for c in os.environ.get("BENCH_CLUSTER_STREAM_CONFIGS", "sqlite-1,etcd-1,etcd-2,etcd-3").split(",")
    if c.strip()
]
PER_NODE = int(os.environ.get("BENCH_CLUSTER_CONN_PER_NODE", "2"))
TOTAL = int(os.environ.get("BENCH_CLUSTER_CONN_TOTAL", "0"))
CASES = [(r, c) for r in range(ROUNDS) for c in CONFIGS]
WORKER = Path(__file__).parent / "cluster_stream.py"


@pytest.mark.parametrize(("rnd", "config"), CASES, ids=[f"r{r}-{c}" for r, c in CASES])
def test_cluster_stream(benchmark: Any, results: Results, rnd: int, config: str) -> None:
    if config != "sqlite-1" and not etcd_available():
        pytest.skip("etcd-server is not installed (./dev setup installs it)")
    argv = [
        sys.executable, str(WORKER), "--config", config, "--seconds", f"{SECONDS:g}",
        "--conn-per-node", str(PER_NODE), "--total-conn", str(TOTAL),
    ]  # fmt: skip
    # s2cs on PATH (the nodes are started by name), as ./dev bench sets it
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    with PrivateNamespace() as ns:

        def run() -> tuple[int, str, str]:
            proc = subprocess.Popen(
                ns.argv(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
            )
            try:
                out, err = proc.communicate(timeout=SECONDS + 180)
            except subprocess.TimeoutExpired:
                # SIGTERM first: the worker unwinds and stops etcd and the nodes it started
                proc.terminate()
                try:
                    out, err = proc.communicate(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    out, err = proc.communicate()
                err += "\n(overdue: stopped)"
            return proc.returncode, out, err

        rc, out, err = benchmark.pedantic(run, rounds=1, iterations=1)
    assert rc == 0, f"cluster_stream.py failed ({rc}):\n{err[-3000:]}"
    row = json.loads(out.strip().splitlines()[-1])
    row["round"] = rnd
    results.add("cluster_stream", row)
    benchmark.extra_info.update({"gbps": row["gbps"], "verified": row["verified"]})
    # a benchmark that moved wrong bytes measured nothing: say so (never a timing)
    assert row["verified"], row["errors"]
