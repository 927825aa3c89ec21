"""The native engine: :class:`EngineBase` over the C engine in ``_engine``.

Importing this module raises ImportError when the extension was not built;
``scistream.dataplane`` then falls back to the pure-Python engine.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Sequence

from scistream.dataplane import _engine  # ImportError here means "not built"
from scistream.dataplane.api import (
    ConnectionStats,
    EngineBase,
    EngineStats,
    InvalidRoute,
    ResourceCounts,
    Route,
    RouteInfo,
    RouteNotFound,
    RouteStats,
    TlsMode,
    TlsRole,
    Tuning,
)
from scistream.endpoints import InvalidEndpoint, parse_endpoint

log = logging.getLogger(__name__)

_ROLE = {None: 0, TlsRole.SERVER: 1, TlsRole.CLIENT: 2}
_MODE = {TlsMode.PSK: 0, TlsMode.COMPAT: 1, TlsMode.CERT: 2}


def _parse_targets(targets: Sequence[str]) -> list[tuple[str, int]]:
    try:
        return [parse_endpoint(t) for t in targets]
    except InvalidEndpoint as exc:
        raise InvalidRoute(str(exc)) from None


class NativeEngine(EngineBase):
    """All routes of a node over ``tuning.workers`` C worker threads.

    Every method may run in any thread, ``close`` too: the core waits for the calls
    in progress and refuses later ones with EngineError (see _engine.pyx), so no
    call can reach a freed engine. ``_lock`` only keeps ``_routes`` in step with the
    core; it is not held across ``stats``, ``drain`` or ``close``."""

    name = "native"

    def __init__(self, tuning: Tuning | None = None) -> None:
        super().__init__(tuning)
        self._lock = threading.Lock()
        self._routes: dict[str, RouteInfo] = {}
        self._core = _engine.CEngine(dataclasses.asdict(self.tuning))

    def _forward_logs(self) -> None:
        self._core.drain_logs(log.log)

    def add_route(self, route: Route) -> RouteInfo:
        targets = _parse_targets(route.targets)
        host, port = ("", 0) if route.listen_fd >= 0 else parse_endpoint(route.listen, allow_port_zero=True)
        tls = route.tls
        try:
            with self._lock:
                bound = self._core.add_route(
                    route.route_id, host, port, route.listen_fd, targets,
                    _ROLE[tls.role if tls else None], _MODE[tls.mode] if tls else 0,
                    tls.psk_identity if tls else "", tls.psk_key if tls else b"",
                    tls.cert_file if tls else "", tls.key_file if tls else "",
                    tls.ca_file if tls else "", tls.server_name if tls else "",
                    tls.ciphers if tls else "", route.rate_limit, route.max_connections,
                )
                info = RouteInfo(route=route, bound=bound)
                self._routes[route.route_id] = info
        finally:
            self._forward_logs()
        return info

    def retarget(self, route_id: str, targets: Sequence[str]) -> None:
        parsed = _parse_targets(targets)
        if not parsed:
            raise InvalidRoute(f"route {route_id} needs at least one target")
        with self._lock:
            info = self._routes.get(route_id)
            if info is None:
                raise RouteNotFound(f"no route {route_id}")
            self._core.retarget(route_id, parsed)
            route = dataclasses.replace(info.route, targets=tuple(targets))
            self._routes[route_id] = RouteInfo(route=route, bound=info.bound)
        self._forward_logs()

    def remove_route(self, route_id: str, *, drain: bool = False) -> None:
        with self._lock:
            if route_id not in self._routes:
                raise RouteNotFound(f"no route {route_id}")
            self._core.remove_route(route_id, drain)
            del self._routes[route_id]
        self._forward_logs()

    def routes(self) -> list[RouteInfo]:
        with self._lock:
            return list(self._routes.values())

    def stats(self, route_id: str | None = None, *, connections: bool = False) -> EngineStats:
        with self._lock:
            infos = dict(self._routes)
        if route_id is not None and route_id not in infos:
            raise RouteNotFound(f"no route {route_id}")
        workers, raw = self._core.stats(route_id, connections)
        self._forward_logs()
        out: dict[str, RouteStats] = {}
        for r in raw:
            info = infos.get(r["route_id"])
            if info is None:  # added or removed while we looked
                continue
            out[r["route_id"]] = RouteStats(
                route_id=r["route_id"],
                bound=info.bound,
                targets=info.route.targets,
                bytes_to_target=r["bytes_to_target"],
                bytes_from_target=r["bytes_from_target"],
                connections_active=r["connections_active"],
                connections_total=r["connections_total"],
                errors={k: v for k, v in r["errors"].items() if v},
                started_at=r["started_at"],
                connections=tuple(
                    ConnectionStats(conn_id=c[0], peer=c[1], target=c[2], bytes_to_target=c[3],
                                    bytes_from_target=c[4], started_at=c[5])
                    for c in sorted(r["connections"])
                ),
                labels=dict(info.route.labels),
            )
        return EngineStats(engine=self.name, workers=workers, routes=out)

    def drain(self, timeout: float | None = None) -> bool:
        done = self._core.drain(-1.0 if timeout is None else max(0.0, timeout))
        self._forward_logs()
        return bool(done)

    def close(self) -> None:
        with self._lock:
            self._routes.clear()
        try:
            self._core.close()  # idempotent; waits for calls in progress, a second close for the first
        finally:
            self._forward_logs()  # with what the close itself logged

    def resource_counts(self) -> ResourceCounts:
        fds, pipes, ssl_objects, conns = self._core.resources()  # after close: what close left behind
        return ResourceCounts(fds=fds, pipes=pipes, ssl_objects=ssl_objects, connections=conns)
