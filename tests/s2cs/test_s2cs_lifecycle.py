"""s2cs instances and their data plane over time, with real processes (issue 10, items 3-6).

* Several s2cs on one host with default options: a state directory each (keyed by the
  control port), a second s2cs on a directory in use is refused with the holder's pid, and
  an s2ds shared by two s2cs keeps each one's routes apart.
* The s2ds an s2cs spawned stops with it when it carries nothing; an idle s2ds exits.
* kill -9 of s2ds mid-stream: s2cs notices, says so (status, events, health), starts a new
  one, re-applies the session; bytes flow again (SHA-256).
* A lost (0-byte) store is refused at startup with the routes left alone; --fresh-state
  starts and lists the routes as orphaned, and they can be released.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import zmq
from grpc_health.v1 import health_pb2, health_pb2_grpc
from s2cs_support import PRODUCER_SEED, Consumer, Producer, establish, free_range, new_uid
from streams import pattern_digest, wait_for

from scistream._proto import scistream_pb2 as pb
from scistream._proto import scistream_pb2_grpc
from scistream.dataplane import native_available
from scistream.events import SessionEvent, topic_for
from scistream.s2cs.backends.native import stop_spawned_s2ds
from scistream.s2ds.client import S2dsClient

pytestmark = pytest.mark.skipif(not native_available(), reason="the native engine is not built")

BIN = Path(sys.executable).parent
TOTAL = 8 << 20


class Gateway:
    """One s2cs process (plaintext control channel, native backend) on 127.0.0.1."""

    def __init__(self, workdir: Path, name: str, *, port: int = 0, state_dir: Path | None = None) -> None:
        self.workdir = workdir
        self.name = name
        self.port = port
        self.state_dir = state_dir
        self.port_range = free_range(10)
        self.log = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""

    def argv(self, *extra: str) -> list[str]:
        lo, hi = self.port_range
        argv = [sys.executable, "-m", "scistream.s2cs", "--port", str(self.port), "--bind", "127.0.0.1",
                "--ssl", "False", "--listener-ip", "127.0.0.1", "--port-range", f"{lo}-{hi}",
                "--type", "native", "--hello-timeout", "20", *extra]  # fmt: skip
        if self.state_dir is not None:
            argv += ["--state-dir", str(self.state_dir)]
        return argv

    def start(self, *extra: str, prefix: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [*prefix, *self.argv(*extra)], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.workdir
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = self.log.read_bytes()[offset:].decode(errors="replace")
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", text)
            if m:
                self.address = f"127.0.0.1:{m.group(1)}"
                return
            assert self.proc.poll() is None, f"s2cs {self.name} exited: {text[-3000:]}"
            time.sleep(0.05)
        raise AssertionError(f"s2cs {self.name} did not start: {self.log.read_text()[-3000:]}")

    def run_refused(self, *extra: str) -> subprocess.CompletedProcess[str]:
        """Start it expecting a refusal: the finished process."""
        return subprocess.run(
            self.argv(*extra), check=False, capture_output=True, text=True, timeout=60, cwd=self.workdir
        )

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def stub(self, stack: contextlib.ExitStack) -> Any:
        ch = stack.enter_context(grpc.insecure_channel(self.address))
        return scistream_pb2_grpc.ControlStub(ch)

    def s2ds_pid(self) -> int:
        assert self.state_dir is not None
        return int((self.state_dir / "s2ds.pid").read_text())


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def stream_sha(endpoint: str, total: int = TOTAL) -> str:
    consumer = Consumer(endpoint, timeout=60)
    consumer.join(60)
    assert consumer.error is None and consumer.received == total, (consumer.error, consumer.received)
    return consumer.sha


def s2ds_routes(address: str) -> list[Any]:
    async def ask() -> list[Any]:
        async with S2dsClient(address) as client:
            return await client.routes()

    return asyncio.run(ask())


@pytest.fixture
def producer() -> Iterator[Producer]:
    app = Producer(TOTAL)
    yield app
    app.close()


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[list[Gateway]]:
    """Gateways a test starts; stopped, with the s2ds they spawned, at teardown."""
    started: list[Gateway] = []
    yield started
    for gw in reversed(started):
        gw.stop()
        if gw.state_dir is not None:
            stop_spawned_s2ds(str(gw.state_dir))


# ---------------------------------------------------------------- item 3: instances


@pytest.mark.skipif(os.geteuid() != 0, reason="a private /var/lib needs root (mount namespace)")
@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare (util-linux) is not installed")
def test_two_s2cs_with_default_state_dirs_carry_one_uid_both_ways(
    tmp_path: Path, free_port: Any, producer: Producer, gateways: list[Gateway]
) -> None:
    # Default options, as root: each s2cs picks /var/lib/scistream/<port>. A private mount
    # namespace puts a temp dir at /var/lib, so the host's is never touched.
    varlib = tmp_path / "varlib"
    varlib.mkdir()
    prefix = ("unshare", "--mount", "--propagation", "private", "sh", "-c",
              'mount --bind "$0" /var/lib && exec "$@"', str(varlib))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCISTREAM_")}
    env["HOME"] = str(tmp_path / "home")
    prod_gw = Gateway(tmp_path, "prod", port=free_port())
    cons_gw = Gateway(tmp_path, "cons", port=free_port())
    for gw in (prod_gw, cons_gw):
        gateways.append(gw)
        gw.start(prefix=prefix, env=env)
        gw.state_dir = varlib / "scistream" / str(gw.port)
        assert gw.proc is not None
        assert (gw.state_dir / "s2cs.lock").read_text().strip() == str(gw.proc.pid)
        assert (gw.state_dir / "s2ds.sock").exists() and (gw.state_dir / "s2cs.db").exists()
    uid = new_uid()  # one uid for both sides, as the tutorials use it
    with contextlib.ExitStack() as stack:
        _, c = establish(prod_gw.stub(stack), cons_gw.stub(stack), uid, producer.port)
        assert stream_sha(c.listeners[0]) == pattern_digest(TOTAL, PRODUCER_SEED)
        assert prod_gw.s2ds_pid() != cons_gw.s2ds_pid()  # an s2ds each
        # A second s2cs on a state directory in use is refused, naming the holder.
        again = Gateway(tmp_path, "again", state_dir=prod_gw.state_dir).run_refused()
        assert again.returncode == 1
        assert f"in use by another s2cs (pid {prod_gw.proc.pid})" in again.stderr  # type: ignore[union-attr]
        assert "Traceback" not in again.stderr
        for stub in (prod_gw.stub(stack), cons_gw.stub(stack)):
            stub.release(pb.Release(uid=uid), timeout=10)
    for gw in (prod_gw, cons_gw):
        assert gw.stop() == 0


def test_two_s2cs_sharing_one_s2ds_keep_their_routes_apart(
    tmp_path: Path, spawn: Any, producer: Producer, gateways: list[Gateway]
) -> None:
    control = f"ipc://{tmp_path / 'shared.sock'}"
    daemon = spawn([str(BIN / "s2ds"), "serve", "--control", control], stderr=subprocess.DEVNULL)
    wait_for((tmp_path / "shared.sock").exists, 20)
    prod_gw = Gateway(tmp_path, "prod", state_dir=tmp_path / "prod")
    cons_gw = Gateway(tmp_path, "cons", state_dir=tmp_path / "cons")
    for gw in (prod_gw, cons_gw):
        gateways.append(gw)
        gw.start("--s2ds", control)
    uid = new_uid()
    with contextlib.ExitStack() as stack:
        prod, cons = prod_gw.stub(stack), cons_gw.stub(stack)
        _, c = establish(prod, cons, uid, producer.port)
        routes = s2ds_routes(control)
        assert len(routes) == 2 and {r.route.labels["uid"] for r in routes} == {uid}
        assert len({r.route.labels["s2cs"] for r in routes}) == 2  # one instance each
        assert stream_sha(c.listeners[0]) == pattern_digest(TOTAL, PRODUCER_SEED)
    # A restarted PROD s2cs reconciles its own routes only: CONS's stay, and the pair works.
    assert prod_gw.stop() == 0
    prod_gw.start("--s2ds", control)
    with contextlib.ExitStack() as stack:
        prod, cons = prod_gw.stub(stack), cons_gw.stub(stack)
        for stub, role in ((prod, "PROD"), (cons, "CONS")):
            (s,) = stub.status(pb.StatusRequest(), timeout=10).sessions
            assert (s.uid, s.role, s.state) in ((uid, role, "ready"), (uid, role, "active"))
        assert len(s2ds_routes(control)) == 2
        assert stream_sha(c.listeners[0]) == pattern_digest(TOTAL, PRODUCER_SEED)
        cons.release(pb.Release(uid=uid), timeout=10)
        (left,) = s2ds_routes(control)
        assert left.route.labels["role"] == "PROD"
        prod.release(pb.Release(uid=uid), timeout=10)
    assert s2ds_routes(control) == []
    for gw in (prod_gw, cons_gw):
        assert gw.stop() == 0
    assert daemon.poll() is None  # not spawned by either s2cs: neither stops it


# ---------------------------------------------------------------- item 4: s2ds lifecycle


def test_spawned_s2ds_stops_with_its_idle_s2cs_and_stays_under_a_live_session(
    tmp_path: Path, producer: Producer, gateways: list[Gateway]
) -> None:
    gw = Gateway(tmp_path, "gw", state_dir=tmp_path / "gw")
    gateways.append(gw)
    gw.start()
    first = gw.s2ds_pid()
    assert gw.stop() == 0
    assert wait_for(lambda: not alive(first), 10), "the idle s2ds outlived its s2cs"
    assert not (tmp_path / "gw" / "s2ds.pid").exists()
    # With a live session the daemon stays (streams outlive the control server) ...
    gw.start()
    second = gw.s2ds_pid()
    uid = new_uid()
    with contextlib.ExitStack() as stack:
        stub = gw.stub(stack)
        fut = stub.req.future(pb.Request(uid=uid, role="PROD", num_conn=1, security="plain"), timeout=30)
        stub.hello(pb.Hello(uid=uid, prod_listeners=[f"127.0.0.1:{producer.port}"], role="PROD"), timeout=10)
        listener = fut.result().listeners[0]
        stub.update(pb.UpdateTargets(uid=uid, remote_listeners=[f"127.0.0.1:{producer.port}"]), timeout=30)
    assert gw.stop() == 0
    time.sleep(1)
    assert alive(second)
    assert stream_sha(listener) == pattern_digest(TOTAL, PRODUCER_SEED)
    # ... and once the session is released, the next clean stop takes it down.
    gw.start()
    assert gw.s2ds_pid() == second
    with contextlib.ExitStack() as stack:
        gw.stub(stack).release(pb.Release(uid=uid), timeout=10)
    assert gw.stop() == 0
    assert wait_for(lambda: not alive(second), 10)


def test_idle_s2ds_exits_after_its_grace_period_but_never_with_a_route(tmp_path: Path, spawn: Any) -> None:
    control = f"ipc://{tmp_path / 'd.sock'}"
    t0 = time.monotonic()
    idle = spawn(
        [str(BIN / "s2ds"), "serve", "--control", control, "--idle-exit", "1"], stderr=subprocess.PIPE
    )
    assert idle.wait(20) == 0
    assert time.monotonic() - t0 >= 1.0
    assert "no route and no command for 1 s" in idle.stderr.read().decode()

    from scistream.dataplane import Route

    busy = spawn(
        [str(BIN / "s2ds"), "serve", "--control", control, "--idle-exit", "1"], stderr=subprocess.DEVNULL
    )

    async def add_then_wait_then_remove() -> None:
        async with S2dsClient(control, timeout=20) as client:
            await client.ping()
            await client.add_route(Route(route_id="r", listen="127.0.0.1:0", targets=("127.0.0.1:9",)))
        await asyncio.sleep(2.5)  # nobody speaks to it: a route keeps it alive
        assert busy.poll() is None
        async with S2dsClient(control) as client:
            await client.remove_route("r")

    asyncio.run(add_then_wait_then_remove())
    assert busy.wait(20) == 0  # nothing left to carry: gone after the grace period


def test_s2ds_of_a_killed_s2cs_exits_when_idle(tmp_path: Path, gateways: list[Gateway]) -> None:
    gw = Gateway(tmp_path, "gw", state_dir=tmp_path / "gw")
    gateways.append(gw)
    gw.start("--backend-option", "s2ds_args=--idle-exit 1")
    pid = gw.s2ds_pid()
    gw.stop(signal.SIGKILL)  # no clean stop: nobody stops the daemon, it notices alone
    assert wait_for(lambda: not alive(pid), 15)


# ---------------------------------------------------------------- item 5: s2ds killed


class HealthWatch:
    """Every status the health service reports, in order (gRPC health Watch)."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.seen: list[tuple[float, str]] = []
        self._call = health_pb2_grpc.HealthStub(self.channel).Watch(health_pb2.HealthCheckRequest(service=""))
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with contextlib.suppress(grpc.RpcError):
            for reply in self._call:
                self.seen.append(
                    (time.monotonic(), health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
                )

    def statuses(self) -> list[str]:
        return [s for _, s in self.seen]

    def close(self) -> None:
        self._call.cancel()
        self.channel.close()


def test_kill9_of_s2ds_mid_stream_is_noticed_reported_and_recovered(
    tmp_path: Path, producer: Producer, gateways: list[Gateway]
) -> None:
    prod_gw = Gateway(tmp_path, "prod", state_dir=tmp_path / "prod")
    cons_gw = Gateway(tmp_path, "cons", state_dir=tmp_path / "cons")
    for gw in (prod_gw, cons_gw):
        gateways.append(gw)
        gw.start()
    uid = new_uid()
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    watch = HealthWatch(prod_gw.address)
    try:
        with contextlib.ExitStack() as stack:
            prod, cons = prod_gw.stub(stack), cons_gw.stub(stack)
            sub.connect(prod.server_info(pb.ServerInfoRequest(), timeout=10).events)
            sub.setsockopt(zmq.SUBSCRIBE, topic_for(uid))
            # 8 MiB at 4 MB/s: the stream is in flight when the daemon dies.
            _, c = establish(prod, cons, uid, producer.port, rate_limit=4_000_000)
            consumer = Consumer(c.listeners[0], timeout=60)
            assert wait_for(lambda: consumer.received >= (1 << 20), 20), "the stream did not start"
            (before,) = prod.status(pb.StatusRequest(uid=uid), timeout=10).sessions
            assert before.connections_active == 1 and not before.error
            old = prod_gw.s2ds_pid()
            os.kill(old, signal.SIGKILL)
            killed = time.monotonic()
            consumer.join(30)
            assert consumer.received < TOTAL  # the connection was cut, not finished
            assert wait_for(lambda: "NOT_SERVING" in watch.statuses()[1:], 10)
            noticed = next(t for t, s in watch.seen[1:] if s == "NOT_SERVING") - killed
            assert noticed < 3.0, f"s2cs took {noticed:.2f} s to notice"
            assert wait_for(lambda: watch.statuses()[-1] == "SERVING" and len(watch.seen) >= 3, 30)
            new = prod_gw.s2ds_pid()
            assert new != old and alive(new)
            (after,) = prod.status(pb.StatusRequest(uid=uid), timeout=10).sessions
            assert f"s2ds pid {old}" in after.error and "1 connection(s) were cut" in after.error
            assert "re-applied" in after.error and after.state in ("ready", "active")
            events = []
            while sub.poll(2000):
                events.append(SessionEvent.decode(sub.recv_multipart()))
                if events[-1].event == "restored":
                    break
            kinds = [e.event for e in events]
            assert "broken" in kinds and kinds[-1] == "restored", kinds
            assert "connection(s) were cut" in next(e.error for e in events if e.event == "broken")
            # A new connection flows end to end through the re-applied routes.
            assert stream_sha(c.listeners[0]) == pattern_digest(TOTAL, PRODUCER_SEED)
            # A request after the recovery is answered at once (no stall behind a dead daemon).
            t0 = time.monotonic()
            prod.release(pb.Release(uid=uid), timeout=10)
            cons.release(pb.Release(uid=uid), timeout=10)
            assert time.monotonic() - t0 < 3.0
        assert watch.statuses()[:1] == ["SERVING"]
        print(f"s2ds kill -9 noticed after {noticed:.2f} s")  # the test's figure, shown with -s
    finally:
        watch.close()
        ctx.destroy(linger=0)
    for gw in (prod_gw, cons_gw):
        assert "Traceback" not in gw.log.read_text()


# ---------------------------------------------------------------- item 6: a lost store


def test_truncated_store_is_refused_and_fresh_state_adopts_orphans(
    tmp_path: Path, producer: Producer, gateways: list[Gateway]
) -> None:
    state = tmp_path / "gw"
    gw = Gateway(tmp_path, "gw", state_dir=state)
    gateways.append(gw)
    gw.start()
    uid = new_uid()
    control = f"ipc://{state / 's2ds.sock'}"
    with contextlib.ExitStack() as stack:
        stub = gw.stub(stack)
        fut = stub.req.future(pb.Request(uid=uid, role="PROD", num_conn=2, security="plain"), timeout=30)
        stub.hello(pb.Hello(uid=uid, prod_listeners=[f"127.0.0.1:{producer.port}"], role="PROD"), timeout=10)
        listeners = list(fut.result().listeners)
        stub.update(pb.UpdateTargets(uid=uid, remote_listeners=[f"127.0.0.1:{producer.port}"]), timeout=30)
    assert gw.stop() == 0  # a live session: s2ds and its routes stay
    routes = sorted((r.route.route_id, r.bound) for r in s2ds_routes(control))
    assert len(routes) == 2
    os.truncate(state / "s2cs.db", 0)

    refused = gw.run_refused()
    assert refused.returncode == 1, refused.stderr
    assert "s2cs.db is empty (0 bytes)" in refused.stderr and "--fresh-state" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert sorted((r.route.route_id, r.bound) for r in s2ds_routes(control)) == routes  # untouched
    assert stream_sha(listeners[0]) == pattern_digest(TOTAL, PRODUCER_SEED)

    gw.start("--fresh-state")
    assert list(state.glob("s2cs.db.bad-*")), "the bad store was not kept aside"
    s2uc = [str(BIN / "s2uc")]
    listed = subprocess.run(
        [*s2uc, "list", "--s2cs", gw.address, "--no-ssl", "--json"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    (entry,) = json.loads(listed.stdout)
    assert entry["uid"] == uid and entry["state"] == "orphaned"
    assert sorted(entry["listeners"]) == sorted(listeners)
    assert stream_sha(listeners[1]) == pattern_digest(TOTAL, PRODUCER_SEED)  # adopted, not removed
    released = subprocess.run(
        [*s2uc, "release", uid, "--s2cs", gw.address, "--no-ssl"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert released.returncode == 0, released.stdout + released.stderr
    assert s2ds_routes(control) == []
    assert gw.stop() == 0
