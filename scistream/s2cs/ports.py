"""The data-port allocator over --port_range: all-or-nothing, test-bound, leak-free.

A port is handed out only after a test bind on the listener address succeeds,
so a port taken by another process (or by another s2cs sharing the range) is
skipped. Allocation is synchronous (no await inside), so on the asyncio loop it
is atomic with respect to other RPCs.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections import deque


class PortsExhausted(Exception):
    pass


def _bindable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # Same option the data plane's listeners use, so TIME_WAIT leftovers of a
        # released session do not make a free port look busy.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
                return False
            raise
    return True


class PortAllocator:
    def __init__(self, low: int, high: int, host: str, *, test_bind: bool = True) -> None:
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"bad port range {low}-{high}")
        self.low, self.high, self.host = low, high, host
        self.test_bind = test_bind
        # Free ports in rotation order: a released port goes to the back, so it is
        # reused last (its old peers have the longest time to go away).
        self._free: deque[int] = deque(range(low, high + 1))
        self._used: set[int] = set()

    @property
    def size(self) -> int:
        return self.high - self.low + 1

    @property
    def in_use(self) -> frozenset[int]:
        return frozenset(self._used)

    @property
    def free_count(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """n distinct bindable ports, or PortsExhausted with nothing held."""
        if n < 1:
            raise ValueError("allocate at least one port")
        chosen: list[int] = []
        skipped: list[int] = []
        while self._free and len(chosen) < n:
            port = self._free.popleft()
            if not self.test_bind or _bindable(self.host, port):
                chosen.append(port)
            else:
                skipped.append(port)
        # Busy ports stay in the pool (they may free up later), at the back.
        self._free.extend(skipped)
        if len(chosen) < n:
            self._free.extendleft(reversed(chosen))
            raise PortsExhausted(
                f"the port range {self.low}-{self.high} has only {len(chosen)} free port(s) "
                f"on {self.host}, {n} requested"
            )
        self._used.update(chosen)
        return chosen

    def claim(self, ports: list[int]) -> None:
        """Mark ports as used without a test bind (sessions restored after a restart,
        whose routes may hold them right now). Ports outside the range are ignored."""
        for port in ports:
            if self.low <= port <= self.high and port not in self._used:
                self._used.add(port)
                with contextlib.suppress(ValueError):
                    self._free.remove(port)

    def release(self, ports: list[int]) -> None:
        for port in ports:
            if port in self._used:
                self._used.discard(port)
                self._free.append(port)
