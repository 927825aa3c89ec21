"""The s2uc request flows, free of click: what each command says to which s2cs.

1.x semantics kept on purpose (shared/PROTOCOL.md): ``req`` blocks on the
server until a hello for the uid arrives, so flows that send their own hello
run ``req`` as a future and send the hello beside it (retrying, because a 1.x
s2cs refuses a hello that beats its req). Progress lines go through a
callback so the CLI can print the lines 1.x users grep for.
"""

from __future__ import annotations

import logging
import time
import uuid as uuidlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from scistream._proto import scistream_pb2 as pb
from scistream._proto import scistream_pb2_grpc as pb_grpc
from scistream.endpoints import InvalidEndpoint, format_endpoint, parse_endpoint
from scistream.grpcutil import (
    CALL_DEADLINE_S,
    REQ_DEADLINE_S,
    ControlError,
    ExitCode,
    auth_metadata,
    check_addresses,
    describe_rpc_error,
    failover_error,
    open_channel,
)
from scistream.s2uc.store import SessionStore

log = logging.getLogger(__name__)

MOCK_UID = "4f8583bc-a4d3-11ee-9fd6-034d1fcbd7c3"
Progress = Callable[[str], None]
T = TypeVar("T")

# A 1.x s2cs fails a hello that arrives before its req: retry for this long.
_HELLO_RETRY_FOR_S = 10.0
_HELLO_RETRY_EVERY_S = 0.25
_RETRYABLE_HELLO = {
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.INVALID_ARGUMENT,
}


def new_uid(mock: bool = False) -> str:
    # uuid1 as in 1.x: sortable by time, which helps when reading server logs.
    return MOCK_UID if mock else str(uuidlib.uuid1())


def expand_endpoints(remote_ip: str, ports: Sequence[int]) -> list[str]:
    """``--remote_ip`` + ``--receiver_ports`` -> the hello's prod_listeners."""
    try:
        parse_endpoint(format_endpoint(remote_ip, 1))
    except InvalidEndpoint:
        raise ControlError(
            f"--remote_ip {remote_ip!r} is not a host name or address", ExitCode.USAGE
        ) from None
    return [format_endpoint(remote_ip, p) for p in ports]


def check_endpoints(endpoints: Sequence[str], what: str) -> list[str]:
    out = []
    for ep in endpoints:
        try:
            parse_endpoint(ep)
        except InvalidEndpoint as exc:
            raise ControlError(f"{what}: {exc}", ExitCode.USAGE) from None
        out.append(ep.strip())
    if not out:
        raise ControlError(f"{what}: at least one host:port is needed", ExitCode.USAGE)
    return out


@dataclass
class Target:
    """One s2cs and how to talk to it. ``address`` may list several nodes of one gateway
    (``HOST:PORT,HOST:PORT``): a call goes to the first, and to the next while one answers
    UNAVAILABLE."""

    address: str
    server_cert: str | None = "server.crt"
    ssl: bool = True
    token: str | None = None
    timeout: float | None = None  # None: 190 s for req (waits for hello), 15 s otherwise

    def deadline(self, method: str) -> float:
        if self.timeout is not None:
            return self.timeout
        return REQ_DEADLINE_S if method == "req" else CALL_DEADLINE_S

    def addresses(self) -> list[str]:
        return check_addresses(self.address)


class Control:
    """A blocking client for one s2cs (one gateway of one or more nodes); every call has a
    deadline and maps errors to ControlError.

    Calls go to the current address (the first at the start); a call answered UNAVAILABLE
    is made again on the next address, in order, which stays the current one for the
    calls that follow (a session's req, hello and update then go to one node)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.addresses = target.addresses()
        self._index = 0
        self._channels: dict[int, grpc.Channel] = {}
        self._stubs: dict[int, Any] = {}
        self._open(0)

    def _open(self, index: int) -> Any:
        if index not in self._stubs:
            t = self.target
            self._channels[index] = open_channel(self.addresses[index], server_cert=t.server_cert, ssl=t.ssl)
            self._stubs[index] = pb_grpc.ControlStub(self._channels[index])
        return self._stubs[index]

    @property
    def address(self) -> str:
        """The address calls go to now."""
        return self.addresses[self._index]

    @property
    def stub(self) -> Any:
        return self._open(self._index)

    def __enter__(self) -> Control:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
        self._stubs.clear()

    def error(self, err: grpc.RpcError, method: str) -> ControlError:
        t = self.target
        return describe_rpc_error(err, self.address, method, timeout=t.deadline(method), ssl=t.ssl)

    def fail_over(self, exc: ControlError, tried: list[ControlError]) -> bool:
        """After ``exc`` from the current address: move to the next one and return True when
        ``exc`` is an UNAVAILABLE and an address is left (``exc`` joins ``tried``)."""
        if not exc.unavailable or self._index + 1 >= len(self.addresses):
            return False
        tried.append(exc)
        self._index += 1
        log.info("%s; trying the next s2cs, %s", exc.message, self.address)
        return True

    def with_failover(self, method: str, attempt: Callable[[], T], *, uid: str = "") -> T:
        """``attempt()`` (which raises ControlError) on the current address, then on the next
        ones while it fails UNAVAILABLE; the final error names what each address answered."""
        tried: list[ControlError] = []
        while True:
            try:
                return attempt()
            except ControlError as exc:
                if not self.fail_over(exc, tried):
                    raise failover_error(method, tried, exc, uid=uid) from None

    def call(self, method: str, request: Any) -> Any:
        def attempt() -> Any:
            fn = getattr(self.stub, method)
            try:
                return fn(
                    request, timeout=self.target.deadline(method), metadata=auth_metadata(self.target.token)
                )
            except grpc.RpcError as err:
                raise self.error(err, method) from None

        return self.with_failover(method, attempt, uid=getattr(request, "uid", ""))

    def req_future(self, request: pb.Request) -> Any:
        return self.stub.req.future(
            request, timeout=self.target.deadline("req"), metadata=auth_metadata(self.target.token)
        )

    def result(self, future: Any, method: str) -> Any:
        try:
            return future.result()
        except grpc.RpcError as err:
            raise self.error(err, method) from None

    def server_info(self) -> pb.ServerInfo | None:
        """None from a 1.x s2cs (no server_info RPC)."""

        def attempt() -> pb.ServerInfo | None:
            try:
                return self.stub.server_info(
                    pb.ServerInfoRequest(),
                    timeout=self.target.deadline("server_info"),
                    metadata=auth_metadata(self.target.token),
                )
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return None
                raise self.error(err, "server_info") from None

        return self.with_failover("server_info", attempt)


def send_hello(
    ctl: Control,
    uid: str,
    prod_listeners: Sequence[str],
    role: str,
    *,
    progress: Progress,
    pending: Any = None,
) -> pb.AppResponse:
    """Send a hello, retrying while the server has not registered the req yet."""
    deadline = time.monotonic() + _HELLO_RETRY_FOR_S
    request = pb.Hello(uid=uid, prod_listeners=list(prod_listeners), role=role)
    while True:
        progress("sending for hello message")
        try:
            return ctl.stub.hello(
                request, timeout=ctl.target.deadline("hello"), metadata=auth_metadata(ctl.target.token)
            )
        except grpc.RpcError as err:
            if pending is not None and pending.done():
                # The req already failed: its error is the one worth reporting.
                ctl.result(pending, "req")
            if err.code() not in _RETRYABLE_HELLO or time.monotonic() > deadline:
                raise ctl.error(err, "hello") from None
            log.debug("hello not accepted yet (%s), retrying", err.code())
            time.sleep(_HELLO_RETRY_EVERY_S)


@dataclass
class SideResult:
    uid: str
    role: str
    s2cs: str
    listeners: list[str] = field(default_factory=list)
    prod_listeners: list[str] = field(default_factory=list)
    security: str = ""
    session_key: bytes | None = None
    extensions: bool = True  # False: the server returned none of our fields (1.x)

    def as_dict(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "role": self.role,
            "s2cs": self.s2cs,
            "listeners": self.listeners,
            "prod_listeners": self.prod_listeners,
            "security": self.security or None,
            "has_session_key": self.session_key is not None,
        }


def _request_with_hello(
    ctl: Control,
    request: pb.Request,
    hello_endpoints: Sequence[str] | None,
    hello_role: str,
    progress: Progress,
) -> pb.Response:
    """The req (and the hello beside it), made again on the next node of the gateway when
    the current one answers UNAVAILABLE to either. Safe: a gateway of several nodes lets
    one req of a uid win and answers ALREADY_EXISTS to the others."""
    return ctl.with_failover(
        "req",
        lambda: _request_once(ctl, request, hello_endpoints, hello_role, progress),
        uid=request.uid,
    )


def _request_once(
    ctl: Control,
    request: pb.Request,
    hello_endpoints: Sequence[str] | None,
    hello_role: str,
    progress: Progress,
) -> pb.Response:
    progress("sending client request message")
    future = ctl.req_future(request)
    progress("started client request")
    progress("waiting for hello message")
    if hello_endpoints is not None:
        # Give the req a head start: a 1.x s2cs must see it before the hello.
        time.sleep(0.1)
        if future.done():
            # Refused already (a req returns only after its hello): no hello may follow it,
            # or the s2cs would keep it as an early hello for a session that never comes.
            ctl.result(future, "req")
        try:
            send_hello(ctl, request.uid, hello_endpoints, hello_role, progress=progress, pending=future)
        except ControlError:
            future.cancel()
            raise
        progress("Hello message sent successfully")
    return ctl.result(future, "req")


def _update_or_release(ctl: Control, request: pb.UpdateTargets) -> pb.Response:
    """A session whose update failed holds ports for nothing: give it back, then report."""
    try:
        return ctl.call("update", request)
    except ControlError as exc:
        try:
            ctl.call("release", pb.Release(uid=request.uid))
        except ControlError as rel:
            log.warning("could not release %s after the failed update: %s", request.uid, rel.message)
            raise exc from None
        raise ControlError(f"{exc.message} (session {request.uid} released)", exc.exit_code) from None


def producer_side(
    target: Target,
    uid: str,
    *,
    num_conn: int,
    rate: int,
    security: str = "",
    rate_limit: int = 0,
    hello_endpoints: Sequence[str] | None = None,
    progress: Progress,
) -> SideResult:
    """inbound-request / prod-req: reserve the inbound proxy and point it at the producer."""
    with Control(target) as ctl:
        request = pb.Request(
            uid=uid, role="PROD", num_conn=num_conn, rate=rate, security=security, rate_limit=rate_limit
        )
        resp = _request_with_hello(ctl, request, hello_endpoints, "PROD", progress)
        prod_listeners = list(resp.prod_listeners)
        if not prod_listeners:
            raise ControlError(f"s2cs at {ctl.address} reported no producer endpoints for {uid}")
        upd = _update_or_release(ctl, pb.UpdateTargets(uid=uid, remote_listeners=prod_listeners, role="PROD"))
        listeners = list(resp.listeners) or list(upd.listeners)
        key = bytes(resp.session_key) if resp.session_key else None
        return SideResult(
            uid=uid,
            role="PROD",
            s2cs=target.address,
            listeners=listeners,
            prod_listeners=prod_listeners,
            security=resp.security,
            session_key=key,
            extensions=bool(resp.security or resp.session_key or resp.uid),
        )


def consumer_side(
    target: Target,
    uid: str,
    remote_endpoints: Sequence[str],
    *,
    num_conn: int,
    rate: int,
    security: str = "",
    rate_limit: int = 0,
    session_key: bytes | None = None,
    hello_endpoints: Sequence[str] | None = None,
    hello_role: str = "PROD",
    progress: Progress,
) -> SideResult:
    """outbound-request / cons-req: reserve the outbound proxy and point it at the inbound listeners."""
    with Control(target) as ctl:
        request = pb.Request(
            uid=uid, role="CONS", num_conn=num_conn, rate=rate, security=security, rate_limit=rate_limit
        )
        resp = _request_with_hello(ctl, request, hello_endpoints, hello_role, progress)
        upd = _update_or_release(
            ctl,
            pb.UpdateTargets(
                uid=uid, remote_listeners=list(remote_endpoints), role="CONS", session_key=session_key or b""
            ),
        )
        return SideResult(
            uid=uid,
            role="CONS",
            s2cs=target.address,
            listeners=list(resp.listeners) or list(upd.listeners),
            prod_listeners=list(upd.prod_listeners),
            security=resp.security or security,
            session_key=session_key,
            extensions=bool(resp.security or resp.uid),
        )


def remember(store: SessionStore, side: SideResult) -> None:
    """Record a side in the session store (the key only from the PROD side)."""
    rec = store.update(side.uid)
    rec.sides[side.role] = side.s2cs
    rec.listeners[side.role] = side.listeners
    if side.role == "PROD":
        rec.prod_listeners = side.prod_listeners
        rec.session_key = side.session_key.hex() if side.session_key else ""
    if side.security:
        rec.security = side.security
    store.put(rec)


@dataclass
class ReleaseOutcome:
    s2cs: str
    ok: bool
    message: str
    exit_code: int = 0


def release(targets: Sequence[Target], uid: str) -> list[ReleaseOutcome]:
    """Release ``uid`` on every target; one failing side does not stop the others."""
    out = []
    for t in targets:
        try:
            with Control(t) as ctl:
                ctl.call("release", pb.Release(uid=uid))
            out.append(ReleaseOutcome(t.address, True, "released"))
        except ControlError as exc:
            out.append(ReleaseOutcome(t.address, False, exc.message, exc.exit_code))
    return out


def status(target: Target, uid: str = "") -> list[pb.SessionStatus]:
    with Control(target) as ctl:
        return list(ctl.call("status", pb.StatusRequest(uid=uid)).sessions)


def server_info(target: Target) -> pb.ServerInfo | None:
    with Control(target) as ctl:
        return ctl.server_info()


def rollback(target: Target, uid: str) -> None:
    """Best effort: give a half-built session back (the user's error is already on its way)."""
    for outcome in release([target], uid):
        if not outcome.ok:
            log.warning("could not release %s on %s: %s", uid, outcome.s2cs, outcome.message)
