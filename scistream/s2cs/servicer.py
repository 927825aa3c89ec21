"""The gRPC face of s2cs: authentication, then the manager, then a status code.

Order on every call but server_info: authenticate (nothing about a uid is
revealed before that), then validate and act. Errors become a gRPC status with one
human sentence; an unexpected exception is logged with its traceback and
answered INTERNAL with a generic sentence (never UNKNOWN, never the traceback).
Every call leaves one audit record.

hello, when s2cs checks tokens, needs a valid token of the identity that owns
the session (or, hello first, that the req must then come from); without
token checks it is authorised by knowledge of the uid, as in 1.x (application
controllers send ``INVALID_TOKEN``). Either way it cannot change a session
that already had its hello, and its endpoints pass the same target policy as
update's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from scistream import __version__
from scistream._proto import scistream_pb2, scistream_pb2_grpc
from scistream.clienttext import escape
from scistream.s2cs.auth import ANONYMOUS, Authenticator, Identity, token_from_metadata
from scistream.s2cs.errors import ControlError
from scistream.s2cs.manager import Session, SessionManager

log = logging.getLogger(__name__)

T = TypeVar("T")

EXTENSIONS = ["status", "server_info", "session_key", "security", "rate_limit", "events", "early_hello"]


def _uid_of(request: Any) -> str:
    uid = getattr(request, "uid", "")
    return uid[:128] if isinstance(uid, str) else ""


class ControlServicer(scistream_pb2_grpc.ControlServicer):
    def __init__(
        self, manager: SessionManager, auth: Authenticator, info: Callable[[], dict[str, Any]]
    ) -> None:
        self.manager = manager
        self.auth = auth
        self._info = info

    async def _run(
        self,
        rpc: str,
        request: Any,
        context: grpc.aio.ServicerContext,
        body: Callable[[Identity], Awaitable[T]],
        *,
        authenticate: bool = True,
    ) -> T:
        uid = _uid_of(request)
        identity = ANONYMOUS
        started = time.monotonic()
        try:
            if authenticate:
                identity = await self.auth.authenticate(token_from_metadata(context.invocation_metadata()))
            result = await body(identity)
        except ControlError as exc:
            self._account(
                rpc=rpc, uid=uid, identity=identity, code=exc.code, reason=exc.message, started=started
            )
            await context.abort(exc.code, exc.message)
            raise AssertionError("unreachable") from None
        except Exception:
            log.exception("%s for %r failed unexpectedly", rpc, uid)
            msg = "the gateway hit an internal error; its operator can find the details in the s2cs log"
            self._account(
                rpc=rpc,
                uid=uid,
                identity=identity,
                code=grpc.StatusCode.INTERNAL,
                reason=msg,
                started=started,
            )
            await context.abort(grpc.StatusCode.INTERNAL, msg)
            raise AssertionError("unreachable") from None
        self._account(
            rpc=rpc, uid=uid, identity=identity, code=grpc.StatusCode.OK, reason="", started=started
        )
        return result

    def _account(
        self, *, rpc: str, uid: str, identity: Identity, code: grpc.StatusCode, reason: str, started: float
    ) -> None:
        name = code.name
        self.manager.metrics.observe_rpc(rpc, name)
        self.manager.audit.record(
            event="rpc",
            rpc=rpc,
            uid=uid,
            identity=identity.sub,
            username=identity.username,
            decision="ok" if code is grpc.StatusCode.OK else "refused",
            code=name,
            reason=reason,
            ms=round((time.monotonic() - started) * 1000, 1),
        )
        if code is not grpc.StatusCode.OK:
            log.info("%s %s by %s: %s %s", rpc, escape(uid) or "-", escape(identity.sub), name, reason)

    # ------------------------------------------------------------------ 1.x RPCs

    async def req(
        self, request: scistream_pb2.Request, context: grpc.aio.ServicerContext
    ) -> scistream_pb2.Response:
        async def body(identity: Identity) -> scistream_pb2.Response:
            s = await self.manager.req(
                identity,
                request.uid,
                role=request.role,
                num_conn=request.num_conn,
                rate=request.rate,
                security=request.security,
                rate_limit=request.rate_limit,
            )
            return scistream_pb2.Response(
                listeners=s.listeners,
                prod_listeners=s.prod_listeners if s.role == "PROD" else [],
                session_key=s.requester_key(),
                security=s.security,
                uid=s.uid,
            )

        return await self._run("req", request, context, body)

    async def hello(
        self, request: scistream_pb2.Hello, context: grpc.aio.ServicerContext
    ) -> scistream_pb2.AppResponse:
        async def body(identity: Identity) -> scistream_pb2.AppResponse:
            message, listeners = await self.manager.hello(
                identity, request.uid, list(request.prod_listeners), request.role
            )
            return scistream_pb2.AppResponse(message=message, listeners=listeners)

        # Without a client secret the authenticator names every caller anonymous (1.x).
        return await self._run("hello", request, context, body)

    async def update(
        self, request: scistream_pb2.UpdateTargets, context: grpc.aio.ServicerContext
    ) -> scistream_pb2.Response:
        async def body(identity: Identity) -> scistream_pb2.Response:
            s = await self.manager.update(
                identity, request.uid, list(request.remote_listeners), request.role, request.session_key
            )
            return scistream_pb2.Response(
                listeners=s.listeners, prod_listeners=s.targets, security=s.security, uid=s.uid
            )

        return await self._run("update", request, context, body)

    async def release(
        self, request: scistream_pb2.Release, context: grpc.aio.ServicerContext
    ) -> scistream_pb2.Response:
        async def body(identity: Identity) -> scistream_pb2.Response:
            await self.manager.release(identity, request.uid)
            return scistream_pb2.Response()

        return await self._run("release", request, context, body)

    # ------------------------------------------------------------------ extensions

    async def status(
        self, request: scistream_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> scistream_pb2.StatusReply:
        async def body(identity: Identity) -> scistream_pb2.StatusReply:
            sessions = await self.manager.status(identity, request.uid)
            return scistream_pb2.StatusReply(sessions=[self._session_status(s) for s in sessions])

        return await self._run("status", request, context, body)

    def _session_status(self, s: Session) -> scistream_pb2.SessionStatus:
        u = s.usage
        return scistream_pb2.SessionStatus(
            uid=s.uid,
            role=s.role,
            state=s.state.value,
            listeners=s.listeners,
            targets=s.targets,
            prod_listeners=s.prod_listeners,
            security=s.security,
            num_conn=s.num_conn,
            rate_limit=s.rate_limit,
            backend=self.manager.backend.name,
            owner=s.owner_name or s.owner,
            created_at=s.created_at,
            last_activity=s.last_activity,
            bytes_to_target=u.bytes_to_target or 0,
            bytes_from_target=u.bytes_from_target or 0,
            connections_active=u.connections_active or 0,
            connections_total=u.connections_total or 0,
            connections=[
                scistream_pb2.ConnectionStatus(
                    listener=c.listener,
                    peer=c.peer,
                    target=c.target,
                    bytes_to_target=c.bytes_to_target,
                    bytes_from_target=c.bytes_from_target,
                    started_at=c.started_at,
                )
                for c in u.connections
            ],
            error=s.error,
            listener_nodes=s.listener_nodes,
            lost_connections=s.lost,
        )

    async def server_info(
        self, request: scistream_pb2.ServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> scistream_pb2.ServerInfo:
        async def body(_identity: Identity) -> scistream_pb2.ServerInfo:
            info = self._info()
            return scistream_pb2.ServerInfo(
                version=__version__,
                extensions=EXTENSIONS,
                events=info.get("events", ""),
                metrics=info.get("metrics", ""),
                backend=self.manager.backend.name,
                default_security=self.manager.config.default_security,
                listener_ip=self.manager.config.listener_ip,
            )

        # What the server is, not who uses it: answered without a token (like a
        # health check) so clients can choose their flow before logging in.
        return await self._run("server_info", request, context, body, authenticate=False)


class _Malformed:
    """A request body that did not parse (gRPC would otherwise answer UNKNOWN)."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def _parser(cls: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except Exception:
            return _Malformed(cls.__name__)

    return parse


def _guarded(method: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]) -> Any:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Malformed):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {request.type_name} message"
            )
        return await method(request, context)

    return handler


def add_to_server(servicer: ControlServicer, server: grpc.aio.Server) -> None:
    """Register the Control service with parsers that turn an undecodable message into
    INVALID_ARGUMENT (the generated registration lets gRPC answer UNKNOWN)."""
    table: dict[str, tuple[Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]], Any]] = {
        "req": (servicer.req, scistream_pb2.Request),
        "update": (servicer.update, scistream_pb2.UpdateTargets),
        "release": (servicer.release, scistream_pb2.Release),
        "hello": (servicer.hello, scistream_pb2.Hello),
        "status": (servicer.status, scistream_pb2.StatusRequest),
        "server_info": (servicer.server_info, scistream_pb2.ServerInfoRequest),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            _guarded(method),
            request_deserializer=_parser(cls),
            response_serializer=lambda msg: msg.SerializeToString(),
        )
        for name, (method, cls) in table.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("scistream.Control", handlers),))
