"""The session-events socket is private (issue 14 item 3).

Default: an ipc socket in the 0700 state directory, its file 0600 from the bind on;
a user other than the s2cs user (``nobody``, via setpriv) cannot even connect. A
tcp:// address is refused at startup without CURVE keys; with them, only a
subscriber whose public key is admitted receives anything.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from click.testing import CliRunner
from s2cs_support import new_uid, prod_flow

from scistream._proto import scistream_pb2 as pb
from scistream.appctrl.cli import main as appctrl_main
from scistream.appctrl.controller import AppController
from scistream.events import SessionEvent, topic_for
from scistream.s2cs.server import StartupError
from scistream.s2ds.keys import keygen, load_keypair, load_public

APP = ["127.0.0.1:5074"]

# Run as nobody with the system interpreter (the test's own may live under /root).
_CONNECT = """
import errno, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
    print("connected")
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e.errno)))
"""


def _as_nobody_connect(path: str) -> str:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a subscriber as another user")
    if not shutil.which("setpriv") or not os.path.exists("/usr/bin/python3"):
        pytest.skip("needs setpriv and /usr/bin/python3")
    nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    p = subprocess.run(
        [*nobody, "/usr/bin/python3", "-c", _CONNECT, path],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory any user may traverse (0755), unlike pytest's basetemp (0700): the
    nobody subscriber is then stopped by the socket's own protections, not by chance."""
    d = Path(tempfile.mkdtemp(prefix="ss-ev-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _sub(ctx: zmq.Context[Any], address: str, curve: tuple[bytes, tuple[bytes, bytes]] | None = None) -> Any:
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        sock.curve_serverkey = curve[0]
        sock.curve_publickey, sock.curve_secretkey = curve[1]
    sock.setsockopt(zmq.SUBSCRIBE, topic_for(None))
    sock.connect(address)
    return sock


def _drain(sock: Any, wait: float) -> list[SessionEvent]:
    got: list[SessionEvent] = []
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000)):
            got.append(SessionEvent.decode(sock.recv_multipart()))
    return got


def _joined(stub: Any, sub: Any, timeout: float = 10.0) -> None:
    """Run throwaway sessions until ``sub`` sees an event: its subscription (and CURVE
    handshake) is then live, whatever the machine's load."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        prod_flow(stub, new_uid(), APP)
        if _drain(sub, 0.3):
            return
    raise AssertionError("the subscriber never received an event")


def test_default_events_socket_is_private(s2cs_factory: Any, stub_for: Any, open_dir: Path) -> None:
    st = s2cs_factory(state_dir=str(open_dir / "state"))
    stub = stub_for(st)
    info = stub.server_info(pb.ServerInfoRequest(), timeout=5)
    path = str(open_dir / "state" / "events.sock")
    assert info.events == f"ipc://{path}"
    mode = os.lstat(path)
    assert stat.S_ISSOCK(mode.st_mode) and stat.S_IMODE(mode.st_mode) == 0o600
    assert mode.st_uid == os.geteuid()
    assert stat.S_IMODE(os.stat(open_dir / "state").st_mode) == 0o700
    # Its own user reads the events (so the test below is not vacuous)...
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        sub = _sub(ctx, info.events)
        _joined(stub, sub)
        uid = new_uid()
        prod_flow(stub, uid, APP)
        assert [e.event for e in _drain(sub, 1.0) if e.uid == uid] == ["created", "hello", "ready"]
        sub.close(0)
    finally:
        ctx.term()
    # ...another local user cannot even connect.
    assert _as_nobody_connect(path) == "EACCES"


def test_an_explicit_ipc_path_is_0600_whatever_the_umask(
    s2cs_factory: Any, stub_for: Any, open_dir: Path
) -> None:
    path = open_dir / "ev.sock"
    old = os.umask(0)  # the socket would be 0777 if its mode were left to the umask
    try:
        st = s2cs_factory(events=f"ipc://{path}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    assert _as_nobody_connect(str(path)) == "EACCES"
    st.stop()
    assert not path.exists()  # removed on stop


def test_an_ipc_socket_in_a_world_writable_directory_is_refused(s2cs_factory: Any, open_dir: Path) -> None:
    shared = open_dir / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could swap the socket for their own
    with pytest.raises(StartupError, match="writable by every user"):
        s2cs_factory(events=f"ipc://{shared}/ev.sock")


def test_tcp_events_without_curve_are_refused_at_startup(s2cs_factory: Any, tmp_path: Path) -> None:
    with pytest.raises(StartupError, match="needs CURVE"):
        s2cs_factory(events="tcp://127.0.0.1:0")
    keygen(tmp_path / "k", ("server",))
    secret = str(tmp_path / "k/server.key_secret")
    with pytest.raises(StartupError, match="need both"):
        s2cs_factory(events="tcp://127.0.0.1:0", events_curve_secret_file=secret)


@pytest.fixture
def curve_keys(tmp_path: Path) -> dict[str, Path]:
    keys = tmp_path / "keys"
    keygen(keys, ("server", "client", "intruder"))
    admitted = tmp_path / "admitted"
    admitted.mkdir(mode=0o700)
    shutil.copy(keys / "client.key", admitted / "client.key")
    return {
        "server_secret": keys / "server.key_secret",
        "server_public": keys / "server.key",
        "client": keys / "client.key_secret",
        "intruder": keys / "intruder.key_secret",
        "admitted": admitted,
    }


def test_tcp_events_with_curve_reach_only_admitted_subscribers(
    s2cs_factory: Any, stub_for: Any, curve_keys: dict[str, Path]
) -> None:
    st = s2cs_factory(
        events="tcp://127.0.0.1:0",
        events_curve_secret_file=str(curve_keys["server_secret"]),
        events_curve_client_keys=str(curve_keys["admitted"]),
    )
    stub = stub_for(st)
    address = stub.server_info(pb.ServerInfoRequest(), timeout=5).events
    assert address.startswith("tcp://127.0.0.1:")
    server_public = load_public(curve_keys["server_public"])
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        plain = _sub(ctx, address)
        intruder = _sub(ctx, address, (server_public, load_keypair(curve_keys["intruder"])))
        client = _sub(ctx, address, (server_public, load_keypair(curve_keys["client"])))
        _joined(stub, client)
        uid = new_uid()
        prod_flow(stub, uid, APP)
        assert [e.event for e in _drain(client, 1.0) if e.uid == uid] == ["created", "hello", "ready"]
        # Every event so far (the warm-up sessions' too) would be queued here by now.
        assert _drain(plain, 0.5) == [] and _drain(intruder, 0.5) == []
        for s in (plain, intruder, client):
            s.close(0)
    finally:
        ctx.term()


def _appctrl_ready_from_events(st: Any, stub: Any, curve: Any) -> str:
    """appctrl hello + wait_ready where only an event can deliver "ready" in time: it
    polls status once, then every 20 s, and the session is ready 1 s after that poll."""
    uid = new_uid()
    req = stub.req.future(pb.Request(uid=uid, role="PROD", num_conn=1), timeout=15)

    def update_later() -> None:
        req.result()
        time.sleep(1.0)  # after appctrl's first status poll: only an event can tell it
        stub.update(pb.UpdateTargets(uid=uid, remote_listeners=APP), timeout=5)

    async def main() -> str:
        async with AppController(st.address, uid, ssl=False, server_cert=None, events_curve=curve) as ctl:
            await ctl.hello(APP)
            threading.Thread(target=update_later, daemon=True).start()
            t0 = time.monotonic()
            state = (await ctl.wait_ready(timeout=30, poll_every=20)).state
            assert time.monotonic() - t0 < 10, "ready came from the status poll, not an event"
            return state

    return asyncio.run(main())


def test_appctrl_waits_on_curve_events(s2cs_factory: Any, stub_for: Any, curve_keys: dict[str, Path]) -> None:
    st = s2cs_factory(
        events="tcp://127.0.0.1:0",
        events_curve_secret_file=str(curve_keys["server_secret"]),
        events_curve_client_keys=str(curve_keys["admitted"]),
    )
    curve = (load_public(curve_keys["server_public"]), load_keypair(curve_keys["client"]))
    assert _appctrl_ready_from_events(st, stub_for(st), curve) == "ready"


def test_appctrl_of_the_s2cs_user_waits_on_the_default_ipc_events(s2cs_factory: Any, stub_for: Any) -> None:
    st = s2cs_factory()  # events: the private ipc socket, advertised by server_info
    assert _appctrl_ready_from_events(st, stub_for(st), None) == "ready"


def test_appctrl_events_key_options(s2cs_factory: Any, curve_keys: dict[str, Path]) -> None:
    st = s2cs_factory(events="off")
    r = CliRunner().invoke(
        appctrl_main,
        ["mock", new_uid(), st.address, "INVALID_TOKEN", "PROD", "127.0.0.1", "--no-ssl"],
        env={"SCISTREAM_APPCTRL_EVENTS_SERVER_KEY": str(curve_keys["server_public"])},
    )
    assert r.exit_code == 2 and "need both --events-server-key and --events-client-key" in r.output
    r = CliRunner().invoke(
        appctrl_main,
        ["mock", new_uid(), st.address, "INVALID_TOKEN", "PROD", "127.0.0.1", "--no-ssl"],
        env={
            "SCISTREAM_APPCTRL_EVENTS_SERVER_KEY": str(curve_keys["server_public"]),
            "SCISTREAM_APPCTRL_EVENTS_CLIENT_KEY": str(curve_keys["client"]),
        },
    )
    assert r.exit_code == 0, r.output
    help_text = CliRunner().invoke(appctrl_main, ["run", "--help"]).output
    assert "SCISTREAM_APPCTRL_EVENTS_SERVER_KEY" in help_text and "--events-client-key" in help_text
