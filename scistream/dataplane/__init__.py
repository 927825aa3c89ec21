"""The data plane: one import for every caller.

``Engine`` is the native C engine when it was built, else the pure-Python
reference engine. ``SCISTREAM_ENGINE=native|pure|auto`` (default auto) chooses;
``native`` fails loudly when the extension is missing.
"""

from __future__ import annotations

import logging
import os

from scistream.dataplane.api import (
    COMPAT_PSK_IDENTITY,
    ERROR_KINDS,
    AddressInUse,
    ConnectionStats,
    EngineBase,
    EngineError,
    EngineStats,
    InvalidRoute,
    ResourceCounts,
    Route,
    RouteExists,
    RouteInfo,
    RouteNotFound,
    RouteStats,
    Tls,
    TlsMode,
    TlsRole,
    Tuning,
    compat_key_from_uid,
)

log = logging.getLogger(__name__)


def native_available() -> bool:
    try:
        from scistream.dataplane import native  # noqa: F401
    except ImportError:
        return False
    return True


def engine_class(choice: str | None = None) -> type[EngineBase]:
    """The engine implementation for ``choice`` (native|pure|auto; default from env)."""
    choice = (choice or os.environ.get("SCISTREAM_ENGINE") or "auto").lower()
    if choice not in ("native", "pure", "auto"):
        raise ValueError(f"SCISTREAM_ENGINE={choice!r}: expected native, pure or auto")
    if choice in ("native", "auto"):
        try:
            from scistream.dataplane.native import NativeEngine
        except ImportError as exc:
            if choice == "native":
                raise ImportError(
                    f"the native engine was requested but cannot be loaded ({exc}); it is not built, "
                    "or a library it was built with is gone: reinstall (./dev setup) with a C compiler "
                    "and libssl-dev"
                ) from exc
            log.warning("native engine cannot be loaded (%s); using the pure-Python engine", exc)
        else:
            return NativeEngine
    from scistream.dataplane.pyengine import PyEngine

    return PyEngine


def Engine(tuning: Tuning | None = None, *, impl: str | None = None) -> EngineBase:  # noqa: N802
    """Create the selected engine (see module docstring)."""
    return engine_class(impl)(tuning)


__all__ = [
    "COMPAT_PSK_IDENTITY",
    "ERROR_KINDS",
    "AddressInUse",
    "ConnectionStats",
    "Engine",
    "EngineBase",
    "EngineError",
    "EngineStats",
    "InvalidRoute",
    "ResourceCounts",
    "Route",
    "RouteExists",
    "RouteInfo",
    "RouteNotFound",
    "RouteStats",
    "Tls",
    "TlsMode",
    "TlsRole",
    "Tuning",
    "compat_key_from_uid",
    "engine_class",
    "native_available",
]
