"""A node cut off from etcd (issue 12): nftables in the node's own network namespace
drops its traffic to etcd. It refuses new sessions within its lease's TTL, applies
nothing it cannot prove current, and the streams through it go on; when the network
heals it joins again and converges on its own."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cluster_support import GatewayCluster, SingleGateway, req_with_hello, status_of, wait_until
from etcd_cluster import EtcdCluster
from streams import Consumer, MiB, Producer, pattern_digest

from scistream._proto import scistream_pb2

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and nftables need root"),
]

TTL = 3.0


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextlib.contextmanager
def _namespace() -> Iterator[tuple[str, str, str]]:
    """A network namespace joined to this one by a veth pair: (name, host address, its address)."""
    tag = secrets.token_hex(3)
    ns, host_if, ns_if = f"sscut{tag}", f"vch{tag}", f"vcn{tag}"
    octet = int(tag[:2], 16) % 200 + 20
    host_addr, ns_addr = f"10.213.{octet}.1", f"10.213.{octet}.2"
    _ip("netns", "add", ns)
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", ns)
        _ip("addr", "add", f"{host_addr}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", ns, "addr", "add", f"{ns_addr}/30", "dev", ns_if)
        _ip("-n", ns, "link", "set", ns_if, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        yield ns, host_addr, ns_addr
    finally:
        subprocess.run(["ip", "link", "del", host_if], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def _nft(ns: str, script: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script.encode(), check=True)


def _cut(ns: str, etcd_host: str, ports: list[int]) -> None:
    """Drop everything the namespace sends to etcd's client ports."""
    _nft(
        ns,
        "table inet sscut {\n chain out {\n  type filter hook output priority 0; policy accept;\n"
        f"  ip daddr {etcd_host} tcp dport {{ {', '.join(map(str, ports))} }} drop\n }}\n}}\n",
    )


def _heal(ns: str) -> None:
    _nft(ns, "delete table inet sscut\n")


def test_a_node_cut_from_etcd_is_fenced_and_its_streams_go_on(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    total = 100 * MiB  # paced to about 10 s: in flight through the whole cut
    with _namespace() as (ns, host_addr, ns_addr):  # noqa: SIM117 (the cluster needs the namespace's address)
        with EtcdCluster(3, parent=tmp_path_factory.getbasetemp(), also_listen=(host_addr,)) as etcd:
            gw = GatewayCluster(tmp_path, etcd.endpoints, ttl=TTL)
            cut = gw.nodes[2]  # the node in the namespace reaches etcd through the veth
            cut.wrap = ["ip", "netns", "exec", ns]
            cut.args = [a for a in cut.args]
            cut.args[cut.args.index("127.0.0.1")] = ns_addr  # --bind
            cut.args[cut.args.index("--listener-ip") + 1] = ns_addr
            cut.args[cut.args.index("--etcd") + 1] = ",".join(etcd.endpoints_on(host_addr))
            with (
                gw,
                SingleGateway(tmp_path, "cons") as cons_gw,
                contextlib.closing(Producer(total, pace=0.1, host=host_addr)) as producer,
            ):
                uid = "cut" + secrets.token_hex(5)
                p = req_with_hello(
                    gw.nodes[0].stub, uid, "PROD", 6, [f"{host_addr}:{producer.port}"], hello_stub=cut.stub
                )
                gw.nodes[1].stub.update(
                    scistream_pb2.UpdateTargets(uid=uid, remote_listeners=list(p.prod_listeners)), timeout=20
                )
                before = status_of(gw.nodes[0].stub, uid)[0]
                assert sorted(before.listener_nodes) == ["n0", "n0", "n1", "n1", "n2", "n2"]
                c = req_with_hello(cons_gw.stub, uid, "CONS", 6, [])
                cons_gw.stub.update(
                    scistream_pb2.UpdateTargets(
                        uid=uid, remote_listeners=list(p.listeners), session_key=p.session_key
                    ),
                    timeout=20,
                )
                consumers = [Consumer(ep, timeout=120) for ep in c.listeners]
                wait_until(
                    lambda: min(x.received for x in consumers) > 2 * MiB, 30, what="every stream flowing"
                )
                log_mark = len(gw.tail(2, 10**7))

                _cut(ns, host_addr, etcd.client_ports)
                cut_at = time.monotonic()
                time.sleep(TTL)
                # Within its TTL it refuses new sessions, at once and with a sentence.
                asked = time.monotonic()
                with pytest.raises(grpc.RpcError) as err:
                    cut.stub.req(scistream_pb2.Request(uid="late" + secrets.token_hex(4), role="PROD",
                                                       num_conn=1), timeout=10)  # fmt: skip
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "lost its place in the cluster" in (err.value.details() or "")
                assert time.monotonic() - asked < 1.0
                # The others take it for gone and move its listeners; meanwhile they change the
                # session (new targets: a second producer) — the cut node must apply none of it.
                moved = wait_until(
                    lambda: [s for s in status_of(gw.nodes[0].stub, uid) if "n2" not in s.listener_nodes],
                    10,
                    what="n2's listeners moved",
                )[0]
                assert len(moved.lost_connections) == 2
                with contextlib.closing(Producer(total, host=host_addr, seed=7)) as other:
                    gw.nodes[0].stub.update(
                        scistream_pb2.UpdateTargets(uid=uid, remote_listeners=[f"{host_addr}:{other.port}"]),
                        timeout=20,
                    )
                    assert max(x.received for x in consumers) < total, "the streams ended before the test"
                    time.sleep(1.0)
                    applied_while_cut = gw.tail(2, 10**7)[log_mark:]
                    assert "applied" not in applied_while_cut and "drained" not in applied_while_cut
                    # Every stream, the two through the cut node included, is intact.
                    for x in consumers:
                        x.join(120)
                    want = pattern_digest(total, producer.seed)
                    assert [(x.error, x.received, x.sha) for x in consumers] == [(None, total, want)] * 6
                    assert time.monotonic() - cut_at > TTL

                    # Healed: it joins again by itself, drains what moved away, serves again.
                    _heal(ns)
                    wait_until(
                        lambda: status_of(cut.stub, uid) == status_of(gw.nodes[0].stub, uid),
                        15,
                        what="the healed node to agree with the others",
                    )
                    wait_until(
                        lambda: "drained" in gw.tail(2, 10**7)[log_mark:], 10, what="its moved routes drained"
                    )
                    late = "late" + secrets.token_hex(4)
                    wait_until(
                        lambda: _req_works(cut.stub, late, host_addr), 15, interval=0.3, what="new sessions"
                    )


def _req_works(stub: object, uid: str, host: str) -> bool:
    try:
        req_with_hello(stub, uid, "PROD", 1, [f"{host}:9"], timeout=3)
    except grpc.RpcError:
        return False
    return True
