"""A gateway of three s2cs nodes sharing its sessions in etcd (issue 12): one uid wins
once, every node answers the same, one session's connections spread over the nodes
with every byte intact."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import secrets
import socket
import subprocess
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from cluster_support import (
    GatewayCluster,
    SingleGateway,
    req_with_hello,
    status_of,
    stream_session,
    wait_until,
)
from etcd_cluster import EtcdCluster
from streams import Consumer, MiB, Producer, pattern_digest

from scistream._proto import scistream_pb2
from scistream.etcd import EtcdClient

pytestmark = pytest.mark.timeout(180)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _uid() -> str:
    return "c" + secrets.token_hex(6)


def _values(etcd: EtcdCluster) -> list[bytes]:
    async def read() -> list[bytes]:
        client = EtcdClient(etcd.endpoints)
        try:
            kvs, _ = await client.get(b"/", prefix=True)
            return [kv.value for kv in kvs]
        finally:
            await client.close()

    return asyncio.run(read())


def _ports_held(etcd: EtcdCluster, prefix: str = "/scistream/v1/") -> list[bytes]:
    async def read() -> list[bytes]:
        client = EtcdClient(etcd.endpoints)
        try:
            kvs, _ = await client.get(f"{prefix}ports/".encode(), prefix=True)
            return [kv.key for kv in kvs]
        finally:
            await client.close()

    return asyncio.run(read())


def test_one_uid_requested_50_times_over_3_nodes_wins_once(tmp_path: Path, etcd_cluster: EtcdCluster) -> None:
    with GatewayCluster(tmp_path, etcd_cluster.endpoints) as gw:
        uid = _uid()
        # The hello first (kept until the req): the winning req then returns at once.
        hello = gw.nodes[0].stub.hello(
            scistream_pb2.Hello(uid=uid, prod_listeners=["127.0.0.1:9"], role="PROD"), timeout=10
        )
        assert "recorded" in hello.message

        def one(i: int) -> str:
            stub = gw.nodes[i % 3].stub
            try:
                stub.req(scistream_pb2.Request(uid=uid, role="PROD", num_conn=2), timeout=30)
            except grpc.RpcError as exc:
                return exc.code().name
            return "OK"

        with ThreadPoolExecutor(50) as pool:
            outcomes = Counter(pool.map(one, range(50)))
        assert outcomes == Counter({"OK": 1, "ALREADY_EXISTS": 49}), outcomes
        assert len(_ports_held(etcd_cluster)) == 2  # the winner's two, none of a loser's
        gw.nodes[1].stub.release(scistream_pb2.Release(uid=uid), timeout=10)
        wait_until(lambda: not _ports_held(etcd_cluster), 5, what="every port given back")
        for node in gw.nodes:
            assert status_of(node.stub) == []


def test_300_sessions_read_the_same_from_every_node(tmp_path: Path, etcd_cluster: EtcdCluster) -> None:
    with GatewayCluster(tmp_path, etcd_cluster.endpoints, ports=400) as gw:
        uids = [f"s{i:03d}" + secrets.token_hex(3) for i in range(300)]

        def make(i: int) -> str:
            uid = uids[i]
            req_with_hello(
                gw.nodes[i % 3].stub, uid, "PROD", 1, ["127.0.0.1:9"], hello_stub=gw.nodes[(i + 1) % 3].stub
            )
            return uid

        with ThreadPoolExecutor(12) as pool:
            made = list(pool.map(make, range(300)))
        assert sorted(made) == sorted(uids)
        views = [[s.SerializeToString(deterministic=True) for s in status_of(node.stub)] for node in gw.nodes]
        assert len(views[0]) == 300
        assert views[0] == views[1] == views[2]
        one = [status_of(node.stub, uids[123])[0] for node in gw.nodes]
        assert one[0] == one[1] == one[2]
        assert one[0].state == "reserved"
        # Spread: the 300 one-connection sessions went over all three nodes.
        per_node = Counter(n for s in status_of(gw.nodes[0].stub) for n in s.listener_nodes)
        assert set(per_node) == {"n0", "n1", "n2"} and min(per_node.values()) >= 90, per_node


def test_six_connections_spread_over_three_nodes_carry_exact_bytes(
    tmp_path: Path, etcd_cluster: EtcdCluster
) -> None:
    total = 24 * MiB
    with (
        GatewayCluster(tmp_path, etcd_cluster.endpoints) as gw,
        SingleGateway(tmp_path, "cons") as cons_gw,
        contextlib.closing(Producer(total)) as producer,
    ):
        uid = _uid()
        p, c = stream_session(gw, cons_gw.stub, uid, 6, producer)
        st = status_of(gw.nodes[1].stub, uid)[0]
        assert Counter(st.listener_nodes) == Counter({"n0": 2, "n1": 2, "n2": 2})
        assert [ep.rsplit(":", 1)[0] for ep in st.listeners] == [
            f"127.0.0.{int(n[1]) + 1}" for n in st.listener_nodes
        ]
        # The session key is in etcd only sealed: no value holds it raw, as hex or base64.
        key = p.session_key
        assert len(key) == 32
        for value in _values(etcd_cluster):
            for form in (key, key.hex().encode(), base64.b64encode(key)):
                assert form not in value
        consumers = [Consumer(ep) for ep in c.listeners]
        for cons in consumers:
            cons.join(60)
        want = pattern_digest(total, producer.seed)
        assert [(x.error, x.received, x.sha) for x in consumers] == [(None, total, want)] * 6
        # Every node counted its own connections; status sums them, the same from each node.
        wait_until(
            lambda: all(status_of(n.stub, uid)[0].bytes_from_target == 6 * total for n in gw.nodes),
            10,
            what="every node's status to count every byte of every node",
        )


def test_s2uc_given_every_node_reads_through_a_dead_one(tmp_path: Path, etcd_cluster: EtcdCluster) -> None:
    with GatewayCluster(tmp_path, etcd_cluster.endpoints) as gw:
        uid = _uid()
        req_with_hello(gw.nodes[0].stub, uid, "PROD", 3, ["127.0.0.1:9"])
        dead = f"127.0.0.1:{free_port()}"  # nothing listens there: s2uc goes on to the next node
        out = subprocess.run(
            ["s2uc", "check-status", "--no-ssl", "--s2cs", f"{dead},{gw.nodes[1].address}", uid],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        for node in ("n0", "n1", "n2"):
            assert f"({node})" in out.stdout, out.stdout


def test_a_second_node_with_a_live_nodes_name_is_refused(tmp_path: Path, etcd_cluster: EtcdCluster) -> None:
    with GatewayCluster(tmp_path, etcd_cluster.endpoints, size=2) as gw:
        namesake = dataclasses.replace(
            gw.nodes[1],
            state_dir=tmp_path / "state-namesake",
            log=tmp_path / "namesake.log",
            proc=None,
            channel=None,
        )
        gw.nodes.append(namesake)
        with pytest.raises(RuntimeError, match="did not start"):
            gw.start(2, timeout=15)
        assert "the node name 'n1' is in use by a live node" in namesake.log.read_text()
        assert namesake.proc is not None and namesake.proc.returncode == 1
        assert status_of(gw.nodes[1].stub) == []  # the live n1 is untouched


def test_a_port_another_process_holds_on_a_node_is_swapped_before_the_req_returns(
    tmp_path: Path, etcd_cluster: EtcdCluster
) -> None:
    total = 4 * MiB
    with (
        GatewayCluster(tmp_path, etcd_cluster.endpoints, ports=12) as gw,
        SingleGateway(tmp_path, "cons") as cons_gw,
        contextlib.closing(Producer(total)) as producer,
        contextlib.ExitStack() as held,
    ):
        lo = int(gw.nodes[1].args[gw.nodes[1].args.index("--port_range") + 1].split("-")[0])
        free = {lo + 10, lo + 11}
        for port in range(lo, lo + 12):
            if port not in free:  # another program listens on n1's address there
                sock = held.enter_context(socket.socket())
                sock.bind(("127.0.0.2", port))
                sock.listen()
        for _ in range(2):  # twice: both of n1's free ports end up used
            uid = _uid()
            p, c = stream_session(gw, cons_gw.stub, uid, 3, producer)
            st = status_of(gw.nodes[2].stub, uid)[0]
            on_n1 = [
                int(ep.rsplit(":", 1)[1])
                for ep, n in zip(st.listeners, st.listener_nodes, strict=True)
                if n == "n1"
            ]
            assert len(on_n1) == 1 and on_n1[0] in free, (on_n1, free)
            assert list(p.listeners) == list(st.listeners)  # what the req returned is what is bound
            consumers = [Consumer(ep) for ep in c.listeners]
            for x in consumers:
                x.join(30)
            assert [(x.error, x.sha) for x in consumers] == [(None, pattern_digest(total, producer.seed))] * 3


def test_a_node_whose_every_port_is_held_gets_no_connection(
    tmp_path: Path, etcd_cluster: EtcdCluster
) -> None:
    with GatewayCluster(tmp_path, etcd_cluster.endpoints, ports=6) as gw, contextlib.ExitStack() as held:
        lo = int(gw.nodes[1].args[gw.nodes[1].args.index("--port_range") + 1].split("-")[0])
        for port in range(lo, lo + 6):  # another program holds every data port of n1's address
            sock = held.enter_context(socket.socket())
            sock.bind(("127.0.0.2", port))
            sock.listen()
        # Asked of n1 itself (it test-binds its own ports) and of n0 (n1 finds out and says so).
        for asked in (1, 0):
            uid = _uid()
            req_with_hello(gw.nodes[asked].stub, uid, "PROD", 3, ["127.0.0.1:9"])
            st = status_of(gw.nodes[2].stub, uid)[0]
            assert "n1" not in st.listener_nodes and len(st.listeners) == 3, st
        wait_until(lambda: "n1" not in {k.split(b"/")[-2].decode() for k in _ports_held(etcd_cluster)}, 5)
