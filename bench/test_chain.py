"""The whole product in the tutorial topology: two s2cs gateways, each backend, iperf3 through them.

Four namespaces (producer, producer gateway, consumer gateway, consumer; veth
links, reno) as ``scistream demo --netns`` builds them. Per case: fresh gateways
(s2cs, and s2ds for the native backend), an iperf3 server on the producer, the
session set up as users do (``s2uc stream --appctrl`` with both hellos), then
``iperf3 -R`` from the consumer through both gateways (the producer sends), and
release. "direct" turns IP forwarding on in the gateways instead: the same wires
with the kernel as the only forwarder. CPU is every gateway process (s2cs, s2ds,
proxies they spawn) over the iperf3 run.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ROUNDS, SECONDS, STREAMS, Results, selected
from peers import iperf3_client_argv, iperf3_end

from scistream import netns
from scistream.demo import Demo, Options

#: name -> (backend, security); None: no gateway software, kernel forwarding.
CHAIN: dict[str, tuple[str, str] | None] = {
    "direct": None,
    "native-tls": ("native", "tls"),
    "native-plain": ("native", "plain"),
    "stunnel-tls": ("StunnelSubprocess", "tls"),
    "stunnel-compat": ("StunnelSubprocess", "compat"),
    "haproxy-plain": ("HaproxySubprocess", "plain"),
}
NAMES = selected(list(CHAIN))
CASES = [(r, name, n) for r in range(ROUNDS) for n in STREAMS for name in NAMES]
IPERF_PORT = 5201


def _iperf(demo: Demo, connect: str, streams: int) -> dict[str, Any]:
    host, port = connect.rsplit(":", 1)
    res = demo.run_cmd(
        "consumer", iperf3_client_argv(host, port, streams, SECONDS, "-R"), timeout=SECONDS + 30
    )
    return iperf3_end(res)


def run_case(name: str, streams: int) -> dict[str, Any]:
    spec = CHAIN[name]
    backend, security = spec or ("native", "plain")
    opts = Options(
        size=0,
        num_conn=streams,
        security=security,
        backend=backend,
        use_netns=True,
        keep=False,
        seed=1,
        engine="",
        timeout=SECONDS + 30,
    )
    demo = Demo(opts, lambda s: None)
    try:
        demo.build_hosts()
        topo = demo.topo
        assert topo is not None
        for host in netns.HOSTS:  # comparable figures (BENCHMARKING.md)
            topo.sh(host, "sysctl", "-qw", "net.ipv4.tcp_congestion_control=reno")
        server = demo.popen(
            "producer",
            ["iperf3", "-s", "-1", "-B", netns.ADDR["producer"], "-p", str(IPERF_PORT)],
            "iperf3-server",
        )
        setup_s = None
        if spec is None:
            for gw in ("prod_gw", "cons_gw"):
                topo.sh(gw, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            connect = f"{netns.ADDR['producer']}:{IPERF_PORT}"
        else:
            demo.start_gateways()
            demo.producer_endpoint = f"{netns.ADDR['producer']}:{IPERF_PORT}"
            connect = demo.setup_stream()[0]
            setup_s = demo.report.setup_seconds
        time.sleep(0.3)  # start-up CPU out of the measured window
        cpu0 = sum(f.cpu_seconds() for f in demo.facilities.values()) if spec else 0.0
        end = _iperf(demo, connect, streams)
        cpu = (sum(f.cpu_seconds() for f in demo.facilities.values()) - cpu0) if spec else None
        if spec is not None:
            demo.release()
        server.wait(timeout=10)
        received = int(end["sum_received"]["bytes"])
        return {
            "config": name,
            "streams": streams,
            "seconds": SECONDS,
            "gbps": round(end["sum_received"]["bits_per_second"] / 1e9, 3),
            "bytes": received,
            "gateway_cpu_s": round(cpu, 3) if cpu is not None else None,
            "cpu_s_per_gb": round(cpu / (received / 1e9), 3) if cpu and received else None,
            "setup_s": round(setup_s, 3) if setup_s is not None else None,
            "retransmits": int(end.get("sum_sent", {}).get("retransmits", 0)),
        }
    finally:
        demo.stop_all()
        demo.close()


@pytest.mark.parametrize(
    ("round_", "name", "streams"), CASES, ids=[f"r{r}-{name}-P{n}" for r, name, n in CASES]
)
def test_chain(
    benchmark: Any, results: Results, tmp_path: Path, round_: int, name: str, streams: int
) -> None:
    for exe in (
        ("iperf3",)
        + (("stunnel",) if "stunnel" in name else ())
        + (("haproxy",) if "haproxy" in name else ())
    ):
        if subprocess.run(["which", exe], capture_output=True, check=False).returncode != 0:
            pytest.skip(f"{exe} is not installed")
    row = benchmark.pedantic(run_case, args=(name, streams), rounds=1, iterations=1)
    row["round"] = round_
    benchmark.extra_info.update(row)
    results.add("chain", row)
