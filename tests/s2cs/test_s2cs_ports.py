"""Port allocator: all-or-nothing, busy ports skipped, nothing leaks over 1,000 cycles."""

from __future__ import annotations

import socket

import pytest
from s2cs_support import free_range

from scistream.s2cs.ports import PortAllocator, PortsExhausted


def test_allocate_distinct_ports_within_range() -> None:
    lo, hi = free_range(20)
    pa = PortAllocator(lo, hi, "127.0.0.1")
    got = pa.allocate(5)
    assert len(set(got)) == 5 and all(lo <= p <= hi for p in got)
    assert pa.in_use == frozenset(got)


def test_exhaustion_is_all_or_nothing() -> None:
    lo, hi = free_range(6)
    pa = PortAllocator(lo, hi, "127.0.0.1", test_bind=False)
    first = pa.allocate(4)
    with pytest.raises(PortsExhausted, match="only 2 free"):
        pa.allocate(3)
    assert pa.in_use == frozenset(first)  # the failed call holds nothing
    assert pa.free_count == 2
    pa.release(first)
    assert len(pa.allocate(6)) == 6


def test_port_in_use_by_another_process_is_skipped() -> None:
    lo, hi = free_range(4)
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", lo))
        busy.listen()
        pa = PortAllocator(lo, hi, "127.0.0.1")
        got = pa.allocate(3)
        assert lo not in got
        with pytest.raises(PortsExhausted):
            pa.allocate(1)
    # once the other process lets go, the port is handed out again
    assert pa.allocate(1) == [lo]


def test_thousand_cycles_leak_nothing() -> None:
    # Pure accounting (no test bind): other processes on this host may hold ports at random.
    lo, hi = free_range(10)
    pa = PortAllocator(lo, hi, "127.0.0.1", test_bind=False)
    for i in range(1000):
        got = pa.allocate(1 + i % 10)
        pa.release(got)
    assert pa.in_use == frozenset() and pa.free_count == 10
    assert sorted(pa.allocate(10)) == list(range(lo, hi + 1))


def test_claim_and_double_release() -> None:
    pa = PortAllocator(6000, 6003, "127.0.0.1", test_bind=False)
    pa.claim([6001, 6001, 7000])  # duplicates and out-of-range ports are ignored
    assert pa.in_use == frozenset({6001})
    pa.release([6001, 6001, 6002])  # releasing twice or a free port is harmless
    assert pa.free_count == 4
