"""s2cs talks only to an s2ds of its own user (or root) on ``--s2ds ipc://`` (issue 14 item 4).

An ipc socket at the --s2ds path that another user (``nobody``, via setpriv) owns or
listens on, or a directory that user controls, is refused with a clear error before
any command (they carry session keys) is sent; and s2ds creates its socket 0600.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from s2ds_support import S2DS, stop

from scistream.s2ds.client import S2dsClient, S2dsUntrusted, check_ipc_peer

NOBODY = 65534

# A listener of another user, with the system interpreter (ours may live under /root).
# It counts the bytes it is sent and prints them when told to stop (a line on stdin).
_LISTEN = """
import socket, sys, threading
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(sys.argv[1])
srv.listen(16)
got = [0]
def serve():
    while True:
        conn, _ = srv.accept()
        conn.settimeout(2)
        try:
            while data := conn.recv(65536):
                got[0] += len(data)
        except OSError:
            pass
        conn.close()
threading.Thread(target=serve, daemon=True).start()
print("ready", flush=True)
sys.stdin.readline()
print(got[0], flush=True)
"""


def _need_nobody() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a listener as another user")
    if not shutil.which("setpriv") or not os.path.exists("/usr/bin/python3"):
        pytest.skip("needs setpriv and /usr/bin/python3")


class NobodyListener:
    def __init__(self, path: Path) -> None:
        nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        self.proc = subprocess.Popen(
            [*nobody, "/usr/bin/python3", "-c", _LISTEN, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        assert line == "ready", self.proc.stderr.read() if self.proc.stderr else line

    def bytes_received(self) -> int:
        out, _ = self.proc.communicate("\n", timeout=10)
        return int(out.strip())

    def close(self) -> None:
        stop(self.proc)  # type: ignore[arg-type]


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """``/tmp/<0755>/gw``: a root-owned 0700 directory for the socket, as a state dir is."""
    top = Path(tempfile.mkdtemp(prefix="ss-peer-", dir="/tmp"))
    top.chmod(0o755)
    d = top / "gw"
    d.mkdir(mode=0o700)
    yield d
    shutil.rmtree(top, ignore_errors=True)


def _nobody_binds(d: Path) -> tuple[NobodyListener, Path]:
    """nobody listens on d/s2ds.sock (d opened to it for the bind only, then 0700 again)."""
    path = d / "s2ds.sock"
    d.chmod(0o733)
    try:
        listener = NobodyListener(path)
    finally:
        d.chmod(0o700)
    assert os.lstat(path).st_uid == NOBODY
    return listener, path


def _ping(address: str) -> None:
    async def go() -> None:
        async with S2dsClient(address, timeout=2) as c:
            await c.ping()

    asyncio.run(go())


def test_s2cs_refuses_a_socket_owned_by_another_user(sockdir: Path, tmp_path: Path) -> None:
    _need_nobody()
    listener, path = _nobody_binds(sockdir)
    try:
        with pytest.raises(S2dsUntrusted, match="owned by uid 65534, not by this user or root"):
            _ping(f"ipc://{path}")
        # The real s2cs: it stops at startup with one clear line, and sends nothing.
        p = subprocess.run(
            [sys.executable, "-m", "scistream.s2cs", "--port", "0", "--ssl", "False", "--events", "off",
             "--state-dir", str(tmp_path / "state"), "--s2ds", f"ipc://{path}"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert p.returncode == 1, p.stderr
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith("s2cs: the native data plane could not start: refusing the s2ds control")
        assert "uid 65534" in last and "Traceback" not in p.stderr
        assert listener.bytes_received() == 0
    finally:
        listener.close()


def test_a_root_owned_file_with_another_users_listener_is_refused_by_its_peer_credentials(
    sockdir: Path,
) -> None:
    _need_nobody()
    listener, path = _nobody_binds(sockdir)
    try:
        os.chown(path, 0, 0)  # the file now looks like ours; the listening process does not
        with pytest.raises(S2dsUntrusted, match=rf"pid {listener.proc.pid}\) runs as uid 65534"):
            _ping(f"ipc://{path}")
        assert listener.bytes_received() == 0  # the credential probe sent nothing
    finally:
        listener.close()


def test_a_directory_another_user_controls_is_refused(sockdir: Path) -> None:
    _need_nobody()
    address = f"ipc://{sockdir / 's2ds.sock'}"
    os.chown(sockdir, NOBODY, -1)
    with pytest.raises(S2dsUntrusted, match="is owned by uid 65534"):
        check_ipc_peer(address)
    os.chown(sockdir, 0, -1)
    sockdir.chmod(0o777)  # anyone may drop a socket here
    with pytest.raises(S2dsUntrusted, match="writable by others"):
        check_ipc_peer(address)
    sockdir.chmod(0o1777)  # sticky, like /tmp: others cannot replace our entries
    check_ipc_peer(address)


def test_our_own_listener_and_a_stale_socket_pass(sockdir: Path) -> None:
    path = sockdir / "s2ds.sock"
    check_ipc_peer(f"ipc://{path}")  # nothing there yet
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    try:
        check_ipc_peer(f"ipc://{path}")  # listened on by this very process
    finally:
        srv.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    check_ipc_peer(f"ipc://{path}")  # stale: nobody listens


def test_s2ds_creates_its_socket_0600_whatever_the_umask(sockdir: Path) -> None:
    path = sockdir / "s2ds.sock"
    old = os.umask(0)  # the socket would be 0777 if its mode were left to the umask
    try:
        proc = subprocess.Popen(
            [*S2DS, "serve", "--control", f"ipc://{path}", "--engine", "pure"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=dict(os.environ, SCISTREAM_STATE_DIR=str(sockdir)),
        )
    finally:
        os.umask(old)
    try:
        deadline = time.monotonic() + 20
        while not path.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "s2ds did not bind"
            time.sleep(0.05)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        _ping(f"ipc://{path}")  # and it is trusted: ours
    finally:
        stop(proc)
