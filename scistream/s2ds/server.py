"""The s2ds daemon: hosts one engine behind a ZeroMQ control socket.

The socket is a ROUTER so that every command runs as its own task: a slow one
(Drain) never stops the daemon from answering stats or ping. Clients speak to
it like a REP socket (REQ, or DEALER with an empty delimiter frame). Engine
calls block, so commands run on a bounded pool of daemon threads
(``COMMAND_THREADS``; a burst of commands queues instead of starting a thread
each), and a drain, which may last as long as its streams, on a thread of its
own so it never holds a pool thread. Daemon threads: a wedged engine call can
never keep the process from exiting on a second signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import queue
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import zmq
import zmq.asyncio
from google.protobuf.message import DecodeError

from scistream import __version__
from scistream._proto import dataplane_pb2 as pb
from scistream.dataplane import EngineBase, EngineError
from scistream.s2ds import convert
from scistream.s2ds.keys import check_client_key_dir, load_keypair
from scistream.s2ds.paths import ipc_path

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Commands are small; anything bigger is not ours.
MAX_COMMAND_BYTES = 4 << 20
#: How long a second signal may take before the process exits regardless.
FORCED_EXIT_S = 1.5


class DaemonError(Exception):
    """The daemon cannot start; the message is one human sentence."""


@dataclass(frozen=True)
class CurveServerConfig:
    secret_file: str  # the daemon's .key_secret file
    client_keys_dir: str  # directory of admitted clients' public *.key files


def probe(
    address: str,
    timeout: float = 0.5,
    *,
    curve_server_public: bytes | None = None,
    curve_keys: tuple[bytes, bytes] | None = None,
) -> dict[str, Any] | None:
    """Ping ``address`` once; the PingReply as a dict, or None if nobody answers in time."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        if curve_server_public and curve_keys:
            sock.curve_serverkey = curve_server_public
            sock.curve_publickey, sock.curve_secretkey = curve_keys
        sock.connect(address)
        sock.send_multipart([b"", pb.Command(ping=pb.Ping()).SerializeToString()])
        if not sock.poll(int(timeout * 1000)):
            return None
        reply = pb.Reply.FromString(sock.recv_multipart()[-1])
        return {"version": reply.ping.version, "engine": reply.ping.engine, "pid": reply.ping.pid}
    except (zmq.ZMQError, DecodeError):
        return None
    finally:
        sock.close(linger=0)


class ControlLock:
    """Makes a node's ipc control socket single-owner.

    The flock on ``<socket>.lock`` is the race-free part; the ping catches a
    daemon that holds the socket without the lock, and a socket file with no
    listener behind it (a crashed daemon) is removed.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.path = ipc_path(address)
        self._fd = -1

    def acquire(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            owner = _read_pid(lock_path)
            raise DaemonError(
                f"another s2ds{f' (pid {owner})' if owner else ''} is already serving {self.address}"
            ) from None
        self._fd = fd
        if self.path.exists() or self.path.is_symlink():
            answer = probe(self.address)
            if answer is not None:
                self.release()
                raise DaemonError(f"another s2ds (pid {answer['pid']}) is already serving {self.address}")
            log.info("removing stale control socket %s (no daemon answers on it)", self.path)
            self.path.unlink()
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self._fd < 0:
            return
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        os.ftruncate(self._fd, 0)  # no pid left behind for a later reader to mistake as live
        os.close(self._fd)  # drops the flock; the lock file itself may stay
        self._fd = -1


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip() or "0") or None
    except (OSError, ValueError):
        return None


#: Threads that run engine commands (add, remove, stats, ...); more commands wait.
COMMAND_THREADS = 4


def _call_job(fn: Callable[..., T], args: tuple[Any, ...]) -> tuple[asyncio.Future[T], Callable[[], None]]:
    """A future on the running loop and the job that runs ``fn(*args)`` (in some thread)
    and settles the future with its result or exception."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, exc: BaseException | None) -> None:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)

    def run() -> None:
        try:
            result, exc = fn(*args), None
        except BaseException as e:  # handed to the awaiting task
            result, exc = None, e
        with contextlib.suppress(RuntimeError):  # the loop is already closed: nobody waits
            loop.call_soon_threadsafe(settle, result, exc)

    return fut, run


def in_daemon_thread(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """Run a blocking call in a daemon thread of its own; the future resolves on the loop."""
    fut, job = _call_job(fn, args)
    threading.Thread(target=job, daemon=True, name=f"s2ds-{getattr(fn, '__name__', 'call')}").start()
    return fut


class CommandPool:
    """A fixed number of daemon threads that run engine calls in arrival order.

    concurrent.futures' pool joins its (non-daemon) threads at exit, which a wedged
    engine call would block; these threads are daemons and are started on first use."""

    def __init__(self, size: int = COMMAND_THREADS) -> None:
        self._size = size
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        fut, job = _call_job(fn, args)
        self._jobs.put(job)
        if len(self._threads) < self._size:
            t = threading.Thread(target=self._work, daemon=True, name=f"s2ds-cmd-{len(self._threads)}")
            self._threads.append(t)
            t.start()
        return fut

    def _work(self) -> None:
        while True:
            self._jobs.get()()


class Daemon:
    """One engine, one control socket; ``run()`` returns the process exit code.

    Exit codes: 0 after a complete drain, 1 when ``drain_timeout`` cut streams,
    128+signal when a second signal forced the exit.
    """

    def __init__(
        self,
        engine: EngineBase,
        address: str,
        *,
        curve: CurveServerConfig | None = None,
        drain_timeout: float = 0.0,
        idle_exit: float = 0.0,
    ) -> None:
        self.engine = engine
        self.address = address
        self.curve = curve
        self.drain_timeout = drain_timeout  # 0: wait for streams however long they take
        self.idle_exit = idle_exit  # 0: never; else exit after this long with no route and no command
        self._last_command = 0.0
        self._stopping = False
        self._forced = False
        self._exit: asyncio.Future[int] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._pool = CommandPool()

    def run(self) -> int:
        return asyncio.run(self._main())

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        self._exit = loop.create_future()
        ctx = zmq.asyncio.Context()
        auth = None
        sock = ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_COMMAND_BYTES)
        try:
            # Before anything can be seen from outside (the socket, the log line): a
            # signal from then on drains, it never kills the process half started.
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_signal, sig)
            if self.curve is not None:
                from zmq.auth.asyncio import AsyncioAuthenticator

                check_client_key_dir(self.curve.client_keys_dir)
                public, secret = load_keypair(self.curve.secret_file)
                auth = AsyncioAuthenticator(ctx)
                auth.start()
                auth.configure_curve(domain="*", location=self.curve.client_keys_dir)
                sock.curve_server = True
                sock.curve_publickey, sock.curve_secretkey = public, secret
            path = ipc_path(self.address)
            # Whoever can connect here can open relays on this node (and is sent keys):
            # the ipc socket is 0600 from its creation (libzmq creates it in bind() on
            # this thread, under this umask), not chmod-ed after a window at the umask.
            old_umask = os.umask(0o077) if path is not None else None
            try:
                sock.bind(self.address)
            except zmq.ZMQError as exc:
                raise DaemonError(f"cannot listen on {self.address}: {exc.strerror}") from None
            finally:
                if old_umask is not None:
                    os.umask(old_umask)
            if path is not None:
                os.chmod(path, 0o600)  # 0700 from the umask; x means nothing on a socket
                st = os.lstat(path)
                if st.st_uid != os.geteuid() or st.st_mode & 0o077:
                    raise DaemonError(f"the control socket {path} is not private after binding")
            try:
                workers = (await self._pool.run(self.engine.stats)).workers  # what the engine really runs
            except EngineError:  # a signal during start-up closed it already
                workers = 0
            log.info(
                "s2ds %s serving %s (engine %s, %d workers%s)",
                __version__,
                self.address,
                self.engine.name,
                workers,
                ", CURVE" if self.curve else "",
            )
            self._last_command = loop.time()
            receiver = asyncio.create_task(self._receive(sock))
            idle = asyncio.create_task(self._exit_when_idle()) if self.idle_exit > 0 else None
            code = await self._exit
            for background in (receiver, idle):
                if background is not None:
                    background.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await background
            for task in list(self._tasks):
                task.cancel()
            return code
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            sock.close(linger=0)
            if auth is not None:
                auth.stop()
            ctx.destroy(linger=0)

    async def _receive(self, sock: zmq.asyncio.Socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            frames = await sock.recv_multipart()
            if len(frames) < 2:
                continue  # no routing identity: not a well-formed peer
            self._last_command = loop.time()
            task = asyncio.create_task(self._answer(sock, frames[:-1], frames[-1]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(self, sock: zmq.asyncio.Socket, envelope: list[bytes], payload: bytes) -> None:
        reply = await self.execute(payload)
        with contextlib.suppress(zmq.ZMQError):  # the peer left; nobody to tell
            await sock.send_multipart([*envelope, reply.SerializeToString()])

    async def execute(self, payload: bytes) -> pb.Reply:
        """One Command in, one Reply out; never raises."""
        try:
            cmd = pb.Command.FromString(payload)
        except DecodeError:
            return pb.Reply(
                ok=False, error_code="invalid", error="the command is not a dataplane.proto Command"
            )
        which = cmd.WhichOneof("cmd")
        if which is None:
            return pb.Reply(ok=False, error_code="invalid", error="the command is empty")
        if self._stopping and which in ("add_route", "retarget_route"):
            return pb.Reply(
                ok=False, error_code="internal", error="s2ds is shutting down and takes no new routes"
            )
        try:
            return await self._dispatch(cmd, which)
        except (EngineError, ValueError) as exc:
            log.warning("%s refused: %s", which, exc)
            return convert.error_reply(exc)
        except Exception as exc:
            log.error("%s failed: %s", which, exc)
            log.debug("%s failed", which, exc_info=True)
            return convert.error_reply(exc)

    async def _dispatch(self, cmd: pb.Command, which: str) -> pb.Reply:
        e = self.engine
        if which == "ping":
            return pb.Reply(ok=True, ping=pb.PingReply(version=__version__, engine=e.name, pid=os.getpid()))
        if which == "add_route":
            route = convert.spec_to_route(cmd.add_route.route)
            info = await self._pool.run(e.add_route, route)
            log.info(
                "route %s added: %s -> %s (%s%s)",
                route.route_id,
                info.bound,
                ",".join(route.targets),
                f"tls {route.tls.role.value}/{route.tls.mode.value}" if route.tls else "plain",
                f", {route.rate_limit} B/s" if route.rate_limit else "",
            )
            return pb.Reply(ok=True, route=convert.route_info_to_pb(info))
        if which == "retarget_route":
            rt = cmd.retarget_route
            await self._pool.run(e.retarget, rt.route_id, tuple(rt.targets))
            log.info("route %s retargeted to %s", rt.route_id, ",".join(rt.targets))
            return pb.Reply(ok=True)
        if which == "remove_route":
            rm = cmd.remove_route
            await self._pool.run(lambda: e.remove_route(rm.route_id, drain=rm.drain))
            log.info("route %s removed%s", rm.route_id, " (draining)" if rm.drain else "")
            return pb.Reply(ok=True)
        if which == "list_routes":
            infos = await self._pool.run(e.routes)
            return pb.Reply(ok=True, routes=pb.RouteList(routes=[convert.route_info_to_pb(i) for i in infos]))
        if which == "get_stats":
            gs = cmd.get_stats
            stats = await self._pool.run(lambda: e.stats(gs.route_id or None, connections=gs.connections))
            return pb.Reply(ok=True, stats=convert.stats_to_pb(stats))
        if which == "drain":
            timeout = cmd.drain.timeout_s or None
            complete = await in_daemon_thread(e.drain, timeout)
            return pb.Reply(ok=True, drain=pb.DrainReply(complete=complete))
        return pb.Reply(ok=False, error_code="invalid", error=f"unknown command {which}")

    async def _exit_when_idle(self) -> None:
        """--idle-exit: a daemon with no route that no client (s2cs pings it every half
        second) has spoken to for ``idle_exit`` seconds has nothing to do: it exits 0.
        It never exits while it carries a route, however long nobody speaks to it."""
        loop = asyncio.get_running_loop()
        period = min(1.0, max(0.05, self.idle_exit / 4))
        while not self._stopping:
            await asyncio.sleep(period)
            if self._stopping or loop.time() - self._last_command < self.idle_exit or self._tasks:
                continue
            if await self._pool.run(self.engine.routes):
                continue
            if loop.time() - self._last_command < self.idle_exit or self._stopping:
                continue  # a command arrived while the routes were listed
            log.info("no route and no command for %g s: exiting (--idle-exit)", self.idle_exit)
            self._stopping = True
            await self._shutdown()
            return

    def _on_signal(self, sig: signal.Signals) -> None:
        if not self._stopping:
            self._stopping = True
            log.info(
                "%s: draining (no new connections; streams in flight finish); signal again to exit now",
                sig.name,
            )
            task = asyncio.create_task(self._shutdown())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        if self._forced:
            return
        self._forced = True
        code = 128 + sig.value
        log.warning("%s again: closing every connection now", sig.name)
        # Whatever the engine does, the process is gone within FORCED_EXIT_S.
        timer = threading.Timer(FORCED_EXIT_S, os._exit, args=(code,))
        timer.daemon = True
        timer.start()
        closing = in_daemon_thread(self.engine.close)
        closing.add_done_callback(lambda _f: self._finish(code))

    async def _shutdown(self) -> None:
        try:
            complete = await in_daemon_thread(self.engine.drain, self.drain_timeout or None)
            if self._forced:
                return  # a second signal closed the engine under the drain; its exit code stands
            if not complete:
                log.warning(
                    "drain timeout (%.1f s) passed; closing the remaining connections", self.drain_timeout
                )
            await in_daemon_thread(self.engine.close)
        except Exception as exc:
            if self._forced:
                return  # the forced close got there first (the drain was refused)
            log.error("shutdown failed: %s", exc)
            complete = False
        if self._forced:
            return
        log.info("s2ds stopped")
        self._finish(0 if complete else 1)

    def _finish(self, code: int) -> None:
        if self._exit is not None and not self._exit.done():
            self._exit.set_result(code)
