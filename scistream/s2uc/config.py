"""Where s2uc keeps its files, and its defaults from the environment and a TOML file.

Precedence: command line > ``SCISTREAM_S2UC_*`` environment > ``s2uc.toml`` >
built-in 1.x defaults. The file lives in the user's config directory
(``$SCISTREAM_HOME`` or ``$XDG_CONFIG_HOME/scistream``, else
``~/.config/scistream``), never in the current directory::

    [defaults]            # any option, for every command
    server_cert = "/etc/scistream/server.crt"
    timeout = 30
    [inbound-request]     # per command (dash or underscore spelling)
    s2cs = "gw1.example.org:5000"
    [scopes]              # s2cs address (host:port or host) -> Globus scope id
    "gw1.example.org" = "26c25f3c-c4b7-4107-8a25-df96898a24fe"
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scistream.grpcutil import ControlError, ExitCode

ENV_PREFIX = "SCISTREAM_S2UC_"


def home_dir() -> Path:
    """The per-user directory for tokens, sessions and config (created 0700 on first write)."""
    explicit = os.environ.get("SCISTREAM_HOME")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".config"
    return base / "scistream"


def ensure_private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


def write_private_file(path: Path, data: bytes, *, own_dir: bool = True) -> None:
    """Write atomically with mode 0600 from creation: tokens and keys never sit world-readable.

    ``own_dir``: the directory is s2uc's own (created, made 0700). A file the user named
    (``--key-file``) lives in the user's directory, which is left exactly as it is."""
    if own_dir:
        ensure_private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def config_path() -> Path:
    explicit = os.environ.get(ENV_PREFIX + "CONFIG")
    return Path(explicit).expanduser() if explicit else home_dir() / "s2uc.toml"


@dataclass
class S2ucConfig:
    defaults: dict[str, Any] = field(default_factory=dict)
    commands: dict[str, dict[str, Any]] = field(default_factory=dict)
    scopes: dict[str, str] = field(default_factory=dict)

    def default_map(self, command_names: list[str]) -> dict[str, dict[str, Any]]:
        """click ``default_map``: per command, the global defaults overlaid by its own section."""
        out: dict[str, dict[str, Any]] = {}
        for name in command_names:
            merged = dict(self.defaults)
            for key in (name, name.replace("-", "_"), name.replace("_", "-")):
                merged.update(self.commands.get(key, {}))
            out[name] = {k.replace("-", "_"): v for k, v in merged.items()}
        return out

    def scope_for(self, s2cs: str) -> str | None:
        """The Globus scope configured for an s2cs (exact host:port first, then host); for
        the nodes of one gateway (``a:5000,b:5000``), the first node's that is configured."""
        if s2cs in self.scopes:
            return self.scopes[s2cs]
        for node in (part.strip() for part in s2cs.split(",") if part.strip()):
            if node in self.scopes:
                return self.scopes[node]
            host = node.rsplit(":", 1)[0].strip("[]")
            if host in self.scopes:
                return self.scopes[host]
        return None


def load_config(path: Path | None = None) -> S2ucConfig:
    p = path or config_path()
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        return S2ucConfig()
    except OSError as exc:
        raise ControlError(f"cannot read config file {p}: {exc.strerror}", ExitCode.USAGE) from None
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ControlError(f"config file {p} is not valid TOML: {exc}", ExitCode.USAGE) from None
    cfg = S2ucConfig()
    for key, value in data.items():
        if key == "scopes":
            if not isinstance(value, dict):
                raise ControlError(f"config file {p}: [scopes] must be a table", ExitCode.USAGE)
            cfg.scopes = {str(k): str(v) for k, v in value.items()}
        elif key == "defaults" and isinstance(value, dict):
            cfg.defaults.update(value)
        elif isinstance(value, dict):
            cfg.commands[key] = dict(value)
        else:
            cfg.defaults[key] = value  # top-level keys are global defaults too
    return cfg
