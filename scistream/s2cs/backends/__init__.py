"""Data-plane backends of s2cs (see base.py for the contract) and the --type registry."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable

from scistream.s2cs.backends.base import Backend, BackendOptions

#: --type spelling (lower case) -> (module, class). 1.x spellings map to the same class.
BACKENDS: dict[str, tuple[str, str]] = {
    "native": ("scistream.s2cs.backends.native", "NativeBackend"),
    "stunnel": ("scistream.s2cs.backends.stunnel", "StunnelBackend"),
    "stunnelsubprocess": ("scistream.s2cs.backends.stunnel", "StunnelBackend"),
    "haproxy": ("scistream.s2cs.backends.haproxy", "HaproxyBackend"),
    "haproxysubprocess": ("scistream.s2cs.backends.haproxy", "HaproxyBackend"),
    "nginx": ("scistream.s2cs.backends.nginx", "NginxBackend"),
}


class UnknownBackend(ValueError):
    pass


class UnknownBackendSetting(ValueError):
    """A backend option the chosen backend does not read (the message lists the valid ones)."""


def check_settings(cls: type[Backend], settings: Iterable[str]) -> None:
    """Refuse every key the backend class does not declare in ``known_settings``."""
    unknown = sorted(set(settings) - set(cls.known_settings))
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, cls.known_settings, n=1)
        hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    valid = ", ".join(sorted(cls.known_settings)) or "none"
    noun = "option" if len(unknown) == 1 else "options"
    raise UnknownBackendSetting(
        f"unknown backend {noun} {', '.join(hints)} for --type {cls.name}; valid keys: {valid}"
    )


def backend_names() -> list[str]:
    return sorted(BACKENDS)


def create_backend(type_name: str, options: BackendOptions) -> Backend:
    """The backend for a --type value (any case); UnknownBackend lists the valid types,
    UnknownBackendSetting the valid keys of ``options.extra``."""
    key = type_name.strip().lower()
    if key not in BACKENDS:
        raise UnknownBackend(
            f"unknown --type {type_name!r}; valid types: {', '.join(backend_names())} (any case)"
        )
    module_name, class_name = BACKENDS[key]
    cls: type[Backend] = getattr(importlib.import_module(module_name), class_name)
    check_settings(cls, options.extra)
    return cls(options)
