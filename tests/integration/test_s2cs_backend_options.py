"""Backend settings reach a real s2cs process: two `s2cs --type Haproxy` subprocesses carry a
``--security tls`` session with operator certificates given as backend options.

The PROD gateway gets its certificate settings on the command line (``--backend-option``),
the CONS gateway from a config file's ``[backend_options]`` table; both use one throwaway CA
and leaf (proxy_harness.make_certs). Bytes go both ways, consumer ⇄ CONS HAProxy ⇒ TLS ⇒ PROD
HAProxy ⇄ producer, and are compared by SHA-256; a plaintext client on the PROD listener
never reaches the producer. Each s2cs is stopped with SIGTERM (it stops its HAProxy
children); no s2ds is involved.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from proxy_harness import CertSet, make_certs
from s2cs_process import Gateway, start_s2cs, stop_s2cs
from streams import DuplexServer, duplex_transfer, pattern_digest, wait_for

from scistream._proto import scistream_pb2 as pb
from scistream._proto import scistream_pb2_grpc

pytestmark = [
    pytest.mark.haproxy,
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed"),
    pytest.mark.timeout(120),
]

SIZE = 4 << 20


def start_haproxy_s2cs(workdir: Path, name: str, *args: str) -> Gateway:
    return start_s2cs(
        workdir,
        name,
        "--ssl",
        "False",
        "--type",
        "Haproxy",
        "--security",
        "tls",
        "--hello-timeout",
        "20",
        *args,
        ports=4,
    )


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[tuple[Gateway, Gateway, CertSet]]:
    certs = make_certs(tmp_path / "pki")
    options = certs.extra()  # tls_cert, tls_key, tls_ca, tls_server_name
    cons_config = tmp_path / "cons.toml"
    cons_config.write_text(
        "[s2cs]\nhello_timeout = 20\n\n[backend_options]\n"
        + "".join(f'{key} = "{value}"\n' for key, value in options.items())
    )
    started: list[Gateway] = []
    try:
        prod_args = [x for key, value in options.items() for x in ("--backend-option", f"{key}={value}")]
        started.append(start_haproxy_s2cs(tmp_path, "prod", *prod_args))
        started.append(start_haproxy_s2cs(tmp_path, "cons", "--config", str(cons_config)))
        yield started[0], started[1], certs
    finally:
        for g in started:
            stop_s2cs(g.proc)
        for g in started:
            text = g.log.read_text(errors="replace")
            assert g.proc.returncode == 0 and "Traceback" not in text, text[-3000:]


def establish(prod: Any, cons: Any, uid: str, app: str) -> tuple[Any, Any]:
    """The s2uc flow: PROD req + hello + update, then CONS req + hello + update with the key."""
    fut = prod.req.future(pb.Request(uid=uid, role="PROD", num_conn=1, rate=10000), timeout=20)
    prod.hello(pb.Hello(uid=uid, prod_listeners=[app], role="PROD"), timeout=10)
    p = fut.result()
    prod.update(pb.UpdateTargets(uid=uid, remote_listeners=list(p.prod_listeners), role="PROD"), timeout=20)
    fut = cons.req.future(pb.Request(uid=uid, role="CONS", num_conn=1, rate=10000), timeout=20)
    cons.hello(pb.Hello(uid=uid, role="PROD"), timeout=10)
    c = fut.result()
    cons.update(
        pb.UpdateTargets(uid=uid, remote_listeners=list(p.listeners), session_key=p.session_key), timeout=20
    )
    return p, c


def test_haproxy_tls_pair_configured_by_backend_options(gateways: tuple[Gateway, Gateway, CertSet]) -> None:
    prod_gw, cons_gw, _certs = gateways
    server = DuplexServer(send_bytes=SIZE, seed=41, expect_bytes=SIZE)
    uid = "opts-" + os.urandom(4).hex()
    with (
        contextlib.closing(server),
        grpc.insecure_channel(prod_gw.address) as pch,
        grpc.insecure_channel(cons_gw.address) as cch,
    ):
        prod, cons = scistream_pb2_grpc.ControlStub(pch), scistream_pb2_grpc.ControlStub(cch)
        p, c = establish(prod, cons, uid, server.address)
        assert p.security == "tls"

        _, got = duplex_transfer(c.listeners[0], send_bytes=SIZE, seed=42, expect=SIZE)
        assert got == (SIZE, pattern_digest(SIZE, 41)), "bytes from the producer differ"
        assert wait_for(lambda: len(server.received) >= 1, 10), "the producer saw no connection"
        assert server.received[-1] == (SIZE, pattern_digest(SIZE, 42)), "bytes to the producer differ"
        assert not server.errors
        status = prod.status(pb.StatusRequest(uid=uid), timeout=5).sessions[0]
        assert status.backend == "haproxy" and status.security == "tls"

        # The WAN listener speaks TLS only: a plaintext client never reaches the producer.
        accepted = server.accepted
        host, port = p.listeners[0].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            raw.sendall(b"GET / HTTP/1.0\r\n\r\n")
            raw.settimeout(5)
            with contextlib.suppress(ConnectionError, TimeoutError):
                reply = raw.recv(100)
                assert not reply or reply[0] == 0x15, reply  # nothing, or a TLS alert record
        assert server.accepted == accepted

        for stub in (cons, prod):
            stub.release(pb.Release(uid=uid), timeout=10)
