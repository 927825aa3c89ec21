"""s2uc and appctrl given the nodes of one gateway (``--s2cs A,B,C``, issue 12): a call goes
to the first node and, while one answers UNAVAILABLE (unreachable, or the s2cs's own
UNAVAILABLE sentence), to the next; any other answer is final; the error names what every
node tried answered. In-test control servers, real gRPC over loopback."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner, Result
from fake_s2cs import FakeS2cs, FakeSession, Running, serve

from scistream._proto import scistream_pb2 as pb
from scistream._proto import scistream_pb2_grpc as pb_grpc
from scistream.appctrl.cli import main as appctrl_main
from scistream.appctrl.controller import AppController, ReadySession
from scistream.certs import make_self_signed
from scistream.grpcutil import ControlError, ExitCode, check_addresses
from scistream.s2uc import flows
from scistream.s2uc.cli import main as s2uc_main
from scistream.s2uc.store import SessionStore

pytestmark = pytest.mark.timeout(60)
UID = "failover-1"
NO_QUORUM = "the gateway's etcd has no quorum: try again in a moment"


class Unavailable(FakeS2cs):
    """A node that is up but cannot serve (its etcd lost quorum): UNAVAILABLE to everything."""

    def _enter(self, name: str, request: Any, context: grpc.ServicerContext) -> None:
        super()._enter(name, request, context)
        context.abort(grpc.StatusCode.UNAVAILABLE, NO_QUORUM)

    def server_info(self, request: pb.ServerInfoRequest, context: grpc.ServicerContext) -> pb.ServerInfo:
        self._enter("server_info", request, context)
        raise AssertionError("unreachable")

    def status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        self._enter("status", request, context)
        raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_self_signed(tmp_path_factory.mktemp("pki"), ["127.0.0.1"], ["localhost"])


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SCISTREAM_HOME", str(tmp_path / "home"))
    for var in ("SCISTREAM_S2UC_S2CS", "SCISTREAM_S2UC_SCOPE", "SCISTREAM_S2UC_CONFIG",
                "SCISTREAM_S2UC_SERVER_CERT", "SCISTREAM_APPCTRL_SERVER_CERT"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "home"


@pytest.fixture
def good(pki: tuple[Path, Path]) -> Iterator[Running]:
    with serve(FakeS2cs(), cert=pki[0], key=pki[1], events=True) as r:
        yield r


@pytest.fixture
def other(pki: tuple[Path, Path]) -> Iterator[Running]:
    with serve(FakeS2cs(first_port=6100), cert=pki[0], key=pki[1]) as r:
        yield r


@pytest.fixture
def busy(pki: tuple[Path, Path]) -> Iterator[Running]:
    with serve(Unavailable(), cert=pki[0], key=pki[1]) as r:
        yield r


def dead_address() -> str:
    """A loopback port nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def s2uc(*args: str) -> Result:
    return CliRunner().invoke(s2uc_main, list(args), catch_exceptions=False)


def appctrl(*args: str) -> Result:
    return CliRunner().invoke(appctrl_main, list(args), catch_exceptions=False)


def error_line(r: Result) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.output
    assert "Traceback" not in r.output
    return lines[0]


def inbound(cert: Path | None, s2cs: str) -> Result:
    return s2uc("inbound-request", "--server_cert", str(cert), "--s2cs", s2cs, "--remote_ip", "127.0.0.1",
                "--receiver_ports", "7000", "--num_conn", "2", "--timeout", "10")  # fmt: skip


def names(r: Running) -> list[str]:
    return [n for n, _, _ in r.fake.calls]


# ---------------------------------------------------------------- s2uc


def test_first_node_dead_the_second_serves_the_whole_req(good: Running) -> None:
    dead = dead_address()
    r = inbound(good.cert, f"{dead},{good.address}")
    assert r.exit_code == 0, r.output
    assert 'listeners: "127.0.0.1:5100"' in r.stdout
    assert names(good)[:1] == ["req"] and {"hello", "update"} <= set(names(good))
    # The session is remembered with every node, so status and release fail over too.
    (record,) = SessionStore().all()
    assert record.sides == {"PROD": f"{dead},{good.address}"}
    r = s2uc("check-status", record.uid, "--server_cert", str(good.cert), "--s2cs", f"{dead},{good.address}")
    assert r.exit_code == 0, r.output
    assert record.uid in r.stdout
    r = s2uc("release", record.uid, "--server_cert", str(good.cert))
    assert r.exit_code == 0, r.output
    assert f"Release completed: {record.uid} on {dead},{good.address}" in r.stdout
    assert good.fake.sessions == {}


def test_first_node_unavailable_the_second_serves(busy: Running, good: Running) -> None:
    r = inbound(good.cert, f"{busy.address},{good.address}")
    assert r.exit_code == 0, r.output
    assert names(busy) == ["req"], "only the req went to the node that could not serve it"
    assert names(good)[0] == "req" and "update" in names(good)
    assert not busy.fake.calls_of("hello"), "no hello may follow a refused req"


def test_not_found_is_final(good: Running, other: Running) -> None:
    r = s2uc("check-status", "no-such-uid", "--server_cert", str(good.cert),
             "--s2cs", f"{good.address},{other.address}")  # fmt: skip
    assert r.exit_code == ExitCode.NOT_FOUND
    assert error_line(r) == f"s2uc: error: s2cs at {good.address}: no session 'no-such-uid'"
    assert other.fake.calls == [], "a NOT_FOUND is an answer: the next node is not asked"


def test_not_found_after_a_failover_names_both_answers(busy: Running, good: Running) -> None:
    r = s2uc(
        "release", "no-such-uid", "--server_cert", str(good.cert), "--s2cs", f"{busy.address},{good.address}"
    )
    assert r.exit_code == ExitCode.NOT_FOUND
    line = error_line(r)
    assert f"s2cs at {good.address}: release request invalid, entry not found" in line
    assert f"(after s2cs at {busy.address} cannot serve release now: {NO_QUORUM})" in line


def test_all_nodes_dead_one_error_naming_each(pki: tuple[Path, Path]) -> None:
    a, b, c = dead_address(), dead_address(), dead_address()
    started = time.monotonic()
    r = s2uc("list", "--server_cert", str(pki[0]), "--s2cs", f"{a},{b},{c}")
    assert time.monotonic() - started < 20
    assert r.exit_code == ExitCode.UNREACHABLE
    line = error_line(r)
    assert line.startswith(f"s2uc: error: no s2cs of {a}, {b}, {c} could serve status: ")
    for address in (a, b, c):
        assert f"cannot reach s2cs at {address}: connection refused" in line


def test_mixed_failures_name_each_and_exit_as_a_failure(busy: Running, pki: tuple[Path, Path]) -> None:
    dead = dead_address()
    r = s2uc("list", "--server_cert", str(pki[0]), "--s2cs", f"{dead},{busy.address}")
    assert r.exit_code == ExitCode.FAILURE
    line = error_line(r)
    assert f"cannot reach s2cs at {dead}: connection refused" in line
    assert f"s2cs at {busy.address} cannot serve status now: {NO_QUORUM}" in line


def test_already_exists_after_a_lost_node_says_the_first_may_have_made_it(good: Running) -> None:
    good.fake.sessions[UID] = FakeSession(uid=UID, role="PROD")
    dead = dead_address()
    target = flows.Target(address=f"{dead},{good.address}", server_cert=str(good.cert), timeout=10)
    with pytest.raises(ControlError) as err:
        flows.producer_side(target, UID, num_conn=1, rate=0, hello_endpoints=["127.0.0.1:7000"],
                            progress=lambda _: None)  # fmt: skip
    message = err.value.message
    assert (
        f"s2cs at {good.address} failed req (already exists): a session with uid '{UID}' already exists"
        in message
    )
    assert f"the same req went to {dead} first, which may have created this session" in message
    assert f"`s2uc check-status {UID}`" in message and f"`s2uc release {UID}`" in message


def test_already_exists_without_a_failover_is_unchanged(good: Running) -> None:
    good.fake.sessions[UID] = FakeSession(uid=UID, role="PROD")
    target = flows.Target(address=good.address, server_cert=str(good.cert), timeout=10)
    with pytest.raises(ControlError) as err:
        flows.producer_side(target, UID, num_conn=1, rate=0, hello_endpoints=None, progress=lambda _: None)
    assert err.value.message == (
        f"s2cs at {good.address} failed req (already exists): a session with uid '{UID}' already exists"
    )


def test_each_address_is_checked_before_anything_is_sent(good: Running) -> None:
    r = s2uc("list", "--server_cert", str(good.cert), "--s2cs", f"{good.address},not a host:1")
    assert r.exit_code == ExitCode.USAGE
    assert error_line(r).startswith("s2uc: error: s2cs address: ")
    assert good.fake.calls == []
    assert check_addresses(f" {good.address} , {good.address}") == [good.address]
    assert check_addresses(good.address) == [good.address]


def test_release_takes_one_gateway_per_s2cs_option(busy: Running, good: Running, other: Running) -> None:
    for fake in (good.fake, other.fake):
        fake.sessions[UID] = FakeSession(uid=UID, role="PROD")
    r = s2uc("release", UID, "--server_cert", str(good.cert),
             "--s2cs", f"{busy.address},{good.address}", "--s2cs", other.address)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert good.fake.sessions == {} and other.fake.sessions == {}


# ---------------------------------------------------------------- appctrl


def req_in_background(r: Running, role: str = "PROD", update: bool = True) -> threading.Thread:
    """The s2uc side on ``r``: req (waits for the hello), then update."""

    def run() -> None:
        assert r.cert is not None
        ch = grpc.secure_channel(r.address, grpc.ssl_channel_credentials(r.cert.read_bytes()))
        s = pb_grpc.ControlStub(ch)
        s.req(pb.Request(uid=UID, role=role, num_conn=1), timeout=20)
        if update:
            time.sleep(0.3)
            s.update(pb.UpdateTargets(uid=UID, remote_listeners=["127.0.0.1:7000"], role=role), timeout=5)
        ch.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_appctrl_library_skips_a_dead_node_and_reads_the_answering_nodes_events(good: Running) -> None:
    t = req_in_background(good)
    dead = dead_address()

    async def go() -> tuple[ReadySession, str, bool]:
        async with AppController(f"{dead},{good.address}", UID, server_cert=good.cert) as ctl:
            await ctl.hello(["127.0.0.1:7000"])
            return await ctl.wait_ready(timeout=10), ctl.address, ctl._sub is not None

    session, address, subscribed = asyncio.run(go())
    t.join(10)
    assert session.state == "ready" and session.listeners == ["127.0.0.1:5100"]
    assert address == good.address and subscribed
    assert "server_info" in names(good)


def test_appctrl_mock_fails_over_from_an_unavailable_node(busy: Running, good: Running) -> None:
    t = req_in_background(good, update=False)
    time.sleep(0.2)
    r = appctrl("mock", UID, f"{busy.address},{good.address}", "INVALID_TOKEN", "PROD", "127.0.0.1",
                "--ports", "7000", "--server-cert", str(good.cert))  # fmt: skip
    t.join(10)
    assert r.exit_code == 0, r.output
    assert "Hello message sent successfully" in r.stdout
    assert names(busy) == ["server_info"], "the node that cannot serve got nothing more"
    assert good.fake.calls_of("hello")


def test_appctrl_release_not_found_is_final(good: Running, other: Running) -> None:
    async def go() -> None:
        async with AppController(f"{good.address},{other.address}", UID, server_cert=good.cert) as ctl:
            await ctl.release()

    with pytest.raises(ControlError) as err:
        asyncio.run(go())
    assert err.value.exit_code == ExitCode.NOT_FOUND and err.value.address == good.address
    assert other.fake.calls == []


def test_appctrl_all_nodes_dead_one_line_naming_each(pki: tuple[Path, Path]) -> None:
    a, b = dead_address(), dead_address()
    r = appctrl("mock", UID, f"{a},{b}", "INVALID_TOKEN", "PROD", "10.0.0.1",
                "--server-cert", str(pki[0]), "--timeout", "5")  # fmt: skip
    assert r.exit_code == ExitCode.UNREACHABLE
    line = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(line) == 1 and "Traceback" not in r.output
    assert line[0].startswith(f"appctrl: error: no s2cs of {a}, {b} could serve server_info: ")
    assert f"cannot reach s2cs at {a}: connection refused" in line[0]
    assert f"cannot reach s2cs at {b}: connection refused" in line[0]
