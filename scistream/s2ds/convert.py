"""Conversions between scistream.dataplane values and proto/dataplane.proto messages.

The daemon and its client both go through here, so the wire form of a route is
defined in exactly one place. PSK keys cross the wire only inside an AddRoute;
a RouteInfo built here never carries one.
"""

from __future__ import annotations

from collections.abc import Mapping

from scistream._proto import dataplane_pb2 as pb
from scistream.dataplane import (
    AddressInUse,
    ConnectionStats,
    EngineError,
    EngineStats,
    InvalidRoute,
    Route,
    RouteExists,
    RouteInfo,
    RouteNotFound,
    RouteStats,
    Tls,
)
from scistream.endpoints import InvalidEndpoint

#: Reply.error_code -> the exception the client raises.
ERRORS_BY_CODE: Mapping[str, type[EngineError]] = {
    "already_exists": RouteExists,
    "not_found": RouteNotFound,
    "invalid": InvalidRoute,
    "address_in_use": AddressInUse,
    "internal": EngineError,
}


def tls_to_pb(tls: Tls, *, with_key: bool) -> pb.TlsConfig:
    return pb.TlsConfig(
        role=tls.role.value,
        mode=tls.mode.value,
        psk_identity=tls.psk_identity,
        psk_key=tls.psk_key if with_key else b"",
        cert_file=tls.cert_file,
        key_file=tls.key_file,
        ca_file=tls.ca_file,
        server_name=tls.server_name,
        ciphers=tls.ciphers,
    )


def route_to_spec(route: Route, *, with_key: bool = True) -> pb.RouteSpec:
    """The wire form of a route; ``with_key=False`` for anything sent back to a client."""
    spec = pb.RouteSpec(
        route_id=route.route_id,
        listen=route.listen,
        targets=list(route.targets),
        rate_limit=route.rate_limit,
        max_connections=route.max_connections,
        labels=dict(route.labels),
    )
    if route.tls is not None:
        spec.tls.CopyFrom(tls_to_pb(route.tls, with_key=with_key))
    return spec


def spec_to_route(spec: pb.RouteSpec, *, keyless: bool = False) -> Route:
    """A Route from its wire form; raises InvalidRoute (or InvalidEndpoint) when malformed.

    ``keyless`` rebuilds a route echoed back by the daemon, whose PSK was
    stripped: the returned Tls has an empty ``psk_key`` (validation, which
    demands a key, is satisfied with a placeholder that is then cleared).
    """
    tls = None
    if spec.HasField("tls"):
        t = spec.tls
        key = t.psk_key
        redacted = keyless and not key and t.mode in ("psk", "compat", "")
        if redacted:
            key = b"\0"
        try:
            tls = Tls(
                role=t.role,  # type: ignore[arg-type]  # Tls coerces str to the enum
                mode=t.mode or "psk",  # type: ignore[arg-type]
                psk_identity=t.psk_identity,
                psk_key=key,
                cert_file=t.cert_file,
                key_file=t.key_file,
                ca_file=t.ca_file,
                server_name=t.server_name,
                ciphers=t.ciphers,
            )
        except ValueError as exc:  # unknown role or mode names
            raise InvalidRoute(f"route {spec.route_id!r}: {exc}") from None
        if redacted:
            object.__setattr__(tls, "psk_key", b"")  # frozen; honest about what we know
    return Route(
        route_id=spec.route_id,
        listen=spec.listen,
        targets=tuple(spec.targets),
        tls=tls,
        rate_limit=spec.rate_limit,
        max_connections=spec.max_connections,
        labels=dict(spec.labels),
    )


def route_info_to_pb(info: RouteInfo) -> pb.RouteInfo:
    return pb.RouteInfo(spec=route_to_spec(info.route, with_key=False), bound=info.bound)


def route_info_from_pb(msg: pb.RouteInfo) -> RouteInfo:
    return RouteInfo(route=spec_to_route(msg.spec, keyless=True), bound=msg.bound)


def route_stats_to_pb(rs: RouteStats) -> pb.RouteStats:
    return pb.RouteStats(
        route_id=rs.route_id,
        bound=rs.bound,
        targets=list(rs.targets),
        bytes_to_target=rs.bytes_to_target,
        bytes_from_target=rs.bytes_from_target,
        connections_active=rs.connections_active,
        connections_total=rs.connections_total,
        errors={k: int(v) for k, v in rs.errors.items()},
        started_at=rs.started_at,
        connections=[
            pb.ConnectionStats(
                conn_id=c.conn_id,
                peer=c.peer,
                target=c.target,
                bytes_to_target=c.bytes_to_target,
                bytes_from_target=c.bytes_from_target,
                started_at=c.started_at,
            )
            for c in rs.connections
        ],
        labels=dict(rs.labels),
    )


def route_stats_from_pb(msg: pb.RouteStats) -> RouteStats:
    return RouteStats(
        route_id=msg.route_id,
        bound=msg.bound,
        targets=tuple(msg.targets),
        bytes_to_target=msg.bytes_to_target,
        bytes_from_target=msg.bytes_from_target,
        connections_active=msg.connections_active,
        connections_total=msg.connections_total,
        errors=dict(msg.errors),
        started_at=msg.started_at,
        connections=tuple(
            ConnectionStats(
                conn_id=c.conn_id,
                peer=c.peer,
                target=c.target,
                bytes_to_target=c.bytes_to_target,
                bytes_from_target=c.bytes_from_target,
                started_at=c.started_at,
            )
            for c in msg.connections
        ),
        labels=dict(msg.labels),
    )


def stats_to_pb(stats: EngineStats) -> pb.StatsReply:
    return pb.StatsReply(
        routes=[route_stats_to_pb(rs) for rs in stats.routes.values()],
        engine=stats.engine,
        workers=stats.workers,
    )


def stats_from_pb(msg: pb.StatsReply) -> EngineStats:
    return EngineStats(
        engine=msg.engine,
        workers=msg.workers,
        routes={rs.route_id: route_stats_from_pb(rs) for rs in msg.routes},
    )


def error_reply(exc: BaseException) -> pb.Reply:
    """The Reply for a refused command: a code from the contract and one sentence."""
    if isinstance(exc, EngineError):
        code = exc.code
    elif isinstance(exc, InvalidEndpoint):
        code = "invalid"
    else:
        code = "internal"
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if code == "internal" and not isinstance(exc, EngineError):
        message = f"internal error: {message}"
    return pb.Reply(ok=False, error_code=code, error=message)


def error_from_reply(reply: pb.Reply) -> EngineError:
    cls = ERRORS_BY_CODE.get(reply.error_code, EngineError)
    return cls(reply.error or f"s2ds refused the command ({reply.error_code or 'no code'})")
