"""Forwarder throughput and CPU per bit: every peer and our engine, round-robin.

Each case is one iperf3 run through one configuration in its own namespace with
fresh processes; cases are ordered round by round so each round runs every
configuration once (BENCHMARKING.md). Medians and ratios come from report.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from conftest import ROUNDS, SECONDS, STREAMS, Results, selected
from peers import CONFIGS, measure

NAMES = selected(list(CONFIGS))
CASES = [(r, name, n) for r in range(ROUNDS) for n in STREAMS for name in NAMES]


@pytest.mark.parametrize(
    ("round_", "name", "streams"), CASES, ids=[f"r{r}-{name}-P{n}" for r, name, n in CASES]
)
def test_forwarder(
    benchmark: Any, results: Results, tmp_path: Path, round_: int, name: str, streams: int
) -> None:
    config = CONFIGS[name]
    why = config.available()
    if why:
        pytest.skip(why)
    m = benchmark.pedantic(measure, args=(config, tmp_path, streams, SECONDS, round_), rounds=1, iterations=1)
    row = dataclasses.asdict(m)
    benchmark.extra_info.update(row)
    results.add("throughput", row)
