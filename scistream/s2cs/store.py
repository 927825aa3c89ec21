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
import os
import sqlite3
from typing import Any

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

    def save(self, uid: str, data: dict[str, Any], psk: bytes) -> None:
        self._db.execute(
            "INSERT INTO sessions(uid, data, psk) VALUES (?, ?, ?) "
            "ON CONFLICT(uid) DO UPDATE SET data = excluded.data, psk = excluded.psk",
            (uid, json.dumps(data, separators=(",", ":")), psk),
        )

    def delete(self, uid: str) -> None:
        self._db.execute("DELETE FROM sessions WHERE uid = ?", (uid,))
        # Old WAL frames still hold the row: fold them into the (zeroed) database file
        # and truncate the WAL, so a released session's key is gone from disk.
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

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
