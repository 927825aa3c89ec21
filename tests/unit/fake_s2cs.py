"""An in-test s2cs: the control protocol only, no data plane.

``FakeS2cs(extensions=True)`` speaks our extensions (session keys, status,
server_info, ZMQ events) with the real server's state names; with
``extensions=False`` it is shaped like SciStream 1.2.1: no status/server_info
RPCs (the generated base class answers UNIMPLEMENTED), no extension fields,
a hello before its req fails with UNKNOWN, an existing uid fails with UNKNOWN.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import zmq

from scistream._proto import scistream_pb2 as pb
from scistream._proto import scistream_pb2_grpc as pb_grpc
from scistream.events import SessionEvent


@dataclass
class FakeSession:
    uid: str
    role: str = ""
    num_conn: int = 0
    state: str = "waiting_hello"
    listeners: list[str] = field(default_factory=list)
    prod_listeners: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    security: str = ""
    session_key: bytes = b""
    rate_limit: int = 0
    hello: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.time)


class FakeS2cs(pb_grpc.ControlServicer):
    def __init__(
        self,
        *,
        extensions: bool = True,
        listener_ip: str = "127.0.0.1",
        security: str = "tls",
        token: str | None = None,
        hello_wait: float = 10.0,
        first_port: int = 5100,
    ) -> None:
        self.extensions = extensions
        self.listener_ip = listener_ip
        self.default_security = security
        self.token = token
        self.hello_wait = hello_wait
        self.next_port = first_port
        self.sessions: dict[str, FakeSession] = {}
        self.calls: list[tuple[str, Any, str]] = []
        self.lock = threading.Lock()
        self.events_endpoint = ""
        self._pub: Any = None

    # -- helpers
    def _enter(self, name: str, request: Any, context: grpc.ServicerContext) -> None:
        md = dict(context.invocation_metadata())
        auth = md.get("authorization", "")
        with self.lock:
            self.calls.append((name, request, auth))
        if self.token is not None and auth != self.token:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "Authentication token is invalid for scope test")

    def _publish(self, s: FakeSession, kind: str) -> None:
        if self._pub is None:
            return
        ev = SessionEvent(
            event=kind,
            uid=s.uid,
            role=s.role,
            state=s.state,
            listeners=list(s.listeners),  # type: ignore[arg-type]
            prod_listeners=list(s.prod_listeners),
            targets=list(s.targets),
            security=s.security,
        )
        with self.lock:
            self._pub.send_multipart(ev.encode())

    def calls_of(self, name: str) -> list[Any]:
        return [req for n, req, _ in self.calls if n == name]

    # -- 1.x RPCs
    def req(self, request: pb.Request, context: grpc.ServicerContext) -> pb.Response:
        self._enter("req", request, context)
        with self.lock:
            s = self.sessions.get(request.uid)
            if s is not None and s.role:
                if self.extensions:
                    context.abort(
                        grpc.StatusCode.ALREADY_EXISTS, f"a session with uid {request.uid!r} already exists"
                    )
                context.abort(
                    grpc.StatusCode.UNKNOWN, "Exception calling application: Entry already found for uid"
                )
            if s is None:
                s = self.sessions[request.uid] = FakeSession(uid=request.uid)
            s.role, s.num_conn, s.rate_limit = request.role, request.num_conn, request.rate_limit
            s.listeners = [f"{self.listener_ip}:{self.next_port + i}" for i in range(request.num_conn)]
            self.next_port += request.num_conn
            if self.extensions:
                s.security = request.security or self.default_security
                if request.role == "PROD" and s.security == "tls":
                    s.session_key = os.urandom(32)
        if not s.hello.wait(self.hello_wait):
            with self.lock:
                self.sessions.pop(request.uid, None)
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no hello arrived")
        s.state = "reserved"
        resp = pb.Response(listeners=s.listeners)
        if request.role == "PROD":
            resp.prod_listeners.extend(s.prod_listeners)
        if self.extensions:
            resp.session_key, resp.security, resp.uid = s.session_key, s.security, s.uid
        return resp

    def hello(self, request: pb.Hello, context: grpc.ServicerContext) -> pb.AppResponse:
        self._enter("hello", request, context)
        with self.lock:
            s = self.sessions.get(request.uid)
            if s is None:
                if not self.extensions:
                    context.abort(
                        grpc.StatusCode.UNKNOWN,
                        f"Exception calling application: hello request invalid, entry not found for uid "
                        f"'{request.uid}'",
                    )
                s = self.sessions[request.uid] = FakeSession(uid=request.uid)
            if request.prod_listeners:
                s.prod_listeners = list(request.prod_listeners)
        s.hello.set()
        self._publish(s, "hello")
        if s.role == "PROD":
            return pb.AppResponse(message="Hello message sent successfully")
        return pb.AppResponse(message="Hello message sent successfully", listeners=s.listeners)

    def update(self, request: pb.UpdateTargets, context: grpc.ServicerContext) -> pb.Response:
        self._enter("update", request, context)
        s = self.sessions.get(request.uid)
        if s is None:
            context.abort(
                grpc.StatusCode.NOT_FOUND if self.extensions else grpc.StatusCode.UNKNOWN,
                f"no session {request.uid!r}",
            )
        if self.extensions and s.role != "PROD":
            if s.security == "tls" and not request.session_key:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "a tls session needs the session key")
            s.session_key = request.session_key
        targets = list(request.remote_listeners)
        s.targets = [targets[i % len(targets)] for i in range(s.num_conn)] if targets else []
        s.state = "ready"
        self._publish(s, "ready")
        return pb.Response(listeners=s.listeners, prod_listeners=s.targets)

    def release(self, request: pb.Release, context: grpc.ServicerContext) -> pb.Response:
        self._enter("release", request, context)
        with self.lock:
            s = self.sessions.pop(request.uid, None)
        if s is None:
            context.abort(
                grpc.StatusCode.NOT_FOUND if self.extensions else grpc.StatusCode.UNKNOWN,
                f"release request invalid, entry not found for uid '{request.uid}'",
            )
        s.state = "released"
        self._publish(s, "released")
        return pb.Response()

    # -- extensions (absent when shaped like 1.x)
    def status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        if not self.extensions:
            return super().status(request, context)  # UNIMPLEMENTED
        self._enter("status", request, context)
        if request.uid and request.uid not in self.sessions:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no session {request.uid!r}")
        chosen = [self.sessions[request.uid]] if request.uid else list(self.sessions.values())
        reply = pb.StatusReply()
        for s in chosen:
            st = reply.sessions.add(
                uid=s.uid,
                role=s.role,
                state=s.state,
                listeners=s.listeners,
                targets=s.targets,
                prod_listeners=s.prod_listeners,
                security=s.security,
                num_conn=s.num_conn,
                created_at=s.created,
                bytes_to_target=1234,
                bytes_from_target=56,
                connections_active=1,
                connections_total=1,
            )
            if s.listeners and s.targets:
                st.connections.add(
                    listener=s.listeners[0],
                    peer="127.0.0.1:40000",
                    target=s.targets[0],
                    bytes_to_target=1234,
                    bytes_from_target=56,
                    rate_to_target=1e6,
                )
        return reply

    def server_info(self, request: pb.ServerInfoRequest, context: grpc.ServicerContext) -> pb.ServerInfo:
        if not self.extensions:
            return super().server_info(request, context)  # UNIMPLEMENTED
        self._enter("server_info", request, context)
        return pb.ServerInfo(
            version="fake",
            extensions=["status", "session_key", "security", "events"],
            events=self.events_endpoint,
            default_security=self.default_security,
            listener_ip=self.listener_ip,
        )


@dataclass
class Running:
    fake: FakeS2cs
    address: str
    cert: Path | None


@contextmanager
def serve(
    fake: FakeS2cs, *, cert: Path | None = None, key: Path | None = None, events: bool = False
) -> Iterator[Running]:
    """Run ``fake`` on 127.0.0.1:<kernel port>, TLS when cert/key are given."""
    ctx: Any = None
    if events:
        ctx = zmq.Context()
        fake._pub = ctx.socket(zmq.PUB)
        fake._pub.setsockopt(zmq.LINGER, 0)
        port = fake._pub.bind_to_random_port("tcp://127.0.0.1")
        fake.events_endpoint = f"tcp://127.0.0.1:{port}"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    pb_grpc.add_ControlServicer_to_server(fake, server)
    if cert and key:
        creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
        port = server.add_secure_port("127.0.0.1:0", creds)
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield Running(fake, f"127.0.0.1:{port}", cert)
    finally:
        server.stop(grace=None)
        for s in list(fake.sessions.values()):
            s.hello.set()
        if ctx is not None:
            fake._pub.close(0)
            ctx.term()
