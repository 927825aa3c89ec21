"""The application controller as a library: hello, then wait until the session is ready.

::

    async with AppController("gw:5000", uid, role="PROD", server_cert="server.crt") as ctl:
        await ctl.hello(["10.0.0.5:7000"])
        session = await ctl.wait_ready()

Readiness comes from the s2cs's ZMQ session events (endpoint advertised by
``server_info``), with the ``status`` RPC as a fallback for an event missed
while subscribing, or for events this controller cannot read: the default
events socket is an ipc socket that only the s2cs user may open, and a tcp://
one needs CURVE keys (``events_curve``: the server's public key and this
controller's key pair). Against a SciStream 1.x s2cs (neither RPC) ``wait_ready``
returns what the hello answered, which is all 1.x can say.

``s2cs`` may name the nodes of one gateway (``"gw1:5000,gw2:5000"``): every call
goes to the current node (the first that answered server_info, whose events are
read) and, while one answers UNAVAILABLE, to the next.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import zmq
import zmq.asyncio

from scistream._proto import scistream_pb2 as pb
from scistream._proto import scistream_pb2_grpc as pb_grpc
from scistream.endpoints import parse_endpoint
from scistream.events import SessionEvent, topic_for
from scistream.grpcutil import (
    CALL_DEADLINE_S,
    ControlError,
    ExitCode,
    auth_metadata,
    check_addresses,
    describe_rpc_error,
    failover_error,
    open_aio_channel,
)

log = logging.getLogger(__name__)

READY_STATES = ("ready", "active")
DEAD_STATES = ("released", "failed", "expired")
_RETRYABLE_HELLO = {
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.FAILED_PRECONDITION,
}


@dataclass(frozen=True)
class ReadySession:
    uid: str
    role: str
    state: str  # "unknown" when a 1.x s2cs cannot say
    listeners: list[str] = field(default_factory=list)
    prod_listeners: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    security: str = ""

    @classmethod
    def of(cls, src: pb.SessionStatus | SessionEvent) -> ReadySession:
        """From a status answer or a session event (they carry the same fields)."""
        return cls(
            uid=src.uid,
            role=src.role,
            state=src.state,
            listeners=list(src.listeners),
            prod_listeners=list(src.prod_listeners),
            targets=list(src.targets),
            security=src.security,
        )


def events_address(advertised: str, s2cs: str) -> str:
    """A wildcard bind (``tcp://*:N``, ``tcp://0.0.0.0:N``) is reached at the s2cs's host."""
    if advertised.startswith("tcp://"):
        host, _, port = advertised[len("tcp://") :].rpartition(":")
        if host in ("*", "0.0.0.0", "[::]", "::", ""):
            s2cs_host, _ = parse_endpoint(s2cs)
            shown = f"[{s2cs_host}]" if ":" in s2cs_host else s2cs_host
            return f"tcp://{shown}:{port}"
    return advertised


class AppController:
    def __init__(
        self,
        s2cs: str,
        uid: str,
        *,
        role: str = "PROD",
        server_cert: str | os.PathLike[str] | None = "server.crt",
        ssl: bool = True,
        token: str | None = None,
        timeout: float = CALL_DEADLINE_S,
        events_curve: tuple[bytes, tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.s2cs = s2cs  # as given: HOST:PORT, or the nodes of one gateway HOST:PORT,HOST:PORT
        self.addresses: list[str] = []  # checked on entering
        self._index = 0
        self.events_curve = events_curve  # (server public key, (our public, our secret))
        self.uid = uid
        self.role = role
        self.server_cert = server_cert
        self.ssl = ssl
        self.token = token
        self.timeout = timeout
        self.info: pb.ServerInfo | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._tried: list[ControlError] = []  # the addresses the last call failed over from
        self._zctx: zmq.asyncio.Context | None = None
        self._sub: Any = None
        self._hello_reply: pb.AppResponse | None = None

    @property
    def address(self) -> str:
        """The s2cs address calls go to now."""
        return self.addresses[self._index] if self.addresses else self.s2cs

    # ------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> AppController:
        self.addresses = check_addresses(self.s2cs)
        self._connect()
        try:
            # The first node that answers server_info is the one whose events we read.
            self.info = await self._rpc("server_info", pb.ServerInfoRequest())
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNIMPLEMENTED:
                await self.close()
                raise self._failure(err, "server_info") from None
            self.info = None  # SciStream 1.x
        if self.info is not None and self.info.events:
            # Subscribe before the hello so the session's ready event cannot slip by.
            self._zctx = zmq.asyncio.Context()
            self._sub = self._zctx.socket(zmq.SUB)
            self._sub.setsockopt(zmq.LINGER, 0)
            self._sub.setsockopt(zmq.SUBSCRIBE, topic_for(self.uid))
            address = events_address(self.info.events, self.address)
            if address.startswith("tcp://") and self.events_curve is not None:
                server_public, (public, secret) = self.events_curve
                self._sub.curve_serverkey = server_public
                self._sub.curve_publickey, self._sub.curve_secretkey = public, secret
            elif address.startswith("tcp://"):
                log.debug("no events CURVE keys: a CURVE events socket will send nothing; polling status")
            # An ipc socket of another user (or host) is never reached: status polling covers it.
            self._sub.connect(address)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._sub is not None:
            self._sub.close(0)
            self._sub = None
        if self._zctx is not None:
            self._zctx.term()
            self._zctx = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    def _connect(self) -> None:
        self._channel = open_aio_channel(self.address, server_cert=self.server_cert, ssl=self.ssl)
        self._stub = pb_grpc.ControlStub(self._channel)

    @property
    def legacy(self) -> bool:
        """True against a SciStream 1.x s2cs (no server_info)."""
        return self.info is None

    def _error(self, err: grpc.RpcError, method: str) -> ControlError:
        return describe_rpc_error(err, self.address, method, timeout=self.timeout, ssl=self.ssl)

    def _failure(self, err: grpc.RpcError, method: str) -> ControlError:
        """The error of the last call (after :meth:`_rpc`), naming every address it tried."""
        return failover_error(method, self._tried, self._error(err, method), uid=self.uid)

    async def _rpc(self, method: str, request: Any) -> Any:
        """One RPC on the current address, made again on the next ones while it is answered
        UNAVAILABLE (the next stays the current one); raises the last grpc.RpcError."""
        self._tried = []
        while True:
            try:
                return await getattr(self._stub, method)(
                    request, timeout=self.timeout, metadata=auth_metadata(self.token)
                )
            except grpc.RpcError as err:
                exc = self._error(err, method)
                if not exc.unavailable or self._index + 1 >= len(self.addresses):
                    raise
                self._tried.append(exc)
                if self._channel is not None:
                    await self._channel.close()
                self._index += 1
                log.info("%s; trying the next s2cs, %s", exc.message, self.address)
                self._connect()

    # ------------------------------------------------------------ RPCs
    async def hello(self, prod_listeners: Sequence[str] = (), *, retry_for: float = 10.0) -> list[str]:
        """Announce the application's endpoints; returns the listeners the s2cs answered (CONS)."""
        request = pb.Hello(uid=self.uid, prod_listeners=list(prod_listeners), role=self.role)
        deadline = time.monotonic() + retry_for
        while True:
            try:
                self._hello_reply = await self._rpc("hello", request)
                return list(self._hello_reply.listeners)
            except grpc.RpcError as err:
                # A 1.x s2cs refuses a hello that beats its req: retry a while.
                if err.code() not in _RETRYABLE_HELLO or time.monotonic() > deadline:
                    raise self._failure(err, "hello") from None
                log.debug("hello refused (%s), retrying", err.code())
                await asyncio.sleep(0.2)

    async def status(self) -> pb.SessionStatus | None:
        """This session's status, or None when the s2cs has no status RPC or no such session yet."""
        if self.legacy or "status" not in list(self.info.extensions if self.info else []):
            return None
        try:
            reply = await self._rpc("status", pb.StatusRequest(uid=self.uid))
        except grpc.RpcError as err:
            if err.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED):
                return None
            raise self._failure(err, "status") from None
        return reply.sessions[0] if reply.sessions else None

    async def release(self) -> None:
        try:
            await self._rpc("release", pb.Release(uid=self.uid))
        except grpc.RpcError as err:
            raise self._failure(err, "release") from None

    # ------------------------------------------------------------ waiting
    def _from_hello(self) -> ReadySession:
        listeners = list(self._hello_reply.listeners) if self._hello_reply else []
        return ReadySession(uid=self.uid, role=self.role, state="unknown", listeners=listeners)

    async def wait_ready(self, timeout: float | None = 300.0, *, poll_every: float = 1.0) -> ReadySession:
        """Block until the session is ready (routes in place) or active; fail if it dies first."""
        if self.legacy:
            return self._from_hello()
        loop_deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            st = await self.status()
            if st is not None:
                if st.state in READY_STATES:
                    return ReadySession.of(st)
                if st.state in DEAD_STATES:
                    raise ControlError(f"session {self.uid} is {st.state}: {st.error or 'no reason given'}")
            wait = poll_every
            if loop_deadline is not None:
                left = loop_deadline - time.monotonic()
                if left <= 0:
                    raise ControlError(
                        f"session {self.uid} was not ready within {timeout:g} s", ExitCode.TIMEOUT
                    )
                wait = min(wait, left)
            event = await self._next_event(wait)
            if event is None:
                continue
            if event.event in DEAD_STATES or event.state in DEAD_STATES:
                raise ControlError(f"session {self.uid} is {event.state}: {event.error or 'no reason given'}")
            if event.event in READY_STATES or event.state in READY_STATES:
                return ReadySession.of(event)

    async def _next_event(self, wait: float) -> SessionEvent | None:
        if self._sub is None:
            await asyncio.sleep(wait)
            return None
        try:
            frames = await asyncio.wait_for(self._sub.recv_multipart(), timeout=wait)
        except TimeoutError:
            return None
        try:
            event = SessionEvent.decode(frames)
        except (ValueError, TypeError) as exc:
            log.debug("ignoring a malformed session event: %s", exc)
            return None
        return event if event.uid == self.uid else None
