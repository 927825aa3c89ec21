"""The pure-Python reference engine: one asyncio loop in a background thread.

It implements :class:`~scistream.dataplane.api.EngineBase` with the same
semantics as the native engine and serves as the test oracle, the benchmark
baseline and the fallback where no C compiler exists.

How it moves bytes: every connection is a pair of *legs* (asyncio protocols),
the accepted socket and the socket to the target. A leg hands what it reads to
its peer; when the peer's write buffer passes its high-water mark the peer's
``pause_writing`` stops reading on this leg, so memory per connection stays
bounded (buffer size plus one 256 KiB read per direction). FIN is forwarded as
``write_eof`` (half-close), a reset is forwarded as a reset (``SO_LINGER`` 0
and abort).

TLS is done in the leg itself through ``ssl.MemoryBIO`` rather than asyncio's
SSL transport, so that handshake failures can be counted and a half-close can
be forwarded as ``close_notify`` followed by FIN. Python's ``ssl`` module has no
external-PSK API, so only :attr:`TlsMode.CERT` is supported here.

Tuning knobs honoured: ``pipe_size`` (per-direction buffer of a plain leg),
``tls_buffer_size`` (per-direction buffer of a TLS leg), ``sndbuf``, ``rcvbuf``,
``nodelay``, ``congestion`` (best effort), ``notsent_lowat``, ``backlog``,
``max_connections``, ``connect_timeout``, ``idle_timeout``, ``tcp_user_timeout``.
Ignored: ``workers`` (one loop thread; reported as 1), ``cpu_affinity``,
``tls_key_update_bytes`` (Python cannot send a TLS KeyUpdate), ``tls_aes_gcm`` and
``Tls.ciphers`` for TLS 1.3 (Python cannot choose TLS 1.3 suites).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import errno
import functools
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from scistream.dataplane.api import (
    AddressInUse,
    ConnectionStats,
    EngineBase,
    EngineError,
    EngineStats,
    InvalidRoute,
    ResourceCounts,
    Route,
    RouteExists,
    RouteInfo,
    RouteNotFound,
    RouteStats,
    Tls,
    TlsMode,
    TlsRole,
    Tuning,
)
from scistream.dataplane.loglimit import LogLimiter
from scistream.endpoints import format_endpoint, parse_endpoint

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How many connections one readiness event of a listener may accept; keeps one
#: busy route from starving the others.
_ACCEPT_BATCH = 64
#: Plaintext read size when draining a TLS leg's decrypted data.
_TLS_READ = 256 << 10
#: A listener that hits EMFILE/ENFILE retries after this pause instead of spinning.
_ACCEPT_RETRY_S = 0.1


def _set_sockopts(sock: socket.socket, tuning: Tuning) -> None:
    """Apply the per-socket tuning knobs; failures of best-effort knobs are only logged."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    if tuning.nodelay:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tuning.sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, tuning.sndbuf)
    if tuning.rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, tuning.rcvbuf)
    if tuning.tcp_user_timeout:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, tuning.tcp_user_timeout)
    if tuning.notsent_lowat:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, tuning.notsent_lowat)
    if tuning.congestion:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, tuning.congestion.encode())
        except OSError as exc:
            log.debug("TCP_CONGESTION %s not available: %s", tuning.congestion, exc)


def _ssl_context(tls: Tls) -> ssl.SSLContext:
    """The context of one TLS leg; only certificate mode exists in Python's ssl."""
    if tls.mode is not TlsMode.CERT:
        raise InvalidRoute("the pure engine cannot do TLS PSK; use the native engine")
    try:
        if tls.role is TlsRole.SERVER:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(tls.cert_file, tls.key_file)
            if tls.ca_file:  # a CA on the server side means: require client certificates
                ctx.load_verify_locations(tls.ca_file)
                ctx.verify_mode = ssl.CERT_REQUIRED
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.load_verify_locations(tls.ca_file)
            if tls.cert_file and tls.key_file:
                ctx.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidRoute(f"cannot load the TLS certificate, key or CA: {exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


class _TokenBucket:
    """A shared byte budget: consumers may overdraw and then wait off the debt.

    Overdrawing (rather than refusing a read) keeps the long-run rate exact
    whatever the read sizes; the burst is a tenth of a second of rate.
    """

    def __init__(self, rate: int, now: float) -> None:
        self.rate = float(rate)
        self.burst = max(self.rate / 10.0, 16384.0)
        self.tokens = self.burst
        self.last = now

    def consume(self, n: int, now: float) -> float:
        """Take ``n`` bytes; return how long the caller must wait before reading again."""
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class _RouteState:
    """A route as the loop runs it: listener, round-robin position, counters."""

    def __init__(self, route: Route, sock: socket.socket, bound: str, now: float) -> None:
        self.route = route
        self.sock: socket.socket | None = sock
        self.bound = bound
        self.next_index = 0
        self.bytes_to_target = 0
        self.bytes_from_target = 0
        self.connections_total = 0
        self.errors: dict[str, int] = {}
        self.started_at = time.time()
        self.conns: set[_Conn] = set()
        self.bucket = _TokenBucket(route.rate_limit, now) if route.rate_limit else None
        self.client_ctx: ssl.SSLContext | None = None
        self.target_ctx: ssl.SSLContext | None = None
        if route.tls is not None:
            ctx = _ssl_context(route.tls)
            if route.tls.role is TlsRole.SERVER:
                self.client_ctx = ctx
            else:
                self.target_ctx = ctx

    def count(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def next_target(self) -> str:
        targets = self.route.targets
        target = targets[self.next_index % len(targets)]
        self.next_index += 1
        return target


class _Leg(asyncio.Protocol):
    """One socket of a connection; forwards what it reads to its peer leg."""

    def __init__(self, conn: _Conn, side: str, ctx: ssl.SSLContext | None, server_hostname: str) -> None:
        self.conn = conn
        self.side = side  # "client" (accepted) or "target"
        self.transport: asyncio.Transport | None = None
        self.peer: _Leg | None = None
        self.paused: set[str] = set()
        self.eof_in = False  # the far end has finished sending (FIN or close_notify)
        self.eof_out = False  # we have finished sending to the far end
        self.raw_eof = False  # TCP FIN seen: the transport reads no more
        self.lost = False
        self.pending: list[bytes] = []  # read before the peer leg existed
        self.rate_until = 0.0
        self.rate_handle: asyncio.TimerHandle | None = None
        self.up: asyncio.Future[None] = conn.engine.loop.create_future()
        self.ssl_obj: ssl.SSLObject | None = None
        self.ssl_in = ssl.MemoryBIO()
        self.ssl_out = ssl.MemoryBIO()
        self.handshaken = ctx is None
        if ctx is not None:
            self.ssl_obj = ctx.wrap_bio(
                self.ssl_in, self.ssl_out,
                server_side=(side == "client"),
                server_hostname=server_hostname or None,
            )
            conn.engine.n_ssl += 1

    # ---- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        high = self.conn.engine.buffer_size(self.ssl_obj is not None)
        transport.set_write_buffer_limits(high=high, low=high // 4)
        if self.ssl_obj is None:
            self.up.set_result(None)
            self.pause("link")  # nothing to read until the peer leg exists
        elif self.side == "target":
            self._handshake()

    def data_received(self, data: bytes) -> None:
        self.conn.touch()
        if self.ssl_obj is None:
            self._app_data(data)
            return
        self.ssl_in.write(data)
        if not self.handshaken:
            self._handshake()
            if not self.handshaken:
                return
        self._tls_read()

    def eof_received(self) -> bool:
        self.raw_eof = True
        if self.ssl_obj is not None and not self.handshaken:
            self._fail_handshake(ConnectionResetError("the peer closed during the TLS handshake"))
            return False
        # A TLS peer that closes without close_notify still ends its stream here.
        self._app_eof()
        return True

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause("backpressure")

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.resume("backpressure")

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        engine = self.conn.engine
        engine.n_fds -= 1
        if self.ssl_obj is not None:
            engine.n_ssl -= 1
            self.ssl_obj = None
        if self.rate_handle is not None:
            self.rate_handle.cancel()
        if not self.up.done():
            self.up.set_exception(exc or ConnectionResetError("connection closed"))
        self.conn.leg_lost(self, exc)

    # ---- reading ------------------------------------------------------------

    def pause(self, why: str) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused.add(why)

    def resume(self, why: str) -> None:
        self.paused.discard(why)
        if self.paused or self.transport is None or self.lost or self.raw_eof:
            return
        if not self.transport.is_reading():
            self.transport.resume_reading()

    def _app_data(self, data: bytes) -> None:
        conn = self.conn
        bucket = conn.route.bucket
        if bucket is not None:
            loop = conn.engine.loop
            delay = bucket.consume(len(data), loop.time())
            if delay > 0:
                self._rate_pause(loop, delay)
        if self.peer is None:
            # Counted once sent: a target that never comes up got none of it. (Debian's
            # Python 3.11.2 reads once despite pause_reading() in connection_made.)
            self.pending.append(data)
            self.pause("link")
        else:
            conn.add_bytes(self.side, len(data))
            self.peer.send(data)

    def _rate_pause(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        until = loop.time() + delay
        if until <= self.rate_until:
            return
        self.rate_until = until
        if self.rate_handle is not None:
            self.rate_handle.cancel()
        self.pause("rate")
        self.rate_handle = loop.call_at(until, self.resume, "rate")

    def _app_eof(self) -> None:
        if self.eof_in:
            return
        self.eof_in = True
        if self.peer is not None:
            self.peer.send_eof()
        self.conn.maybe_done()

    # ---- writing ------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self.transport is None or self.lost or self.eof_out:
            return
        if self.ssl_obj is None:
            self.transport.write(data)
            return
        try:
            self.ssl_obj.write(data)
        except ssl.SSLError as exc:
            self.conn.fail_io(self, exc)
            return
        self._flush()

    def send_eof(self) -> None:
        if self.eof_out or self.transport is None or self.lost:
            return
        self.eof_out = True
        if self.ssl_obj is not None:
            # close_notify first; the far end may go on sending (TLS 1.3 half-close).
            with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLError, ValueError):
                self.ssl_obj.unwrap()
            self._flush()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.conn.maybe_done()

    def reset(self) -> None:
        """Abort with a TCP RST so the far end sees a reset, not an end of stream."""
        if self.transport is None or self.lost:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def close(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.close()

    # ---- TLS ----------------------------------------------------------------

    def _flush(self) -> None:
        if self.ssl_out.pending and self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.ssl_out.read())

    def _handshake(self) -> None:
        assert self.ssl_obj is not None
        try:
            self.ssl_obj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError) as exc:
            self._flush()  # let the peer see our alert
            self._fail_handshake(exc)
            return
        self.handshaken = True
        self._flush()
        if not self.up.done():
            self.up.set_result(None)

    def _fail_handshake(self, exc: BaseException) -> None:
        log.debug("TLS handshake failed on route %s: %s", self.conn.route.route.route_id, exc)
        if not self.up.done():
            self.up.set_exception(ssl.SSLError(f"TLS handshake failed: {exc}"))
        self.conn.handshake_failed = True
        if self.transport is not None:
            self.transport.close()

    def _tls_read(self) -> None:
        while self.ssl_obj is not None and not self.eof_in:
            try:
                chunk = self.ssl_obj.read(_TLS_READ)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self._app_eof()
                break
            except ssl.SSLError as exc:
                self.conn.fail_io(self, exc)
                return
            if not chunk:
                self._app_eof()
                break
            self._app_data(chunk)
        self._flush()  # post-handshake messages (tickets, key update replies)


class _Conn:
    """One accepted connection and its connection to a target."""

    def __init__(self, engine: PyEngine, route: _RouteState, conn_id: int, peer: str, target: str) -> None:
        self.engine = engine
        self.route = route
        self.conn_id = conn_id
        self.peer = peer
        self.target = target
        self.bytes_to_target = 0
        self.bytes_from_target = 0
        self.started_at = time.time()
        self.last_active = engine.loop.time()
        self.client: _Leg | None = None
        self.target_leg: _Leg | None = None
        self.setup: asyncio.Task[None] | None = None
        self.setup_done = False  # set by the setup task itself, which cannot ask setup.done()
        self.finished = False
        self.failed = False
        self.handshake_failed = False
        engine.n_conns += 1
        route.conns.add(self)
        route.connections_total += 1

    def touch(self) -> None:
        self.last_active = self.engine.loop.time()

    def add_bytes(self, side: str, n: int) -> None:
        if side == "client":
            self.bytes_to_target += n
            self.route.bytes_to_target += n
        else:
            self.bytes_from_target += n
            self.route.bytes_from_target += n

    def legs(self) -> list[_Leg]:
        return [leg for leg in (self.client, self.target_leg) if leg is not None]

    def link(self) -> None:
        client, target = self.client, self.target_leg
        assert client is not None and target is not None
        client.peer, target.peer = target, client
        for src, dst in ((client, target), (target, client)):
            for data in src.pending:
                self.add_bytes(src.side, len(data))
                dst.send(data)
            src.pending.clear()
            if src.eof_in:
                dst.send_eof()
        client.resume("link")
        target.resume("link")
        self.maybe_done()

    def maybe_done(self) -> None:
        """Both directions ended with a FIN each way: close both sockets gracefully."""
        if self.client is None or self.target_leg is None or self.client.peer is None:
            return
        c, t = self.client, self.target_leg
        if c.eof_in and t.eof_out and t.eof_in and c.eof_out:
            c.close()
            t.close()

    def abort(self, kind: str | None, *, reset: bool) -> None:
        """End the connection now (counting ``kind``), with RSTs when ``reset``."""
        if self.failed:
            return
        self.failed = True
        if kind is not None:
            self.route.count(kind)
        if self.setup is not None and not self.setup.done():
            self.setup.cancel()
        for leg in self.legs():
            if reset:
                leg.reset()
            elif leg.transport is not None and not leg.lost:
                leg.transport.abort()

    def fail_io(self, leg: _Leg, exc: BaseException) -> None:
        log.debug("connection %d: %s", self.conn_id, exc)
        self.abort("io", reset=True)

    def leg_lost(self, leg: _Leg, exc: Exception | None) -> None:
        if exc is not None and not self.failed and leg.peer is not None:
            # A socket error on an established connection: pass it on as a reset.
            kind = "reset" if isinstance(exc, (ConnectionResetError, BrokenPipeError)) else "io"
            log.debug("connection %d %s leg: %s", self.conn_id, leg.side, exc)
            self.abort(kind, reset=True)
        elif leg.peer is not None and not (leg.eof_in and leg.eof_out):
            # Closed by us (remove_route, idle timeout) or a half-finished close:
            # make sure the other side goes too.
            other = leg.peer
            if not other.lost and not self.failed and other.transport is not None:
                if exc is None and leg.eof_in and not other.eof_out:
                    other.send_eof()
                other.close()
        self.maybe_finish()

    def maybe_finish(self) -> None:
        if self.finished:
            return
        if not self.setup_done:
            return
        if any(not leg.lost for leg in self.legs()):
            return
        self.finished = True
        self.engine.n_conns -= 1
        self.route.conns.discard(self)
        self.engine.conn_finished()

    def stats(self) -> ConnectionStats:
        return ConnectionStats(self.conn_id, self.peer, self.target, self.bytes_to_target,
                               self.bytes_from_target, self.started_at)


class PyEngine(EngineBase):
    """The reference engine; see the module docstring for what it honours."""

    name = "pure"

    def __init__(self, tuning: Tuning | None = None) -> None:
        super().__init__(tuning)
        self.loop = asyncio.new_event_loop()
        self._routes: dict[str, _RouteState] = {}
        self._detached: set[_RouteState] = set()  # removed with drain, connections still running
        self._next_conn_id = 1
        self._closed = False
        self._close_lock = threading.Lock()
        self._idle_task: asyncio.Task[None] | None = None
        self._drain_waiters: list[asyncio.Future[None]] = []
        self.n_fds = 0
        self.n_ssl = 0
        self.n_conns = 0
        self.log_limit = LogLimiter(log)  # per-connection lines; used on the loop thread only
        self._thread = threading.Thread(target=self._run_loop, name="scistream-pyengine", daemon=True)
        self._thread.start()
        if self.tuning.idle_timeout > 0:
            self._call(self._start_idle_reaper)

    # ---- thread plumbing -------------------------------------------------------

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the loop thread and return its result (or raise its error)."""
        if self._closed:
            raise EngineError("the engine is closed")
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # handed to the calling thread
                fut.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return fut.result()

    def _await(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if self._closed:
            coro.close()
            raise EngineError("the engine is closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def buffer_size(self, tls: bool) -> int:
        return max(self.tuning.tls_buffer_size if tls else self.tuning.pipe_size, 4096)

    # ---- routes ------------------------------------------------------------------

    def add_route(self, route: Route) -> RouteInfo:
        if route.tls is not None and route.tls.mode is not TlsMode.CERT:
            raise InvalidRoute("the pure engine cannot do TLS PSK; use the native engine")
        return self._call(self._add_route, route)

    def _add_route(self, route: Route) -> RouteInfo:
        if route.route_id in self._routes:
            raise RouteExists(f"route {route.route_id} already exists")
        sock = self._listener(route)
        self.n_fds += 1
        try:
            host, port = sock.getsockname()[:2]
            state = _RouteState(route, sock, format_endpoint(host, port), self.loop.time())
        except BaseException:
            sock.close()
            self.n_fds -= 1
            raise
        self._routes[route.route_id] = state
        self.loop.add_reader(sock.fileno(), self._on_accept, state)
        log.debug("route %s listening on %s", route.route_id, state.bound)
        return RouteInfo(route, state.bound)

    def _listener(self, route: Route) -> socket.socket:
        if route.listen_fd >= 0:
            try:
                sock = socket.socket(fileno=route.listen_fd)
            except OSError as exc:
                raise InvalidRoute(
                    f"route {route.route_id}: listen_fd {route.listen_fd} is not a socket") from exc
            try:
                sock.listen(self.tuning.backlog)
            except OSError as exc:
                sock.close()
                raise InvalidRoute(
                    f"route {route.route_id}: cannot listen on fd {route.listen_fd}: {exc}") from exc
            sock.setblocking(False)
            return sock
        host, port = parse_endpoint(route.listen, allow_port_zero=True)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise InvalidRoute(f"route {route.route_id}: cannot resolve {host}: {exc.strerror}") from None
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            _set_sockopts(sock, self.tuning)
            sock.bind(addr)
            sock.listen(self.tuning.backlog)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUse(
                    f"route {route.route_id}: address {route.listen} is already in use") from None
            raise InvalidRoute(
                f"route {route.route_id}: cannot listen on {route.listen}: {exc.strerror}") from None
        return sock

    def _close_listener(self, state: _RouteState) -> None:
        if state.sock is None:
            return
        self.loop.remove_reader(state.sock.fileno())
        state.sock.close()
        state.sock = None
        self.n_fds -= 1

    def retarget(self, route_id: str, targets: Sequence[str]) -> None:
        targets = tuple(targets)
        self._call(self._retarget, route_id, targets)

    def _retarget(self, route_id: str, targets: tuple[str, ...]) -> None:
        state = self._route(route_id)
        try:
            state.route = dataclasses.replace(state.route, targets=targets)  # validates the targets
        except ValueError as exc:
            raise InvalidRoute(str(exc)) from None

    def remove_route(self, route_id: str, *, drain: bool = False) -> None:
        self._await(self._remove_route(route_id, drain))

    async def _remove_route(self, route_id: str, drain: bool) -> None:
        state = self._route(route_id)
        del self._routes[route_id]
        self._close_listener(state)
        if drain and state.conns:
            self._detached.add(state)
            return
        for conn in list(state.conns):
            conn.abort(None, reset=False)
        await asyncio.sleep(0)  # let the transports deliver connection_lost
        self.log_limit.flush(route_id)

    def _route(self, route_id: str) -> _RouteState:
        try:
            return self._routes[route_id]
        except KeyError:
            raise RouteNotFound(f"no route {route_id}") from None

    def routes(self) -> list[RouteInfo]:
        return self._call(lambda: [RouteInfo(s.route, s.bound) for s in self._routes.values()])

    # ---- accepting and connecting ----------------------------------------------------

    def _on_accept(self, state: _RouteState) -> None:
        for _ in range(_ACCEPT_BATCH):
            if state.sock is None:
                return
            try:
                csock, addr = state.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                state.count("accept")
                route_id = state.route.route_id
                self.log_limit.log(route_id, "accept", logging.WARNING, "route %s: accept failed: %s",
                                   route_id, exc.strerror)
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._backoff_accept(state)
                return
            self.n_fds += 1
            limit = state.route.max_connections or self.tuning.max_connections
            if limit and len(state.conns) >= limit:
                state.count("max_connections")
                csock.close()
                self.n_fds -= 1
                continue
            peer = format_endpoint(addr[0], addr[1])
            conn = _Conn(self, state, self._next_conn_id, peer, state.next_target())
            self._next_conn_id += 1
            conn.setup = self.loop.create_task(self._setup(conn, csock))
            conn.setup.add_done_callback(functools.partial(self._setup_ended, conn, csock))

    def _setup_ended(self, conn: _Conn, csock: socket.socket, _task: asyncio.Task[None]) -> None:
        if conn.setup_done:
            return
        # Cancelled before it ever ran (close or remove_route right after accept): the
        # accepted socket is still ours to close.
        csock.close()
        self.n_fds -= 1
        conn.setup_done = True
        conn.maybe_finish()

    def _backoff_accept(self, state: _RouteState) -> None:
        sock = state.sock
        if sock is None:
            return
        self.loop.remove_reader(sock.fileno())

        def again() -> None:
            if state.sock is sock:
                self.loop.add_reader(sock.fileno(), self._on_accept, state)

        self.loop.call_later(_ACCEPT_RETRY_S, again)

    async def _setup(self, conn: _Conn, csock: socket.socket) -> None:
        state = conn.route
        timeout = self.tuning.connect_timeout
        try:
            try:
                csock.setblocking(False)
                _set_sockopts(csock, self.tuning)
                _, client = await self.loop.connect_accepted_socket(
                    lambda: _Leg(conn, "client", state.client_ctx, ""), csock)
            except BaseException:
                csock.close()
                self.n_fds -= 1
                raise
            conn.client = client
            if state.client_ctx is not None:
                # Not shielded: a timeout or a cancel cancels client.up, so the leg's
                # connection_lost has no exception left to put where nobody reads it.
                try:
                    await asyncio.wait_for(client.up, timeout)
                except (TimeoutError, ssl.SSLError, OSError):
                    conn.abort("tls_handshake", reset=False)
                    return
            kind = await self._connect(conn, timeout)
            if kind is not None:
                conn.abort(kind, reset=False)
                return
            if conn.client.lost:
                conn.abort(None, reset=False)
                return
            conn.link()
        except OSError as exc:
            # Anything else the set-up meets (fds exhausted mid-way, ...) ends this
            # connection, counted, never a half-set-up one left open.
            self.log_limit.log(state.route.route_id, "io", logging.INFO,
                               "route %s: connection set-up failed: %s", state.route.route_id, exc)
            conn.abort("io", reset=False)
        except asyncio.CancelledError:
            for leg in conn.legs():
                if leg.transport is not None and not leg.lost:
                    leg.transport.abort()
        finally:
            conn.setup_done = True
            conn.maybe_finish()

    async def _connect(self, conn: _Conn, timeout: float) -> str | None:
        """Connect (and TLS-handshake) to the connection's target; the error kind or None."""
        state = conn.route
        deadline = self.loop.time() + timeout
        host, port = parse_endpoint(conn.target)
        try:
            infos = await asyncio.wait_for(
                self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)
        except (OSError, TimeoutError) as exc:
            self.log_limit.log(state.route.route_id, "connect_error", logging.INFO,
                               "route %s: cannot resolve %s: %s", state.route.route_id, host, exc)
            return "connect_error"
        kind = "connect_error"
        for family, _, proto, _, addr in infos:
            try:
                sock = socket.socket(family, socket.SOCK_STREAM, proto)
            except OSError as exc:  # EMFILE/ENFILE: out of fds, the accepted side is closed
                self.log_limit.log(state.route.route_id, "connect_error", logging.INFO,
                                   "route %s: no socket for %s: %s",
                                   state.route.route_id, conn.target, exc.strerror)
                kind = "connect_error"
                continue
            self.n_fds += 1
            try:
                sock.setblocking(False)
                _set_sockopts(sock, self.tuning)
                await asyncio.wait_for(self.loop.sock_connect(sock, addr), deadline - self.loop.time())
            except BaseException as exc:
                sock.close()
                self.n_fds -= 1
                if isinstance(exc, ConnectionRefusedError):
                    kind = "connect_refused"
                elif isinstance(exc, TimeoutError):
                    return "connect_timeout"
                elif isinstance(exc, OSError):
                    kind = "connect_error"
                else:
                    raise
                continue
            break
        else:
            self.log_limit.log(state.route.route_id, kind, logging.INFO,
                               "route %s: cannot connect to %s (%s)", state.route.route_id, conn.target, kind)
            return kind
        server_name = (state.route.tls.server_name if state.route.tls else "") or host
        try:
            _, leg = await self.loop.create_connection(
                lambda: _Leg(conn, "target", state.target_ctx, server_name), sock=sock)
        except BaseException:
            sock.close()
            self.n_fds -= 1
            raise
        conn.target_leg = leg
        if state.target_ctx is not None:
            try:
                # Not shielded, as in _setup.
                await asyncio.wait_for(leg.up, max(deadline - self.loop.time(), 0.001))
            except TimeoutError:
                return "connect_timeout"
            except (ssl.SSLError, OSError):
                return "tls_handshake"
        return None

    # ---- timeouts, drain, close ------------------------------------------------------

    def _start_idle_reaper(self) -> None:
        self._idle_task = self.loop.create_task(self._idle_reaper())

    async def _idle_reaper(self) -> None:
        limit = self.tuning.idle_timeout
        while True:
            await asyncio.sleep(min(max(limit / 4, 0.05), 1.0))
            now = self.loop.time()
            for state in [*self._routes.values(), *self._detached]:
                for conn in list(state.conns):
                    linked = conn.client is not None and conn.client.peer is not None
                    if linked and now - conn.last_active > limit:
                        conn.abort("idle_timeout", reset=False)

    def _all_conns(self) -> list[_Conn]:
        return [c for s in [*self._routes.values(), *self._detached] for c in s.conns]

    def conn_finished(self) -> None:
        self._detached = {s for s in self._detached if s.conns}
        if not self._all_conns():
            for fut in self._drain_waiters:
                if not fut.done():
                    fut.set_result(None)
            self._drain_waiters.clear()

    def drain(self, timeout: float | None = None) -> bool:
        return self._await(self._drain(timeout))

    async def _drain(self, timeout: float | None) -> bool:
        for state in self._routes.values():
            self._close_listener(state)
        if not self._all_conns():
            return True
        fut: asyncio.Future[None] = self.loop.create_future()
        self._drain_waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            try:
                self._await(self._shutdown(), timeout=30)
            except (EngineError, concurrent.futures.TimeoutError) as exc:
                log.warning("pure engine did not shut down cleanly: %s", exc)
            self._closed = True
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            if not self._thread.is_alive():
                self.loop.close()

    async def _shutdown(self) -> None:
        if self._idle_task is not None:
            self._idle_task.cancel()
        for state in list(self._routes.values()):
            self._close_listener(state)
        for conn in self._all_conns():
            conn.abort(None, reset=False)
        for _ in range(100):  # aborts and cancellations complete within a few loop turns
            if not self._all_conns():
                break
            await asyncio.sleep(0.01)
        self._routes.clear()
        self._detached.clear()

    # ---- observation -------------------------------------------------------------

    def stats(self, route_id: str | None = None, *, connections: bool = False) -> EngineStats:
        return self._call(self._stats, route_id, connections)

    def _stats(self, route_id: str | None, connections: bool) -> EngineStats:
        self.log_limit.flush()  # sum up the log intervals that are over, as the native engine does
        states = [self._route(route_id)] if route_id is not None else list(self._routes.values())
        out = {}
        for s in states:
            conns = tuple(c.stats() for c in sorted(s.conns, key=lambda c: c.conn_id)) if connections else ()
            out[s.route.route_id] = RouteStats(
                route_id=s.route.route_id, bound=s.bound, targets=s.route.targets,
                bytes_to_target=s.bytes_to_target, bytes_from_target=s.bytes_from_target,
                connections_active=len(s.conns), connections_total=s.connections_total,
                errors=dict(s.errors), started_at=s.started_at, connections=conns,
                labels=dict(s.route.labels))
        return EngineStats(engine=self.name, workers=1, routes=out)

    def resource_counts(self) -> ResourceCounts:
        if self._closed:
            return ResourceCounts(fds=0, pipes=0, ssl_objects=0, connections=0)
        return self._call(lambda: ResourceCounts(fds=self.n_fds, pipes=0, ssl_objects=self.n_ssl,
                                                 connections=self.n_conns))
