"""Malformed and random input on every RPC (RELIABILITY 13): no crash, no UNKNOWN, no traceback."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from s2cs_support import FakeBackend, ServerThread, make_config

from scistream._proto import scistream_pb2 as pb
from scistream._proto import scistream_pb2_grpc

CHARS = st.characters(blacklist_categories=("Cs",))
TEXT = st.text(CHARS, max_size=80)
UIDS = st.one_of(TEXT, st.uuids().map(str), st.sampled_from(["", "-", "a" * 129, "a/b", "../x", "u1"]))
ENDPOINT = st.one_of(
    TEXT,
    st.builds(
        lambda h, p: f"{h}:{p}",
        st.sampled_from(
            ["127.0.0.1", "10.0.0.1", "[::1]", "localhost", "169.254.169.254", "0.0.0.0", "a..b", ""]
        ),
        st.integers(-5, 70000),
    ),
)
ENDPOINTS = st.lists(ENDPOINT, max_size=6)
ROLES = st.one_of(st.sampled_from(["PROD", "CONS", "prod", "", "Cons "]), TEXT)
INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
SECURITY = st.one_of(st.sampled_from(["", "tls", "plain", "compat", "TLS"]), TEXT)

MESSAGES = st.one_of(
    st.builds(
        lambda *a: (
            "req",
            pb.Request(uid=a[0], role=a[1], num_conn=a[2], rate=a[3], security=a[4], rate_limit=a[5]),
        ),
        UIDS,
        ROLES,
        st.one_of(st.integers(-3, 70), INT32),
        INT32,
        SECURITY,
        INT64,
    ),
    st.builds(lambda u, e, r: ("hello", pb.Hello(uid=u, prod_listeners=e, role=r)), UIDS, ENDPOINTS, ROLES),
    st.builds(
        lambda u, e, r, k: ("update", pb.UpdateTargets(uid=u, remote_listeners=e, role=r, session_key=k)),
        UIDS,
        ENDPOINTS,
        ROLES,
        st.binary(max_size=80),
    ),
    st.builds(lambda u: ("release", pb.Release(uid=u)), UIDS),
    st.builds(lambda u: ("status", pb.StatusRequest(uid=u)), UIDS),
    st.just(("server_info", pb.ServerInfoRequest())),
)

BAD_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: Any) -> Iterator[tuple[ServerThread, Any]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    srv = ServerThread(make_config(tmp, hello_timeout=0.3, reserved_timeout=0.5), FakeBackend())
    ch = grpc.insecure_channel(srv.address)
    yield srv, ch
    ch.close()
    srv.stop()


def check_error(exc: grpc.RpcError) -> None:
    e: Any = exc
    assert e.code() not in BAD_CODES, (e.code(), e.details())
    details = e.details() or ""
    assert "Traceback" not in details and 'File "' not in details


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(MESSAGES)
def test_random_messages(fuzz_server: tuple[ServerThread, Any], item: tuple[str, Any]) -> None:
    srv, ch = fuzz_server
    stub = scistream_pb2_grpc.ControlStub(ch)
    rpc, msg = item
    try:
        getattr(stub, rpc)(msg, timeout=0.4)
    except grpc.RpcError as exc:
        if exc.code() is not grpc.StatusCode.DEADLINE_EXCEEDED:  # type: ignore[attr-defined]
            check_error(exc)
    assert srv.thread.is_alive()


VALID = {
    "req": pb.Request(uid="4f8583bc-a4d3-11ee-9fd6-034d1fcbd7c3", role="PROD", num_conn=5, rate=10000),
    "hello": pb.Hello(uid="u", prod_listeners=["127.0.0.1:5074", "127.0.0.1:5075"], role="PROD"),
    "update": pb.UpdateTargets(uid="u", remote_listeners=["127.0.0.1:5100"], session_key=b"k" * 32),
    "release": pb.Release(uid="u"),
    "status": pb.StatusRequest(uid="u"),
    "server_info": pb.ServerInfoRequest(),
}


@st.composite
def raw_request(draw: Any) -> tuple[str, bytes]:
    """Random bytes, or a valid message with a few bytes overwritten or inserted."""
    rpc = draw(st.sampled_from(sorted(VALID)))
    if draw(st.booleans()):
        return rpc, draw(st.binary(max_size=200))
    data = bytearray(VALID[rpc].SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        if data and draw(st.booleans()):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        else:
            data.insert(draw(st.integers(0, len(data))), draw(st.integers(0, 255)))
    return rpc, bytes(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw_request())
def test_raw_bytes(fuzz_server: tuple[ServerThread, Any], item: tuple[str, bytes]) -> None:
    rpc, payload = item
    srv, ch = fuzz_server
    call = ch.unary_unary(f"/scistream.Control/{rpc}", request_serializer=None, response_deserializer=None)
    try:
        call(payload, timeout=0.4)
    except grpc.RpcError as exc:
        e: Any = exc
        # gRPC itself answers INTERNAL for an undecodable message; never UNKNOWN, never a traceback.
        assert e.code() is not grpc.StatusCode.UNKNOWN
        assert "Traceback" not in (e.details() or "")
    assert srv.thread.is_alive()


def test_server_still_healthy_after_fuzz(fuzz_server: tuple[ServerThread, Any]) -> None:
    import time

    srv, ch = fuzz_server
    stub = scistream_pb2_grpc.ControlStub(ch)
    uid = os.urandom(8).hex()
    fut = stub.req.future(pb.Request(uid=uid, role="PROD", num_conn=1), timeout=5)
    stub.hello(pb.Hello(uid=uid, prod_listeners=["127.0.0.1:5074"]), timeout=5)
    fut.result()
    stub.release(pb.Release(uid=uid), timeout=5)
    deadline = time.time() + 3  # sessions left waiting by the fuzz expire on their own
    while time.time() < deadline and srv.manager.ports.in_use:
        time.sleep(0.1)
    assert not srv.manager.ports.in_use
