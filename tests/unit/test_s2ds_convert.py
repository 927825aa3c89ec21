"""Route <-> RouteSpec and the session -> routes mapping of the native backend."""

from __future__ import annotations

import pytest

from scistream._proto import dataplane_pb2 as pb
from scistream.dataplane import (
    AddressInUse,
    EngineError,
    InvalidRoute,
    Route,
    RouteExists,
    RouteInfo,
    RouteNotFound,
    RouteStats,
    Tls,
    TlsMode,
    TlsRole,
    compat_key_from_uid,
)
from scistream.endpoints import InvalidEndpoint
from scistream.keys import key_fingerprint
from scistream.s2cs.backends.base import RoutePlan, SessionPlan
from scistream.s2cs.backends.native import session_routes
from scistream.s2ds import convert

KEY = bytes(range(32))


def test_route_round_trip_keeps_key_only_in_add_route() -> None:
    route = Route(
        "u/0",
        listen="[::1]:0",
        targets=("a.example:1", "10.0.0.1:2"),
        rate_limit=5,
        max_connections=3,
        labels={"uid": "u"},
        tls=Tls(role=TlsRole.SERVER, mode=TlsMode.PSK, psk_identity="u", psk_key=KEY),
    )
    assert convert.spec_to_route(convert.route_to_spec(route)) == route
    info = convert.route_info_to_pb(RouteInfo(route, "[::1]:4000"))
    assert info.spec.tls.psk_key == b"" and KEY not in info.SerializeToString()
    back = convert.route_info_from_pb(pb.RouteInfo.FromString(info.SerializeToString()))
    assert back.bound == "[::1]:4000"
    assert back.route.tls is not None and back.route.tls.psk_key == b"" and back.route.tls.psk_identity == "u"
    plain = Route("p", targets=("h:1",))
    assert convert.spec_to_route(convert.route_to_spec(plain)) == plain


def test_stats_round_trip() -> None:
    rs = RouteStats(
        route_id="r",
        bound="127.0.0.1:1",
        targets=("h:2",),
        bytes_to_target=10,
        bytes_from_target=20,
        connections_active=1,
        connections_total=4,
        errors={"reset": 2},
        started_at=1.5,
        labels={"uid": "x"},
    )
    from scistream.dataplane import EngineStats

    stats = EngineStats(engine="pure", workers=2, routes={"r": rs})
    assert convert.stats_from_pb(convert.stats_to_pb(stats)) == stats


@pytest.mark.parametrize(
    ("exc", "code", "cls"),
    [
        (RouteExists("x"), "already_exists", RouteExists),
        (RouteNotFound("x"), "not_found", RouteNotFound),
        (InvalidRoute("x"), "invalid", InvalidRoute),
        (InvalidEndpoint("x"), "invalid", InvalidRoute),
        (AddressInUse("x"), "address_in_use", AddressInUse),
        (RuntimeError("boom\nline2"), "internal", EngineError),
    ],
)
def test_error_codes(exc: Exception, code: str, cls: type[EngineError]) -> None:
    reply = convert.error_reply(exc)
    assert (reply.ok, reply.error_code) == (False, code) and "\n" not in reply.error
    assert type(convert.error_from_reply(reply)) is cls


def test_bad_tls_names_are_invalid() -> None:
    spec = pb.RouteSpec(
        route_id="r",
        listen="127.0.0.1:0",
        targets=["h:1"],
        tls=pb.TlsConfig(role="both", mode="psk", psk_identity="i", psk_key=b"k"),
    )
    with pytest.raises(InvalidRoute):
        convert.spec_to_route(spec)


def _plan(security: str, role: str = "PROD", n: int = 2, rate: int = 0, key: bytes = KEY) -> SessionPlan:
    uid = "6f1c6d2e-1111-4222-8333-444455556666"
    return SessionPlan(
        uid=uid,
        role=role,
        security=security,  # type: ignore[arg-type]
        psk_identity=uid if security == "tls" else "client1" if security == "compat" else "",
        psk_key=key,
        rate_limit=rate,
        routes=tuple(
            RoutePlan(f"{uid}/{i}", f"0.0.0.0:{5000 + i}", f"10.0.0.9:{6000 + i}") for i in range(n)
        ),
    )


def test_session_routes_tls_roles_and_rate_split() -> None:
    prod = session_routes(_plan("tls", "PROD", n=3, rate=1000))
    assert [r.route_id for r in prod] == [f"{_plan('tls').uid}/{i}" for i in range(3)]
    assert all(r.tls is not None and r.tls.role is TlsRole.SERVER and r.tls.mode is TlsMode.PSK for r in prod)
    assert {r.rate_limit for r in prod} == {333}
    assert prod[0].labels["key_fp"] == key_fingerprint(KEY) and KEY.hex() not in str(prod[0].labels)
    cons = session_routes(_plan("tls", "CONS"))
    assert all(r.tls is not None and r.tls.role is TlsRole.CLIENT for r in cons)
    assert cons[1].targets == ("10.0.0.9:6001",) and cons[1].listen == "0.0.0.0:5001"
    compat = session_routes(_plan("compat", key=b""))
    assert compat[0].tls is not None and compat[0].tls.mode is TlsMode.COMPAT
    # The key a 1.x stunnel uses: the uid's hex digits decoded, whether given as text or not at all.
    assert compat[0].tls.psk_key == bytes.fromhex(_plan("compat").uid.replace("-", ""))
    given = session_routes(_plan("compat", key=compat_key_from_uid(_plan("compat").uid)))
    assert given[0].tls is not None and given[0].tls.psk_key == compat[0].tls.psk_key
    plain = session_routes(_plan("plain", key=b""))
    assert all(r.tls is None and "key_fp" not in r.labels for r in plain)
    assert dict(plain[0].labels) == {"uid": _plan("plain").uid, "role": "PROD", "security": "plain"}


def test_key_fingerprint_tracks_the_key() -> None:
    assert key_fingerprint(KEY) == key_fingerprint(bytes(KEY))
    assert key_fingerprint(KEY) != key_fingerprint(KEY[::-1])
