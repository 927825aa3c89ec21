"""Forwarder throughput and CPU per bit: every peer and our engine, round-robin.

Each case is one iperf3 run through one configuration in its own namespace with
fresh processes; cases are ordered round by round so each round runs every
configuration once (BENCHMARKING.md), and each round starts one configuration
later than the one before: with a fixed order each configuration kept its place,
and places differ here (two builds measured A-B then B-A swapped winners by up
to 10 %). Two kinds of case:

* as fast as it goes, at each of BENCH_STREAMS: Gbit/s and Gbit per forwarder
  CPU-second;
* at an equal offered load (one stream paced to BENCH_LOAD_HOP / BENCH_LOAD_PAIR
  Gbit/s): every forwarder of a kind carries the same bytes at the same rate, so
  its CPU compares work for work. At full speed on two shared cores the CPU a
  forwarder is charged also depends on which work the kernel runs in its context
  and which in the iperf3 processes' (bench/README.md).

Medians and ratios come from report.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from conftest import LOADS, ROUNDS, SECONDS, STREAMS, Results, selected
from peers import CONFIGS, measure

NAMES = selected(list(CONFIGS))


def _rotated(names: list[str], r: int) -> list[str]:
    k = r % len(names) if names else 0
    return names[k:] + names[:k]


#: (round, configuration, streams, offered load in Gbit/s or None = unpaced)
CASES = [
    case
    for r in range(ROUNDS)
    for case in [(r, name, n, None) for n in STREAMS for name in _rotated(NAMES, r)]
    + [(r, name, 1, LOADS[CONFIGS[name].kind])
       for name in _rotated(NAMES, r) if LOADS.get(CONFIGS[name].kind)]
]


def _case_id(r: int, name: str, streams: int, load: float | None) -> str:
    return f"r{r}-{name}-P{streams}" + (f"-at{load:g}G" if load else "")


@pytest.mark.parametrize(("round_", "name", "streams", "load"), CASES, ids=[_case_id(*c) for c in CASES])
def test_forwarder(
    benchmark: Any,
    results: Results,
    tmp_path: Path,
    round_: int,
    name: str,
    streams: int,
    load: float | None,
) -> None:
    config = CONFIGS[name]
    why = config.available()
    if why:
        pytest.skip(why)
    m = benchmark.pedantic(
        measure,
        args=(config, tmp_path, streams, SECONDS, round_),
        kwargs={"load_gbps": load},
        rounds=1,
        iterations=1,
    )
    row = dataclasses.asdict(m)
    benchmark.extra_info.update(row)
    results.add("throughput", row)
