"""Helpers of the s2cs tests: an in-test backend, an s2cs on its own loop thread, flows.

``FakeBackend`` keeps the Backend contract with real sockets: ``apply`` binds
every listener and (security "plain") forwards bytes to the target with
asyncio, so tests move real bytes; with a TLS plan it only accepts and closes
(the TLS data plane is the native backend's business, tested elsewhere).

``Producer`` and ``Consumer`` are the stream applications at either end, built on
tests/streams.py (the seeded SHA-256 stream, its StreamServer, connect, recv_stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Collection, Coroutine
from typing import Any, TypeVar

import grpc
from streams import PRODUCER_SEED, Consumer, Producer  # noqa: F401  (re-exported to the s2cs tests)

from scistream._proto import scistream_pb2
from scistream.endpoints import parse_endpoint
from scistream.s2cs.auth import Authenticator
from scistream.s2cs.backends.base import (
    Backend,
    BackendError,
    BackendOptions,
    ConnectionUsage,
    SessionPlan,
    SessionUsage,
    SessionView,
)
from scistream.s2cs.config import ServerConfig
from scistream.s2cs.server import S2CSServer

T = TypeVar("T")


class _Route:
    def __init__(self, target: str) -> None:
        self.server: Any = None
        self.target = target
        self.writers: set[asyncio.StreamWriter] = set()


class FakeBackend(Backend):
    name = "fake"

    def __init__(self, options: BackendOptions | None = None) -> None:
        super().__init__(options or BackendOptions(state_dir="", listener_ip="127.0.0.1"))
        self.plans: dict[str, SessionPlan] = {}
        self.routes: dict[str, list[_Route]] = {}
        self.removed: list[str] = []
        self.applied: list[str] = []
        self.fail_apply = False
        self.keep_on_close = False
        self.bytes: dict[str, list[int]] = {}
        self.conns: dict[str, int] = {}
        self.conn_list: dict[str, list[ConnectionUsage]] = {}
        self.failures: dict[str, str] = {}  # uid -> why its data plane "died"

    async def start(self) -> None:
        pass

    async def apply(self, plan: SessionPlan) -> None:
        if self.fail_apply:
            raise BackendError("the fake data plane refuses every route")
        await self.remove(plan.uid, _record=False)
        routes: list[_Route] = []
        try:
            for r in plan.routes:
                host, port = parse_endpoint(r.listen)
                route = _Route(r.target)
                handler = self._handler(plan, route)
                server = await asyncio.start_server(handler, host, port, reuse_address=True)
                route.server = server
                routes.append(route)
        except OSError as exc:
            for rt in routes:
                rt.server.close()
            raise BackendError(f"cannot listen: {exc.strerror}") from None
        self.plans[plan.uid] = plan
        self.routes[plan.uid] = routes
        self.bytes.setdefault(plan.uid, [0, 0])
        self.conns.setdefault(plan.uid, 0)
        self.applied.append(plan.uid)

    def _handler(self, plan: SessionPlan, route: _Route) -> Callable[..., Coroutine[Any, Any, None]]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve(plan.uid, plan, route, reader, writer)

        return handle

    async def _serve(
        self,
        uid: str,
        plan: SessionPlan,
        route: _Route,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        route.writers.add(writer)
        self.conns[uid] = self.conns.get(uid, 0) + 1
        peer = writer.get_extra_info("peername")
        listen = writer.get_extra_info("sockname")
        self.conn_list.setdefault(uid, []).append(
            ConnectionUsage(
                f"{listen[0]}:{listen[1]}", f"{peer[0]}:{peer[1]}", route.target, 0, 0, time.time()
            )
        )
        try:
            if plan.security != "plain":
                return
            host, port = parse_endpoint(route.target)
            t_reader, t_writer = await asyncio.open_connection(host, port)
            route.writers.add(t_writer)
            counters = self.bytes.setdefault(uid, [0, 0])

            async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, idx: int) -> None:
                try:
                    while data := await src.read(65536):
                        counters[idx] += len(data)
                        dst.write(data)
                        await dst.drain()
                    if dst.can_write_eof():
                        dst.write_eof()
                except (ConnectionError, OSError):
                    pass

            await asyncio.gather(pump(reader, t_writer, 0), pump(t_reader, writer, 1))
            t_writer.close()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def remove(self, uid: str, *, drain: bool = False, _record: bool = True) -> None:
        if _record:
            self.removed.append(uid)
        self.plans.pop(uid, None)
        for route in self.routes.pop(uid, []):
            # A route made on an earlier s2cs's loop (restart tests) may belong to a closed loop.
            with contextlib.suppress(RuntimeError):
                route.server.close()
                for w in list(route.writers):
                    w.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(route.server.wait_closed(), 2)

    async def observe(self, uids: Collection[str] | None = None) -> dict[str, SessionView]:
        views = {}
        for uid in set(self.plans) | set(self.failures) if uids is None else uids:
            if uid not in self.plans and uid not in self.failures:
                continue
            b = self.bytes.get(uid, [0, 0])
            usage = SessionUsage(
                bytes_to_target=b[0],
                bytes_from_target=b[1],
                connections_active=0,
                connections_total=self.conns.get(uid, 0),
                connections=tuple(self.conn_list.get(uid, ())),
            )
            views[uid] = SessionView(
                running=uid in self.plans,
                usage=usage if uid in self.plans else SessionUsage(),
                error=self.failures.get(uid),
            )
        return views

    async def close(self) -> None:
        if not self.keep_on_close:
            for uid in list(self.plans):
                await self.remove(uid, _record=False)


def free_range(size: int = 40) -> tuple[int, int]:
    """A port range below the kernel's ephemeral range, mostly free (busy ports are skipped)."""
    lo = random.randrange(20000, 32000 - size)
    return lo, lo + size - 1


class ServerThread:
    """An s2cs running on its own event loop in a thread, as a real deployment would."""

    def __init__(
        self,
        config: ServerConfig,
        backend: Backend | None = None,
        authenticator: Authenticator | None = None,
    ) -> None:
        self.config = config
        self.backend = backend
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = S2CSServer(config, backend=backend, authenticator=authenticator)
        try:
            self.call(self.server.start())
        except BaseException:
            self.stop()
            raise

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def manager(self) -> Any:
        return self.server.manager

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if not self.thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self.call(self.server.stop(0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def make_config(tmp_path: Any, **overrides: Any) -> ServerConfig:
    base: dict[str, Any] = {
        "port": 0,
        "bind": "127.0.0.1",
        "ssl": False,
        "listener_ip": "127.0.0.1",
        "port_range": free_range(),
        "backend_type": "native",
        "state_dir": str(tmp_path / "state"),
        "events": "ipc",
        "hello_timeout": 10.0,
        "poll_interval": 0.2,
    }
    base.update(overrides)
    return ServerConfig(**base)


def new_uid() -> str:
    import uuid

    return str(uuid.uuid1())


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def bindable(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def prod_flow(
    stub: Any, uid: str, targets: list[str], num_conn: int = 1, security: str = "", timeout: float = 10
) -> Any:
    """req + hello (hello after the req, as 1.x) + update; returns the req Response."""
    fut = stub.req.future(
        scistream_pb2.Request(uid=uid, role="PROD", num_conn=num_conn, rate=10000, security=security),
        timeout=timeout,
    )
    deadline = time.time() + timeout
    while True:
        try:
            stub.hello(scistream_pb2.Hello(uid=uid, prod_listeners=targets, role="PROD"), timeout=timeout)
            break
        except grpc.RpcError:
            if time.time() > deadline:
                raise
            time.sleep(0.05)
    resp = fut.result()
    stub.update(scistream_pb2.UpdateTargets(uid=uid, remote_listeners=targets), timeout=timeout)
    return resp


def establish(prod: Any, cons: Any, uid: str, app_port: int, rate_limit: int = 0) -> tuple[Any, Any]:
    """A one-connection session ``uid`` through two gateways (the stubs ``prod`` and ``cons``)
    to the application on 127.0.0.1:``app_port``: req, hello and update on each side, the
    CONS side's hello after its req (as 1.x). Returns the two req Responses."""
    fut = prod.req.future(
        scistream_pb2.Request(uid=uid, role="PROD", num_conn=1, rate_limit=rate_limit), timeout=30
    )
    prod.hello(
        scistream_pb2.Hello(uid=uid, prod_listeners=[f"127.0.0.1:{app_port}"], role="PROD"), timeout=10
    )
    p = fut.result()
    prod.update(scistream_pb2.UpdateTargets(uid=uid, remote_listeners=list(p.prod_listeners)), timeout=30)
    fut = cons.req.future(scistream_pb2.Request(uid=uid, role="CONS", num_conn=1), timeout=30)
    cons.hello(scistream_pb2.Hello(uid=uid, role="PROD"), timeout=10)
    c = fut.result()
    cons.update(
        scistream_pb2.UpdateTargets(uid=uid, remote_listeners=list(p.listeners), session_key=p.session_key),
        timeout=30,
    )
    return p, c
