"""One facility's gateway in each configuration the multi-node benchmarks compare (issue 12),
and a session driven over gRPC as ``s2uc`` and ``appctrl`` drive it.

Configurations (``Facility(config, workdir)``):

* ``sqlite-1``: one plain s2cs, no etcd (the default: its embedded SQLite store);
* ``etcd-N``: N s2cs nodes (``--etcd``, ``--node-name nI``, listener 127.0.0.<I+1>, each its
  own s2ds and state dir, placement ``spread``, node TTL 10 s as shipped) against a fresh
  3-member etcd cluster on loopback.

The processes come from the tests' helpers (tests/etcd_cluster.py and
tests/cluster/cluster_support.py), imported from there so that one copy starts them.
Control channels are plain gRPC (the tests' helpers start nodes with ``--ssl False``),
the same for every configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.append(str(Path(__file__).resolve().parent.parent / "tests" / "cluster"))

import grpc
from cluster_support import GatewayCluster, Node, SingleGateway
from etcd_cluster import ETCD, EtcdCluster

from scistream._proto import scistream_pb2 as pb
from scistream._proto import scistream_pb2_grpc
from scistream.etcd import EtcdClient
from scistream.s2cs.backends.native import PID_FILE

CLK_TCK = os.sysconf("SC_CLK_TCK")
#: Node TTL of the cluster configurations: the shipped default (keep-alives every TTL/3).
NODE_TTL = 10.0


def etcd_available() -> bool:
    return os.access(ETCD, os.X_OK)


def node_count(config: str) -> int:
    return 1 if config == "sqlite-1" else int(config.split("-", 1)[1])


class Facility:
    """The gateway of one facility in configuration ``config`` (see the module docstring):
    every process started here is stopped, and ``workdir`` removed, on exit."""

    def __init__(self, config: str, *, ports: int = 60, name: str = "prod") -> None:
        self.config = config
        self.workdir = Path(tempfile.mkdtemp(prefix=f"bench-{config}-"))
        self.etcd: EtcdCluster | None = None
        self._ports = ports
        self._name = name
        self._gateway: GatewayCluster | None = None
        self._stack = contextlib.ExitStack()
        self._channels: list[grpc.Channel] = []

    def __enter__(self) -> Facility:
        try:
            if self.config == "sqlite-1":
                single = self._stack.enter_context(SingleGateway(self.workdir, self._name, ports=self._ports))
                self._gateway = single.cluster
            else:
                self.etcd = self._stack.enter_context(EtcdCluster(3, parent=self.workdir))
                self._gateway = self._stack.enter_context(
                    GatewayCluster(
                        self.workdir,
                        self.etcd.endpoints,
                        node_count(self.config),
                        ttl=NODE_TTL,
                        ports=self._ports,
                    )
                )
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        self._channels.clear()
        try:
            self._stack.close()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def etcd_revision(self) -> int:
        """etcd's current revision (every write adds one), 0 without etcd."""
        if self.etcd is None:
            return 0

        async def read() -> int:
            client = EtcdClient(self.etcd.endpoints if self.etcd else [])
            try:
                return (await client.get(b"/", keys_only=True))[1]
            finally:
                await client.close()

        return asyncio.run(read())

    @property
    def nodes(self) -> list[Node]:
        assert self._gateway is not None
        return self._gateway.nodes

    def stubs(self) -> list[Any]:
        """A stub per node on fresh channels (a client of its own); closed with the facility."""
        channels = [grpc.insecure_channel(n.address) for n in self.nodes]
        self._channels += channels
        return [scistream_pb2_grpc.ControlStub(ch) for ch in channels]

    def processes(self) -> dict[str, int]:
        """PIDs of the gateway's processes by role: ``s2cs:n0``, ``s2ds:n0``, ..., ``etcd:m0``, ...
        (an s2ds is listed once its node has spawned it)."""
        out: dict[str, int] = {}
        for node in self.nodes:
            if node.proc is not None:
                out[f"s2cs:{node.name}"] = node.proc.pid
            with contextlib.suppress(OSError, ValueError):
                out[f"s2ds:{node.name}"] = int((node.state_dir / PID_FILE).read_text().strip())
        if self.etcd is not None:
            for i, proc in enumerate(self.etcd.procs):
                if proc is not None:
                    out[f"etcd:{self.etcd.names[i]}"] = proc.pid
        return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads) and its reaped children; 0 if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def cpu_of(pids: dict[str, int]) -> dict[str, float]:
    return {role: cpu_seconds(pid) for role, pid in pids.items()}


def machine_busy_seconds() -> float:
    """CPU-seconds the whole machine (every job on it, not only ours) has been busy:
    user, nice, system, irq and softirq of /proc/stat's first line (not idle, iowait or a
    hypervisor's steal). The machine is shared: the difference between this and our
    processes' CPU over a case is what other jobs took meanwhile."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in f.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / CLK_TCK


@dataclass
class Route:
    """Which node's stub each verb of one session goes to (the same node, or one per verb
    as a client list and an appctrl pointed at other nodes would)."""

    req: Any
    hello: Any
    update: Any
    release: Any


def setup(
    route: Route,
    uid: str,
    role: str,
    num_conn: int,
    *,
    producer: Sequence[str] = ("127.0.0.1:9",),
    remote: Sequence[str] = (),
    session_key: bytes = b"",
    security: str = "tls",
    timeout: float = 30.0,
) -> Any:
    """req in flight while its hello arrives (no sleep, as s2uc and appctrl do), then
    update: to ``remote`` if given, else (PROD) to the producer listeners the req returned.
    Returns the req's Response."""
    fut = route.req.req.future(
        pb.Request(uid=uid, role=role, num_conn=num_conn, security=security), timeout=timeout
    )
    route.hello.hello(
        pb.Hello(uid=uid, prod_listeners=list(producer) if role == "PROD" else [], role=role),
        timeout=timeout,
    )
    resp = fut.result()
    targets = list(remote) if remote else list(resp.prod_listeners)
    route.update.update(
        pb.UpdateTargets(uid=uid, remote_listeners=targets, role=role, session_key=session_key),
        timeout=timeout,
    )
    return resp


def release(route: Route, uid: str, timeout: float = 30.0) -> None:
    route.release.release(pb.Release(uid=uid), timeout=timeout)


def status(stub: Any, uid: str) -> Any:
    return stub.status(pb.StatusRequest(uid=uid), timeout=10).sessions[0]
