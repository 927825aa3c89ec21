"""Fixtures for tests that build the tutorial's four-host topology in network namespaces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from scistream import netns
from scistream.demo import Demo, Options
from scistream.demo_apps import Stream

#: Every namespace these tests create starts with this, so the session can check
#: that none is left behind.
PREFIX = "sstt"

def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="network namespaces need root")
    for item in items:
        if "tests/netns" in str(item.fspath):
            item.add_marker(pytest.mark.root)
            if os.geteuid() != 0:
                item.add_marker(skip)


def _leaked(prefix: str) -> list[str]:
    """Namespaces of ``prefix`` created by this process or by one that is gone
    (a demo CLI run by a test); live creators' (other sessions') are not ours."""
    out = []
    for name in netns.list_namespaces(prefix):
        pid = name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and (int(pid) == os.getpid() or not os.path.exists(f"/proc/{pid}")):
            out.append(name)
    return out


@pytest.fixture(scope="session", autouse=True)
def _no_namespace_left() -> Iterator[None]:
    """Nothing this session created may outlive it: neither the tests' namespaces
    nor those of the demo (prefix ``ssdemo``), library or CLI."""
    if os.geteuid() != 0:
        yield
        return
    yield
    left = _leaked(PREFIX) + _leaked("ssdemo")
    for prefix in (PREFIX, "ssdemo"):
        netns.remove_stale(prefix)  # keep the machine clean even when we fail below
    assert not left, f"namespaces left behind: {left}"


@pytest.fixture
def topo() -> Iterator[netns.Topology]:
    """A fresh four-host topology, removed on teardown even if the test failed."""
    with netns.Topology(PREFIX) as t:
        yield t
    assert not [n for n in netns.list_namespaces(PREFIX) if n.startswith(t.tag)]


# --------------------------------------------------------------------------- two gateways


@dataclass
class Chain:
    """The tutorial topology with both gateways up and one session set up."""

    demo: Demo
    connect: list[str]
    seed: int

    @property
    def topo(self) -> netns.Topology:
        assert self.demo.topo is not None
        return self.demo.topo

    def consumer(self, size: int, *, timeout: float = 30, interval: float = 0.1
                 ) -> subprocess.Popen[bytes]:
        """Start the consumer application in the consumer namespace."""
        return self.demo.popen("consumer", [
            sys.executable, "-m", "scistream.demo_apps", "consumer", "--connect", ",".join(self.connect),
            "--size", str(size), "--timeout", str(timeout), "--interval", str(interval)],
            "consumer-app", stdout=subprocess.PIPE)

    def stats(self, side: str) -> dict[str, Any]:
        res = subprocess.run(["s2ds", "ctl", "--control", self.demo.s2ds_control(side), "stats"],
                             capture_output=True, text=True, timeout=10, check=True)
        return dict(json.loads(res.stdout))

    def active(self, side: str) -> int:
        return sum(r["connections_active"] for r in self.stats(side)["routes"].values())

    def s2ds_pid(self, side: str) -> int:
        return self.demo.facilities[side].procs[0].pid

    def s2cs_proc(self, side: str) -> subprocess.Popen[bytes]:
        return self.demo.facilities[side].procs[-1]


def read_result(proc: subprocess.Popen[bytes], on_progress: Callable[[int], None] | None = None,
                timeout: float = 60) -> dict[str, Any]:
    """The consumer application's result line (progress lines go to ``on_progress``)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    for raw in proc.stdout:
        msg = json.loads(raw)
        if "progress" in msg and on_progress:
            on_progress(int(msg["progress"]))
        if "result" in msg:
            proc.wait(timeout=10)
            return dict(msg["result"])
        assert time.monotonic() < deadline, "the consumer did not finish in time"
    raise AssertionError("the consumer exited without a result")


def expected_sha(seed: int, offset: int, length: int) -> str:
    return Stream(seed).sha256(offset, length)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def wait_until(cond: Callable[[], bool], timeout: float, interval: float = 0.05) -> float:
    """Seconds until ``cond()`` held; AssertionError after ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


@pytest.fixture
def make_chain() -> Iterator[Callable[..., Chain]]:
    """``make_chain(num_conn=2, security="tls", s2ds_args=())``: both gateways in the
    tutorial topology with a session set up by ``s2uc stream`` + appctrl hellos.
    Everything is stopped and the namespaces removed at teardown, pass or fail."""
    demos: list[Demo] = []

    def make(num_conn: int = 2, security: str = "tls", backend: str = "native",
             s2ds_args: tuple[str, ...] = (), seed: int = 11) -> Chain:
        opts = Options(size=0, num_conn=num_conn, security=security, backend=backend, use_netns=True,
                       keep=False, seed=seed, engine="", timeout=30, s2ds_args=s2ds_args)
        demo = Demo(opts, lambda s: None)
        demos.append(demo)
        demo.build_hosts()
        demo.start_gateways()
        demo.start_producer()
        return Chain(demo, demo.setup_stream(), seed)

    yield make
    for demo in demos:
        try:
            demo.stop_all()
        finally:
            demo.close()
