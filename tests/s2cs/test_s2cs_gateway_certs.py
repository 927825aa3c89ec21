"""Gateway certificates: unmodified SciStream 1.x clients, secure WAN leg (DESIGN decision 9).

A 1.2.1 s2uc/appctrl sends req/hello/update with none of our fields: no
security, no session key. With gateway certificates from ``scistream certs
--gateway`` configured on both s2cs (``tls_cert``/``tls_key``/``tls_ca``), the
PROD listener is TLS 1.3 and requires a client certificate from the gateway
CA, and the CONS gateway presents its own: the stream runs with no key carried
by the client. Two real native gateways (each with its s2ds) on loopback;
bytes compared by SHA-256; a gateway of another CA, and TLS clients without a
gateway certificate, get nothing.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from s2cs_support import Consumer, Producer, ServerThread, make_config, new_uid

from scistream._proto import scistream_pb2 as pb
from scistream._proto import scistream_pb2_grpc
from scistream.certs import CaAndLeaf, make_gateway_cert
from scistream.dataplane import native_available
from scistream.s2cs.backends.native import stop_spawned_s2ds

pytestmark = [
    pytest.mark.skipif(not native_available(), reason="the native engine is not built"),
    pytest.mark.timeout(120),
]


def gateway_options(made: CaAndLeaf) -> dict[str, str]:
    return {"tls_cert": str(made.cert), "tls_key": str(made.key), "tls_ca": str(made.ca_cert)}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CaAndLeaf]:
    d, other = tmp_path_factory.mktemp("gateway-pki"), tmp_path_factory.mktemp("other-pki")
    return {
        "prod": make_gateway_cert(d, "prod", ["127.0.0.1"]),
        "cons": make_gateway_cert(d, "cons", ["127.0.0.1"]),
        "rogue": make_gateway_cert(other, "cons", ["127.0.0.1"]),
    }


@pytest.fixture(scope="module")
def gateways(
    tmp_path_factory: pytest.TempPathFactory, pki: dict[str, CaAndLeaf]
) -> Iterator[dict[str, ServerThread]]:
    root = tmp_path_factory.mktemp("gw")
    started: dict[str, ServerThread] = {}
    try:
        for name in ("prod", "cons", "rogue"):
            extra = gateway_options(pki[name])
            cfg = make_config(root / name, backend_type="native", hello_timeout=20.0, backend_extra=extra)
            started[name] = ServerThread(cfg)
        yield started
    finally:
        for st in started.values():
            st.stop()
            stop_spawned_s2ds(st.config.state_dir)


def stub(st: ServerThread) -> tuple[grpc.Channel, Any]:
    ch = grpc.insecure_channel(st.address)
    return ch, scistream_pb2_grpc.ControlStub(ch)


def legacy_prod(prod: Any, uid: str, app_port: int) -> Any:
    """What 1.2.1's ``s2uc prod-req`` + ``appctrl mock`` send: no field of ours."""
    fut = prod.req.future(pb.Request(uid=uid, role="PROD", num_conn=2, rate=10000), timeout=20)
    prod.hello(pb.Hello(uid=uid, prod_listeners=[f"127.0.0.1:{app_port}"], role="PROD"), timeout=10)
    p = fut.result()
    prod.update(pb.UpdateTargets(uid=uid, remote_listeners=list(p.prod_listeners), role="PROD"), timeout=20)
    return p


def legacy_cons(cons: Any, uid: str, inbound: list[str]) -> Any:
    """What 1.2.1's ``s2uc cons-req`` + ``appctrl mock`` send: no key in the update."""
    fut = cons.req.future(pb.Request(uid=uid, role="CONS", num_conn=2, rate=10000), timeout=20)
    cons.hello(pb.Hello(uid=uid, prod_listeners=["127.0.0.1:5074"], role="PROD"), timeout=10)
    c = fut.result()
    cons.update(pb.UpdateTargets(uid=uid, remote_listeners=inbound, role="CONS"), timeout=20)
    return c


def tls_client_gets(listener: str, ca: Path, cert: CaAndLeaf | None) -> tuple[str, bytes]:
    """(TLS version, bytes read) of a direct TLS client of the PROD listener."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(ca))
    ctx.check_hostname = False
    if cert is not None:
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
    host, port = listener.rsplit(":", 1)
    got, version = b"", ""
    with socket.create_connection((host, int(port)), timeout=10) as raw, ctx.wrap_socket(raw) as tls:
        version = tls.version() or ""
        with contextlib.suppress(ssl.SSLError, OSError):
            while len(got) < 4096 and (chunk := tls.recv(4096)):
                got += chunk
    return version, got


def test_unmodified_1x_flow_runs_over_gateway_certificates(
    gateways: dict[str, ServerThread], pki: dict[str, CaAndLeaf]
) -> None:
    pch, prod = stub(gateways["prod"])
    cch, cons = stub(gateways["cons"])
    with contextlib.closing(pch), contextlib.closing(cch), contextlib.closing(Producer(8 << 20)) as app:
        uid = new_uid()
        p = legacy_prod(prod, uid, app.port)
        assert p.security == "tls" and p.session_key == b""  # nothing for the client to carry
        c = legacy_cons(cons, uid, list(p.listeners))
        consumer = Consumer(c.listeners[0])
        consumer.join(60)
        (served,) = app.wait_served(1, timeout=10)
        assert served.error is None and consumer.error is None
        assert consumer.received == app.total and consumer.sha == served.results["sent"]
        # The WAN leg: TLS 1.3, and only a certificate of the gateway CA gets a byte.
        ca = pki["prod"].ca_cert
        version, good = tls_client_gets(p.listeners[1], ca, pki["cons"])
        assert version == "TLSv1.3" and len(good) > 0
        for who in (None, pki["rogue"]):
            _, bad = tls_client_gets(p.listeners[1], ca, who)
            assert bad == b""
        for s, u in ((cons, uid), (prod, uid)):
            s.release(pb.Release(uid=u), timeout=10)


def test_a_gateway_of_another_ca_is_refused(gateways: dict[str, ServerThread]) -> None:
    pch, prod = stub(gateways["prod"])
    rch, rogue = stub(gateways["rogue"])
    with contextlib.closing(pch), contextlib.closing(rch), contextlib.closing(Producer(1 << 20)) as app:
        uid = new_uid()
        p = legacy_prod(prod, uid, app.port)
        c = legacy_cons(rogue, uid, list(p.listeners))
        consumer = Consumer(c.listeners[0], timeout=15)
        consumer.join(30)
        assert consumer.received == 0
        assert app.served == [] or all("sent" not in s.results for s in app.served)
        st = prod.status(pb.StatusRequest(uid=uid), timeout=5).sessions[0]
        assert st.bytes_from_target == 0 and st.bytes_to_target == 0
        for s in (rogue, prod):
            s.release(pb.Release(uid=uid), timeout=10)


def test_without_gateway_certificates_a_1x_cons_update_is_refused_naming_them(tmp_path: Path) -> None:
    st = ServerThread(make_config(tmp_path, backend_type="native", hello_timeout=20.0))
    ch, cons = stub(st)
    try:
        uid = new_uid()
        fut = cons.req.future(pb.Request(uid=uid, role="CONS", num_conn=1, rate=10000), timeout=20)
        cons.hello(pb.Hello(uid=uid, role="PROD"), timeout=10)
        fut.result()
        with pytest.raises(grpc.RpcError) as info:
            cons.update(pb.UpdateTargets(uid=uid, remote_listeners=["127.0.0.1:9"], role="CONS"), timeout=20)
        assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "scistream certs --gateway" in (info.value.details() or "")
    finally:
        ch.close()
        st.stop()
        stop_spawned_s2ds(st.config.state_dir)


def test_gateway_certificate_without_a_ca_is_refused_at_start(
    tmp_path: Path, pki: dict[str, CaAndLeaf]
) -> None:
    opts = gateway_options(pki["prod"])
    del opts["tls_ca"]
    cfg = make_config(tmp_path, backend_type="native", backend_extra=opts)
    with pytest.raises(Exception, match="tls_ca"):
        ServerThread(cfg)
    stop_spawned_s2ds(cfg.state_dir)


@pytest.mark.haproxy
@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
def test_unmodified_1x_flow_over_gateway_certificates_with_haproxy(
    tmp_path: Path, pki: dict[str, CaAndLeaf]
) -> None:
    """The same options on HAProxy gateways: operator certificates, no key carried."""
    started: list[ServerThread] = []
    try:
        for name in ("prod", "cons"):
            extra = gateway_options(pki[name])
            started.append(
                ServerThread(make_config(tmp_path / name, backend_type="haproxy", backend_extra=extra))
            )
        (pch, prod), (cch, cons) = stub(started[0]), stub(started[1])
        with contextlib.closing(pch), contextlib.closing(cch), contextlib.closing(Producer(4 << 20)) as app:
            uid = new_uid()
            p = legacy_prod(prod, uid, app.port)
            assert p.security == "tls" and p.session_key == b""
            c = legacy_cons(cons, uid, list(p.listeners))
            consumer = Consumer(c.listeners[0])
            consumer.join(60)
            (served,) = app.wait_served(1, timeout=10)
            assert consumer.error is None and consumer.sha == served.results["sent"]
            _, bad = tls_client_gets(p.listeners[1], pki["prod"].ca_cert, pki["rogue"])
            assert bad == b""
            for s in (cons, prod):
                s.release(pb.Release(uid=uid), timeout=10)
    finally:
        for st in started:
            st.stop()
