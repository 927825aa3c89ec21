"""The user's local session store: what s2uc must remember between commands.

One JSON file per uid under ``<home>/sessions/`` (dir 0700, files 0600): the
s2cs addresses of each side, listeners, the security mode and the data-channel
key that the producer's s2cs returned. The consumer side picks the key up from
here, so it never appears on a command line. Deleted on release.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from scistream.grpcutil import ControlError, ExitCode
from scistream.s2uc.config import home_dir, write_private_file

# The uids an s2cs accepts (grpcutil.check_uid); none can name another directory.
_UID_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


@dataclass
class SessionRecord:
    uid: str
    sides: dict[str, str] = field(default_factory=dict)  # role ("PROD"/"CONS") -> s2cs address
    listeners: dict[str, list[str]] = field(default_factory=dict)  # role -> listeners
    prod_listeners: list[str] = field(default_factory=list)
    security: str = ""
    session_key: str = ""  # hex; empty when the s2cs returned none (1.x, plain)
    created: float = field(default_factory=time.time)

    @property
    def key_bytes(self) -> bytes | None:
        return bytes.fromhex(self.session_key) if self.session_key else None


class SessionStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or home_dir()) / "sessions"

    def _path(self, uid: str) -> Path:
        if not _UID_SAFE.fullmatch(uid):
            raise ControlError(f"uid {uid!r} has characters a session id never has", ExitCode.USAGE)
        return self.root / f"{uid}.json"

    def get(self, uid: str) -> SessionRecord | None:
        path = self._path(uid)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ControlError(f"session store entry {path} is unreadable: {exc}") from None
        known = SessionRecord.__dataclass_fields__
        return SessionRecord(**{k: v for k, v in data.items() if k in known})

    def put(self, record: SessionRecord) -> Path:
        path = self._path(record.uid)
        write_private_file(path, json.dumps(asdict(record), indent=1).encode())
        return path

    def update(self, uid: str) -> SessionRecord:
        return self.get(uid) or SessionRecord(uid=uid)

    def delete(self, uid: str) -> bool:
        try:
            self._path(uid).unlink()
            return True
        except FileNotFoundError:
            return False

    def all(self) -> list[SessionRecord]:
        if not self.root.is_dir():
            return []
        out = []
        for path in sorted(self.root.glob("*.json")):
            rec = self.get(path.stem)
            if rec:
                out.append(rec)
        return out


def read_key_file(path: str) -> bytes:
    """A key file holds the key in hex (64 characters for the default 32-byte key)."""
    p = Path(path)
    try:
        text = p.read_text().strip()
    except OSError as exc:
        raise ControlError(f"cannot read key file {p}: {exc.strerror}", ExitCode.USAGE) from None
    if text.startswith("{"):
        try:
            text = str(json.loads(text).get("session_key", ""))
        except ValueError:
            raise ControlError(f"key file {p} is neither hex nor a session record", ExitCode.USAGE) from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ControlError(f"key file {p} does not hold a hex key", ExitCode.USAGE) from None
    if not key:
        raise ControlError(f"key file {p} is empty", ExitCode.USAGE)
    return key


def check_key_file_writable(path: str) -> None:
    """Before a session is set up: the key file it will write can be written (else the
    session would exist with its key lost)."""
    p = Path(path).absolute()
    if p.is_dir():
        raise ControlError(f"key file {path} is a directory", ExitCode.USAGE)
    folder = p.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # missing directories are created, in the first one that exists
    if not folder.is_dir():
        raise ControlError(f"cannot write key file {path}: {folder} is not a directory", ExitCode.USAGE)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ControlError(f"cannot write key file {path}: {folder} is not writable", ExitCode.USAGE)


def write_key_file(path: str, key: bytes) -> None:
    """The file is 0600 from its creation. Its directory is the user's: an existing one is
    left as it is (never chmod'ed); a missing one is created 0700, as it will hold a key."""
    try:
        Path(path).absolute().parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private_file(Path(path), key.hex().encode() + b"\n", own_dir=False)
    except OSError as exc:
        raise ControlError(f"cannot write key file {path}: {exc.strerror}", ExitCode.USAGE) from None
