"""Two s2cs with the native backend (each spawning its s2ds) on loopback: the whole product path.

producer app ← PROD gateway (TLS server, PSK from the PROD req) ⇐ TLS ⇐ CONS gateway ← consumer app.
The key travels from the PROD req response to the CONS update, as s2uc carries it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from s2cs_support import Consumer, Producer, ServerThread, bindable, make_config, new_uid

from scistream._proto import scistream_pb2 as pb
from scistream._proto import scistream_pb2_grpc
from scistream.dataplane import native_available
from scistream.s2cs.backends.native import stop_spawned_s2ds

pytestmark = pytest.mark.skipif(not native_available(), reason="the native engine is not built")


@pytest.fixture
def gateways(tmp_path: Any) -> Iterator[tuple[ServerThread, ServerThread]]:
    started: list[ServerThread] = []
    try:
        for side in ("prod", "cons"):
            cfg = make_config(tmp_path / side, backend_type="native", hello_timeout=20.0)
            started.append(ServerThread(cfg))
        yield started[0], started[1]
    finally:
        for st in started:
            st.stop()
            stop_spawned_s2ds(st.config.state_dir)


def connect(st: ServerThread) -> tuple[grpc.Channel, Any]:
    ch = grpc.insecure_channel(st.address)
    return ch, scistream_pb2_grpc.ControlStub(ch)


def establish(prod: Any, cons: Any, uid: str, app_port: int, num_conn: int) -> tuple[Any, Any]:
    fut = prod.req.future(pb.Request(uid=uid, role="PROD", num_conn=num_conn, rate=10000), timeout=20)
    prod.hello(pb.Hello(uid=uid, prod_listeners=[f"127.0.0.1:{app_port}"], role="PROD"), timeout=10)
    p = fut.result()
    prod.update(pb.UpdateTargets(uid=uid, remote_listeners=list(p.prod_listeners), role="PROD"), timeout=20)
    fut = cons.req.future(pb.Request(uid=uid, role="CONS", num_conn=num_conn, rate=10000), timeout=20)
    cons.hello(pb.Hello(uid=uid, role="PROD"), timeout=10)  # the 1.2.1 outbound hello says PROD
    c = fut.result()
    cons.update(
        pb.UpdateTargets(uid=uid, remote_listeners=list(p.listeners), session_key=p.session_key), timeout=20
    )
    return p, c


def test_tls_stream_through_two_native_gateways(gateways: tuple[ServerThread, ServerThread]) -> None:
    prod_st, cons_st = gateways
    pch, prod = connect(prod_st)
    cch, cons = connect(cons_st)
    with contextlib.closing(pch), contextlib.closing(cch), contextlib.closing(Producer(64 << 20)) as app:
        uid = new_uid()
        p, c = establish(prod, cons, uid, app.port, num_conn=2)
        assert p.security == "tls" and len(p.session_key) == 32
        consumer = Consumer(c.listeners[0])
        consumer.join(60)
        (served,) = app.wait_served(1, timeout=10)
        assert served.error is None and consumer.error is None
        assert consumer.received == app.total and consumer.sha == served.results["sent"]
        deadline = time.time() + 10
        while time.time() < deadline:
            s = prod.status(pb.StatusRequest(uid=uid), timeout=5).sessions[0]
            if s.state == "active" and s.bytes_from_target >= app.total:
                break
            time.sleep(0.2)
        assert s.state == "active" and s.backend == "native" and s.bytes_from_target >= app.total
        # a consumer-side client without the key gets nothing from the PROD listener
        import socket

        host, port = p.listeners[1].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            raw.sendall(b"GET / HTTP/1.0\r\n\r\n")
            raw.settimeout(5)
            with contextlib.suppress(ConnectionError, TimeoutError):
                assert raw.recv(100) == b""
        for stub in (cons, prod):
            stub.release(pb.Release(uid=uid), timeout=10)
        ports = [int(x.rsplit(":", 1)[1]) for x in (*p.listeners, *c.listeners)]
        deadline = time.time() + 2
        while time.time() < deadline and not all(bindable(x) for x in ports):
            time.sleep(0.05)
        assert all(bindable(x) for x in ports)
        for st in gateways:
            assert st.call(st.manager.backend.running_sessions()) == set()
