"""Data-plane backends of s2cs (see base.py for the contract) and the --type registry."""

from __future__ import annotations

import importlib

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


def backend_names() -> list[str]:
    return sorted(BACKENDS)


def create_backend(type_name: str, options: BackendOptions) -> Backend:
    """The backend for a --type value (any case); UnknownBackend lists the valid ones."""
    key = type_name.strip().lower()
    if key not in BACKENDS:
        raise UnknownBackend(
            f"unknown --type {type_name!r}; valid types: {', '.join(backend_names())} (any case)"
        )
    module_name, class_name = BACKENDS[key]
    cls: type[Backend] = getattr(importlib.import_module(module_name), class_name)
    return cls(options)
