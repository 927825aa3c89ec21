"""Supervision of the proxy processes the subprocess backends run, and their session directories.

Each child runs in the foreground in its own process group, with stdout and
stderr going to a log file in its session directory. A thread per child waits
for it, so it is reaped the moment it exits (1.x left stunnel zombies), and an
exit that nobody asked for is logged and recorded on the :class:`Child`.

The children die with s2cs: each is started with ``PR_SET_PDEATHSIG``
(SIGTERM), so even a ``kill -9`` of s2cs leaves no orphan proxy holding ports.
That means the subprocess backends do not outlive an s2cs restart (the native
backend's s2ds is the one that does); on restart the session layer finds no
running sessions here and re-applies or fails them. The signal is tied to the
thread that forked the child, so children are spawned from the event-loop
thread, which lives as long as s2cs.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import errno
import functools
import logging
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import ClassVar

from scistream.clienttext import escape
from scistream.s2cs.backends.base import (
    Backend,
    BackendError,
    BackendOptions,
    SessionPlan,
    SessionUsage,
    SessionView,
)
from scistream.s2cs.backends.proxyconf import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_IDLE_TIMEOUT_S,
    check_uid,
    split_endpoint,
)

log = logging.getLogger(__name__)

#: A file in each session directory that names the backend owning it, so a
#: restarted s2cs removes only what a subprocess backend left behind.
OWNER_FILE = ".proxy-backend"
_LISTEN_STATE = "0A"


@functools.cache
def _die_with_parent_argv() -> tuple[str, ...]:
    """A prefix that makes the child get SIGTERM when the thread that spawned it exits.

    setpriv (util-linux, on every Debian; looked up once per s2cs) sets
    PR_SET_PDEATHSIG and execs the proxy. It replaces a preexec_fn: a preexec_fn
    makes Python fork() instead of vfork(), which runs grpc's fork handlers in the
    child, and grpcio >= 1.80 can abort there ("Check failed: next_worker->state ==
    KICKED") before the proxy starts.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        log.warning("setpriv (util-linux) not found: proxies may outlive a killed s2cs")
        return ()
    return (setpriv, "--pdeathsig", "TERM", "--")


#: The only variables a proxy child inherits. HAProxy expands "${VAR}" in its config and
#: nginx/stunnel need none of s2cs's settings: SCISTREAM_CLIENT_SECRET, tokens and the
#: rest of s2cs's environment stay out of every proxy (and out of /proc/<pid>/environ).
PROXY_ENVIRONMENT = ("PATH", "LANG")


def proxy_environment() -> dict[str, str]:
    """The environment of a proxy child: :data:`PROXY_ENVIRONMENT` from s2cs's, PATH always."""
    env = {name: os.environ[name] for name in PROXY_ENVIRONMENT if name in os.environ}
    env.setdefault("PATH", os.defpath)
    return env


_FAILURE = re.compile(
    r"(?i)already in use|cannot|could not|can't|failed|failure|error|invalid|"
    r"unknown|denied|not found|\[emerg\]|\[alert\]|\[crit\]"
)
#: Log-line prefixes (stunnel's severity mark or timestamp, HAProxy's level and pid,
#: nginx's timestamp, level and pid) that say nothing to the person reading the error.
_LOG_PREFIX = re.compile(
    r"^(?:\[[ .:!]\]\s*"
    r"|\d{4}\.\d\d\.\d\d \d\d:\d\d:\d\d LOG\d\[[^\]]*\]:\s*"
    r"|\[[A-Z]+\]\s+\(\d+\)\s*:\s*"
    r"|\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[\w+\] \d+#\d+:\s*)"
)


def _tail_lines(path: Path, size: int = 16384) -> list[str]:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            f.seek(max(0, end - size))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    # A proxy logs what remote peers sent (a PSK identity, say): escaped here, because these
    # lines become session errors that clients are shown.
    return [escape(line.strip()) for line in tail.splitlines() if line.strip()]


def last_log_line(path: Path, *, limit: int = 300) -> str:
    """The last line of a proxy's log (what it said before it went away), shortened."""
    lines = _tail_lines(path)
    return _LOG_PREFIX.sub("", lines[-1])[:limit] if lines else ""


def failure_reason(path: Path, *, limit: int = 300) -> str:
    """Why a proxy failed to start: the first line of its log that reads like an error
    (stunnel, HAProxy and nginx state the cause first and "exiting" after it), else the
    last line; shortened, without the proxy's log prefix."""
    lines = _tail_lines(path)
    chosen = next((line for line in lines if _FAILURE.search(line)), lines[-1] if lines else "")
    return _LOG_PREFIX.sub("", chosen)[:limit]


class Child:
    """One supervised proxy process (and its process group)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        cwd: Path,
        on_exit: Callable[[Child], None] | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self.exited = threading.Event()
        self.returncode: int | None = None
        self.stopping = False  # set before we signal it: its exit is then expected
        self.ready = False  # set once it listens; an exit before that is a failed start
        self.unexpected_exit = False
        self.last_line = ""
        self._on_exit = on_exit
        with log_path.open("ab") as logf:
            os.chmod(log_path, 0o600)
            self.proc = subprocess.Popen(
                [*_die_with_parent_argv(), *argv],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=proxy_environment(),
                close_fds=True,
                start_new_session=True,
            )
        self.pid = self.proc.pid
        self._waiter = threading.Thread(target=self._wait, name=f"reap-{name}", daemon=True)
        self._waiter.start()

    def _wait(self) -> None:
        code = self.proc.wait()
        self.returncode = code
        if not self.stopping and not self.ready:
            log.debug("%s (pid %d) exited with status %d while starting", self.name, self.pid, code)
        elif not self.stopping:
            self.unexpected_exit = True
            self.last_line = last_log_line(self.log_path)
            log.warning(
                "%s (pid %d) exited unexpectedly with status %d: %s",
                self.name,
                self.pid,
                code,
                self.last_line or "no log output",
            )
        # Workers the leader left behind (nginx) must not keep the ports.
        self._kill_group(signal.SIGKILL)
        self.exited.set()
        if self._on_exit is not None:
            try:
                self._on_exit(self)
            except Exception:  # a callback must not kill the reaper
                log.exception("exit callback of %s failed", self.name)

    def _kill_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    @property
    def alive(self) -> bool:
        return not self.exited.is_set()

    def send(self, sig: signal.Signals) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def stop(
        self, *, timeout: float = 5.0, first: signal.Signals = signal.SIGTERM, grace: float = 0.0
    ) -> None:
        """Signal, wait up to ``grace + timeout`` seconds, then SIGKILL the group; always reaps.

        Blocking: the backends call it in a worker thread.
        """
        self.stopping = True
        if self.alive:
            self.send(first)
            if not self.exited.wait(grace + timeout) and first is not signal.SIGTERM:
                self.send(signal.SIGTERM)
                self.exited.wait(timeout)
            if self.alive:
                log.warning("%s (pid %d) did not stop in time; killing it", self.name, self.pid)
                self._kill_group(signal.SIGKILL)
                self.exited.wait(timeout)
        self._waiter.join(timeout)


def _socket_inodes(pid: int) -> set[str]:
    inodes: set[str] = set()
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return inodes
    for fd in names:
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _listening_ports(inodes: set[str]) -> set[int]:
    """TCP ports in LISTEN state held by the given socket inodes."""
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for row in f:
                    cols = row.split()
                    if len(cols) > 9 and cols[3] == _LISTEN_STATE and cols[9] in inodes:
                        ports.add(int(cols[1].rsplit(":", 1)[1], 16))
        except OSError:
            continue
    return ports


def wait_listening(child: Child, ports: Iterable[int], *, timeout: float, what: str) -> None:
    """Block until the child's process holds a listening socket on every port.

    Checked through /proc rather than by connecting, because a test connection
    would be forwarded to the producer application as if it were a consumer.
    Raises BackendError with the proxy's last log line if it exits first.
    """
    wanted = set(ports)
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        if child.exited.wait(0):
            line = failure_reason(child.log_path)
            raise BackendError(f"{what} failed to start: {line or f'exit status {child.returncode}'}")
        if wanted <= _listening_ports(_socket_inodes(child.pid)):
            return
        if time.monotonic() > deadline:
            line = failure_reason(child.log_path)
            raise BackendError(
                f"{what} was not listening on every port after {timeout:g} s" + (f": {line}" if line else "")
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def sessions_root(state_dir: str) -> Path:
    root = Path(state_dir) / "sessions"
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    return root


def make_session_dir(state_dir: str, uid: str, owner: str) -> Path:
    """A fresh, empty <state_dir>/sessions/<uid>/ (mode 0700) marked as ``owner``'s."""
    path = sessions_root(state_dir) / uid
    if path.is_symlink():
        raise BackendError(f"session directory {path} is a symbolic link; refusing to use it")
    remove_session_dir(path)
    path.mkdir(mode=0o700)
    os.chmod(path, 0o700)
    write_private(path / OWNER_FILE, owner + "\n")
    return path


def write_private(path: Path, text: str) -> None:
    """Create a file readable only by s2cs's user (keys, configs); never follows a link."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def remove_session_dir(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        path.unlink()
        return
    shutil.rmtree(path, ignore_errors=False, onerror=_ignore_missing)


def _ignore_missing(func: Callable[..., object], path: str, exc_info: object) -> None:
    exc = exc_info[1] if isinstance(exc_info, tuple) else exc_info
    if isinstance(exc, OSError) and exc.errno == errno.ENOENT:
        return
    raise exc if isinstance(exc, BaseException) else OSError(f"cannot remove {path}")


def sweep_stale_sessions(state_dir: str, owner: str, keep: set[str] | None = None) -> list[str]:
    """Remove session directories this backend left behind (s2cs was killed); returns their uids."""
    root = Path(state_dir) / "sessions"
    removed: list[str] = []
    if not root.is_dir():
        return removed
    for entry in sorted(root.iterdir()):
        if keep and entry.name in keep:
            continue
        marker = entry / OWNER_FILE
        try:
            if entry.is_symlink() or marker.read_text().strip() != owner:
                continue
        except OSError:
            continue
        remove_session_dir(entry)
        removed.append(entry.name)
    return removed


def find_binary(setting: str | None, default: str, package: str) -> str:
    """The proxy's executable (an explicit setting wins), or BackendError naming the package."""
    candidate = setting or default
    path = shutil.which(candidate)
    if path is None:
        raise BackendError(f"{candidate} not found; install the {package} package or set its path")
    return path


#: Settings every subprocess backend reads (seconds); see SubprocessBackend.
TIMEOUT_SETTINGS = ("start_timeout", "stop_timeout", "drain_timeout", "idle_timeout", "connect_timeout")


class _Session:
    def __init__(self, plan: SessionPlan, path: Path, child: Child) -> None:
        self.plan = plan
        self.path = path
        self.child = child


class SubprocessBackend(Backend):
    """Session bookkeeping shared by the stunnel, HAProxy and nginx backends.

    One child process per session; ``apply`` writes the session's files,
    starts the child and returns once it listens on every port; ``remove``
    stops and reaps it and deletes the session directory.

    Settings (``BackendOptions.extra``): ``<name>_bin`` (executable),
    ``start_timeout`` (s, default 10), ``stop_timeout`` (s, default 5),
    ``drain_timeout`` (s, default 30: how long ``remove(drain=True)`` lets open
    streams finish), ``idle_timeout`` and ``connect_timeout`` (s). Each subclass
    lists them, with its own, in ``known_settings``; ``start`` checks their values.
    """

    #: Debian package that provides the executable (for the error message).
    package: ClassVar[str]
    #: Whether the proxy can enforce SessionPlan.rate_limit.
    enforces_rate_limit: ClassVar[bool] = False
    #: Signal that makes the proxy stop accepting and finish open streams (drain).
    drain_signal: ClassVar[signal.Signals | None] = None

    def __init__(self, options: BackendOptions) -> None:
        super().__init__(options)
        self._sessions: dict[str, _Session] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._failures: dict[str, str] = {}
        self.binary = ""
        self._swept = False
        #: Called (from a reaper thread) with (uid, message) when a child dies unasked.
        self.on_session_failed: Callable[[str, str], None] | None = None

    # -- settings ---------------------------------------------------------------------------
    def _check_settings(self) -> None:
        """Refuse a malformed setting at start rather than at the first session."""
        for key in TIMEOUT_SETTINGS:
            self._setting_float(key, 1.0)

    def _setting_float(self, key: str, default: float) -> float:
        text = self.options.extra.get(key, "")
        try:
            value = float(text) if text else default
        except ValueError:
            raise BackendError(f"backend setting {key}={text!r} is not a number") from None
        if not math.isfinite(value) or value <= 0:  # nan, inf: no timer could wait that long
            raise BackendError(f"backend setting {key} must be a positive number of seconds")
        return value

    def _idle_timeout(self) -> int:
        return int(self._setting_float("idle_timeout", DEFAULT_IDLE_TIMEOUT_S))

    def _connect_timeout(self) -> int:
        return max(1, int(self._setting_float("connect_timeout", DEFAULT_CONNECT_TIMEOUT_S)))

    # -- what each proxy provides -----------------------------------------------------------
    @abc.abstractmethod
    def _write_files(self, plan: SessionPlan, path: Path) -> list[str]:
        """Write the session's config (and key) files under ``path``; return the argv to run."""

    async def _check_binary(self) -> None:
        """Extra start-up checks (nginx: the stream module)."""

    # -- Backend ----------------------------------------------------------------------------
    async def start(self) -> None:
        self._check_settings()
        self.binary = find_binary(
            self.options.extra.get(f"{self.name}_bin"), self.default_binary(), self.package
        )
        await self._check_binary()
        if self._swept:
            return
        self._swept = True
        # Children die with s2cs, so directories found now belong to a previous s2cs.
        for uid in sweep_stale_sessions(self.options.state_dir, self.name, keep=set(self._sessions)):
            log.info("removed the files %s left for session %s before s2cs restarted", self.name, uid)

    def default_binary(self) -> str:
        return self.name

    def _lock(self, uid: str) -> asyncio.Lock:
        return self._locks.setdefault(uid, asyncio.Lock())

    async def apply(self, plan: SessionPlan) -> None:
        check_uid(plan.uid)
        if not plan.routes:
            raise BackendError(f"session {plan.uid} has no routes to apply")
        if not self.binary:
            await self.start()
        async with self._lock(plan.uid):
            current = self._sessions.get(plan.uid)
            if current is not None and current.plan == plan and current.child.alive:
                return
            if current is not None:
                await self._stop_session(plan.uid, drain=False)
            if plan.rate_limit > 0 and not self.enforces_rate_limit:
                log.warning(
                    "session %s asks for a rate limit of %d B/s, which the %s backend cannot "
                    "enforce; it runs unlimited",
                    plan.uid,
                    plan.rate_limit,
                    self.name,
                )
            ports = [split_endpoint(r.listen)[1] for r in plan.routes]
            path = make_session_dir(self.options.state_dir, plan.uid, self.name)
            child: Child | None = None
            try:
                try:
                    argv = self._write_files(plan, path)
                    child = Child(
                        f"{self.name}[{plan.uid}]",
                        argv,
                        log_path=path / "proxy.log",
                        cwd=path,
                        on_exit=self._child_exited(plan.uid),
                    )
                except OSError as exc:
                    where = f" ({exc.filename})" if exc.filename else ""
                    raise BackendError(
                        f"{self.name} for session {plan.uid} could not start: {exc.strerror or exc}{where}"
                    ) from None
                await asyncio.to_thread(
                    wait_listening,
                    child,
                    ports,
                    timeout=self._setting_float("start_timeout", 10.0),
                    what=f"{self.name} for session {plan.uid}",
                )
            except BaseException:
                if child is not None:
                    await asyncio.to_thread(child.stop, timeout=self._setting_float("stop_timeout", 5.0))
                remove_session_dir(path)
                raise
            self._failures.pop(plan.uid, None)
            child.ready = True
            self._sessions[plan.uid] = _Session(plan, path, child)
            log.info(
                "%s session %s: %s %d route(s), pid %d",
                self.name,
                plan.uid,
                plan.role,
                len(plan.routes),
                child.pid,
            )

    def _child_exited(self, uid: str) -> Callable[[Child], None]:
        def record(child: Child) -> None:
            session = self._sessions.get(uid)
            if not child.unexpected_exit or session is None or session.child is not child:
                return  # asked to stop, or failed while starting (apply reports that)
            message = f"{self.name} for session {uid} exited unexpectedly (status {child.returncode})" + (
                f": {child.last_line}" if child.last_line else ""
            )
            self._failures[uid] = message
            if self.on_session_failed is not None:
                self.on_session_failed(uid, message)

        return record

    async def _stop_session(self, uid: str, *, drain: bool) -> None:
        session = self._sessions.pop(uid, None)
        if session is None:
            return
        stop_timeout = self._setting_float("stop_timeout", 5.0)
        if drain and self.drain_signal is not None:
            await asyncio.to_thread(
                session.child.stop,
                timeout=stop_timeout,
                first=self.drain_signal,
                grace=self._setting_float("drain_timeout", 30.0),
            )
        else:
            await asyncio.to_thread(session.child.stop, timeout=stop_timeout)
        remove_session_dir(session.path)

    async def remove(self, uid: str, *, drain: bool = False) -> None:
        async with self._lock(uid):
            await self._stop_session(uid, drain=drain)
            self._failures.pop(uid, None)
        self._locks.pop(uid, None)

    async def observe(self, uids: Collection[str] | None = None) -> dict[str, SessionView]:
        """One proxy process per session: each live one is asked for its counters, all at once."""
        wanted = [
            uid
            for uid in (self._sessions.keys() | self._failures.keys() if uids is None else uids)
            if uid in self._sessions or uid in self._failures
        ]
        usages = await asyncio.gather(*(self._session_usage(uid) for uid in wanted))
        views = {}
        for uid, usage in zip(wanted, usages, strict=True):
            session = self._sessions.get(uid)
            running = session is not None and session.child.alive
            views[uid] = SessionView(running=running, usage=usage, error=self._failures.get(uid))
        return views

    def session_error(self, uid: str) -> str | None:
        """Why the session's proxy is gone, if it died without being asked to (one sentence)."""
        return self._failures.get(uid)

    def child_pid(self, uid: str) -> int | None:
        session = self._sessions.get(uid)
        return session.child.pid if session is not None else None

    def _base_errors(self, uid: str) -> dict[str, int]:
        errors: dict[str, int] = {}
        session = self._sessions.get(uid)
        if session is not None and session.child.unexpected_exit:
            errors["proxy_exited"] = 1
        if session is not None and session.plan.rate_limit > 0 and not self.enforces_rate_limit:
            errors["rate_limit_not_enforced"] = 1
        return errors

    async def _session_usage(self, uid: str) -> SessionUsage:
        """Counters of one session's proxy; this base knows none, only errors."""
        return SessionUsage(errors=self._base_errors(uid))

    async def close(self) -> None:
        await asyncio.gather(*(self.remove(uid) for uid in list(self._sessions)), return_exceptions=True)
