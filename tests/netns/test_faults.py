"""Failures in the tutorial topology, through both gateways (RELIABILITY.md 1, 4, 15, 16, 25).

Each test sets a TLS session up with `s2uc stream` + appctrl hellos (make_chain),
streams the demo's deterministic data producer -> consumer, breaks something, and
checks bytes (SHA-256 of what arrived against the seed), gateway state and memory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

from conftest import Chain, expected_sha, read_result, rss_kib, wait_until

from scistream.demo_apps import slices

MiB = 1 << 20


def _wait_bytes(progress: list[int], n: int, timeout: float = 20) -> None:
    wait_until(lambda: progress[0] >= n, timeout)


def _follow(proc: subprocess.Popen[bytes]) -> tuple[list[int], dict[str, object], threading.Thread]:
    """Read the consumer's output in a thread: live byte count and its final result."""
    progress = [0]
    out: dict[str, object] = {}

    def run() -> None:
        # Killed on purpose, or failed: the test asserts on ``out`` being filled.
        with contextlib.suppress(AssertionError):
            out.update(read_result(proc, lambda n: progress.__setitem__(0, n), timeout=120))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return progress, out, t


def _verify_all(chain: Chain, result: dict[str, object], size: int) -> None:
    parts = slices(size, len(chain.connect))
    got = result["slices"]
    assert isinstance(got, list)
    for s, (off, n) in zip(got, parts, strict=True):
        assert not s["error"], s["error"]
        assert s["received"] == n
        assert s["sha256"] == expected_sha(chain.seed, off, n)


def test_producer_dies_mid_stream(make_chain) -> None:
    """RELIABILITY 4: an exact prefix arrives, the gateways let go, a new connection works."""
    chain = make_chain(num_conn=2)
    size = 8 << 30  # far more than can flow before the kill
    consumer = chain.consumer(size, timeout=20)
    progress, result, reader = _follow(consumer)
    _wait_bytes(progress, 32 * MiB)
    producer = chain.demo.producer_proc
    assert producer is not None
    producer.kill()
    producer.wait()
    reader.join(30)
    assert result, "the consumer did not finish after the producer died"
    for s, (off, _n) in zip(result["slices"], slices(size, 2), strict=True):  # type: ignore[arg-type]
        assert s["error"], "a connection claims to be complete although the producer died"
        # Whatever arrived is exactly the beginning of that connection's share.
        assert s["sha256"] == expected_sha(chain.seed, off, s["received"])
    # Both gateways drop the dead connections.
    for side in ("producer", "consumer"):
        wait_until(lambda side=side: chain.active(side) == 0, 10)
    # A new producer on the same endpoint and a new consumer: the session still works.
    host, port = chain.demo.producer_endpoint.rsplit(":", 1)
    chain.demo.popen("producer", [sys.executable, "-m", "scistream.demo_apps", "producer", "--listen",
                                  f"{host}:{port}", "--seed", str(chain.seed)], "producer-app-2")
    time.sleep(0.5)
    again = read_result(chain.consumer(16 * MiB))
    _verify_all(chain, again, 16 * MiB)


def test_consumer_stalls_without_loss_and_bounded_gateway_memory(make_chain) -> None:
    """RELIABILITY 1 (short): SIGSTOP the consumer; gateway RSS stays bounded; every byte arrives."""
    chain = make_chain(num_conn=2)
    size = 768 * MiB
    base = {side: rss_kib(chain.s2ds_pid(side)) for side in ("producer", "consumer")}
    consumer = chain.consumer(size, timeout=60)
    progress, result, reader = _follow(consumer)
    _wait_bytes(progress, 16 * MiB)
    os.kill(consumer.pid, signal.SIGSTOP)
    peak = dict(base)
    try:
        t_end = time.monotonic() + 8
        while time.monotonic() < t_end:
            for side, top in list(peak.items()):
                peak[side] = max(top, rss_kib(chain.s2ds_pid(side)))
            time.sleep(0.25)
    finally:
        os.kill(consumer.pid, signal.SIGCONT)
    reader.join(90)
    assert result, "the consumer did not finish after SIGCONT"
    _verify_all(chain, result, size)
    # Per connection: at most the engine's buffers (256 KiB per TLS direction,
    # 1 MiB pipes live in the kernel), far below what the producer could push
    # into an unbounded gateway in 8 s (gigabytes).
    for side, top in peak.items():
        growth_mib = (top - base[side]) / 1024
        print(f"figure: {side} gateway RSS grew {growth_mib:.2f} MiB during an 8 s consumer stall")
        assert growth_mib < 2 * 1 + 4 + 8, f"{side} gateway RSS grew {growth_mib:.1f} MiB while stalled"


def test_wan_cut_for_seconds_stream_survives(make_chain) -> None:
    """A silent WAN outage of 3 s: TCP retransmits, the stream completes byte-exact."""
    chain = make_chain(num_conn=2)
    size = 384 * MiB
    # 20 MB/s on the WAN makes the transfer outlast the cut without costing CPU.
    chain.topo.shape("wan", "160mbit")
    consumer = chain.consumer(size, timeout=60)
    progress, result, reader = _follow(consumer)
    _wait_bytes(progress, 8 * MiB)
    chain.topo.cut("wan")
    time.sleep(3)
    before = progress[0]
    chain.topo.restore("wan")
    chain.topo.unshape("wan")
    reader.join(90)
    assert result, "the consumer did not finish after the WAN came back"
    assert before < size, "the transfer ended before the cut: the test proved nothing"
    _verify_all(chain, result, size)


def test_peer_gateway_blackhole_detected_within_user_timeout(make_chain) -> None:
    """RELIABILITY 15: the consumer gateway goes silent (its replies to the producer
    gateway are blackholed); with TCP_USER_TIMEOUT 2 s the producer gateway drops
    the connections within 2 s + 1 s."""
    user_timeout_ms = 2000
    chain = make_chain(num_conn=2, s2ds_args=("--tcp-user-timeout", str(user_timeout_ms)))
    consumer = chain.consumer(8 << 30, timeout=30)
    progress, _result, reader = _follow(consumer)
    _wait_bytes(progress, 16 * MiB)
    assert chain.active("producer") == 2
    chain.topo.blackhole("cons_gw", "192.168.20.10/32")
    t0 = time.monotonic()
    wait_until(lambda: chain.active("producer") == 0, user_timeout_ms / 1000 + 1 + 0.5)
    detected = time.monotonic() - t0
    print(f"figure: blackholed peer detected after {detected:.2f} s (TCP user timeout 2 s)")
    assert detected <= user_timeout_ms / 1000 + 1, f"detected after {detected:.2f} s"
    chain.topo.unblackhole("cons_gw", "192.168.20.10/32")
    consumer.kill()
    reader.join(10)


def test_wan_shaped_to_100mbit(make_chain) -> None:
    """RELIABILITY 25: tbf 100 Mbit/s on the WAN veth: >= 90 % of it end to end, flat RSS."""
    chain = make_chain(num_conn=2)
    chain.topo.shape("wan", "100mbit")
    size = 48 * MiB  # ~4 s at 100 Mbit/s
    samples: list[int] = []
    consumer = chain.consumer(size, timeout=30)
    progress, result, reader = _follow(consumer)
    _wait_bytes(progress, 4 * MiB)
    while reader.is_alive():
        samples.append(rss_kib(chain.s2ds_pid("producer")) + rss_kib(chain.s2ds_pid("consumer")))
        reader.join(0.25)
    assert result
    _verify_all(chain, result, size)
    mbit = size * 8 / float(result["seconds"]) / 1e6  # type: ignore[arg-type]
    print(f"figure: {mbit:.1f} Mbit/s through tbf 100mbit; gateway RSS "
          f"{min(samples) / 1024:.1f}-{max(samples) / 1024:.1f} MiB")
    assert mbit >= 90, f"{mbit:.1f} Mbit/s through a 100 Mbit/s WAN"
    assert mbit <= 101, f"{mbit:.1f} Mbit/s: the shaper was not in the path"
    assert len(samples) >= 4
    assert (max(samples) - min(samples)) / 1024 < 4, f"gateway RSS moved {samples}"


def test_s2cs_killed_and_restarted_mid_stream(make_chain) -> None:
    """RELIABILITY 16: kill -9 the producer's s2cs mid-stream; s2ds keeps streaming;
    after a restart the session is in status and releases cleanly."""
    chain = make_chain(num_conn=2)
    size = 512 * MiB
    chain.topo.shape("wan", "400mbit")  # ~10 s of transfer: the restart happens mid-stream
    consumer = chain.consumer(size, timeout=60)
    progress, result, reader = _follow(consumer)
    _wait_bytes(progress, 16 * MiB)
    s2cs = chain.s2cs_proc("producer")
    s2cs.kill()
    s2cs.wait()
    chain.demo.restart_s2cs("producer")
    assert reader.is_alive(), "the transfer ended before the restart: the test proved nothing"
    chain.topo.unshape("wan")
    reader.join(90)
    assert result
    _verify_all(chain, result, size)
    prod = chain.demo.facilities["producer"]
    status = chain.demo.s2uc(["check-status", "--s2cs", prod.control, "--server_cert",
                              str(chain.demo.cert), chain.demo.report.uid, "--json"])
    assert status.returncode == 0, status.stderr
    assert chain.demo.report.uid in status.stdout
    chain.demo.release()
    assert chain.demo.report.released, chain.demo.report.error
    assert chain.demo.report.ports_rebindable, chain.demo.report.ports_still_bound
