"""Sessions persisted in SQLite under the state directory, so a restart loses none.

The state directory belongs to one s2cs at a time (:class:`StateDirLock`) and
carries a marker written when its store is first created (:class:`Instance`):
a store that is missing, empty or unreadable where the marker says one lived
is refused at startup (:func:`open_store`) instead of being taken for "no
sessions", which would let the restarted s2cs lose track of live routes.

The data-channel key is stored too: after a restart a session whose routes are
gone must be re-applied with the same key its peer holds. The database file is
mode 0600 in a 0700 directory and the key never appears in a log. A session's
row is deleted when it ends, with secure_delete and a WAL truncation so
its key does not linger in free pages or old WAL frames.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from scistream.s2cs.errors import ControlError

log = logging.getLogger(__name__)

LOCK_FILE = "s2cs.lock"
INSTANCE_FILE = "s2cs.instance"
DB_FILE = "s2cs.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    uid TEXT PRIMARY KEY,
    data TEXT NOT NULL,
    psk BLOB NOT NULL DEFAULT x''
)
"""


def ensure_private_dir(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)


class StateError(Exception):
    """The state directory cannot be used; the message is one sentence for the operator."""


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip() or "0") or None
    except (OSError, ValueError):
        return None


class StateDirLock:
    """One s2cs per state directory: an flock on ``<dir>/s2cs.lock`` holding its pid.

    The kernel drops the flock when the holder dies (even by SIGKILL), so a stale
    lock file never blocks a restart; a live holder is named by its pid.
    """

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, LOCK_FILE)
        self._fd = -1

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            owner = _read_pid(self.path)
            raise StateError(
                f"the state directory {os.path.dirname(self.path)} is in use by another s2cs"
                f"{f' (pid {owner})' if owner else ''}; give each s2cs its own --state-dir "
                "(by default each control --port has its own)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd < 0:
            return
        os.ftruncate(self._fd, 0)  # no pid left for a later reader to mistake as live
        os.close(self._fd)
        self._fd = -1


@dataclass(frozen=True)
class Instance:
    """Who this s2cs is across restarts: the id that namespaces its data-plane routes
    (so several s2cs can share one s2ds) and whether its store has existed before."""

    instance_id: str
    store_existed: bool  # the marker was there before this start


def load_instance(state_dir: str) -> Instance:
    """Read ``<dir>/s2cs.instance``; on a first start, a fresh id (written by open_store
    once the store exists, so a crash in between never leaves a marker without a store)."""
    path = os.path.join(state_dir, INSTANCE_FILE)
    try:
        with open(path) as f:
            data = json.load(f)
        instance_id = str(data["instance"])
        if not instance_id.isalnum():
            raise ValueError(instance_id)
        return Instance(instance_id, True)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StateError(
            f"the instance marker {path} is unreadable ({exc}); it names this s2cs's routes "
            "in s2ds, so it is not replaced silently: restore it, or remove it to start as a "
            "new instance (routes of the old one are then left alone)"
        ) from None
    return Instance(secrets.token_hex(4), False)


def write_marker(state_dir: str, instance: Instance) -> None:
    path = os.path.join(state_dir, INSTANCE_FILE)
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"instance": instance.instance_id, "created": time.time()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def _store_problem(path: str, marker_existed: bool) -> str | None:
    """Why the store at ``path`` cannot be trusted (one clause), or None."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return "is missing" if marker_existed else None
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if size == 0:
        return "is empty (0 bytes)"  # SQLite never leaves a created store at 0 bytes
    try:
        with open(path, "rb") as f:
            f.read(16)
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            db.close()
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    except sqlite3.Error as exc:
        return f"is not a readable session store ({exc})"
    if "sessions" not in tables and marker_existed:
        return "has no sessions table"
    return None


def open_store(state_dir: str, instance: Instance, *, fresh: bool = False) -> SessionStore:
    """The session store of ``state_dir``, refusing one that should exist and does not
    (StateError) unless ``fresh``: then a bad store is moved aside and a new one begins."""
    path = os.path.join(state_dir, DB_FILE)
    problem = _store_problem(path, instance.store_existed)
    if problem is not None:
        if not fresh:
            raise StateError(
                f"the session store {path} {problem}, but this state directory has held "
                "sessions before; s2cs will not start as if it had none, since their routes may "
                "still carry streams. Restore the file, or start once with --fresh-state to begin "
                "with an empty store (routes still in the data plane are then listed as "
                "'orphaned' for you to release)"
            )
        if os.path.exists(path):
            aside = f"{path}.bad-{time.strftime('%Y%m%dT%H%M%S')}"
            os.replace(path, aside)
            log.warning("--fresh-state: the session store %s; moved it to %s", problem, aside)
        else:
            log.warning("--fresh-state: the session store %s; starting an empty one", problem)
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path + suffix)  # they belong to the store moved aside
    store = SessionStore(path)
    if not instance.store_existed:
        write_marker(state_dir, instance)
    return store


class SessionStore:
    def __init__(self, path: str) -> None:
        self.path = path
        # Why the last write failed (disk full, read-only, ...), until one succeeds again;
        # ``on_problem`` hears each change (the server turns it into its health status).
        self.problem: str | None = None
        self.on_problem: Callable[[str | None], None] | None = None
        ensure_private_dir(os.path.dirname(os.path.abspath(path)))
        # Create the file 0600 before sqlite opens it (sqlite would use the umask).
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        os.chmod(path, 0o600)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # WAL + NORMAL: a crash loses at most the last transaction, and writes do
        # not fsync on every session change (hundreds of sessions per second).
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        # A deleted row (with its key) is overwritten, not left in a free page.
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.execute(_SCHEMA)
        for suffix in ("-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.chmod(path + suffix, 0o600)

    def check_writable(self) -> None:
        """Refuse a change up front while the last write failed (UNAVAILABLE, one sentence)."""
        if self.problem is not None:
            raise self._unavailable(self.problem)

    def save(self, uid: str, data: dict[str, Any], psk: bytes) -> None:
        with self._writing():
            self._db.execute(
                "INSERT INTO sessions(uid, data, psk) VALUES (?, ?, ?) "
                "ON CONFLICT(uid) DO UPDATE SET data = excluded.data, psk = excluded.psk",
                (uid, json.dumps(data, separators=(",", ":")), psk),
            )

    def delete(self, uid: str) -> None:
        with self._writing():
            self._db.execute("DELETE FROM sessions WHERE uid = ?", (uid,))
            # Old WAL frames still hold the row: fold them into the (zeroed) database file
            # and truncate the WAL, so a released session's key is gone from disk.
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def probe(self) -> bool:
        """While writes fail: can the state directory take a write again? (A scratch file
        the size of a few database pages, written, synced and removed.)"""
        if self.problem is None:
            return True
        scratch = os.path.join(os.path.dirname(os.path.abspath(self.path)), ".s2cs-write-probe")
        try:
            fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, bytes(64 << 10))
                os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(scratch)
        except OSError:
            return False
        self._set_problem(None)
        return True

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            self._set_problem(reason)
            raise self._unavailable(reason) from None
        self._set_problem(None)

    def _unavailable(self, reason: str) -> ControlError:
        return ControlError(
            grpc.StatusCode.UNAVAILABLE,
            f"the gateway cannot write its session store ({reason}); its operator must free space "
            "in its state directory or fix its permissions",
        )

    def _set_problem(self, problem: str | None) -> None:
        if problem == self.problem:
            return
        if problem is None:
            log.warning("the session store %s is writable again", self.path)
        else:
            log.error("cannot write the session store %s: %s", self.path, problem)
        self.problem = problem
        if self.on_problem is not None:
            self.on_problem(problem)

    def load(self) -> list[tuple[dict[str, Any], bytes]]:
        rows = self._db.execute("SELECT data, psk FROM sessions ORDER BY rowid").fetchall()
        out: list[tuple[dict[str, Any], bytes]] = []
        for data, psk in rows:
            try:
                out.append((json.loads(data), bytes(psk)))
            except (ValueError, TypeError):
                continue  # a corrupt row is dropped, not fatal
        return out

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()
