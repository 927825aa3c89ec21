"""`scistream demo --nodes 3` as a user types it: two facilities of three gateway nodes on
a 3-member etcd cluster each, one session spread over the nodes, bytes verified, and nothing
left behind (issue 12)."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from scistream import netns

pytestmark = pytest.mark.timeout(150)

DEMO = [sys.executable, "-c", "from scistream.cli import main; main()", "demo"]
SIZE = 24 << 20
NODES = 3
PREFIX = "sstt"  # tests/netns/conftest.py checks that none of these is left


def own_processes(workdir: str) -> list[str]:
    """Live processes of the demo: every one it starts runs in its work directory, and
    every s2cs, s2ds and etcd member it starts names it (state, socket, data directory)."""
    left = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if (workdir in cmdline or cwd.startswith(workdir)) and state != "Z":
            left.append(f"{entry}: {cmdline[:200]}")
    return left


def assert_nothing_left(pid: int, report: dict[str, Any]) -> None:
    assert report["released"], report["error"]
    assert report["ports_rebindable"], report["ports_still_bound"]
    assert report["processes_left"] == []
    assert netns.list_namespaces(f"ssdemo{pid}-") == []
    assert report["workdir"] and own_processes(report["workdir"]) == []


def assert_spread_and_verified(report: dict[str, Any]) -> None:
    num_conn = 2 * NODES
    assert report["ok"], report["error"]
    assert report["nodes"] == NODES and report["num_conn"] == num_conn
    assert len(report["slices"]) == num_conn
    assert sum(s["received"] for s in report["slices"]) == SIZE
    for s in report["slices"]:
        assert s["sha256"] == s["expected_sha256"] and not s["error"]
    assert report["stream_digest"] == report["expected_digest"]
    # Every node of both facilities carries connections (placement "spread"), and each
    # connection's row names the nodes whose listeners carried it.
    rows = report["placement"]
    assert [r["connection"] for r in rows] == list(range(num_conn))
    assert {r["consumer_node"] for r in rows} == {f"c{i}" for i in range(1, NODES + 1)}
    assert {r["producer_node"] for r in rows} == {f"p{i}" for i in range(1, NODES + 1)}
    assert all(r["ok"] and r["producer_listener"] for r in rows)
    # The node the status names for a listener is the one with that address (node i
    # listens on .1i of its facility's segment).
    for r in rows:
        for side in ("consumer", "producer"):
            ip = r[f"{side}_listener"].rsplit(":", 1)[0]
            assert r[f"{side}_node"] == f"{side[0]}{ip[-1]}", r
    # The listeners are the nodes' own addresses, not one gateway's.
    assert len({ep.rsplit(":", 1)[0] for ep in report["listeners"]["producer"]}) == NODES
    assert len({ep.rsplit(":", 1)[0] for ep in report["listeners"]["consumer"]}) == NODES
    assert set(report["gateway_cpu"]) == {f"{side}-{side[0]}{i}" for side in ("producer", "consumer")
                                          for i in range(1, NODES + 1)}


# A tiny TCP client: exit 0 if it connects (run inside a namespace).
CONNECT = (
    "import socket,sys\n"
    "try: socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=0.5).close()\n"
    "except OSError: sys.exit(1)\n"
)


def test_facility_topology_nodes_meet_only_through_gateways() -> None:
    """Every node reaches its LAN and the WAN; producer and consumer never meet directly;
    the namespaces are gone after exit."""
    with netns.FacilityTopology(2, prefix=PREFIX) as topo:
        for host, addr in ((h, a) for (h, _), a in topo.addrs.items()):
            topo.popen(host, ["socat", f"TCP-LISTEN:7000,bind={addr},reuseaddr,fork", "SYSTEM:true"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for host in topo.hosts:
            netns.wait_for_listen(functools.partial(topo.argv, host), 7000)

        def connects(src: str, dst: str, segment: str = "") -> bool:
            res = subprocess.run(topo.argv(src, [sys.executable, "-c", CONNECT,
                                                 topo.addr(dst, segment), "7000"]), check=False)
            return res.returncode == 0

        for i in (1, 2):
            assert connects("producer", f"p{i}") and connects("consumer", f"c{i}")
            assert connects(f"c{i}", "p2", "wan") and connects(f"p{i}", "c1", "wan")
            assert connects(f"p{i}", "p1") and connects(f"c{i}", "c2")  # the etcd LANs
        assert not connects("producer", "consumer") and not connects("consumer", "producer")
        assert not connects("producer", "c1", "wan") and not connects("consumer", "p1", "wan")
        assert not connects("c1", "producer")  # gateways reach only their own facility's LAN
        tag = topo.tag
        assert len(netns.list_namespaces(tag)) == 2 * 2 + 3
    assert netns.list_namespaces(tag) == []


def stop(proc: subprocess.Popen[str]) -> None:
    """Ctrl-C for a demo past its time: it stops what it started (its children are in
    sessions of their own, so a kill would orphan them); a kill only if it hangs."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


def run_demo(*args: str) -> tuple[subprocess.Popen[str], dict[str, Any], str]:
    """The demo as typed, bounded in time."""
    proc = subprocess.Popen([*DEMO, "--nodes", str(NODES), "--size", str(SIZE), "--json", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            stop(proc)
    try:
        return proc, json.loads(out), err
    except ValueError:
        pytest.fail(f"demo printed no JSON report (rc {proc.returncode}): {err[-2000:]}")


def test_demo_three_nodes_spread_tls_verified_and_nothing_left() -> None:
    proc, report, err = run_demo()
    assert proc.returncode == 0, report["error"] or err[-2000:]
    assert report["security"] == "tls" and report["netns"]
    assert_spread_and_verified(report)
    assert_nothing_left(proc.pid, report)


def test_demo_three_nodes_keep_then_ctrl_c_cleans_up() -> None:
    proc = subprocess.Popen([*DEMO, "--nodes", str(NODES), "--size", str(SIZE), "--json", "--keep"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        seen = ""
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and "Ctrl-C" not in seen:
            line = proc.stderr.readline()
            if not line:
                break
            seen += line
        # The commands it prints work as printed (shell lines, run from the root namespace).
        commands = [line.split("#")[0].strip() for line in seen.splitlines()
                    if "check-status" in line or "etcdctl" in line]
        assert len(commands) == 4, seen[-2000:]
        for cmd in commands:
            res = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=30,
                                 check=False)
            assert res.returncode == 0, f"{cmd}: {res.stderr[-1000:]}"
            side = "p" if "192.168.20." in cmd or "192.168.10." in cmd else "c"
            for i in range(1, NODES + 1):  # every node: its listeners, its membership in etcd
                want = f"/scistream/v1/nodes/{side}{i}" if "etcdctl" in cmd else f"({side}{i})"
                assert want in res.stdout, f"{cmd}: {res.stdout[-2000:]}"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            stop(proc)
    report = json.loads(out)
    assert proc.returncode == 0, report["error"]
    assert_spread_and_verified(report)
    assert_nothing_left(proc.pid, report)


def test_demo_three_nodes_failure_still_cleans_up() -> None:
    """A byte flipped by the producer: exit 1, the bad connection named, nothing left."""
    proc, report, err = run_demo("--security", "plain", "--corrupt-at", str(SIZE // 2))
    assert proc.returncode == 1 and not report["ok"], err[-2000:]
    assert report["slices_ok"] == 2 * NODES - 1
    assert [r["ok"] for r in report["placement"]].count(False) == 1
    assert_nothing_left(proc.pid, report)


def test_demo_three_nodes_ctrl_c_twice_while_starting_leaves_nothing() -> None:
    """Ctrl-C while the namespaces, etcd and the nodes come up, and again while it cleans
    up: the second one must not cut the clean-up short."""
    proc = subprocess.Popen([*DEMO, "--nodes", str(NODES), "--size", str(SIZE), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not netns.list_namespaces(f"ssdemo{proc.pid}-") and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        for _ in range(3):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.2)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            stop(proc)
    report = json.loads(out)
    assert proc.returncode == 1 and "interrupted" in report["error"], err[-2000:]
    assert report["processes_left"] == []
    assert netns.list_namespaces(f"ssdemo{proc.pid}-") == []
    assert own_processes(report["workdir"]) == []
