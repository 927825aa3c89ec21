"""Typed stub of the Cython binding over csrc/engine.h (see _engine.pyx)."""

from collections.abc import Callable
from typing import Any

ERROR_KIND_NAMES: tuple[str, ...]

class CEngine:
    def __init__(self, tuning: dict[str, Any]) -> None: ...
    @property
    def workers(self) -> int: ...
    def close(self) -> None: ...
    def add_route(
        self,
        route_id: str,
        listen_host: str,
        listen_port: int,
        listen_fd: int,
        targets: list[tuple[str, int]],
        tls_role: int,
        tls_mode: int,
        psk_identity: str,
        psk_key: bytes,
        cert_file: str,
        key_file: str,
        ca_file: str,
        server_name: str,
        ciphers: str,
        rate_limit: int,
        max_connections: int,
    ) -> str: ...
    def retarget(self, route_id: str, targets: list[tuple[str, int]]) -> None: ...
    def remove_route(self, route_id: str, drain: bool) -> None: ...
    def drain(self, timeout: float) -> bool: ...
    def stats(self, route_id: str | None, connections: bool) -> tuple[int, list[dict[str, Any]]]: ...
    def resources(self) -> tuple[int, int, int, int]: ...
    def drain_logs(self, sink: Callable[[int, str], None]) -> None: ...
