"""s2cs over real gRPC: the 1.x flows, both hello orders, concurrency, timeouts, errors."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from s2cs_support import FakeBackend, bindable, free_range, new_uid, open_fds, prod_flow

from scistream._proto import scistream_pb2 as pb
from scistream.dataplane import COMPAT_PSK_IDENTITY, compat_key_from_uid

SC = grpc.StatusCode


def code_of(fn: Any, *args: Any, **kwargs: Any) -> tuple[SC, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, timeout=10, **kwargs)
    err: Any = info.value
    return err.code(), err.details()


def test_prod_flow_hello_after_req(s2cs: Any, stub: Any) -> None:
    uid = new_uid()
    targets = ["127.0.0.1:5074", "127.0.0.1:5075"]
    resp = prod_flow(stub, uid, targets, num_conn=3)
    assert len(resp.listeners) == 3 and all(x.startswith("127.0.0.1:") for x in resp.listeners)
    assert list(resp.prod_listeners) == targets
    assert resp.security == "tls" and resp.uid == uid and len(resp.session_key) == 32
    plan = s2cs.backend.plans[uid]
    # round robin: connection i of listener i goes to target i mod len(targets)
    assert [r.target for r in plan.routes] == ["127.0.0.1:5074", "127.0.0.1:5075", "127.0.0.1:5074"]
    assert [r.listen for r in plan.routes] == list(resp.listeners)
    assert plan.psk_key == resp.session_key and plan.psk_identity == uid
    st = stub.status(pb.StatusRequest(uid=uid), timeout=5).sessions[0]
    assert st.state == "ready" and st.role == "PROD" and st.num_conn == 3 and st.backend == "fake"
    stub.release(pb.Release(uid=uid), timeout=5)
    assert uid in s2cs.backend.removed and uid not in s2cs.backend.plans
    assert code_of(stub.status, pb.StatusRequest(uid=uid))[0] is SC.NOT_FOUND


def test_hello_before_req_cons(s2cs: Any, stub: Any) -> None:
    uid = new_uid()
    # The hello comes first: it is kept and answered with the listeners once the req arrives.
    hello = stub.hello.future(pb.Hello(uid=uid, prod_listeners=["127.0.0.1:7000"], role="CONS"), timeout=10)
    time.sleep(0.3)
    resp = stub.req(pb.Request(uid=uid, role="CONS", num_conn=2, rate=10000), timeout=10)
    assert len(resp.listeners) == 2 and not resp.session_key
    app = hello.result()
    assert list(app.listeners) == list(resp.listeners)
    key = os.urandom(32)
    up = stub.update(
        pb.UpdateTargets(uid=uid, remote_listeners=["127.0.0.1:6000"], session_key=key), timeout=10
    )
    assert list(up.prod_listeners) == ["127.0.0.1:6000", "127.0.0.1:6000"]
    assert s2cs.backend.plans[uid].psk_key == key and s2cs.backend.plans[uid].role == "CONS"
    stub.release(pb.Release(uid=uid), timeout=5)


def test_early_prod_hello_answers_at_once(s2cs: Any, stub: Any) -> None:
    uid = new_uid()
    app = stub.hello(pb.Hello(uid=uid, prod_listeners=["127.0.0.1:7001"], role="PROD"), timeout=5)
    assert "recorded" in app.message
    resp = stub.req(pb.Request(uid=uid, role="PROD", num_conn=1), timeout=10)
    assert list(resp.prod_listeners) == ["127.0.0.1:7001"]
    stub.release(pb.Release(uid=uid), timeout=5)


def test_outbound_hello_with_prod_role_for_cons_session(s2cs: Any, stub: Any) -> None:
    # 1.2.1 outbound-request sends its hello with role "PROD" for a CONS session.
    uid = new_uid()
    fut = stub.req.future(pb.Request(uid=uid, role="CONS", num_conn=1, rate=10000), timeout=10)
    time.sleep(0.2)
    app = stub.hello(pb.Hello(uid=uid, prod_listeners=["10.1.2.3:5201"], role="PROD"), timeout=5)
    resp = fut.result()
    assert list(app.listeners) == list(resp.listeners)
    stub.release(pb.Release(uid=uid), timeout=5)


def test_cons_update_without_key_in_tls_mode(s2cs: Any, stub: Any) -> None:
    uid = new_uid()
    fut = stub.req.future(pb.Request(uid=uid, role="CONS", num_conn=1), timeout=10)
    stub.hello(pb.Hello(uid=uid, prod_listeners=[], role="CONS"), timeout=5)
    fut.result()
    code, details = code_of(stub.update, pb.UpdateTargets(uid=uid, remote_listeners=["127.0.0.1:6001"]))
    assert code is SC.FAILED_PRECONDITION
    assert "s2uc" in details and "--scistream1-compat" in details
    assert uid not in s2cs.backend.plans
    code, _ = code_of(
        stub.update, pb.UpdateTargets(uid=uid, remote_listeners=["127.0.0.1:6001"], session_key=b"short")
    )
    assert code is SC.INVALID_ARGUMENT


def test_compat_mode_only_when_asked(s2cs_factory: Any, stub_for: Any) -> None:
    default = s2cs_factory()
    stub = stub_for(default)
    code, details = code_of(stub.req, pb.Request(uid=new_uid(), role="PROD", num_conn=1, security="compat"))
    assert code is SC.FAILED_PRECONDITION and "--scistream1-compat" in details
    compat = s2cs_factory(default_security="compat", compat_allowed=True)
    stub = stub_for(compat)
    uid = "4f8583bc-a4d3-11ee-9fd6-034d1fcbd7c3"
    resp = prod_flow(stub, uid, ["127.0.0.1:5074"])
    assert resp.security == "compat" and not resp.session_key  # nothing secret to hand out
    plan = compat.backend.plans[uid]
    assert plan.psk_identity == COMPAT_PSK_IDENTITY and plan.psk_key == compat_key_from_uid(uid)
    # a 1.x CONS flow: no key in the update
    cuid = new_uid()
    fut = stub.req.future(pb.Request(uid=cuid, role="CONS", num_conn=1), timeout=10)
    stub.hello(pb.Hello(uid=cuid, role="PROD"), timeout=5)
    fut.result()
    stub.update(pb.UpdateTargets(uid=cuid, remote_listeners=["127.0.0.1:6002"]), timeout=5)
    assert compat.backend.plans[cuid].psk_key == compat_key_from_uid(cuid)


def test_plain_security_moves_real_bytes(s2cs: Any, stub: Any) -> None:
    # A producer application (TCP server) and a consumer through the gateway's listener.
    payload = os.urandom(2 * 1024 * 1024)
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def producer() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.sendall(payload)

    t = threading.Thread(target=producer)
    t.start()
    uid = new_uid()
    resp = prod_flow(stub, uid, [f"127.0.0.1:{port}"], security="plain")
    assert resp.security == "plain" and not resp.session_key
    host, lport = resp.listeners[0].rsplit(":", 1)
    got = bytearray()
    with socket.create_connection((host, int(lport)), timeout=10) as c:
        while chunk := c.recv(1 << 16):
            got += chunk
    t.join(10)
    srv.close()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
    deadline = time.time() + 5
    while time.time() < deadline:
        st = stub.status(pb.StatusRequest(uid=uid), timeout=5).sessions[0]
        if st.state == "active":
            break
        time.sleep(0.1)
    assert st.state == "active" and st.bytes_from_target == len(payload)
    assert len(st.connections) == 1 and st.connections[0].target == f"127.0.0.1:{port}"
    stub.release(pb.Release(uid=uid), timeout=5)
    import json

    with open(s2cs.config.audit_path()) as f:
        records = [json.loads(line) for line in f]
    conns = [r for r in records if r["event"] == "connection" and r["uid"] == uid]
    assert len(conns) == 1 and conns[0]["target"] == f"127.0.0.1:{port}"
    end = [r for r in records if r["event"] == "session_end" and r["uid"] == uid]
    assert end[0]["bytes_from_target"] == len(payload) and end[0]["connections_total"] == 1


def test_errors_have_codes_and_sentences(s2cs: Any, stub: Any) -> None:
    cases = [
        (stub.release, pb.Release(uid=new_uid()), SC.NOT_FOUND),
        (stub.update, pb.UpdateTargets(uid=new_uid(), remote_listeners=["127.0.0.1:1"]), SC.NOT_FOUND),
        (stub.release, pb.Release(uid=""), SC.INVALID_ARGUMENT),
        (stub.req, pb.Request(uid="a b", role="PROD", num_conn=1), SC.INVALID_ARGUMENT),
        (stub.req, pb.Request(uid="x" * 500, role="PROD", num_conn=1), SC.INVALID_ARGUMENT),
        (stub.req, pb.Request(uid=new_uid(), role="WHO", num_conn=1), SC.INVALID_ARGUMENT),
        (stub.req, pb.Request(uid=new_uid(), role="PROD", num_conn=0), SC.INVALID_ARGUMENT),
        (stub.req, pb.Request(uid=new_uid(), role="PROD", num_conn=100000), SC.INVALID_ARGUMENT),
        (stub.req, pb.Request(uid=new_uid(), role="PROD", num_conn=1, rate=-1), SC.INVALID_ARGUMENT),
        (stub.req, pb.Request(uid=new_uid(), role="PROD", num_conn=1, security="rot13"), SC.INVALID_ARGUMENT),
        (stub.hello, pb.Hello(uid=new_uid(), prod_listeners=["no-port"]), SC.INVALID_ARGUMENT),
    ]
    for fn, msg, want in cases:
        code, details = code_of(fn, msg)
        assert code is want, (msg, code, details)
        assert details and "Traceback" not in details and "\n" not in details


def test_update_target_validation(s2cs: Any, stub: Any) -> None:
    uid = new_uid()
    prod_flow(stub, uid, ["127.0.0.1:5074"])
    for targets, want in [
        ([], SC.INVALID_ARGUMENT),
        (["127.0.0.1"], SC.INVALID_ARGUMENT),
        (["127.0.0.1:0"], SC.INVALID_ARGUMENT),
        (["169.254.169.254:80"], SC.PERMISSION_DENIED),
        ([f"127.0.0.1:{s2cs.server.port}"], SC.PERMISSION_DENIED),  # the gateway's own control port
    ]:
        code, _ = code_of(stub.update, pb.UpdateTargets(uid=uid, remote_listeners=targets))
        assert code is want, targets
    # a refused update changes nothing
    assert [r.target for r in s2cs.backend.plans[uid].routes] == ["127.0.0.1:5074"]


def test_hello_cannot_change_a_helloed_session(s2cs: Any, stub: Any) -> None:
    uid = new_uid()
    prod_flow(stub, uid, ["127.0.0.1:5074"])
    same = stub.hello(pb.Hello(uid=uid, prod_listeners=["127.0.0.1:5074"], role="PROD"), timeout=5)
    assert same.message
    code, _ = code_of(stub.hello, pb.Hello(uid=uid, prod_listeners=["127.0.0.1:9999"], role="PROD"))
    assert code is SC.FAILED_PRECONDITION


def test_update_before_hello_is_refused(s2cs: Any, stub: Any) -> None:
    uid = new_uid()
    fut = stub.req.future(pb.Request(uid=uid, role="PROD", num_conn=1), timeout=10)
    time.sleep(0.2)
    code, _ = code_of(stub.update, pb.UpdateTargets(uid=uid, remote_listeners=["127.0.0.1:5074"]))
    assert code is SC.FAILED_PRECONDITION
    stub.release(pb.Release(uid=uid), timeout=5)
    with pytest.raises(grpc.RpcError) as info:
        fut.result()
    assert info.value.code() is SC.FAILED_PRECONDITION  # type: ignore[attr-defined]


def test_range_exhausted(s2cs_factory: Any, stub_for: Any) -> None:
    st = s2cs_factory(port_range=free_range(4))
    stub = stub_for(st)
    fut = stub.req.future(pb.Request(uid=new_uid(), role="PROD", num_conn=3), timeout=10)
    time.sleep(0.2)
    code, details = code_of(stub.req, pb.Request(uid=new_uid(), role="PROD", num_conn=2))
    assert code is SC.RESOURCE_EXHAUSTED and "free port" in details
    assert len(st.manager.ports.in_use) == 3  # the refused req holds nothing
    fut.cancel()


def test_hello_timeout_releases_everything(s2cs_factory: Any, stub_for: Any) -> None:
    st = s2cs_factory(hello_timeout=1.0)
    stub = stub_for(st)
    uid = new_uid()
    t0 = time.time()
    code, details = code_of(stub.req, pb.Request(uid=uid, role="PROD", num_conn=4))
    assert code is SC.DEADLINE_EXCEEDED and "released" in details
    assert time.time() - t0 < 5
    # ports re-bindable within 1 s of the timeout, nothing held, the uid usable again
    ports = [int(x) for x in range(st.config.port_range[0], st.config.port_range[1] + 1)]
    assert not st.manager.ports.in_use and uid not in st.manager.sessions
    assert all(bindable(p) for p in ports[:4])
    assert uid in st.backend.removed
    assert code_of(stub.release, pb.Release(uid=uid))[0] is SC.NOT_FOUND


def test_requester_giving_up_frees_ports(s2cs: Any, stub: Any) -> None:
    uid = new_uid()
    msg = pb.Request(uid=uid, role="PROD", num_conn=2)
    code, _ = code_of(lambda m, timeout: stub.req(m, timeout=0.5), msg)
    assert code is SC.DEADLINE_EXCEEDED
    deadline = time.time() + 1.0
    while time.time() < deadline and (s2cs.manager.ports.in_use or uid in s2cs.manager.sessions):
        time.sleep(0.02)
    assert not s2cs.manager.ports.in_use and uid not in s2cs.manager.sessions


def test_duplicate_uid_race(s2cs: Any, stub: Any) -> None:
    uid = new_uid()
    futs = [stub.req.future(pb.Request(uid=uid, role="PROD", num_conn=1), timeout=15) for _ in range(50)]
    time.sleep(0.5)
    stub.hello(pb.Hello(uid=uid, prod_listeners=["127.0.0.1:5074"], role="PROD"), timeout=5)
    ok, dup = 0, 0
    for f in futs:
        try:
            f.result()
            ok += 1
        except grpc.RpcError as exc:
            assert exc.code() is SC.ALREADY_EXISTS  # type: ignore[attr-defined]
            dup += 1
    assert (ok, dup) == (1, 49)
    assert len(s2cs.manager.ports.in_use) == 1


def test_fifty_pending_reqs_with_late_hellos(s2cs_factory: Any, stub_for: Any) -> None:
    st = s2cs_factory(port_range=free_range(120))
    stub = stub_for(st)
    uids = [new_uid() for _ in range(50)]
    futs = [stub.req.future(pb.Request(uid=u, role="PROD", num_conn=2), timeout=30) for u in uids]
    time.sleep(1.0)  # all 50 are parked; the server must still answer other calls at once
    t0 = time.time()
    stub.server_info(pb.ServerInfoRequest(), timeout=5)
    assert time.time() - t0 < 2
    for u in uids:
        stub.hello(pb.Hello(uid=u, prod_listeners=["127.0.0.1:5074"], role="PROD"), timeout=5)
    listeners = set()
    for f in futs:
        listeners.update(f.result().listeners)
    assert len(listeners) == 100  # no two sessions share a port
    for u in uids:
        stub.release(pb.Release(uid=u), timeout=5)
    assert not st.manager.ports.in_use


def test_two_hundred_sessions_leak_nothing(s2cs_factory: Any, stub_for: Any, tmp_path: Any) -> None:
    st = s2cs_factory(port_range=free_range(450))
    stub = stub_for(st)
    stub.server_info(pb.ServerInfoRequest(), timeout=5)  # warm the channel before counting fds
    fds_before = open_fds()
    uids = [new_uid() for _ in range(200)]

    def one(u: str) -> list[str]:
        resp = prod_flow(stub, u, ["127.0.0.1:5074"], num_conn=2, timeout=30)
        return list(resp.listeners)

    with ThreadPoolExecutor(16) as ex:
        all_listeners = [x for ls in ex.map(one, uids) for x in ls]
    assert len(set(all_listeners)) == 400
    assert len(st.backend.plans) == 200
    with ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda u: stub.release(pb.Release(uid=u), timeout=10), uids))
    assert not st.manager.ports.in_use and not st.manager.sessions and not st.backend.plans
    assert all(bindable(int(x.rsplit(":", 1)[1])) for x in all_listeners)
    assert open_fds() <= fds_before + 5
    assert st.server.manager.store.load() == []
    leftover = [p.name for p in (tmp_path / "state").iterdir()]
    kept = {"s2cs.db", "s2cs.db-wal", "s2cs.db-shm", "audit.log", "events.sock"}
    assert set(leftover) <= kept | {"s2cs.lock", "s2cs.instance"}


def test_server_info_and_health(s2cs: Any, stub: Any) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    info = stub.server_info(pb.ServerInfoRequest(), timeout=5)
    assert info.backend == "fake" and info.default_security == "tls" and info.listener_ip == "127.0.0.1"
    assert "status" in info.extensions and "session_key" in info.extensions
    assert info.events.startswith("ipc://") and info.events.endswith("/events.sock")  # private, 0600
    with grpc.insecure_channel(s2cs.address) as ch:
        h = health_pb2_grpc.HealthStub(ch)
        assert h.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == 1  # SERVING
        s2cs.call(s2cs.server.stop(0.5))
        with pytest.raises(grpc.RpcError):
            h.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)


def test_backend_failure_is_unavailable_not_unknown(s2cs: Any, stub: Any) -> None:
    s2cs.backend.fail_apply = True
    code, details = code_of(lambda m, timeout: prod_flow(stub, new_uid(), ["127.0.0.1:5074"]), None)
    assert code is SC.UNAVAILABLE and "refuses" in details


def test_rate_limit_is_passed_and_rate_only_when_asked(s2cs_factory: Any, stub_for: Any) -> None:
    st = s2cs_factory()
    stub = stub_for(st)
    uid = new_uid()
    prod_flow(stub, uid, ["127.0.0.1:5074"])  # rate=10000 (1.x default): stored, not enforced
    assert st.backend.plans[uid].rate_limit == 0
    fut = stub.req.future(pb.Request(uid="r2", role="PROD", num_conn=1, rate_limit=123456), timeout=10)
    stub.hello(pb.Hello(uid="r2", prod_listeners=["127.0.0.1:5074"]), timeout=5)
    fut.result()
    stub.update(pb.UpdateTargets(uid="r2", remote_listeners=["127.0.0.1:5074"]), timeout=5)
    assert st.backend.plans["r2"].rate_limit == 123456
    enforced = s2cs_factory(enforce_rate=True)
    stub2 = stub_for(enforced)
    uid3 = new_uid()
    prod_flow(stub2, uid3, ["127.0.0.1:5074"])
    assert enforced.backend.plans[uid3].rate_limit == 10000 * 1000


def test_reserved_session_expires(s2cs_factory: Any, stub_for: Any) -> None:
    st = s2cs_factory(reserved_timeout=0.5)
    stub = stub_for(st)
    uid = new_uid()
    fut = stub.req.future(pb.Request(uid=uid, role="PROD", num_conn=2), timeout=10)
    stub.hello(pb.Hello(uid=uid, prod_listeners=["127.0.0.1:5074"]), timeout=5)
    fut.result()
    deadline = time.time() + 5
    while time.time() < deadline and uid in st.manager.sessions:
        time.sleep(0.05)
    assert uid not in st.manager.sessions and not st.manager.ports.in_use


def test_idle_session_expires_only_when_configured(s2cs_factory: Any, stub_for: Any) -> None:
    st = s2cs_factory(idle_timeout=0.5)
    stub = stub_for(st)
    uid = new_uid()
    prod_flow(stub, uid, ["127.0.0.1:5074"])
    deadline = time.time() + 5
    while time.time() < deadline and uid in st.manager.sessions:
        time.sleep(0.05)
    assert uid not in st.manager.sessions and uid in st.backend.removed
    default = s2cs_factory()  # idle_timeout 0: an idle stream is never cut
    stub2 = stub_for(default)
    uid2 = new_uid()
    prod_flow(stub2, uid2, ["127.0.0.1:5074"])
    time.sleep(1.0)
    assert uid2 in default.manager.sessions


def test_session_whose_data_plane_died_fails_and_frees_its_ports(s2cs_factory: Any, stub_for: Any) -> None:
    st = s2cs_factory(poll_interval=0.1)
    stub = stub_for(st)
    uid = new_uid()
    resp = prod_flow(stub, uid, ["127.0.0.1:5074"], num_conn=2)
    ports = [int(x.rsplit(":", 1)[1]) for x in resp.listeners]
    st.backend.failures[uid] = "stunnel for session x exited unexpectedly (status 1)"
    deadline = time.time() + 5
    while time.time() < deadline and uid in st.manager.sessions:
        time.sleep(0.05)
    assert uid not in st.manager.sessions and uid in st.backend.removed
    assert not st.manager.ports.in_use and all(bindable(p) for p in ports)
    with pytest.raises(grpc.RpcError) as err:
        stub.status(pb.StatusRequest(uid=uid), timeout=5)
    assert err.value.code() is grpc.StatusCode.NOT_FOUND


def test_five_hundred_pending_reqs_do_not_delay_other_calls(s2cs_factory: Any, stub_for: Any) -> None:
    st = s2cs_factory(port_range=free_range(520), hello_timeout=60.0)
    stub = stub_for(st)
    futs = [stub.req.future(pb.Request(uid=f"p{i}", role="PROD", num_conn=1), timeout=60) for i in range(500)]
    deadline = time.time() + 20
    while time.time() < deadline and len(st.manager.sessions) < 500:
        time.sleep(0.05)
    assert len(st.manager.sessions) == 500
    t0 = time.time()
    uid = new_uid()
    fut = stub.req.future(pb.Request(uid=uid, role="PROD", num_conn=1), timeout=10)
    stub.hello(pb.Hello(uid=uid, prod_listeners=["127.0.0.1:5074"]), timeout=5)
    fut.result()
    stub.release(pb.Release(uid=uid), timeout=5)
    assert time.time() - t0 < 3
    for f in futs:  # every requester gives up: everything comes back
        f.cancel()
    deadline = time.time() + 10
    while time.time() < deadline and (st.manager.sessions or st.manager.ports.in_use):
        time.sleep(0.05)
    assert not st.manager.sessions and not st.manager.ports.in_use


def test_fake_backend_is_a_backend() -> None:
    from scistream.s2cs.backends.base import Backend

    assert issubclass(FakeBackend, Backend)
