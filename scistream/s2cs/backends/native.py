"""The default backend: a session's routes live in the node's s2ds (DESIGN decision 1).

s2cs only sends commands; the daemon owns the sockets, so streams outlive an
s2cs restart. A session of n connections is n routes ``<instance>/<uid>/<i>``
labelled ``s2cs`` (the instance id), ``uid``, ``role`` and ``owner``; every
question about a session (running, usage) is answered from those labels, so
nothing here needs its own state to reconcile. Several s2cs may share one s2ds:
each sees, changes and removes only the routes labelled with its own instance.

Lifecycle of a daemon this backend spawned: it stops with its s2cs when it
carries no route at all (a clean stop with no live session), and otherwise
exits by itself once it has had no route and no command for ``--idle-exit``
seconds (default 60 when spawned here). If it dies, :meth:`data_plane_pid`
says so and :meth:`restart_data_plane` starts a new one.

Rate limit: the session's cap is split evenly over its routes (each route has
its own token bucket), so the session as a whole never exceeds the cap.

1.x interop (security "compat"): a key given as hex text (the uid without
dashes) is decoded as a 1.x stunnel decodes it (see scistream/keys.py), so
this gateway, a 1.x gateway and the stunnel backend all use the same 16 bytes.

WAN credentials: the session's PSK (default); per-session certificates a
HAProxy or nginx PROD gateway minted, carried here by the client (CONS: a
client certificate to present, the listener's to pin; their files exist, 0600,
only while s2ds loads them); or gateway certificates the operator configured
(``tls_cert``, ``tls_key``, ``tls_ca``, ``tls_server_name``: DESIGN decision 9),
for unmodified 1.x clients that carry no key: the PROD listener then requires
a client certificate from ``tls_ca`` and the CONS side presents its own.

Settings in ``BackendOptions.extra`` (all optional):
``s2ds_curve_server_key`` / ``s2ds_curve_client_key`` (key files for a tcp://
s2ds), ``s2ds_timeout`` (seconds per command, default 5), ``s2ds_args``
(extra ``s2ds serve`` arguments for a spawned daemon, e.g. tuning knobs;
``--idle-exit 0`` there keeps an idle spawned daemon forever).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from pathlib import Path
from typing import ClassVar, Literal, TypeVar

from scistream.certs import is_credentials
from scistream.dataplane import (
    COMPAT_PSK_IDENTITY,
    EngineError,
    Route,
    RouteExists,
    RouteNotFound,
    RouteStats,
    Tls,
    TlsMode,
    TlsRole,
)
from scistream.keys import compat_key, compat_key_bytes, key_fingerprint
from scistream.s2cs.backends.base import (
    Backend,
    BackendError,
    BackendOptions,
    ConnectionUsage,
    LiveSession,
    SessionPlan,
    SessionUsage,
    SessionView,
)
from scistream.s2cs.backends.haproxy import CERT_SETTINGS, operator_certs, session_cert_files
from scistream.s2cs.backends.proxyconf import CertFiles
from scistream.s2cs.backends.supervisor import remove_session_dir
from scistream.s2ds.client import S2dsClient, S2dsUnavailable
from scistream.s2ds.convert import route_to_spec
from scistream.s2ds.keys import CurveKeyError, load_keypair, load_public
from scistream.s2ds.paths import default_control_address, ipc_path

log = logging.getLogger(__name__)

T = TypeVar("T")

PID_FILE = "s2ds.pid"
LOG_FILE = "s2ds.log"
#: How long a freshly spawned s2ds may take to answer its first ping.
SPAWN_WAIT_S = 20.0
#: A spawned s2ds with no route and no command for this long exits (s2ds serve --idle-exit).
SPAWNED_IDLE_EXIT_S = 60
#: How long a liveness ping may take before it counts as a miss.
HEARTBEAT_TIMEOUT_S = 0.5
#: Missed pings in a row that mean the daemon is gone when its pid cannot be checked ...
HEARTBEAT_MISSES = 3
#: ... and when its process is still there (hung, or a very loaded node: be patient).
HUNG_MISSES = 10

#: Popen objects of daemons this process spawned, so stopping one also reaps it.
_spawned: dict[int, subprocess.Popen[bytes]] = {}


def session_routes(plan: SessionPlan, certs: CertFiles | None = None, instance: str = "") -> list[Route]:
    """The s2ds routes that realise a session plan, namespaced by the s2cs ``instance``;
    ``certs``: certificate files to use instead of a PSK (a tls plan only)."""
    tls = None
    if plan.security == "tls" and certs is not None:
        tls = Tls(
            role=TlsRole.SERVER if plan.role == "PROD" else TlsRole.CLIENT,
            mode=TlsMode.CERT,
            cert_file=certs.cert,
            key_file=certs.key,
            ca_file=certs.ca,
            server_name=certs.server_name,
        )
    elif plan.security in ("tls", "compat"):
        compat = plan.security == "compat"
        key = plan.psk_key or (compat_key(plan.uid) if compat else b"")
        if compat:
            # A 1.x stunnel peer decodes a key given as text as hex; so must we.
            key = compat_key_bytes(key)
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
    if instance:
        labels["s2cs"] = instance
    if plan.owner:
        labels["owner"] = plan.owner
    labels["security"] = plan.security
    if tls is not None:
        labels["key_fp"] = key_fingerprint(tls.psk_key or plan.psk_key or b"gateway certificates")
    return [
        Route(
            route_id=f"{instance}/{rp.route_id}" if instance else rp.route_id,
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


def _route_index(route_id: str) -> int:
    """i of a route id ``[<instance>/]<uid>/<i>``: a session's routes in listener order."""
    tail = route_id.rsplit("/", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _session_usage(mine: list[RouteStats]) -> SessionUsage:
    """A session's counters: the sum over its routes."""
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


# --- the daemon's lifecycle -------------------------------------------------------------


def spawn_s2ds(address: str, state_dir: str, extra_args: list[str] | None = None) -> int:
    """Start ``s2ds serve`` detached from this process (own session) so it outlives s2cs.

    Its output goes to ``<state_dir>/s2ds.log``; :func:`record_pid` writes its pid
    to ``<state_dir>/s2ds.pid`` once it answers.
    """
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    cmd = [sys.executable, "-m", "scistream.s2ds", "serve", "--control", address,
           "--idle-exit", str(SPAWNED_IDLE_EXIT_S), *(extra_args or [])]  # fmt: skip
    # s2ds needs none of s2cs's credentials (the Globus client secret, tokens).
    env = {k: v for k, v in os.environ.items() if "SECRET" not in k.upper() and "TOKEN" not in k.upper()}
    env["SCISTREAM_STATE_DIR"] = str(state.absolute())
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

    True if a daemon was running and has stopped. s2cs calls it on a clean stop when
    the daemon carries no route; tests and the demo call it too.
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
        *CERT_SETTINGS,
    )
    wan_keys: ClassVar[frozenset[str]] = frozenset({"psk", "certs"})

    def __init__(self, options: BackendOptions) -> None:
        super().__init__(options)
        self.address = options.s2ds_address or default_control_address(options.state_dir)
        self.instance = options.instance_id
        self._client: S2dsClient | None = None
        self._watch: S2dsClient | None = None  # liveness pings never queue behind a slow command
        self._pid = 0  # the daemon's pid, as it answered our last ping
        self._pid_checkable = False  # that pid is a local s2ds process we can look up in /proc
        self._misses = 0
        self._spawn_lock = asyncio.Lock()

    def _gateway_certs(self) -> CertFiles | None:
        return operator_certs(self.options.extra, "the native backend")

    def prod_credentials(self) -> Literal["psk", "mint", "operator"]:
        certs = self._gateway_certs()
        return "operator" if certs is not None and certs.cert else "psk"

    def cons_operator_certs(self) -> bool:
        certs = self._gateway_certs()
        return certs is not None and bool(certs.ca)

    def _check_gateway_certs(self) -> None:
        certs = self._gateway_certs()
        if certs is not None and certs.cert and not certs.ca:
            # A PROD listener with a certificate but no CA would let any client in.
            raise BackendError(
                "gateway certificates need tls_ca too (the CA or pinned certificates of the peer "
                "gateways), so that the listener authenticates them"
            )

    def _tls_dir(self, uid: str) -> Path:
        return Path(self.options.state_dir) / f".tls-{uid}"

    def _cert_files(self, plan: SessionPlan) -> CertFiles | None:
        """The certificates of a tls plan: minted per session (written for s2ds to load,
        removed right after), the operator's gateway certificates, or None (a PSK)."""
        if plan.security != "tls":
            return None
        if plan.psk_key and not is_credentials(plan.psk_key):
            return None
        if plan.psk_key:
            path = self._tls_dir(plan.uid)
            remove_session_dir(path)
            path.mkdir(mode=0o700)
            return session_cert_files(plan, path, combined=False)
        certs = self._gateway_certs()
        if certs is None or not (certs.cert if plan.role == "PROD" else certs.ca):
            raise BackendError(
                f"session {plan.uid} asks for TLS but has no key and this gateway has no gateway "
                "certificates (tls_cert, tls_key, tls_ca)"
            )
        return certs

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
        self._check_gateway_certs()
        for stale in Path(self.options.state_dir).glob(".tls-*"):
            remove_session_dir(stale)  # certificate files a killed s2cs left behind
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
            self._note_pid((await client.ping())["pid"])
        except BaseException:
            await client.close()
            raise
        self._client = client
        self._watch = self._new_client()

    def _note_pid(self, pid: int) -> None:
        self._pid = pid
        # Only a daemon on this node (ipc://) whose /proc entry is an s2ds can be checked by
        # pid; one in another pid namespace is watched by ping alone.
        self._pid_checkable = ipc_path(self.address) is not None and _is_s2ds(pid)
        self._misses = 0

    def _mine(self, labels: dict[str, str] | Mapping[str, str]) -> bool:
        """A route of this s2cs instance (others may share the daemon)."""
        return labels.get("s2cs", "") == self.instance and bool(labels.get("uid"))

    async def data_plane_pid(self) -> int | None:
        """The daemon's pid, or None once it is gone: at once when its local pid has
        exited, else after several unanswered pings in a row (a loaded node may be slow)."""
        if self._watch is None:
            return 0
        if self._pid and self._pid_checkable and _gone(self._pid):
            return None
        try:
            pid = int((await self._watch.ping(timeout=HEARTBEAT_TIMEOUT_S))["pid"])
        except S2dsUnavailable:
            self._misses += 1
            limit = HUNG_MISSES if self._pid_checkable else HEARTBEAT_MISSES
            return None if self._misses >= limit else self._pid
        if pid != self._pid:
            self._note_pid(pid)
        self._misses = 0
        return pid

    async def restart_data_plane(self) -> None:
        async with self._spawn_lock:
            if self._pid and not (self._pid_checkable and _gone(self._pid)):
                with contextlib.suppress(S2dsUnavailable):
                    self._note_pid((await self.client.ping(timeout=1.0))["pid"])
                    return  # it answers (again): a slow daemon, or one restarted by systemd
            elif await self._answers(self.client, 1.0):
                self._note_pid((await self.client.ping())["pid"])
                return
            if not self._may_spawn():
                raise BackendError(f"s2ds at {self.address} stopped answering; this s2cs may not start one")
            log.warning("s2ds at %s is gone (pid %d); starting a new one", self.address, self._pid)
            await self._spawn_and_wait(self.client)
            self._note_pid((await self.client.ping())["pid"])

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
            if not self._may_spawn():
                raise
            await self.restart_data_plane()  # the session layer sees the new pid and re-applies
            return await call()

    async def apply(self, plan: SessionPlan) -> None:
        try:
            certs = self._cert_files(plan)
            await self._apply(plan, session_routes(plan, certs, self.instance))
        finally:
            # s2ds loaded the session's certificate files when it added the routes.
            remove_session_dir(self._tls_dir(plan.uid))

    async def _apply(self, plan: SessionPlan, desired: list[Route]) -> None:
        added: list[str] = []
        try:
            existing = {
                i.route.route_id: i.route
                for i in await self._reach(self.client.routes)
                if self._mine(i.route.labels) and i.route.labels.get("uid") == plan.uid
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
        return [
            i.route.route_id for i in infos if self._mine(i.route.labels) and i.route.labels["uid"] == uid
        ]

    async def remove(self, uid: str, *, drain: bool = False) -> None:
        try:
            for route_id in await self._session_route_ids(uid):
                with contextlib.suppress(RouteNotFound):
                    await self.client.remove_route(route_id, drain)
        except EngineError as exc:
            raise BackendError(f"session {uid}: {exc}") from None

    async def describe(self, uid: str) -> LiveSession:
        try:
            infos = await self._reach(self.client.routes)
        except EngineError as exc:
            raise BackendError(str(exc)) from None
        mine = sorted(
            (i for i in infos if self._mine(i.route.labels) and i.route.labels["uid"] == uid),
            key=lambda i: _route_index(i.route.route_id),
        )
        if not mine:
            return LiveSession(uid)
        labels = mine[0].route.labels
        tls = mine[0].route.tls
        security = labels.get("security") or (
            "plain" if tls is None else "compat" if tls.mode is TlsMode.COMPAT else "tls"
        )
        return LiveSession(
            uid=uid,
            role=labels.get("role", ""),
            listeners=tuple(i.bound for i in mine),
            targets=tuple(i.route.targets[0] if i.route.targets else "" for i in mine),
            security=security,
            owner=labels.get("owner", ""),
        )

    async def observe(self, uids: Collection[str] | None = None) -> dict[str, SessionView]:
        """One stats call for every route of this instance, grouped by session."""
        try:
            stats = await self._reach(lambda: self.client.stats(connections=True))
        except EngineError as exc:
            raise BackendError(str(exc)) from None
        wanted = None if uids is None else set(uids)
        by_uid: dict[str, list[RouteStats]] = {}
        for rs in stats.routes.values():
            if self._mine(rs.labels) and (wanted is None or rs.labels["uid"] in wanted):
                by_uid.setdefault(rs.labels["uid"], []).append(rs)
        return {uid: SessionView(usage=_session_usage(mine)) for uid, mine in by_uid.items()}

    async def close(self) -> None:
        """Routes stay and so does their daemon: streams outlive the control server. A
        daemon this s2cs spawned and that carries no route at all (no live session here,
        none of another s2cs sharing it) is stopped: nothing would be left to carry."""
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._stop_idle_spawned_daemon()
            await self._client.close()
            self._client = None
        if self._watch is not None:
            await self._watch.close()
            self._watch = None

    async def _stop_idle_spawned_daemon(self) -> None:
        state_dir = self.options.state_dir
        try:
            spawned = int((Path(state_dir) / PID_FILE).read_text().strip())
        except (OSError, ValueError):
            return  # not ours: started by systemd, an operator or another s2cs
        if not self._pid or spawned != self._pid or await self.client.routes():
            return
        log.info("stopping the s2ds this s2cs started (pid %d): it carries no route", spawned)
        await asyncio.to_thread(stop_spawned_s2ds, state_dir, 5.0)
