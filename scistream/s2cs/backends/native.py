"""The default backend: a session's routes live in the node's s2ds (DESIGN decision 1).

s2cs only sends commands; the daemon owns the sockets, so streams outlive an
s2cs restart. A session of n connections is n routes ``<uid>/<i>`` labelled
``uid`` and ``role``; every question about a session (running, usage) is
answered from those labels, so nothing here needs its own state to reconcile.

Rate limit: the session's cap is split evenly over its routes (each route has
its own token bucket), so the session as a whole never exceeds the cap.

1.x interop (security "compat"): a key given as hex text (the uid without
dashes) is decoded as a 1.x stunnel decodes it (see scistream/s2ds/psk.py), so
this gateway, a 1.x gateway and the stunnel backend all use the same 16 bytes.

Settings in ``BackendOptions.extra`` (all optional):
``s2ds_curve_server_key`` / ``s2ds_curve_client_key`` (key files for a tcp://
s2ds), ``s2ds_timeout`` (seconds per command, default 5), ``s2ds_args``
(extra ``s2ds serve`` arguments for a spawned daemon, e.g. tuning knobs).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import ClassVar, TypeVar

from scistream.dataplane import (
    COMPAT_PSK_IDENTITY,
    EngineError,
    Route,
    RouteExists,
    RouteNotFound,
    Tls,
    TlsMode,
    TlsRole,
    compat_key_from_uid,
)
from scistream.s2cs.backends.base import (
    Backend,
    BackendError,
    BackendOptions,
    ConnectionUsage,
    SessionPlan,
    SessionUsage,
)
from scistream.s2ds.client import S2dsClient, S2dsUnavailable
from scistream.s2ds.convert import route_to_spec
from scistream.s2ds.keys import CurveKeyError, load_keypair, load_public
from scistream.s2ds.paths import default_control_address, ipc_path
from scistream.s2ds.psk import as_stunnel_key

log = logging.getLogger(__name__)

T = TypeVar("T")

PID_FILE = "s2ds.pid"
LOG_FILE = "s2ds.log"
#: How long a freshly spawned s2ds may take to answer its first ping.
SPAWN_WAIT_S = 20.0

#: Popen objects of daemons this process spawned, so stopping one also reaps it.
_spawned: dict[int, subprocess.Popen[bytes]] = {}


def key_fingerprint(key: bytes) -> str:
    """A label that tells whether a route's key changed without revealing it.

    s2ds never echoes keys back, so apply() compares this instead. It is a
    keyed hash of a 32-byte random secret: it cannot be turned back into the key.
    """
    return hmac.new(b"scistream route key fingerprint", key, hashlib.sha256).hexdigest()[:16]


def session_routes(plan: SessionPlan) -> list[Route]:
    """The s2ds routes that realise a session plan."""
    tls = None
    if plan.security in ("tls", "compat"):
        compat = plan.security == "compat"
        key = plan.psk_key or (compat_key_from_uid(plan.uid) if compat else b"")
        if compat:
            # A 1.x stunnel peer decodes the uid-derived key text as hex; so must we.
            key = as_stunnel_key(key)
        if not key:
            raise BackendError(f"session {plan.uid} asks for TLS but has no key")
        tls = Tls(
            role=TlsRole.SERVER if plan.role == "PROD" else TlsRole.CLIENT,
            mode=TlsMode.COMPAT if compat else TlsMode.PSK,
            psk_identity=plan.psk_identity or (COMPAT_PSK_IDENTITY if compat else plan.uid),
            psk_key=key,
        )
    n = max(1, len(plan.routes))
    per_route = max(1, plan.rate_limit // n) if plan.rate_limit > 0 else 0
    labels = {"uid": plan.uid, "role": plan.role}
    if tls is not None:
        labels["key_fp"] = key_fingerprint(tls.psk_key)
    return [
        Route(
            route_id=rp.route_id,
            listen=rp.listen,
            targets=(rp.target,),
            tls=tls,
            rate_limit=per_route,
            labels=labels,
        )
        for rp in plan.routes
    ]


def _shape(route: Route) -> bytes:
    """Everything about a route except its targets and key (those are compared apart)."""
    spec = route_to_spec(route, with_key=False)
    del spec.targets[:]
    return spec.SerializeToString(deterministic=True)


# --- the daemon's lifecycle -------------------------------------------------------------


def spawn_s2ds(address: str, state_dir: str, extra_args: list[str] | None = None) -> int:
    """Start ``s2ds serve`` detached from this process (own session) so it outlives s2cs.

    Its output goes to ``<state_dir>/s2ds.log``; :func:`record_pid` writes its pid
    to ``<state_dir>/s2ds.pid`` once it answers.
    """
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    cmd = [sys.executable, "-m", "scistream.s2ds", "serve", "--control", address, *(extra_args or [])]
    env = dict(os.environ, SCISTREAM_STATE_DIR=str(state.absolute()))
    log_fd = os.open(state / LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(log_fd)
    _spawned[proc.pid] = proc
    log.info("started s2ds (pid %d) on %s; log %s", proc.pid, address, state / LOG_FILE)
    return proc.pid


def record_pid(state_dir: str, pid: int) -> None:
    """Remember the daemon we started, for :func:`stop_spawned_s2ds`."""
    fd = os.open(Path(state_dir) / PID_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{pid}\n")


def _is_s2ds(pid: int) -> bool:
    """Guards against signalling a recycled pid that is no longer our daemon."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"s2ds" in cmdline


def _gone(pid: int) -> bool:
    proc = _spawned.get(pid)
    if proc is not None:
        return proc.poll() is not None
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")  # a zombie whose parent is not us has stopped all the same


def stop_spawned_s2ds(state_dir: str, timeout: float = 10.0) -> bool:
    """Stop the s2ds whose pid ``spawn_s2ds`` recorded: SIGTERM (drain), then SIGKILL.

    True if a daemon was running and has stopped. For tests, the demo and operators;
    s2cs itself never stops the daemon.
    """
    pid_path = Path(state_dir) / PID_FILE
    try:
        pid = int(pid_path.read_text().strip())
    except (OSError, ValueError):
        return False
    stopped = False
    if not _gone(pid) and _is_s2ds(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not _gone(pid):
            log.warning("s2ds (pid %d) did not drain within %.0f s; killing it", pid, timeout)
            os.kill(pid, signal.SIGKILL)
            while not _gone(pid):
                time.sleep(0.05)
        stopped = True
    proc = _spawned.pop(pid, None)
    if proc is not None:
        proc.wait()
    with contextlib.suppress(FileNotFoundError):
        pid_path.unlink()
    return stopped


def _last_log_line(state_dir: str) -> str:
    try:
        lines = (Path(state_dir) / LOG_FILE).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


# --- the backend ------------------------------------------------------------------------


class NativeBackend(Backend):
    name = "native"
    known_settings: ClassVar[tuple[str, ...]] = (
        "s2ds_curve_server_key",
        "s2ds_curve_client_key",
        "s2ds_timeout",
        "s2ds_args",
    )

    def __init__(self, options: BackendOptions) -> None:
        super().__init__(options)
        self.address = options.s2ds_address or default_control_address(options.state_dir)
        self._client: S2dsClient | None = None

    def _new_client(self) -> S2dsClient:
        extra = self.options.extra
        server_key, client_key = extra.get("s2ds_curve_server_key"), extra.get("s2ds_curve_client_key")
        text = extra.get("s2ds_timeout", "5")
        try:
            timeout = float(text)
        except ValueError:
            timeout = math.nan
        if not (math.isfinite(timeout) and 0 < timeout <= 86400):
            raise BackendError(f"backend setting s2ds_timeout={text!r} is not a number of seconds (0-86400]")
        try:
            if server_key or client_key:
                if not (server_key and client_key):
                    raise BackendError(
                        "a CURVE s2ds needs both s2ds_curve_server_key and s2ds_curve_client_key"
                    )
                return S2dsClient(
                    self.address,
                    curve_server_public=load_public(server_key),
                    curve_keys=load_keypair(client_key),
                    timeout=timeout,
                )
            return S2dsClient(self.address, timeout=timeout)
        except (CurveKeyError, ValueError) as exc:
            raise BackendError(f"cannot reach s2ds at {self.address}: {exc}") from None

    @property
    def client(self) -> S2dsClient:
        if self._client is None:
            raise BackendError("the native backend was not started")
        return self._client

    async def start(self) -> None:
        client = self._new_client()
        try:
            if await self._answers(client, 1.0) or await self._wait_for_starting_daemon(client):
                info = await client.ping()
                log.info(
                    "using s2ds %s (pid %d, engine %s) at %s",
                    info["version"],
                    info["pid"],
                    info["engine"],
                    self.address,
                )
            elif not self._may_spawn():
                raise BackendError(
                    f"no s2ds answers on {self.address}; start one with `s2ds serve --control {self.address}`"
                )
            else:
                await self._spawn_and_wait(client)
        except BaseException:
            await client.close()
            raise
        self._client = client

    @staticmethod
    async def _answers(client: S2dsClient, timeout: float) -> bool:
        path = ipc_path(client.address)
        if path is not None and not path.exists():
            return False  # no socket file: nobody to wait for
        try:
            await client.ping(timeout=timeout)
        except S2dsUnavailable:
            return False
        return True

    async def _spawn_and_wait(self, client: S2dsClient) -> None:
        extra_args = shlex.split(self.options.extra.get("s2ds_args", ""))
        pid = spawn_s2ds(self.address, self.options.state_dir, extra_args)
        deadline = time.monotonic() + SPAWN_WAIT_S
        while time.monotonic() < deadline:
            proc = _spawned.get(pid)
            if proc is not None and proc.poll() is not None:
                _spawned.pop(pid, None)
                if await self._answers(client, 1.0):
                    return  # another s2ds (started meanwhile, e.g. by systemd) won the socket; use it
                raise BackendError(
                    f"s2ds exited at start (code {proc.returncode}): {_last_log_line(self.options.state_dir)}"
                )
            if await self._answers(client, 0.5):
                if (await client.ping())["pid"] == pid:
                    record_pid(self.options.state_dir, pid)
                return
            await asyncio.sleep(0.1)
        raise BackendError(f"s2ds (pid {pid}) did not answer on {self.address} within {SPAWN_WAIT_S:g} s")

    async def _wait_for_starting_daemon(self, client: S2dsClient) -> bool:
        """True once a daemon that holds the socket's lock (still starting up) answers.

        Read-only: it never takes the lock itself, which could make that daemon's
        own non-blocking lock attempt fail."""
        path = ipc_path(self.address)
        if path is None:
            return False
        try:
            owner = int(path.with_name(path.name + ".lock").read_text().strip() or "0")
        except (OSError, ValueError):
            return False
        deadline = time.monotonic() + SPAWN_WAIT_S
        while owner and not _gone(owner) and _is_s2ds(owner) and time.monotonic() < deadline:
            if await self._answers(client, 0.5):
                return True
            await asyncio.sleep(0.1)
        return False

    def _may_spawn(self) -> bool:
        return self.options.spawn_s2ds and ipc_path(self.address) is not None

    async def _reach(self, call: Callable[[], Awaitable[T]]) -> T:
        """The first command of an operation: if the daemon died (a crash takes its
        routes with it), start a new one so the session layer can re-apply."""
        try:
            return await call()
        except S2dsUnavailable:
            if not self._may_spawn() or await self._answers(self.client, 1.0):
                raise
            log.warning("s2ds at %s stopped answering; starting a new one", self.address)
            await self._spawn_and_wait(self.client)
            return await call()

    async def apply(self, plan: SessionPlan) -> None:
        desired = session_routes(plan)
        added: list[str] = []
        try:
            existing = {
                i.route.route_id: i.route
                for i in await self._reach(self.client.routes)
                if i.route.labels.get("uid") == plan.uid
            }
            for route in desired:
                current = existing.pop(route.route_id, None)
                if current is not None:
                    if _shape(current) == _shape(route):
                        if current.targets != route.targets:
                            await self.client.retarget(route.route_id, route.targets)
                            log.info("session %s: route %s retargeted", plan.uid, route.route_id)
                        continue
                    await self.client.remove_route(route.route_id)  # changed: replace it
                try:
                    await self.client.add_route(route)
                except RouteExists:
                    # Same id without our labels: a leftover of this session; ours wins.
                    await self.client.remove_route(route.route_id)
                    await self.client.add_route(route)
                added.append(route.route_id)
            for stale in existing:
                with contextlib.suppress(RouteNotFound):
                    await self.client.remove_route(stale)
        except EngineError as exc:
            for route_id in added:  # no half-applied session
                with contextlib.suppress(EngineError):
                    await self.client.remove_route(route_id)
            raise BackendError(f"session {plan.uid}: {exc}") from None
        log.info("session %s: %d route(s) applied on s2ds", plan.uid, len(desired))

    async def _session_route_ids(self, uid: str) -> list[str]:
        infos = await self._reach(self.client.routes)
        return [i.route.route_id for i in infos if i.route.labels.get("uid") == uid]

    async def remove(self, uid: str, *, drain: bool = False) -> None:
        try:
            for route_id in await self._session_route_ids(uid):
                with contextlib.suppress(RouteNotFound):
                    await self.client.remove_route(route_id, drain)
        except EngineError as exc:
            raise BackendError(f"session {uid}: {exc}") from None

    async def running_sessions(self) -> set[str]:
        try:
            infos = await self._reach(self.client.routes)
        except EngineError as exc:
            raise BackendError(str(exc)) from None
        return {i.route.labels["uid"] for i in infos if i.route.labels.get("uid")}

    async def usage(self, uid: str) -> SessionUsage:
        try:
            stats = await self._reach(lambda: self.client.stats(connections=True))
        except EngineError as exc:
            raise BackendError(str(exc)) from None
        mine = [rs for rs in stats.routes.values() if rs.labels.get("uid") == uid]
        if not mine:
            return SessionUsage()
        errors: dict[str, int] = {}
        for rs in mine:
            for kind, n in rs.errors.items():
                errors[kind] = errors.get(kind, 0) + n
        return SessionUsage(
            bytes_to_target=sum(rs.bytes_to_target for rs in mine),
            bytes_from_target=sum(rs.bytes_from_target for rs in mine),
            connections_active=sum(rs.connections_active for rs in mine),
            connections_total=sum(rs.connections_total for rs in mine),
            connections=tuple(
                ConnectionUsage(
                    listener=rs.bound,
                    peer=c.peer,
                    target=c.target,
                    bytes_to_target=c.bytes_to_target,
                    bytes_from_target=c.bytes_from_target,
                    started_at=c.started_at,
                )
                for rs in mine
                for c in rs.connections
            ),
            errors=errors,
        )

    async def close(self) -> None:
        # s2ds and its routes stay: streams outlive the control server.
        if self._client is not None:
            await self._client.close()
            self._client = None
