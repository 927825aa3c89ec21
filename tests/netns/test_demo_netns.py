"""`scistream demo --netns`: the demo in the VM tutorial's four namespaces."""

from __future__ import annotations

import json
import subprocess
import sys

from scistream import netns

DEMO = [sys.executable, "-c", "from scistream.cli import main; main()", "demo"]


def test_demo_netns_tls_verified_and_nothing_left() -> None:
    before = set(netns.list_namespaces("ssdemo"))
    res = subprocess.run([*DEMO, "--netns", "--size", str(32 << 20), "--num-conn", "4", "--json"],
                         capture_output=True, text=True, timeout=120, check=False)
    report = json.loads(res.stdout)
    assert res.returncode == 0, report["error"] or res.stderr[-2000:]
    assert report["netns"] and report["ok"] and report["slices_ok"] == 4
    assert report["stream_digest"] == report["expected_digest"]
    # The listeners are the topology's gateway addresses, not loopback.
    assert all(ep.startswith("192.168.20.10:") for ep in report["listeners"]["producer"])
    assert all(ep.startswith("192.168.30.10:") for ep in report["listeners"]["consumer"])
    assert report["released"] and report["ports_rebindable"] and report["processes_left"] == []
    # The demo removed its namespaces (others' concurrent demos may exist: compare).
    assert set(netns.list_namespaces("ssdemo")) <= before
