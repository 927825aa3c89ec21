"""The namespace topology itself: addressing, isolation, impairments, clean-up."""

from __future__ import annotations

import functools
import subprocess
import sys

from scistream import netns

# A tiny TCP client: exit 0 if it connects, 1 otherwise (run inside a namespace).
CONNECT = (
    "import socket,sys\n"
    "try:\n"
    "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()\n"
    "except OSError as e:\n"
    "    print(e); sys.exit(1)\n"
)


def _listen(topo: netns.Topology, host: netns.Host, addr: str, port: int) -> subprocess.Popen[bytes]:
    proc = topo.popen(host, ["socat", f"TCP-LISTEN:{port},bind={addr},reuseaddr,fork", "SYSTEM:echo ok"],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    netns.wait_for_listen(functools.partial(topo.argv, host), port)
    return proc


def _connects(topo: netns.Topology, host: netns.Host, addr: str, port: int, timeout: float = 1.0) -> bool:
    res = topo.run(host, [sys.executable, "-c", CONNECT, addr, str(port), str(timeout)], check=False)
    return res.returncode == 0


def test_neighbours_reach_each_other_but_not_across_gateways(topo: netns.Topology) -> None:
    a = netns.ADDR
    _listen(topo, "consumer", a["consumer"], 7000)
    _listen(topo, "prod_gw", a["prod_gw_lan"], 7001)
    _listen(topo, "cons_gw", a["cons_gw_wan"], 7002)
    # Each hop works.
    assert _connects(topo, "producer", a["prod_gw_lan"], 7001)
    assert _connects(topo, "prod_gw", a["cons_gw_wan"], 7002)
    assert _connects(topo, "cons_gw", a["consumer"], 7000)
    # The ends only meet through a proxy: routes exist, forwarding does not.
    assert not _connects(topo, "producer", a["consumer"], 7000)
    assert not _connects(topo, "producer", a["cons_gw_wan"], 7002)
    for host in ("prod_gw", "cons_gw"):
        assert topo.sh(host, "sysctl", "-n", "net.ipv4.ip_forward").strip() == "0"


def test_cut_blackhole_and_shape_are_reversible(topo: netns.Topology) -> None:
    a = netns.ADDR
    _listen(topo, "cons_gw", a["cons_gw_wan"], 7010)
    topo.cut("wan")
    assert not _connects(topo, "prod_gw", a["cons_gw_wan"], 7010, timeout=0.5)
    topo.restore("wan")
    assert _connects(topo, "prod_gw", a["cons_gw_wan"], 7010)
    topo.blackhole("prod_gw", a["cons_gw_wan"])
    assert not _connects(topo, "prod_gw", a["cons_gw_wan"], 7010, timeout=0.5)
    topo.unblackhole("prod_gw", a["cons_gw_wan"])
    topo.shape("wan", "100mbit")
    assert "tbf" in topo.sh("prod_gw", "tc", "qdisc", "show", "dev", "wan0")
    topo.unshape("wan")
    assert _connects(topo, "prod_gw", a["cons_gw_wan"], 7010)


def test_namespaces_are_gone_after_a_failure() -> None:
    tag = ""
    try:
        with netns.Topology("sstt") as t:
            tag = t.tag
            proc = t.popen("producer", ["sleep", "60"])
            assert len([n for n in netns.list_namespaces("sstt") if n.startswith(tag)]) == 4
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert proc.poll() is not None, "the process started in the namespace was not stopped"
    assert not [n for n in netns.list_namespaces("sstt") if n.startswith(tag)]
