"""Prometheus metrics of one s2cs, served on a loopback port (--metrics-port).

Counters and the hello-latency histogram are updated by the servicer; session
gauges are read at scrape time from a snapshot the manager keeps (so the HTTP
thread never touches live session objects).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionSample:
    uid: str
    role: str
    state: str
    bytes_to_target: int = 0
    bytes_from_target: int = 0
    connections_active: int = 0


@dataclass(frozen=True)
class Snapshot:
    by_state: dict[str, int] = field(default_factory=dict)
    sessions: tuple[SessionSample, ...] = ()


class _SessionCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        snap = self._snapshot()
        states = GaugeMetricFamily("scistream_sessions", "Sessions by state", labels=["state"])
        for state, n in sorted(snap.by_state.items()):
            states.add_metric([state], n)
        yield states
        to_t = GaugeMetricFamily(
            "scistream_session_bytes_to_target", "Bytes forwarded towards the target", labels=["uid", "role"]
        )
        from_t = GaugeMetricFamily(
            "scistream_session_bytes_from_target",
            "Bytes forwarded back from the target",
            labels=["uid", "role"],
        )
        conns = GaugeMetricFamily(
            "scistream_session_connections", "Open data connections", labels=["uid", "role"]
        )
        for s in snap.sessions:
            to_t.add_metric([s.uid, s.role], s.bytes_to_target)
            from_t.add_metric([s.uid, s.role], s.bytes_from_target)
            conns.add_metric([s.uid, s.role], s.connections_active)
        yield to_t
        yield from_t
        yield conns


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.rpcs = Counter(
            "scistream_rpcs", "Control RPCs answered", ["rpc", "code"], registry=self.registry
        )
        self.errors = Counter(
            "scistream_rpc_errors",
            "Control RPCs answered with an error",
            ["rpc", "code"],
            registry=self.registry,
        )
        self.hello_latency = Histogram(
            "scistream_hello_latency_seconds",
            "Time from req to its hello",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 180),
            registry=self.registry,
        )
        self.sessions_ended = Counter(
            "scistream_sessions_ended",
            "Sessions that ended, by final state",
            ["state"],
            registry=self.registry,
        )
        self._snapshot: Snapshot = Snapshot()
        self.registry.register(_SessionCollector(lambda: self._snapshot))
        self._server: Any = None
        self.url = ""
        self._label_secret = secrets.token_bytes(16)

    def uid_label(self, uid: str, security: str) -> str:
        """The ``uid`` label of a session's series. In the 1.x compat mode the uid is the
        data key, and the metrics port needs no credentials: such a session is labelled
        with a keyed hash that this process alone can compute (stable while it runs)."""
        if security != "compat":
            return uid
        digest = hmac.new(self._label_secret, uid.encode(), hashlib.sha256).hexdigest()[:16]
        return f"compat-{digest}"

    def set_snapshot(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot  # one reference swap: safe for the scrape thread

    def observe_rpc(self, rpc: str, code: str) -> None:
        self.rpcs.labels(rpc, code).inc()
        if code != "OK":
            self.errors.labels(rpc, code).inc()

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        self._server = server
        self.url = f"http://{addr}:{server.server_port}/metrics"
        log.info("metrics on %s", self.url)

    @property
    def port(self) -> int:
        return int(self._server.server_port) if self._server is not None else 0

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
