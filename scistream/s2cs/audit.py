"""The audit log: one JSON line per RPC decision and per session end.

Records carry identity, uid, rpc, decision and reason (and bytes at session
end), never a token or a key. The file is created 0600. JSON escapes control
characters, so a client string cannot add a line; each string field is also
cut at :data:`MAX_FIELD_CHARS` characters, so a client cannot make one
unauthenticated request cost megabytes of audit log.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import IO, Any

from scistream.clienttext import bounded

log = logging.getLogger(__name__)

#: Characters kept of one string field of a record (uids are at most 128, endpoints 300).
MAX_FIELD_CHARS = 1024


class AuditLog:
    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fh: IO[str] | None = None
        if not path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._fh = os.fdopen(fd, "a", encoding="utf-8")

    def record(self, **fields: Any) -> None:
        if self._fh is None:
            return
        entry = {"ts": round(time.time(), 3), **{k: _bounded(v) for k, v in fields.items()}}
        line = json.dumps(entry, separators=(",", ":"), default=str)
        with self._lock:
            try:
                self._fh.write(line + "\n")
                self._fh.flush()
            except OSError as exc:  # a full disk must not fail the RPC
                log.error("cannot write the audit log %s: %s", self.path, exc)

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


def _bounded(value: Any) -> Any:
    if isinstance(value, str):
        return bounded(value, MAX_FIELD_CHARS)
    if isinstance(value, list | tuple):
        return [_bounded(v) for v in value]
    return value
