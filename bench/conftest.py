"""Benchmark session settings (environment) and the results sink read by report.py.

BENCH_SECONDS (5), BENCH_ROUNDS (3), BENCH_STREAMS ("1,4"), BENCH_CONFIGS (all
available), BENCH_OUT (bench/results), BENCH_LOAD_HOP (10) and BENCH_LOAD_PAIR (2):
the offered load in Gbit/s of the equal-load runs of 1-hop forwarders and TLS pairs
(one stream; 0 = none). Run with ``./dev bench``; not a test suite: nothing here
asserts performance.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
STREAMS = tuple(int(s) for s in os.environ.get("BENCH_STREAMS", "1,4").split(",") if s)
OUT = Path(os.environ.get("BENCH_OUT", Path(__file__).parent / "results"))
#: Offered load (Gbit/s) of the equal-load runs, by kind of forwarder: below what the
#: slowest peer of that kind reaches here, so every forwarder carries the same bytes.
LOADS = {
    "1 hop": float(os.environ.get("BENCH_LOAD_HOP", "10")),
    "TLS pair": float(os.environ.get("BENCH_LOAD_PAIR", "2")),
}


def selected(names: list[str]) -> list[str]:
    wanted = [n.strip() for n in os.environ.get("BENCH_CONFIGS", "").split(",") if n.strip()]
    return [n for n in names if not wanted or n in wanted]


class Results:
    """Rows of every benchmark of the session, written as JSON per suite at the end."""

    def __init__(self) -> None:
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.meta = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "seconds": SECONDS,
            "rounds": ROUNDS,
            "cpus": os.cpu_count(),
            "kernel": os.uname().release,
        }

    def add(self, suite: str, row: dict[str, Any]) -> None:
        self.rows.setdefault(suite, []).append(row)

    def write(self) -> list[Path]:
        OUT.mkdir(parents=True, exist_ok=True)
        paths = []
        for suite, rows in self.rows.items():
            path = OUT / f"{suite}.json"
            path.write_text(json.dumps({"meta": self.meta, "rows": rows}, indent=1))
            paths.append(path)
        return paths


@pytest.fixture(scope="session")
def results() -> Iterator[Results]:
    r = Results()
    yield r
    for path in r.write():
        print(f"\nbench: wrote {path}")
    if r.rows:
        import report

        for path in report.render(OUT):
            print(f"bench: wrote {path}")


@pytest.fixture(autouse=True)
def _root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("benchmarks run in private network namespaces and need root")
