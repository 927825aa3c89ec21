"""Sessions persisted in SQLite under the state directory, so a restart loses none.

The data-channel key is stored too: after a restart a session whose routes are
gone must be re-applied with the same key its peer holds. The database file is
mode 0600 in a 0700 directory and the key never appears in a log. A session's
row is deleted when it ends, with secure_delete and a WAL truncation so
its key does not linger in free pages or old WAL frames.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from scistream.s2cs.errors import ControlError

log = logging.getLogger(__name__)

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
