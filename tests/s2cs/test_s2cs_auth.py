"""Authentication and authorization against a local stand-in for Globus Auth's introspection.

The stand-in is reached through globus-sdk's own service-URL setting
(GLOBUS_SDK_SERVICE_URL_AUTH), so the real ConfidentialAppAuthClient code runs.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from globus_standin import IntrospectionStandIn
from s2cs_support import new_uid

from scistream._proto import scistream_pb2 as pb

SC = grpc.StatusCode
CLIENT_ID = "c42c0dac-0a52-408e-a04f-5d31bfe0aef8"
SECRET = "s3cret-client-value-never-logged"
SCOPE = f"https://auth.globus.org/scopes/{CLIENT_ID}/scistream"

ALICE = "tok-alice-0123456789abcdef"
BOB = "tok-bob-0123456789abcdef"
EXPIRED = "tok-expired-0123456789"
INACTIVE = "tok-inactive-0123456789"
WRONG_SCOPE = "tok-wrongscope-0123456789"
WRONG_AUD = "tok-wrongaud-0123456789"


def _tokens() -> dict[str, dict[str, Any]]:
    now = int(time.time())

    def ok(sub: str, user: str, **kw: Any) -> dict[str, Any]:
        d = {
            "active": True,
            "sub": sub,
            "username": user,
            "scope": f"openid {SCOPE}",
            "aud": [CLIENT_ID, "other"],
            "exp": now + 3600,
            "client_id": "4787c84e",
        }
        d.update(kw)
        return d

    return {
        ALICE: ok("a1a1a1a1-0000-0000-0000-000000000001", "alice@uchicago.edu"),
        BOB: ok("b2b2b2b2-0000-0000-0000-000000000002", "bob@anl.gov"),
        EXPIRED: ok("c3", "carol@anl.gov", exp=now - 10),
        INACTIVE: {"active": False},
        WRONG_SCOPE: ok(
            "d4", "dan@anl.gov", scope="openid urn:globus:auth:scope:transfer.api.globus.org:all"
        ),
        WRONG_AUD: ok("e5", "eve@anl.gov", aud=["someone-else"]),
    }


class StandIn(IntrospectionStandIn):
    """Globus Auth as these tests see it: ``tokens`` (tests may change it) at the real
    introspection path, nothing anywhere else."""

    def __init__(self) -> None:
        self.tokens = _tokens()
        super().__init__(self._introspect)

    def _introspect(self, path: str, token: str) -> dict[str, Any] | None:
        if path.rstrip("/") != "/v2/oauth2/token/introspect":
            return None
        return self.tokens.get(token, {"active": False})


def serve_standin(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandIn]:
    """The body of a fixture: a running StandIn that globus-sdk reaches through its own
    service-URL setting, closed at teardown (shared by the auth, hello and token-cache tests)."""
    s = StandIn()
    monkeypatch.setenv("GLOBUS_SDK_ENVIRONMENT", "production")
    monkeypatch.setenv("GLOBUS_SDK_SERVICE_URL_AUTH", s.url)
    yield s
    s.close()


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandIn]:
    yield from serve_standin(monkeypatch)


def md(token: str | None) -> list[tuple[str, str]]:
    return [] if token is None else [("authorization", token)]


def call(fn: Any, msg: Any, token: str | None, timeout: float = 10) -> Any:
    return fn(msg, metadata=md(token), timeout=timeout)


def err(fn: Any, msg: Any, token: str | None, timeout: float = 10) -> tuple[SC, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(fn, msg, token, timeout)
    e: Any = info.value
    return e.code(), e.details()


def make_session(stub: Any, token: str) -> str:
    uid = new_uid()
    fut = stub.req.future(pb.Request(uid=uid, role="PROD", num_conn=1), metadata=md(token), timeout=10)
    stub.hello(pb.Hello(uid=uid, prod_listeners=["127.0.0.1:5074"]), metadata=md(token), timeout=5)
    fut.result()
    call(stub.update, pb.UpdateTargets(uid=uid, remote_listeners=["127.0.0.1:5074"]), token)
    return uid


def test_auth_matrix(standin: StandIn, s2cs_factory: Any, stub_for: Any, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    st = s2cs_factory(client_secret=SECRET, client_id=CLIENT_ID)
    stub = stub_for(st)
    uid = make_session(stub, ALICE)
    missing_uid = new_uid()
    # Every bad token: UNAUTHENTICATED, and the same answer whether the uid exists or not.
    for token in (None, "INVALID_TOKEN", "", "garbage", EXPIRED, INACTIVE, WRONG_SCOPE, WRONG_AUD):
        answers = set()
        for target in (uid, missing_uid):
            for fn, msg in (
                (stub.release, pb.Release(uid=target)),
                (stub.update, pb.UpdateTargets(uid=target, remote_listeners=["127.0.0.1:1"])),
                (stub.status, pb.StatusRequest(uid=target)),
                (stub.req, pb.Request(uid=target, role="PROD", num_conn=1)),
            ):
                code, details = err(fn, msg, token)
                assert code is SC.UNAUTHENTICATED, (token, fn, details)
                answers.add(details)
        assert len(answers) == 1, answers  # nothing about the uid leaks
    assert uid in st.manager.sessions and list(st.backend.plans) == [uid]
    # "Bearer " is tolerated
    status = call(stub.status, pb.StatusRequest(uid=uid), f"Bearer {ALICE}")
    assert status.sessions[0].owner == "alice@uchicago.edu"
    # Bob may not touch Alice's session: PERMISSION_DENIED, no state change
    plan_before = st.backend.plans[uid]
    for fn, msg in (
        (stub.release, pb.Release(uid=uid)),
        (stub.update, pb.UpdateTargets(uid=uid, remote_listeners=["127.0.0.1:9"])),
        (stub.status, pb.StatusRequest(uid=uid)),
    ):
        code, _ = err(fn, msg, BOB)
        assert code is SC.PERMISSION_DENIED
    assert st.backend.plans[uid] is plan_before and st.manager.sessions[uid].state.value == "ready"
    assert call(stub.status, pb.StatusRequest(), BOB).sessions == []  # Bob sees none of Alice's
    assert [s.uid for s in call(stub.status, pb.StatusRequest(), ALICE).sessions] == [uid]
    call(stub.release, pb.Release(uid=uid), ALICE)
    assert uid not in st.manager.sessions
    # The token cache: Alice's token was introspected once for all those calls.
    hits = standin.hits
    call(stub.status, pb.StatusRequest(), ALICE)
    assert standin.hits == hits
    # The client secret went to the stand-in as HTTP basic auth, never into our logs.
    assert all(h.startswith("Basic ") for h in standin.auth_headers)
    with open(st.config.audit_path()) as f:
        text = caplog.text + f.read()
    for secret in (SECRET, ALICE, BOB, EXPIRED, WRONG_SCOPE):
        assert secret not in text


def test_allow_list(standin: StandIn, s2cs_factory: Any, stub_for: Any) -> None:
    st = s2cs_factory(client_secret=SECRET, allowed_domains=["anl.gov"])
    stub = stub_for(st)
    code, details = err(stub.req, pb.Request(uid=new_uid(), role="PROD", num_conn=1), ALICE)
    assert code is SC.PERMISSION_DENIED and "alice@uchicago.edu" in details
    assert not st.manager.sessions and not st.manager.ports.in_use
    make_session(stub, BOB)  # bob@anl.gov is in the allowed domain


def test_allow_list_refuses_every_authenticated_call_as_the_help_says(
    standin: StandIn, s2cs_factory: Any, stub_for: Any
) -> None:
    st = s2cs_factory(client_secret=SECRET, allowed_identities=["bob@anl.gov"])
    stub = stub_for(st)
    uid = make_session(stub, BOB)  # listed
    calls = {
        "req": (stub.req, pb.Request(uid=new_uid(), role="PROD", num_conn=1)),
        "update": (stub.update, pb.UpdateTargets(uid=uid, remote_listeners=["127.0.0.1:9"])),
        "release": (stub.release, pb.Release(uid=uid)),
        "status": (stub.status, pb.StatusRequest()),
        "hello": (stub.hello, pb.Hello(uid=new_uid(), prod_listeners=["127.0.0.1:5074"])),
        "server_info": (stub.server_info, pb.ServerInfoRequest()),
    }
    refused = set()
    for name, (fn, msg) in calls.items():
        try:
            call(fn, msg, ALICE)  # a valid token of an identity on no list
        except grpc.RpcError as exc:
            assert exc.code() is SC.PERMISSION_DENIED, (name, exc.details())
            assert (
                "alice@uchicago.edu" in exc.details() and "not allowed to use this gateway" in exc.details()
            )
            refused.add(name)
    assert refused == {"req", "hello", "update", "release", "status"}
    assert uid in st.manager.sessions and st.manager.sessions[uid].state.value == "ready"
    # The options' help names exactly the calls refused.
    from scistream.s2cs import cli

    for param in cli.main.params:
        if param.name in ("allowed_identity", "allowed_domain"):
            help_text = getattr(param, "help", "")
            assert "with --client-secret" in help_text and "PERMISSION_DENIED" in help_text
            assert help_text.endswith("every authenticated call: req, hello, update, release, status.")


def test_unreachable_introspection_is_bounded(
    monkeypatch: pytest.MonkeyPatch, s2cs_factory: Any, stub_for: Any
) -> None:
    # A socket that accepts connections and never answers: the worst case.
    hole = socket.create_server(("127.0.0.1", 0))
    hole_port = hole.getsockname()[1]
    monkeypatch.setenv("GLOBUS_SDK_SERVICE_URL_AUTH", f"http://127.0.0.1:{hole_port}/")
    try:
        st = s2cs_factory(client_secret=SECRET, introspect_timeout=1.0)
        stub = stub_for(st)
        t0 = time.time()
        code, details = err(stub.req, pb.Request(uid=new_uid(), role="PROD", num_conn=1), ALICE)
        assert code is SC.UNAVAILABLE and "Globus Auth" in details
        assert time.time() - t0 < 4
        assert not st.manager.sessions
    finally:
        hole.close()
    # Nothing listens at all: refused at once.
    monkeypatch.setenv("GLOBUS_SDK_SERVICE_URL_AUTH", f"http://127.0.0.1:{hole_port}/")
    st2 = s2cs_factory(client_secret=SECRET, introspect_timeout=1.0)
    code, _ = err(stub_for(st2).status, pb.StatusRequest(), ALICE)
    assert code is SC.UNAVAILABLE


def test_no_secret_means_no_check(s2cs: Any, stub: Any) -> None:
    uid = make_session(stub, "INVALID_TOKEN")
    assert s2cs.manager.sessions[uid].owner == "anonymous"
    call(stub.release, pb.Release(uid=uid), None)


def test_allow_list_without_a_secret_is_ignored_with_a_warning(s2cs_factory: Any, caplog: Any) -> None:
    caplog.set_level(logging.WARNING)
    s2cs_factory(allowed_identities=["alice@example.org"], allowed_domains=["example.org"])
    assert any(
        "ignored" in r.getMessage() and "--client-secret" in r.getMessage() for r in caplog.records
    ), caplog.text
