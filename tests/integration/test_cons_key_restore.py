"""A CONS session whose key came with its update survives an s2cs restart that must
re-apply its routes (issue 14, item 5).

The CONS side has no key at req: the key arrives in update, so it reaches the store only
through the store's update path (the upsert of an existing row). When the s2ds is gone too,
the restarted s2cs re-applies the session from the store alone; dropping the key on that
path left the re-applied route without a key, and no test noticed. Here both gateways
(native backend, real s2cs and s2ds processes) are stopped with their s2ds, restarted on
the same state, and a stream must then cross the re-applied routes; the producer gateway's
listener refuses a client without the key or with a wrong one, so bytes arriving prove the
re-applied CONS route holds the key.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from streams import Served, StreamServer, connect, recv_stream, send_stream

from scistream._proto import scistream_pb2 as pb
from scistream._proto import scistream_pb2_grpc
from scistream.dataplane import native_available
from scistream.demo import free_port_range
from scistream.netns import stop_process
from scistream.s2cs.backends.native import stop_spawned_s2ds

pytestmark = [
    pytest.mark.skipif(not native_available(), reason="TLS PSK on the data channel needs the native engine"),
    pytest.mark.timeout(120),
]

SIZE = 1 << 20
SEED = 0x4E57


class Gateway:
    """One s2cs process (native backend, s2ds spawned in its state dir) that can be stopped
    with its s2ds and started again on the same state and port range."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.state = workdir / f"state-{name}"
        self.log = workdir / f"{name}.log"
        self.ports = free_port_range(4)
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""

    def start(self) -> None:
        lo, hi = self.ports
        offset = self.log.stat().st_size if self.log.exists() else 0
        env = {k: v for k, v in os.environ.items() if not k.startswith("SCISTREAM_")}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "scistream.s2cs", "--port", "0", "--bind", "127.0.0.1",
                 "--ssl", "False", "--listener-ip", "127.0.0.1", "--port-range", f"{lo}-{hi}",
                 "--state-dir", str(self.state), "--type", "native", "--events", "off"],
                stdout=out, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = self.log.read_bytes()[offset:].decode(errors="replace")
            if m := re.search(r"listening on 127\.0\.0\.1:(\d+)", text):
                self.address = f"127.0.0.1:{m.group(1)}"
                return
            assert self.proc.poll() is None, text[-3000:]
            time.sleep(0.05)
        raise AssertionError(f"s2cs did not start: {self.log.read_text(errors='replace')[-3000:]}")

    def stop_with_s2ds(self) -> None:
        """s2cs exits (routes outlive it by design), then its s2ds: nothing is left running,
        so a restart must rebuild every route from the store."""
        if self.proc is not None:
            stop_process(self.proc, timeout=15)
        stop_spawned_s2ds(str(self.state))

    def stub(self, stack: contextlib.ExitStack) -> Any:
        return scistream_pb2_grpc.ControlStub(stack.enter_context(grpc.insecure_channel(self.address)))


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[tuple[Gateway, Gateway]]:
    prod, cons = Gateway(tmp_path, "prod"), Gateway(tmp_path, "cons")
    try:
        prod.start()
        cons.start()
        yield prod, cons
    finally:
        for gw in (prod, cons):
            gw.stop_with_s2ds()
        for gw in (prod, cons):
            assert "Traceback" not in gw.log.read_text(errors="replace")


def producer_app() -> StreamServer:
    def handler(sock: socket.socket, served: Served) -> None:
        served.results["sent"] = send_stream(sock, SIZE, SEED)

    return StreamServer(handler)


def fetch(endpoint: str) -> tuple[int, str]:
    with connect(endpoint, timeout=15) as sock:
        sock.settimeout(15)
        return recv_stream(sock)


def s_client(address: str, *args: str) -> bytes:
    res = subprocess.run(["openssl", "s_client", "-connect", address, "-quiet", "-tls1_3",
                          "-ciphersuites", "TLS_AES_128_GCM_SHA256", *args],
                         input=b"", capture_output=True, timeout=20, check=False)
    return res.stdout


def test_cons_key_from_update_survives_restart_with_reapplied_routes(
        gateways: tuple[Gateway, Gateway]) -> None:
    prod_gw, cons_gw = gateways
    app = producer_app()
    try:
        uid = f"restore-{os.getpid()}-{time.monotonic_ns()}"
        with contextlib.ExitStack() as stack:
            prod, cons = prod_gw.stub(stack), cons_gw.stub(stack)
            fut = prod.req.future(pb.Request(uid=uid, role="PROD", num_conn=1), timeout=30)
            prod.hello(pb.Hello(uid=uid, prod_listeners=[app.address], role="PROD"), timeout=10)
            p = fut.result()
            prod.update(pb.UpdateTargets(uid=uid, remote_listeners=list(p.prod_listeners)), timeout=30)
            assert len(p.session_key) == 32, "the producer s2cs returned no per-session key"
            fut = cons.req.future(pb.Request(uid=uid, role="CONS", num_conn=1), timeout=30)
            cons.hello(pb.Hello(uid=uid, role="PROD"), timeout=10)
            c = fut.result()
            # The key reaches the CONS side only here, in update.
            cons.update(pb.UpdateTargets(uid=uid, remote_listeners=list(p.listeners),
                                         session_key=p.session_key), timeout=30)
        before = fetch(c.listeners[0])
        assert before[0] == SIZE

        for gw in (cons_gw, prod_gw):
            gw.stop_with_s2ds()
        with contextlib.suppress(OSError), connect(c.listeners[0], timeout=2):
            pytest.fail("a route is still up with both s2ds stopped: nothing would be re-applied")
        for gw in (prod_gw, cons_gw):
            gw.start()

        with contextlib.ExitStack() as stack:
            for gw, role in ((prod_gw, "PROD"), (cons_gw, "CONS")):
                try:
                    listed = gw.stub(stack).status(pb.StatusRequest(uid=uid), timeout=10).sessions
                except grpc.RpcError as exc:
                    pytest.fail(f"the {role} session did not survive the restart ({exc.details()}): "
                                f"{gw.log.read_text(errors='replace')[-1500:]}")
                assert [(s.uid, s.role, s.security) for s in listed] == [(uid, role, "tls")]
                assert listed[0].state in ("ready", "active"), listed[0]
        assert "routes re-applied after restart" in cons_gw.log.read_text(errors="replace")

        # The stream crosses the re-applied routes, TLS and all: the CONS route has the key.
        assert fetch(c.listeners[0]) == before
        # ... and the producer's listener does check it: without the key, or with a wrong
        # one, not a byte of the producer's stream comes out.
        if shutil.which("openssl"):
            assert s_client(p.listeners[0]) == b""
            assert s_client(p.listeners[0], "-psk_identity", uid, "-psk", os.urandom(32).hex()) == b""
        with connect(p.listeners[0], timeout=5) as raw:
            raw.settimeout(5)
            with contextlib.suppress(OSError):
                raw.sendall(b"\x16\x03\x01 plain bytes, not a TLS client hello\n")
            got = b""
            with contextlib.suppress(OSError):
                while data := raw.recv(65536):
                    got += data
            assert len(got) < 64, "a plain client read the producer's stream"
        with contextlib.ExitStack() as stack:
            for gw in (cons_gw, prod_gw):
                gw.stub(stack).release(pb.Release(uid=uid), timeout=10)
    finally:
        app.close()
