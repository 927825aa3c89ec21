"""The ZMQ PUB socket on which s2cs publishes every session transition.

Wire format: :mod:`scistream.events`. Events name every session's uid, role,
listeners and targets (with ``--security compat`` the uid is the data key), so
only the s2cs user may read them:

* the default is ``ipc://<state dir>/events.sock``, bound with umask 077 (the
  file is created 0600, never wider, even for an instant) and checked after the
  bind; the state directory itself is 0700;
* an explicit ``ipc://PATH`` gets the same treatment;
* ``tcp://`` is accepted only with CURVE: the server's key pair and a directory
  of admitted subscribers' public keys (ZAP), as s2ds does for its control
  socket. Without both, startup is refused.

The bound address is advertised by the ``server_info`` RPC. Publishing never
blocks: a slow subscriber loses events past ZMQ's high-water mark, never stalls
a session.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator

from scistream.events import SessionEvent
from scistream.s2ds.keys import CurveKeyError, check_client_key_dir, load_keypair

log = logging.getLogger(__name__)

SOCKET_NAME = "events.sock"


class EventsConfigError(Exception):
    """The events socket cannot be set up as asked; the message is one sentence."""


@dataclass(frozen=True)
class EventsCurve:
    secret_file: str  # s2cs's .key_secret file (from `s2ds keygen`)
    client_keys_dir: str  # admitted subscribers' public *.key files


def default_events_address(state_dir: str) -> str:
    return f"ipc://{Path(state_dir).absolute() / SOCKET_NAME}"


def _bind_private_ipc(sock: zmq.Socket[bytes], address: str) -> tuple[Path, int]:
    """Bind an ipc socket whose file is 0600 from the moment it exists.

    libzmq creates the file in bind() on the calling thread, so the umask set
    around it applies (umask is process-wide: kept for the bind only, and it can
    only make files made meanwhile by other threads more private)."""
    path = Path(address[len("ipc://") :])
    with contextlib.suppress(FileNotFoundError):  # (a missing directory: bind says so)
        parent = os.stat(path.parent or ".")
        if parent.st_mode & 0o002 and not parent.st_mode & stat.S_ISVTX:
            raise EventsConfigError(
                f"the events socket's directory {path.parent} is writable by every user, who "
                "could replace the socket; put it in a private directory (the default is "
                "the state directory)"
            )
    old = os.umask(0o077)
    try:
        sock.bind(address)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)  # 0700 from the umask: the x bit means nothing on a socket
    st = os.lstat(path)
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise EventsConfigError(
            f"the events socket {path} is not a private socket of this user after binding "
            f"(mode {stat.filemode(st.st_mode)}, uid {st.st_uid}); refusing to publish on it"
        )
    return path, st.st_ino


class EventPublisher:
    def __init__(self, bind: str, *, curve: EventsCurve | None = None) -> None:
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._sock: zmq.Socket[bytes] | None = None
        self._auth: ThreadAuthenticator | None = None
        self._ipc: tuple[Path, int] | None = None  # the socket file we made (path, inode)
        self.endpoint = ""
        self.curve = curve is not None
        if not bind:
            return
        if bind.startswith("tcp://"):
            if curve is None:
                raise EventsConfigError(
                    f"a tcp:// events address ({bind}) needs CURVE authentication: give "
                    "--events-curve-secret-file and --events-curve-client-keys (make keys with "
                    "`s2ds keygen DIR`), or use the default ipc socket in the state directory"
                )
        elif not bind.startswith("ipc://"):
            raise EventsConfigError(f"--events {bind!r}: use ipc://PATH, tcp://HOST:PORT (with CURVE) or off")
        elif curve is not None:
            log.warning("the events CURVE keys are not used on an ipc socket (file permissions guard it)")
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.PUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        try:
            if curve is not None and bind.startswith("tcp://"):
                self._curve_server(sock, curve)
            if bind.startswith("ipc://"):
                self._ipc = _bind_private_ipc(sock, bind)
            else:
                sock.bind(bind)
        except BaseException:
            sock.close()
            self._sock = None
            self.close()
            raise
        self._sock = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def _curve_server(self, sock: zmq.Socket[bytes], curve: EventsCurve) -> None:
        if not zmq.has("curve"):
            raise EventsConfigError("this libzmq was built without CURVE support")
        assert self._ctx is not None
        try:
            check_client_key_dir(curve.client_keys_dir)
            public, secret = load_keypair(curve.secret_file)
        except CurveKeyError as exc:
            raise EventsConfigError(str(exc)) from None
        # ZAP: a subscriber whose public key is not in the directory never completes
        # the handshake, so it receives nothing.
        self._auth = ThreadAuthenticator(self._ctx)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=curve.client_keys_dir)
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = public, secret

    @property
    def port(self) -> int:
        if self.endpoint.startswith("tcp://"):
            return int(self.endpoint.rsplit(":", 1)[1])
        return 0

    def publish(self, event: SessionEvent) -> None:
        if self._sock is None:
            return
        try:
            self._sock.send_multipart(event.encode(), flags=zmq.NOBLOCK)
        except zmq.Again:
            log.debug("event for %s dropped: subscribers too slow", event.uid)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        if self._ipc is not None:
            path, inode = self._ipc
            self._ipc = None
            with contextlib.suppress(FileNotFoundError):
                if os.lstat(path).st_ino == inode:  # ours, not a later instance's
                    path.unlink()
