"""Operations: restart from the SQLite store, events, metrics, audit log, secrets at rest."""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
import time
import urllib.request
from typing import Any

import grpc
import pytest
import zmq
from s2cs_support import FakeBackend, ServerThread, make_config, new_uid, prod_flow

from scistream._proto import scistream_pb2 as pb
from scistream._proto import scistream_pb2_grpc
from scistream.events import SessionEvent, topic_for


def test_restart_restores_and_reconciles(tmp_path: Any) -> None:
    backend = FakeBackend()
    backend.keep_on_close = True  # like s2ds: routes outlive the control server
    cfg = make_config(tmp_path)
    st1 = ServerThread(cfg, backend)
    try:
        with grpc.insecure_channel(st1.address) as ch:
            stub = scistream_pb2_grpc.ControlStub(ch)
            live, gone = new_uid(), new_uid()
            live_resp = prod_flow(stub, live, ["127.0.0.1:5074"], num_conn=2)
            prod_flow(stub, gone, ["127.0.0.1:5075"])
            reserved = new_uid()
            fut = stub.req.future(pb.Request(uid=reserved, role="PROD", num_conn=1), timeout=10)
            stub.hello(pb.Hello(uid=reserved, prod_listeners=["127.0.0.1:5076"]), timeout=5)
            fut.result()
            waiting = new_uid()
            pending = stub.req.future(pb.Request(uid=waiting, role="PROD", num_conn=1), timeout=10)
            time.sleep(0.3)
            ports_before = set(st1.manager.ports.in_use)
            # The data plane loses one session's routes while s2cs is down.
            st1.call(backend.remove(gone, _record=False))
            st1.stop()  # orderly stop: the waiting session fails, the others stay stored
            with pytest.raises(grpc.RpcError) as info:
                pending.result()
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    finally:
        st1.stop()
    assert set(backend.plans) == {live}
    applied_before = backend.applied.count(gone)
    cfg2 = make_config(tmp_path, port_range=cfg.port_range)
    st2 = ServerThread(cfg2, backend)
    try:
        mgr = st2.manager
        assert set(mgr.sessions) == {live, gone, reserved}
        assert mgr.sessions[live].state.value == "ready" and mgr.sessions[reserved].state.value == "reserved"
        assert backend.applied.count(gone) == applied_before + 1  # re-applied with its stored plan
        assert backend.plans[live].psk_key == live_resp.session_key  # the key survived the restart
        assert waiting in backend.removed
        assert mgr.ports.in_use <= ports_before and len(mgr.ports.in_use) == 4
        with grpc.insecure_channel(st2.address) as ch:
            stub = scistream_pb2_grpc.ControlStub(ch)
            listed = {s.uid: s for s in stub.status(pb.StatusRequest(), timeout=5).sessions}
            assert set(listed) == {live, gone, reserved}
            assert list(listed[live].listeners) == list(live_resp.listeners)
            for uid in listed:
                stub.release(pb.Release(uid=uid), timeout=5)
        assert not mgr.sessions and not mgr.ports.in_use and not backend.plans
    finally:
        st2.stop()


def test_events_metrics_audit_and_secrets(s2cs_factory: Any, stub_for: Any, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG)
    st = s2cs_factory(metrics_port=0)
    stub = stub_for(st)
    info = stub.server_info(pb.ServerInfoRequest(), timeout=5)
    assert info.metrics.startswith("http://127.0.0.1:")
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    try:
        sub.connect(info.events)
        sub.setsockopt(zmq.SUBSCRIBE, topic_for(None))
        time.sleep(0.3)  # PUB/SUB join
        uid = new_uid()
        resp = prod_flow(stub, uid, ["127.0.0.1:5074"], num_conn=2)
        key = resp.session_key
        with urllib.request.urlopen(info.metrics, timeout=5) as r:
            time.sleep(0.5)
        with urllib.request.urlopen(info.metrics, timeout=5) as r:
            text = r.read().decode()
        assert 'scistream_sessions{state="ready"} 1.0' in text
        assert 'scistream_rpcs_total{code="OK",rpc="req"} 1.0' in text
        assert "scistream_hello_latency_seconds_count 1.0" in text
        stub.release(pb.Release(uid=uid), timeout=5)
        with pytest.raises(grpc.RpcError):
            stub.release(pb.Release(uid=uid), timeout=5)
        kinds = []
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        deadline = time.time() + 5
        while time.time() < deadline and "released" not in kinds:
            if poller.poll(200):
                ev = SessionEvent.decode(sub.recv_multipart())
                assert ev.uid == uid
                kinds.append(ev.event)
        assert kinds == ["created", "hello", "ready", "released"]
    finally:
        sub.close()
        ctx.term()
    # audit: one record per RPC and one per session end; no key, no token anywhere
    with open(st.config.audit_path()) as f:
        records = [json.loads(line) for line in f]
    rpcs = [(r["rpc"], r["code"]) for r in records if r["event"] == "rpc"]
    assert ("req", "OK") in rpcs and ("release", "NOT_FOUND") in rpcs and ("hello", "OK") in rpcs
    ends = [r for r in records if r["event"] == "session_end"]
    assert len(ends) == 1 and ends[0]["uid"] == uid and ends[0]["state"] == "released"
    state_dir = st.config.state_dir
    assert stat.S_IMODE(os.stat(state_dir).st_mode) == 0o700
    for name in os.listdir(state_dir):
        path = os.path.join(state_dir, name)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, name
    forms = [key, key.hex().encode(), base64.b64encode(key)]
    for name in os.listdir(state_dir):
        if name == "events.sock":  # the private events socket (0600 above): no data at rest
            continue
        with open(os.path.join(state_dir, name), "rb") as f:
            data = f.read()
        assert not any(k in data for k in forms), name  # released: the stored key is gone
    assert not any(k.decode("latin-1") in caplog.text for k in forms)


def test_metrics_never_show_a_compat_uid(s2cs_factory: Any, stub_for: Any) -> None:
    """In the 1.x compat mode the uid is the data key, and the metrics port asks for no
    credentials: a compat session's series carry a keyed label, never the uid."""
    st = s2cs_factory(metrics_port=0, default_security="compat", compat_allowed=True)
    stub = stub_for(st)
    info = stub.server_info(pb.ServerInfoRequest(), timeout=5)
    uid = new_uid()
    prod_flow(stub, uid, ["127.0.0.1:5074"], num_conn=1)
    deadline = time.time() + 10
    text = ""
    while time.time() < deadline and "scistream_session_connections{" not in text:
        with urllib.request.urlopen(info.metrics, timeout=5) as r:
            text = r.read().decode()
        time.sleep(0.2)
    assert 'uid="compat-' in text, text
    assert uid not in text and uid.replace("-", "") not in text
    stub.release(pb.Release(uid=uid), timeout=5)
