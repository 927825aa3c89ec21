"""Asyncio client of the s2ds control socket, mirroring EngineBase.

One DEALER socket carries one request at a time. A request that times out (or
is cancelled) throws its socket away, so a late reply can never be read as the
answer to the next request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import zmq
import zmq.asyncio
from google.protobuf.message import DecodeError

from scistream._proto import dataplane_pb2 as pb
from scistream.dataplane import EngineError, EngineStats, Route, RouteInfo
from scistream.s2ds import convert


class S2dsUnavailable(EngineError):
    """No s2ds answered on the control socket in time."""

    code = "unavailable"


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
