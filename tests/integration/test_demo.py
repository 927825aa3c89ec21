"""`scistream demo` end to end on loopback: real s2cs, s2ds, s2uc, applications, bytes checked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from scistream.dataplane import native_available

DEMO = [sys.executable, "-c", "from scistream.cli import main; main()", "demo"]
SIZE = str(24 << 20)


def run_demo(*args: str, timeout: float = 90) -> tuple[int, dict[str, Any], str]:
    res = subprocess.run([*DEMO, "--size", SIZE, "--json", *args], capture_output=True, text=True,
                         timeout=timeout, check=False)
    try:
        report = json.loads(res.stdout)
    except ValueError:
        pytest.fail(f"demo printed no JSON report (rc {res.returncode}): {res.stderr[-2000:]}")
    return res.returncode, report, res.stderr


def assert_clean(report: dict[str, Any]) -> None:
    assert report["released"], report["error"]
    assert report["ports_rebindable"], report["ports_still_bound"]
    assert report["processes_left"] == []


def assert_verified(report: dict[str, Any], num_conn: int) -> None:
    assert report["ok"], report["error"]
    assert report["size"] == int(SIZE)
    assert len(report["slices"]) == num_conn
    assert sum(s["received"] for s in report["slices"]) == int(SIZE)
    for s in report["slices"]:
        assert s["sha256"] == s["expected_sha256"] and not s["error"]
    assert report["stream_digest"] == report["expected_digest"]
    assert report["uid"] and report["setup_seconds"] > 0 and report["gbps"] > 0
    assert set(report["gateway_cpu"]) == {"producer", "consumer"}


tls_needs_native = pytest.mark.skipif(
    not native_available(), reason="TLS 1.3 PSK on the data channel needs the native engine (not built)")


@tls_needs_native
def test_demo_tls_native_backend() -> None:
    rc, report, err = run_demo("--security", "tls", "--num-conn", "4")
    assert rc == 0, report["error"] or err[-2000:]
    assert report["security"] == "tls"
    assert_verified(report, 4)
    assert_clean(report)


def test_demo_plain_one_connection() -> None:
    rc, report, err = run_demo("--security", "plain", "--num-conn", "1")
    assert rc == 0, report["error"] or err[-2000:]
    assert_verified(report, 1)
    assert_clean(report)


@tls_needs_native
def test_demo_tls_stunnel_backend() -> None:
    rc, report, err = run_demo("--security", "tls", "--backend", "stunnel", "--num-conn", "2")
    assert rc == 0, report["error"] or err[-2000:]
    assert_verified(report, 2)
    assert_clean(report)


def test_demo_fails_when_a_byte_differs() -> None:
    # The producer flips one byte in the third connection's share: the demo
    # must notice, say which connection, exit 1, and still clean up.
    rc, report, _ = run_demo("--security", "plain", "--num-conn", "4", "--corrupt-at", str(13 << 20))
    assert rc == 1
    assert not report["ok"]
    bad = [s for s in report["slices"] if s["sha256"] != s["expected_sha256"]]
    assert [s["offset"] for s in bad] == [12 << 20]
    assert report["stream_digest"] != report["expected_digest"]
    assert_clean(report)


def test_demo_keep_then_ctrl_c_cleans_up() -> None:
    proc = subprocess.Popen([*DEMO, "--size", SIZE, "--json", "--security", "plain", "--num-conn", "2",
                             "--keep"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        seen = ""
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen += line
            if "Ctrl-C" in line:
                break
        assert "s2uc check-status" in seen, seen[-2000:]
        os.kill(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            # Ctrl-C first: the demo stops its gateways (own sessions, so a kill of the demo
            # alone would leave them running); kill only what does not stop.
            os.kill(proc.pid, signal.SIGINT)
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    report = json.loads(out)
    assert proc.returncode == 0, report["error"]
    assert_verified(report, 2)
    assert_clean(report)
