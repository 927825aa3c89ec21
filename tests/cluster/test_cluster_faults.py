"""Failures of a gateway of three nodes (issue 12): a node killed, the etcd leader killed,
etcd's quorum lost. Flowing streams never notice; the cluster reports, moves, recovers."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import zmq
from cluster_support import (
    GatewayCluster,
    SingleGateway,
    status_of,
    stream_session,
    wait_until,
)
from etcd_cluster import EtcdCluster
from streams import Consumer, MiB, Producer, pattern_digest

from scistream._proto import scistream_pb2
from scistream.s2cs.backends.native import PID_FILE

pytestmark = pytest.mark.timeout(240)

TTL = 3.0


def _uid() -> str:
    return "f" + secrets.token_hex(6)


@contextlib.contextmanager
def _events(node_state_dir: Path) -> Iterator[Any]:
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"session/")
    sock.connect(f"ipc://{node_state_dir / 'events.sock'}")
    try:
        yield sock
    finally:
        sock.close()
        ctx.term()


def _next_event(sock: Any, uid: str, kind: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000)):
            _topic, body = sock.recv_multipart()
            ev = json.loads(body)
            if ev["uid"] == uid and ev["event"] == kind:
                return dict(ev)
    raise AssertionError(f"no {kind!r} event for {uid} within {timeout:g} s")


def _check(consumers: list[Consumer], total: int, seed: int) -> None:
    for c in consumers:
        c.join(120)
    want = pattern_digest(total, seed)
    assert [(c.error, c.received, c.sha) for c in consumers] == [(None, total, want)] * len(consumers)


def test_kill9_of_a_node_mid_stream(tmp_path: Path, etcd_cluster: EtcdCluster) -> None:
    total = 192 * MiB
    with (
        GatewayCluster(tmp_path, etcd_cluster.endpoints, ttl=TTL) as gw,
        SingleGateway(tmp_path, "cons") as cons_gw,
        contextlib.closing(Producer(total)) as producer,
        _events(gw.nodes[0].state_dir) as events0,
        _events(gw.nodes[2].state_dir) as events2,
    ):
        uid = _uid()
        p, c = stream_session(gw, cons_gw.stub, uid, 6, producer)
        before = status_of(gw.nodes[0].stub, uid)[0]
        on_n1 = [i for i, n in enumerate(before.listener_nodes) if n == "n1"]
        assert len(on_n1) == 2
        consumers = [Consumer(ep) for ep in c.listeners]
        wait_until(lambda: min(x.received for x in consumers) > 4 * MiB, 30, what="every stream flowing")
        killed_at = time.monotonic()
        gw.kill(1)  # s2cs only: n1's s2ds goes on carrying its two connections
        # Every other node reports n1's connections as failed within TTL + 2 s.
        for sock in (events0, events2):
            ev = _next_event(sock, uid, "broken", TTL + 2)
            assert "node n1 left the cluster" in ev["error"]
        assert time.monotonic() - killed_at < TTL + 2
        # ... and moves its listeners to live nodes, for new connections.
        moved = wait_until(
            lambda: [s for s in status_of(gw.nodes[2].stub, uid) if "n1" not in s.listener_nodes],
            5,
            what="n1's listeners moved",
        )[0]
        assert len(moved.lost_connections) == 2 and all("n1" in x for x in moved.lost_connections)
        assert [moved.listeners[i] for i in on_n1] != [before.listeners[i] for i in on_n1]
        _check(consumers, total, producer.seed)  # no stream was touched, n1's own included
        # n1 comes back on its own: it drains the routes that moved away and agrees with the others.
        gw.start(1)
        wait_until(
            lambda: status_of(gw.nodes[1].stub, uid) == status_of(gw.nodes[0].stub, uid),
            10,
            what="n1 converged",
        )
        wait_until(lambda: "drained" in gw.tail(1, 20000), 10, what="n1 drained its moved routes")
        # A new connection through a moved listener carries exact bytes.
        cons_gw.stub.update(
            scistream_pb2.UpdateTargets(
                uid=uid, remote_listeners=list(moved.listeners), session_key=p.session_key
            ),
            timeout=20,
        )
        again = [Consumer(c.listeners[i]) for i in on_n1]
        _check(again, total, producer.seed)


def _req_ok(stub: Any, timeout: float = 3.0) -> str:
    uid = _uid()
    stub.hello(scistream_pb2.Hello(uid=uid, prod_listeners=["127.0.0.1:9"], role="PROD"), timeout=timeout)
    stub.req(scistream_pb2.Request(uid=uid, role="PROD", num_conn=1), timeout=timeout)
    return uid


def test_etcd_leader_killed_and_quorum_lost(tmp_path: Path, etcd_cluster: EtcdCluster) -> None:
    total = 120 * MiB  # paced to about 12 s per stream: in flight through every fault below
    with (
        GatewayCluster(tmp_path, etcd_cluster.endpoints, ttl=TTL) as gw,
        SingleGateway(tmp_path, "cons") as cons_gw,
        contextlib.closing(Producer(total, pace=0.1)) as producer,
    ):
        uid = _uid()
        _p, c = stream_session(gw, cons_gw.stub, uid, 3, producer)
        consumers = [Consumer(ep, timeout=120) for ep in c.listeners]
        wait_until(lambda: min(x.received for x in consumers) > 2 * MiB, 30, what="every stream flowing")

        # kill -9 of the leader: writes resume within 5 s.
        leader = etcd_cluster.leader()
        etcd_cluster.kill(leader)
        killed = time.monotonic()
        while True:
            try:
                _req_ok(gw.nodes[0].stub)
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                assert time.monotonic() - killed < 5, "no write went through within 5 s of the leader's death"
                time.sleep(0.1)
        assert time.monotonic() - killed < 5
        etcd_cluster.start(leader)
        etcd_cluster.wait_healthy()

        # Quorum lost: new requests fail within 2 s with a sentence; streams flow on.
        others = [i for i in range(3) if i != etcd_cluster.leader()]
        lost = [etcd_cluster.leader(), others[0]]
        for i in lost:
            etcd_cluster.stop(i)
        assert max(x.received for x in consumers) < total, "the streams ended before the quorum was lost"
        for node in gw.nodes:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                _req_ok(node.stub, timeout=10)
            assert time.monotonic() - started < 2.0 + 0.5  # 2 s, and the RPC's own round trips
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "etcd" in (err.value.details() or "") or "cluster" in (err.value.details() or "")
        time.sleep(TTL)  # longer than the nodes' lease: they count themselves fenced meanwhile
        flowing = [x.received for x in consumers]
        assert max(flowing) < total
        wait_until(
            lambda: min(x.received - f for x, f in zip(consumers, flowing, strict=True)) > MiB,
            10,
            what="the streams flowing without quorum",
        )
        for i in lost:
            etcd_cluster.start(i)
        etcd_cluster.wait_healthy()
        # Everything recovers without a restart.
        for node in gw.nodes:
            wait_until(
                lambda node=node: _try(lambda: _req_ok(node.stub)), 15, interval=0.3, what="writes again"
            )
        _check(consumers, total, producer.seed)


def _try(fn: Any) -> bool:
    try:
        fn()
    except grpc.RpcError:
        return False
    return True


def test_kill9_of_a_nodes_s2ds_is_repaired_by_its_node(tmp_path: Path, etcd_cluster: EtcdCluster) -> None:
    total = 8 * MiB
    with (
        GatewayCluster(tmp_path, etcd_cluster.endpoints, ttl=TTL) as gw,
        SingleGateway(tmp_path, "cons") as cons_gw,
        contextlib.closing(Producer(total)) as producer,
        _events(gw.nodes[1].state_dir) as events1,
    ):
        uid = _uid()
        _p, c = stream_session(gw, cons_gw.stub, uid, 3, producer)
        pid_file = gw.nodes[1].state_dir / PID_FILE
        old = int(pid_file.read_text())
        applied = gw.tail(1, 10**7).count("route(s) of this node applied")
        os.kill(old, signal.SIGKILL)
        # n1 notices, starts a new s2ds and applies its part of every session again.
        wait_until(
            lambda: pid_file.exists() and pid_file.read_text().strip() not in ("", str(old)),
            10,
            what="a new s2ds on n1",
        )
        wait_until(
            lambda: gw.tail(1, 10**7).count("route(s) of this node applied") > applied,
            10,
            what="n1 re-applied",
        )
        assert "s2ds pid" in _next_event(events1, uid, "broken", 5)["error"]
        assert "applied again" in _next_event(events1, uid, "restored", 10)["error"]
        _check([Consumer(ep) for ep in c.listeners], total, producer.seed)
