"""The token cache of s2cs/auth.py against the local Globus Auth introspection stand-in.

Revocation is seen once the positive cache lapses, a refused token is cached briefly,
only the JSON ``true`` is active, and a flood of random tokens costs a bounded number
of introspection calls.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from test_s2cs_auth import ALICE, CLIENT_ID, SCOPE, SECRET, StandIn, serve_standin

from scistream.s2cs.auth import GlobusAuthenticator
from scistream.s2cs.errors import ControlError


@pytest.fixture
def globus(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandIn]:
    yield from serve_standin(monkeypatch)


def _auth(**kw: Any) -> GlobusAuthenticator:
    return GlobusAuthenticator(CLIENT_ID, SECRET, timeout=2.0, **kw)


def _code(auth: GlobusAuthenticator, token: str) -> grpc.StatusCode | str:
    """OK's stand-in: the identity's sub; else the refusal's status code."""
    try:
        return asyncio.run(auth.authenticate(token)).sub
    except ControlError as exc:
        return exc.code


def test_revoked_token_stops_working_after_the_cache_ttl(globus: StandIn) -> None:
    auth = _auth(cache_ttl=0.5)
    sub = globus.tokens[ALICE]["sub"]
    assert _code(auth, ALICE) == sub
    assert _code(auth, ALICE) == sub and globus.hits == 1  # cached
    globus.tokens[ALICE] = {"active": False}  # revoked at Globus (its exp is an hour away)
    assert _code(auth, ALICE) == sub  # still inside the cache window
    time.sleep(0.6)
    assert _code(auth, ALICE) is grpc.StatusCode.UNAUTHENTICATED
    assert globus.hits == 2


def test_positive_cache_never_outlives_exp(globus: StandIn) -> None:
    token = "tok-short-lived-0123456789"
    globus.tokens[token] = {**globus.tokens[ALICE], "exp": int(time.time()) + 2}
    auth = _auth(cache_ttl=3600)
    assert _code(auth, token) == globus.tokens[ALICE]["sub"]
    time.sleep(2.1)
    assert _code(auth, token) is grpc.StatusCode.UNAUTHENTICATED  # expired: asked again
    assert globus.hits == 2


@pytest.mark.parametrize("active", ["false", "true", 1, None, [True]])
def test_only_json_true_is_active(globus: StandIn, active: Any) -> None:
    token = f"tok-active-{active!r}-0123456789"
    globus.tokens[token] = {**globus.tokens[ALICE], "active": active}
    assert _code(_auth(), token) is grpc.StatusCode.UNAUTHENTICATED


def test_boolean_exp_is_not_a_time(globus: StandIn) -> None:
    token = "tok-bool-exp-0123456789"
    globus.tokens[token] = {**globus.tokens[ALICE], "exp": True}
    assert _code(_auth(), token) is grpc.StatusCode.UNAUTHENTICATED


def test_refusals_are_cached_briefly(globus: StandIn) -> None:
    auth = _auth(negative_ttl=0.5)
    for _ in range(5):
        assert _code(auth, "tok-unknown-0123456789") is grpc.StatusCode.UNAUTHENTICATED
    assert globus.hits == 1
    time.sleep(0.6)
    # Became valid meanwhile (e.g. the stand-in's clock): asked again once the refusal lapsed.
    globus.tokens["tok-unknown-0123456789"] = {**globus.tokens[ALICE], "scope": f"openid {SCOPE}"}
    assert _code(auth, "tok-unknown-0123456789") == globus.tokens[ALICE]["sub"]
    assert globus.hits == 2


def test_a_burst_of_random_tokens_costs_a_bounded_number_of_calls(globus: StandIn) -> None:
    auth = _auth(introspect_rate=5.0, introspect_burst=10, introspect_concurrency=3)
    in_flight = 0
    peak = 0
    real = auth._introspect

    async def counting(token: str) -> dict[str, Any]:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            return await real(token)
        finally:
            in_flight -= 1

    auth._introspect = counting  # type: ignore[method-assign]

    async def flood() -> list[Any]:
        async def one(token: str) -> Any:
            try:
                return await auth.authenticate(token)
            except ControlError as exc:
                return exc.code

        return await asyncio.gather(*(one(secrets.token_hex(16)) for _ in range(200)))

    t0 = time.monotonic()
    answers = asyncio.run(flood())
    elapsed = time.monotonic() - t0
    codes = set(answers)
    assert codes <= {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE}
    assert grpc.StatusCode.UNAVAILABLE in codes  # over the limit: "try again", never let in
    bound = 10 + 5.0 * elapsed + 1
    assert globus.hits == auth.introspections <= bound, (globus.hits, elapsed)
    assert peak <= 3
    # A known-good token still gets through once the bucket refills.
    time.sleep(0.3)
    assert _code(auth, ALICE) == globus.tokens[ALICE]["sub"]
