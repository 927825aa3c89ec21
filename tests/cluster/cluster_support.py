"""A facility gateway of several s2cs nodes on loopback, as an operator starts one.

Each node is a real ``s2cs --etcd ... --node-name ...`` process with its own state
directory (so its own s2ds), its own control port and its own listener address
(127.0.0.<i+1>, one loopback address per node, as one host per node would have),
all against one etcd cluster (tests/etcd_cluster.py). Nodes are killed by PID and
every process started here (s2cs and the s2ds it spawned) is stopped at the end.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from scistream._proto import scistream_pb2, scistream_pb2_grpc
from scistream.demo import free_port_range
from scistream.netns import stop_process
from scistream.s2cs.backends.native import stop_spawned_s2ds
from scistream.s2cs.clusterkey import write_cluster_key


@dataclass
class Node:
    name: str
    listener_ip: str
    state_dir: Path
    log: Path
    args: list[str]
    wrap: list[str] = field(default_factory=list)  # e.g. ["ip", "netns", "exec", NS]
    proc: subprocess.Popen[bytes] | None = None
    address: str = ""
    channel: grpc.Channel | None = field(default=None, repr=False)

    @property
    def stub(self) -> Any:
        assert self.channel is not None, f"node {self.name} is not running"
        return scistream_pb2_grpc.ControlStub(self.channel)


class GatewayCluster:
    """``size`` s2cs nodes of one facility against ``etcd_endpoints``."""

    def __init__(
        self,
        workdir: Path,
        etcd_endpoints: list[str],
        size: int = 3,
        *,
        ttl: float = 3.0,
        extra: tuple[str, ...] = (),
        ports: int = 40,
        prefix: str = "/scistream/v1/",
    ) -> None:
        self.workdir = workdir
        self.key = workdir / "cluster.key"
        if not self.key.exists():
            write_cluster_key(self.key)
        lo, hi = free_port_range(ports)
        common = [
            "--ssl",
            "False",
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--port_range",
            f"{lo}-{hi}",
            "--etcd",
            ",".join(etcd_endpoints),
            "--etcd-key-file",
            str(self.key),
            "--node-ttl",
            f"{ttl:g}",
            "--etcd-prefix",
            prefix,
            *extra,
        ]
        self.nodes = [
            Node(
                name=f"n{i}",
                listener_ip=f"127.0.0.{i + 1}",
                state_dir=workdir / f"state-n{i}",
                log=workdir / f"n{i}.log",
                args=[*common, "--node-name", f"n{i}", "--listener-ip", f"127.0.0.{i + 1}"],
            )
            for i in range(size)
        ]

    def __enter__(self) -> GatewayCluster:
        try:
            for i in range(len(self.nodes)):
                self.start(i)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, i: int, timeout: float = 30.0) -> Node:
        node = self.nodes[i]
        mark = node.log.stat().st_size if node.log.exists() else 0
        env = dict(os.environ, SCISTREAM_STATE_DIR=str(node.state_dir))
        with open(node.log, "ab") as out:
            node.proc = subprocess.Popen(
                [*node.wrap, "s2cs", *node.args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = node.log.read_bytes()[mark:].decode(errors="replace")
            m = re.search(r"listening on ([0-9.]+):(\d+)", text)
            if m:
                node.address = f"{m.group(1)}:{m.group(2)}"
                node.channel = grpc.insecure_channel(node.address)
                return node
            if node.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.kill(i)
        raise RuntimeError(f"s2cs node {node.name} did not start: {self.tail(i)}")

    def tail(self, i: int, size: int = 3000) -> str:
        return self.nodes[i].log.read_text(errors="replace")[-size:]

    def kill(self, i: int) -> None:
        """kill -9 of the node's s2cs (its s2ds, a separate process, goes on carrying)."""
        node = self.nodes[i]
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait(10)
        if node.channel is not None:
            node.channel.close()
            node.channel = None

    def stop(self, i: int) -> None:
        node = self.nodes[i]
        if node.proc is not None:
            stop_process(node.proc, timeout=15)
        if node.channel is not None:
            node.channel.close()
            node.channel = None

    def close(self) -> None:
        for i, node in enumerate(self.nodes):
            with contextlib.suppress(Exception):
                self.stop(i)
            with contextlib.suppress(Exception):
                stop_spawned_s2ds(str(node.state_dir))

    def addresses(self) -> str:
        return ",".join(n.address for n in self.nodes if n.channel is not None)


class SingleGateway:
    """One s2cs on its own (no etcd), the other facility's gateway in a test."""

    def __init__(self, workdir: Path, name: str, *, ports: int = 20) -> None:
        lo, hi = free_port_range(ports)
        self.cluster = GatewayCluster.__new__(GatewayCluster)
        self.cluster.workdir = workdir
        self.cluster.nodes = [
            Node(
                name=name,
                listener_ip="127.0.0.1",
                state_dir=workdir / f"state-{name}",
                log=workdir / f"{name}.log",
                args=[
                    "--ssl",
                    "False",
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    "0",
                    "--port_range",
                    f"{lo}-{hi}",
                    "--listener-ip",
                    "127.0.0.1",
                ],
            )
        ]

    @property
    def stub(self) -> Any:
        return self.cluster.nodes[0].stub

    def __enter__(self) -> SingleGateway:
        self.cluster.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cluster.close()


def wait_until(pred: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or pred}")
        time.sleep(interval)


def req_with_hello(
    stub: Any,
    uid: str,
    role: str,
    num_conn: int,
    prod_listeners: list[str],
    hello_stub: Any = None,
    timeout: float = 20.0,
    security: str = "",
) -> Any:
    """req on ``stub``, its hello on ``hello_stub`` (another node, if given): the req Response."""
    fut = stub.req.future(
        scistream_pb2.Request(uid=uid, role=role, num_conn=num_conn, security=security), timeout=timeout
    )
    hello = hello_stub or stub
    deadline = time.monotonic() + timeout
    while True:
        try:
            hello.hello(
                scistream_pb2.Hello(uid=uid, prod_listeners=prod_listeners, role=role), timeout=timeout
            )
            break
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    return fut.result()


def status_of(stub: Any, uid: str = "") -> list[Any]:
    return list(stub.status(scistream_pb2.StatusRequest(uid=uid), timeout=10).sessions)


def stream_session(gw: GatewayCluster, cons: Any, uid: str, num_conn: int, producer: Any) -> tuple[Any, Any]:
    """A PROD session on the cluster (req on n0, hello on n1, update on n2: any node answers
    for any session) to ``producer``, and a CONS session on the gateway ``cons`` pointing at
    its listeners with its key: the two req Responses."""
    p = req_with_hello(
        gw.nodes[0].stub, uid, "PROD", num_conn, [f"127.0.0.1:{producer.port}"], hello_stub=gw.nodes[1].stub
    )
    gw.nodes[2].stub.update(
        scistream_pb2.UpdateTargets(uid=uid, remote_listeners=list(p.prod_listeners)), timeout=20
    )
    c = req_with_hello(cons, uid, "CONS", num_conn, [])
    cons.update(
        scistream_pb2.UpdateTargets(uid=uid, remote_listeners=list(p.listeners), session_key=p.session_key),
        timeout=20,
    )
    return p, c
