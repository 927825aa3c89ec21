"""RELIABILITY 16: s2cs killed -9 mid-stream. A 2 GiB TLS stream through a PROD and a CONS
native gateway keeps flowing while both control servers are dead, no byte is lost, and the
restarted s2cs list the session and release it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from s2cs_support import Consumer, Producer, establish, free_range, new_uid

from scistream._proto import scistream_pb2 as pb
from scistream._proto import scistream_pb2_grpc
from scistream.dataplane import native_available
from scistream.s2cs.backends.native import stop_spawned_s2ds

pytestmark = [
    pytest.mark.skipif(not native_available(), reason="the native engine is not built"),
    pytest.mark.slow,
]

TOTAL = 2 << 30
RATE = 400 * 1000 * 1000  # bytes/s: the stream lasts ~5 s, long enough to kill s2cs inside it


class S2CS:
    def __init__(self, state: Path, port_range: tuple[int, int]) -> None:
        self.state = state
        self.port_range = port_range
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log = state.parent / f"{state.name}.log"

    def start(self) -> None:
        lo, hi = self.port_range
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "scistream.s2cs", "--port", "0", "--bind", "127.0.0.1",
                 "--ssl", "False", "--listener-ip", "127.0.0.1", "--port-range", f"{lo}-{hi}",
                 "--state-dir", str(self.state), "--type", "native"],
                stdout=subprocess.DEVNULL, stderr=log, cwd=self.state.parent,
            )  # fmt: skip
        deadline = time.time() + 30
        while time.time() < deadline:
            text = self.log.read_bytes()[offset:].decode(errors="replace")
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", text)
            if m:
                self.port = int(m.group(1))
                return
            assert self.proc.poll() is None, text
            time.sleep(0.05)
        raise AssertionError(f"s2cs did not start: {self.log.read_text()}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def stub(self, stack: contextlib.ExitStack) -> Any:
        ch = stack.enter_context(grpc.insecure_channel(f"127.0.0.1:{self.port}"))
        return scistream_pb2_grpc.ControlStub(ch)


def test_kill9_mid_stream(tmp_path: Path) -> None:
    prod_gw = S2CS(tmp_path / "prod", free_range(10))
    cons_gw = S2CS(tmp_path / "cons", free_range(10))
    app: Producer | None = None
    consumer: Consumer | None = None
    try:
        prod_gw.start()
        cons_gw.start()
        app = Producer(TOTAL)
        uid = new_uid()
        with contextlib.ExitStack() as stack:
            prod, cons = prod_gw.stub(stack), cons_gw.stub(stack)
            _, c = establish(prod, cons, uid, app.port, RATE)
        consumer = Consumer(c.listeners[0], timeout=120)
        deadline = time.time() + 30
        while consumer.received < (64 << 20) and time.time() < deadline:
            time.sleep(0.01)
        assert consumer.received >= (64 << 20), "the stream did not start"
        prod_gw.kill9()
        cons_gw.kill9()
        before = consumer.received
        time.sleep(0.5)
        assert consumer.received > before or consumer.received == TOTAL  # still flowing with no s2cs
        killed_at = consumer.received
        prod_gw.start()
        cons_gw.start()
        with contextlib.ExitStack() as stack:
            prod, cons = prod_gw.stub(stack), cons_gw.stub(stack)
            for stub, role in ((prod, "PROD"), (cons, "CONS")):
                listed = stub.status(pb.StatusRequest(), timeout=10).sessions
                assert [(s.uid, s.role) for s in listed] == [(uid, role)]
                assert listed[0].state in ("ready", "active")
            consumer.join(120)
            (served,) = app.wait_served(1, timeout=10)
            assert served.error is None and consumer.error is None
            assert consumer.received == TOTAL and consumer.sha == served.results["sent"]
            assert killed_at < TOTAL, "the stream ended before s2cs was killed; nothing was proven"
            for stub in (cons, prod):
                stub.release(pb.Release(uid=uid), timeout=10)
                with pytest.raises(grpc.RpcError) as info:
                    stub.status(pb.StatusRequest(uid=uid), timeout=10)
                assert info.value.code() is grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
        for gw in (prod_gw, cons_gw):
            assert "Traceback" not in gw.log.read_text()
    finally:
        for gw in (prod_gw, cons_gw):
            gw.stop()
            stop_spawned_s2ds(str(gw.state))
        if consumer is not None:
            with contextlib.suppress(OSError):
                consumer.sock.close()
        if app is not None:
            app.close()
        assert not os.path.exists(tmp_path / "app.log")
