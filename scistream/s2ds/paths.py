"""Where a node's s2ds keeps its control socket, lock, pid and log files."""

from __future__ import annotations

import os
from pathlib import Path

SOCKET_NAME = "s2ds.sock"


def state_dir() -> Path:
    """$SCISTREAM_STATE_DIR, else /var/lib/scistream for root, else ~/.scistream."""
    env = os.environ.get("SCISTREAM_STATE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/scistream")
    return Path.home() / ".scistream"


def default_control_address(state: str | os.PathLike[str] | None = None) -> str:
    """The node-local control socket: ``ipc://<state dir>/s2ds.sock``.

    s2cs calls it with its own (per-instance) state directory, so each s2cs has its
    own daemon by default; ``s2ds serve`` and ``s2ds ctl`` with no flags use the
    node-wide directory (several s2cs may share that daemon with ``--s2ds``).
    """
    base = Path(state) if state else state_dir()
    return f"ipc://{base.absolute() / SOCKET_NAME}"


def ipc_path(address: str) -> Path | None:
    """The filesystem path of an ``ipc://`` address, None for other transports."""
    if address.startswith("ipc://"):
        return Path(address[len("ipc://") :])
    return None
