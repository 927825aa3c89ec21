"""Hello authentication (issue 14 item 2), against the local Globus Auth introspection stand-in.

With token checks on, a hello needs a valid token of the session's owner; a hello that
comes first records its identity and the req must come from the same one. Without a
client secret nothing changes (1.x appctrl sends INVALID_TOKEN).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from click.testing import CliRunner
from s2cs_support import new_uid
from test_s2cs_auth import ALICE, BOB, CLIENT_ID, EXPIRED, SECRET, StandIn, call, err, md, serve_standin

from scistream._proto import scistream_pb2 as pb
from scistream.appctrl.cli import main as appctrl_main

SC = grpc.StatusCode
APP = ["127.0.0.1:5074"]
ALICE_SUB = "a1a1a1a1-0000-0000-0000-000000000001"
BOB_SUB = "b2b2b2b2-0000-0000-0000-000000000002"


@pytest.fixture
def globus(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandIn]:
    yield from serve_standin(monkeypatch)


@pytest.fixture
def gw(globus: StandIn, s2cs_factory: Any, stub_for: Any) -> tuple[Any, Any]:
    st = s2cs_factory(client_secret=SECRET, client_id=CLIENT_ID)
    return st, stub_for(st)


def _pending_req(stub: Any, uid: str, token: str, role: str = "PROD") -> Any:
    return stub.req.future(pb.Request(uid=uid, role=role, num_conn=1), metadata=md(token), timeout=10)


def _wait_registered(st: Any, uid: str) -> None:
    deadline = time.time() + 5
    while uid not in st.manager.sessions:
        assert time.time() < deadline, "the req was never registered"
        time.sleep(0.02)


def test_hello_needs_the_owners_token(gw: tuple[Any, Any]) -> None:
    st, stub = gw
    uid, missing = new_uid(), new_uid()
    fut = _pending_req(stub, uid, ALICE)
    _wait_registered(st, uid)
    for token in (None, "INVALID_TOKEN", "", "garbage", EXPIRED):
        answers = set()
        for target in (uid, missing):
            code, details = err(stub.hello, pb.Hello(uid=target, prod_listeners=["127.0.0.1:9"]), token)
            assert code is SC.UNAUTHENTICATED, (token, details)
            answers.add(details)
        assert len(answers) == 1, answers  # the same answer whether the uid exists or not
    assert missing not in st.manager.early  # a refused hello parks nothing
    # Another identity: PERMISSION_DENIED, and the session is untouched.
    code, _ = err(stub.hello, pb.Hello(uid=uid, prod_listeners=["127.0.0.1:9"]), BOB)
    assert code is SC.PERMISSION_DENIED
    s = st.manager.sessions[uid]
    assert s.state.value == "waiting_hello" and s.prod_listeners == []
    # The owner's hello goes through.
    call(stub.hello, pb.Hello(uid=uid, prod_listeners=APP), ALICE)
    assert list(fut.result().prod_listeners) == APP
    # Once helloed, another identity still learns nothing and changes nothing.
    code, _ = err(stub.hello, pb.Hello(uid=uid, prod_listeners=APP), BOB)
    assert code is SC.PERMISSION_DENIED
    call(stub.hello, pb.Hello(uid=uid, prod_listeners=APP), ALICE)  # the owner's repeat is fine


def test_a_cons_hello_of_another_identity_does_not_get_the_listeners(gw: tuple[Any, Any]) -> None:
    st, stub = gw
    uid = new_uid()
    fut = _pending_req(stub, uid, ALICE, role="CONS")
    _wait_registered(st, uid)
    got = call(stub.hello, pb.Hello(uid=uid, role="CONS"), ALICE)
    assert list(got.listeners) == list(fut.result().listeners)
    with pytest.raises(grpc.RpcError) as info:
        call(stub.hello, pb.Hello(uid=uid, role="CONS"), BOB)
    assert info.value.code() is SC.PERMISSION_DENIED
    assert str(fut.result().listeners[0]) not in (info.value.details() or "")


def test_early_hello_binds_the_req_to_its_identity(gw: tuple[Any, Any]) -> None:
    st, stub = gw
    uid = new_uid()
    # Bob (a valid token, but not the requester) pre-registers a hello.
    call(stub.hello, pb.Hello(uid=uid, prod_listeners=["127.0.0.1:9"], role="PROD"), BOB)
    assert st.manager.early[uid].owner == BOB_SUB
    # A second early hello from another identity changes nothing.
    code, _ = err(stub.hello, pb.Hello(uid=uid, prod_listeners=APP, role="PROD"), ALICE)
    assert code is SC.PERMISSION_DENIED
    assert st.manager.early[uid].prod_listeners == ["127.0.0.1:9"]
    # Alice's req: refused, nothing reserved, and Bob's hello is dropped.
    in_use = set(st.manager.ports.in_use)
    code, details = err(stub.req, pb.Request(uid=uid, role="PROD", num_conn=1), ALICE)
    assert code is SC.PERMISSION_DENIED and "another identity" in details
    assert uid not in st.manager.sessions and uid not in st.manager.early
    assert set(st.manager.ports.in_use) == in_use
    # Alice's own hello first, then her req: the session is hers, with her endpoints.
    call(stub.hello, pb.Hello(uid=uid, prod_listeners=APP, role="PROD"), ALICE)
    resp = call(stub.req, pb.Request(uid=uid, role="PROD", num_conn=1), ALICE)
    assert list(resp.prod_listeners) == APP
    assert st.manager.sessions[uid].owner == ALICE_SUB


def test_a_waiting_early_cons_hello_of_another_identity_is_told_no(gw: tuple[Any, Any]) -> None:
    st, stub = gw
    uid = new_uid()
    hello = stub.hello.future(pb.Hello(uid=uid, role="CONS"), metadata=md(BOB), timeout=10)
    deadline = time.time() + 5
    while uid not in st.manager.early:
        assert time.time() < deadline
        time.sleep(0.02)
    code, _ = err(stub.req, pb.Request(uid=uid, role="CONS", num_conn=1), ALICE)
    assert code is SC.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as info:
        hello.result()
    assert info.value.code() is SC.PERMISSION_DENIED


def test_without_a_secret_hello_is_as_in_1x(s2cs_factory: Any, stub_for: Any) -> None:
    st = s2cs_factory()
    stub = stub_for(st)
    # Hello first with one "token", req with another: nobody is checked.
    uid = new_uid()
    call(stub.hello, pb.Hello(uid=uid, prod_listeners=APP, role="PROD"), "INVALID_TOKEN")
    assert list(call(stub.req, pb.Request(uid=uid, role="PROD", num_conn=1), "x").prod_listeners) == APP
    uid2 = new_uid()
    fut = _pending_req(stub, uid2, "INVALID_TOKEN")
    _wait_registered(st, uid2)
    call(stub.hello, pb.Hello(uid=uid2, prod_listeners=APP), None)
    assert list(fut.result().prod_listeners) == APP


def test_appctrl_mock_sends_the_token_it_is_given(gw: tuple[Any, Any]) -> None:
    st, stub = gw
    uid = new_uid()
    fut = _pending_req(stub, uid, ALICE)
    _wait_registered(st, uid)
    base = [uid, st.address]
    tail = ["PROD", "127.0.0.1", "--ports", "5074", "--no-ssl", "--timeout", "5"]
    runner = CliRunner()
    refused = runner.invoke(appctrl_main, ["mock", *base, "INVALID_TOKEN", *tail])
    assert refused.exit_code != 0 and "token" in refused.output.lower(), refused.output
    assert runner.invoke(appctrl_main, ["mock", *base, BOB, *tail]).exit_code != 0
    ok = runner.invoke(appctrl_main, ["mock", *base, ALICE, *tail])
    assert ok.exit_code == 0, ok.output
    assert list(fut.result().prod_listeners) == APP


def test_appctrl_run_sends_its_token(gw: tuple[Any, Any]) -> None:
    st, stub = gw
    uid = new_uid()
    done: dict[str, Any] = {}

    def requester() -> None:
        done["resp"] = call(stub.req, pb.Request(uid=uid, role="PROD", num_conn=1), ALICE)
        call(stub.update, pb.UpdateTargets(uid=uid, remote_listeners=APP), ALICE)

    t = threading.Thread(target=requester, daemon=True)
    t.start()
    _wait_registered(st, uid)
    argv = ["run", "--uid", uid, "--s2cs", st.address, "--listen", APP[0], "--no-ssl"]
    r = CliRunner(env={"SCISTREAM_APPCTRL_TOKEN": ALICE}).invoke(
        appctrl_main, [*argv, "--ready-timeout", "10", "--", "true"]
    )
    t.join(10)
    assert r.exit_code == 0, r.output
    assert list(done["resp"].prod_listeners) == APP
