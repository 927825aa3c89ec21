"""Two s2cs on loopback driven over gRPC as `s2uc` and `appctrl` drive them: shared by the
control-plane benchmark (test_setup_latency.py) and the soak (soak.py)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from scistream._proto import scistream_pb2 as pb
from scistream.demo import Demo, Options
from scistream.s2uc import flows


@contextmanager
def loopback_gateways(num_conn: int, backend: str = "native") -> Iterator[Demo]:
    """Both s2cs (each with its s2ds for the native backend) with TLS control channels, as
    `scistream demo` starts them, with a data port range of ``num_conn`` ports each."""
    opts = Options(
        size=0,
        num_conn=num_conn,
        security="tls",
        backend=backend,
        use_netns=False,
        keep=False,
        seed=1,
        engine="",
        timeout=10,
    )
    demo = Demo(opts, lambda s: None)
    try:
        demo.build_hosts()
        demo.start_gateways()
        yield demo
    finally:
        demo.stop_all()
        demo.close()


def controls(demo: Demo) -> tuple[flows.Control, flows.Control]:
    """gRPC clients of the producer's and the consumer's s2cs (close both when done)."""

    def ctl(side: str) -> flows.Control:
        return flows.Control(
            flows.Target(demo.facilities[side].control, server_cert=str(demo.cert), timeout=15)
        )

    return ctl("producer"), ctl("consumer")


def setup_session(
    prod: flows.Control,
    cons: flows.Control,
    uid: str,
    num_conn: int = 1,
    producer: Sequence[str] = ("127.0.0.1:9",),
) -> list[str]:
    """Each side as its users drive it: the req (s2uc) in flight while the hello
    (appctrl, announcing ``producer``) arrives; no sleep anywhere. Returns the
    consumer's listeners (where the consuming application connects)."""
    fut = prod.req_future(pb.Request(uid=uid, role="PROD", num_conn=num_conn, rate=10000, security="tls"))
    prod.call("hello", pb.Hello(uid=uid, prod_listeners=list(producer), role="PROD"))
    resp = prod.result(fut, "req")
    prod.call("update", pb.UpdateTargets(uid=uid, remote_listeners=list(resp.prod_listeners), role="PROD"))
    fut = cons.req_future(pb.Request(uid=uid, role="CONS", num_conn=num_conn, rate=10000, security="tls"))
    cons.call("hello", pb.Hello(uid=uid, prod_listeners=[], role="CONS"))
    cons_resp = cons.result(fut, "req")
    cons.call(
        "update",
        pb.UpdateTargets(
            uid=uid, remote_listeners=list(resp.listeners), role="CONS", session_key=resp.session_key
        ),
    )
    return list(cons_resp.listeners)


def release_session(prod: flows.Control, cons: flows.Control, uid: str) -> None:
    prod.call("release", pb.Release(uid=uid))
    cons.call("release", pb.Release(uid=uid))
