"""Asyncio client of the s2ds control socket, mirroring EngineBase.

One DEALER socket carries one request at a time. A request that times out (or
is cancelled) throws its socket away, so a late reply can never be read as the
answer to the next request.

Before connecting to an ``ipc://`` daemon the client proves who listens there
(:func:`check_ipc_peer`), since route commands carry session keys: a daemon of
another local user must never receive them.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat
import struct
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import zmq
import zmq.asyncio
from google.protobuf.message import DecodeError

from scistream._proto import dataplane_pb2 as pb
from scistream.dataplane import EngineError, EngineStats, Route, RouteInfo
from scistream.s2ds import convert
from scistream.s2ds.paths import ipc_path


class S2dsUnavailable(EngineError):
    """No s2ds answered on the control socket in time."""

    code = "unavailable"


class S2dsUntrusted(EngineError):
    """The ipc control socket is not provably this user's (or root's) s2ds."""

    code = "untrusted"


def _trusted_uid(uid: int) -> bool:
    return uid in (os.geteuid(), 0)


def check_ipc_peer(address: str) -> None:
    """Refuse (S2dsUntrusted) an ``ipc://`` control socket another user could control.

    ZMQ hides its file descriptors, so the proof is made beside it, before ZMQ
    connects:

    1. every directory from the socket's up to ``/`` is owned by this user or
       root and is writable by no one else (a sticky directory such as /tmp is
       fine: others cannot remove or rename our entries there). Then only this
       user or root can create, replace or rebind the socket file, which covers
       the moments after this check and ZMQ's later reconnects;
    2. the socket file, if there, is a socket owned by this user or root;
    3. the process listening on it, asked with SO_PEERCRED on a connection of
       our own (the kernel's record of who called listen(), which no file
       permission or rename can fake), runs as this user or root. That
       connection sends nothing and is closed at once; s2ds sees a peer that
       never spoke.

    Nothing listening yet (no file, or a stale one) passes: by 1., only a
    trusted user can bind it later. tcp:// daemons are authenticated by CURVE.
    """
    path = ipc_path(address)
    if path is None:
        return
    where = os.path.realpath(path.parent or ".")
    while True:
        try:
            st = os.stat(where)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                msg = f"cannot check the s2ds socket directory {where}: {exc.strerror}"
                raise S2dsUntrusted(msg) from None
            where = os.path.dirname(where)  # not made yet (a spawned s2ds makes it 0700): check above
            continue
        if not _trusted_uid(st.st_uid):
            raise S2dsUntrusted(
                f"refusing the s2ds control socket {path}: its directory {where} is owned by uid "
                f"{st.st_uid}, not by this user or root, so another user controls who listens there"
            )
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise S2dsUntrusted(
                f"refusing the s2ds control socket {path}: its directory {where} is writable by "
                f"others (mode {stat.filemode(st.st_mode)}), who could put their own socket there"
            )
        if where == "/":
            break
        where = os.path.dirname(where)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode) or not _trusted_uid(st.st_uid):
        kind = "a socket" if stat.S_ISSOCK(st.st_mode) else "not a socket"
        raise S2dsUntrusted(
            f"refusing the s2ds control socket {path}: it is {kind} owned by uid {st.st_uid}, "
            "not by this user or root; remove it, or start s2ds as this user"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return  # nobody listens (a stale file): a trusted s2ds replaces it
        except OSError as exc:
            raise S2dsUntrusted(f"cannot check who listens on {path}: {exc.strerror or exc}") from None
        creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        if not _trusted_uid(uid):
            raise S2dsUntrusted(
                f"refusing the s2ds control socket {path}: the process listening on it (pid {pid}) "
                f"runs as uid {uid}, not as this user or root; route commands carry session keys"
            )
    finally:
        probe.close()


class S2dsClient:
    """``async with S2dsClient(addr) as c: await c.add_route(route)``.

    ``curve_server_public`` (the daemon's public key) and ``curve_keys``
    (this client's public, secret) are needed for a tcp:// daemon.
    """

    def __init__(
        self,
        address: str,
        *,
        curve_server_public: bytes | None = None,
        curve_keys: tuple[bytes, bytes] | None = None,
        timeout: float = 5.0,
    ) -> None:
        if address.startswith("tcp://") and not (curve_server_public and curve_keys):
            raise ValueError("a tcp:// s2ds needs CURVE keys: curve_server_public and curve_keys")
        self.address = address
        self.timeout = timeout
        self._curve_server_public = curve_server_public
        self._curve_keys = curve_keys
        self._ctx = zmq.asyncio.Context()
        self._sock: zmq.asyncio.Socket | None = None
        self._lock = asyncio.Lock()

    # --- the engine API -------------------------------------------------------

    async def add_route(self, route: Route) -> RouteInfo:
        reply = await self._call(pb.Command(add_route=pb.AddRoute(route=convert.route_to_spec(route))))
        return convert.route_info_from_pb(reply.route)

    async def retarget(self, route_id: str, targets: Sequence[str]) -> None:
        cmd = pb.Command(retarget_route=pb.RetargetRoute(route_id=route_id, targets=list(targets)))
        await self._call(cmd)

    async def remove_route(self, route_id: str, drain: bool = False) -> None:
        await self._call(pb.Command(remove_route=pb.RemoveRoute(route_id=route_id, drain=drain)))

    async def routes(self) -> list[RouteInfo]:
        reply = await self._call(pb.Command(list_routes=pb.ListRoutes()))
        return [convert.route_info_from_pb(r) for r in reply.routes.routes]

    async def stats(self, route_id: str | None = None, connections: bool = False) -> EngineStats:
        reply = await self._call(
            pb.Command(get_stats=pb.GetStats(route_id=route_id or "", connections=connections))
        )
        return convert.stats_from_pb(reply.stats)

    async def drain(self, timeout: float | None = None) -> bool:
        """Stop accepting everywhere; wait up to ``timeout`` (None: as long as it takes)."""
        wait = None if timeout is None else timeout + self.timeout
        reply = await self._call(pb.Command(drain=pb.Drain(timeout_s=timeout or 0.0)), timeout=wait)
        return reply.drain.complete

    async def ping(self, timeout: float | None = None) -> dict[str, Any]:
        reply = await self._call(pb.Command(ping=pb.Ping()), timeout=timeout or self.timeout)
        return {"version": reply.ping.version, "engine": reply.ping.engine, "pid": reply.ping.pid}

    # --- plumbing ---------------------------------------------------------------

    async def _call(self, cmd: pb.Command, timeout: float | None = -1.0) -> pb.Reply:
        wait = self.timeout if timeout == -1.0 else timeout
        async with self._lock:
            sock = self._socket()
            try:
                frames = await asyncio.wait_for(self._roundtrip(sock, cmd.SerializeToString()), wait)
            except TimeoutError:
                self._discard()
                raise S2dsUnavailable(f"s2ds at {self.address} did not answer within {wait:g} s") from None
            except BaseException:
                self._discard()  # cancelled or broken mid-request: the socket's state is unknown
                raise
        try:
            reply = pb.Reply.FromString(frames[-1])
        except DecodeError:
            raise EngineError(f"s2ds at {self.address} sent a reply that is not a dataplane Reply") from None
        if not reply.ok:
            raise convert.error_from_reply(reply)
        return reply

    @staticmethod
    async def _roundtrip(sock: zmq.asyncio.Socket, data: bytes) -> list[bytes]:
        await sock.send_multipart([b"", data])  # the empty frame makes us look like REQ to the daemon
        return await sock.recv_multipart()

    def _socket(self) -> zmq.asyncio.Socket:
        if self._sock is None:
            if self._ctx.closed:
                raise EngineError("this S2dsClient is closed")
            check_ipc_peer(self.address)  # before anything (keys!) can be sent there
            sock = self._ctx.socket(zmq.DEALER)
            sock.linger = 0
            if self._curve_server_public and self._curve_keys:
                sock.curve_serverkey = self._curve_server_public
                sock.curve_publickey, sock.curve_secretkey = self._curve_keys
            sock.connect(self.address)
            self._sock = sock
        return self._sock

    def _discard(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    async def close(self) -> None:
        self._discard()
        self._ctx.destroy(linger=0)

    async def __aenter__(self) -> S2dsClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
