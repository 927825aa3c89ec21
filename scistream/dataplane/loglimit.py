"""Rate-limited log lines about single connections, so an attacker does not decide how much an
engine logs.

Every failed connection is counted in its route's errors. Of the log lines about them, the first
:data:`LOG_BURST` of one kind (an error kind: ``tls_handshake``, ``accept``, ...) per route and
interval of :data:`LOG_WINDOW_S` seconds are logged one by one with their details; the others
are only counted, and summed up in one line at the level of the loudest of them once the
interval is over (seen at the next line of that kind, or at :meth:`LogLimiter.flush`) or the
route is removed::

    route tls-in: 395 more tls_handshake errors in the last 10.0 s (each counted in the route's errors)

The native engine does the same in C with the same figures (csrc/internal.h, ``S2_LOG_BURST``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

LOG_BURST = 5  # lines logged one by one per route, kind and interval
LOG_WINDOW_S = 10.0  # the interval


@dataclass
class _Interval:
    start: float
    logged: int = 0
    suppressed: int = 0
    level: int = logging.NOTSET  # the loudest suppressed line


class LogLimiter:
    """Per-route, per-kind limiter in front of one logger. Not thread-safe: its owner calls it
    from one thread (the pure engine: its event loop)."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = LOG_BURST,
        window: float = LOG_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._burst = burst
        self._window = window
        self._clock = clock
        self._intervals: dict[tuple[str, str], _Interval] = {}

    def log(self, route_id: str, kind: str, level: int, msg: str, *args: object) -> None:
        """Log ``msg % args`` about one connection of ``route_id`` that failed with ``kind``,
        unless this interval already had its share of those."""
        now = self._clock()
        key = (route_id, kind)
        interval = self._intervals.get(key)
        if interval is not None and now - interval.start >= self._window:
            self._end(key, interval, now)
            interval = None
        if interval is None:
            interval = self._intervals[key] = _Interval(start=now)
        if interval.logged < self._burst:
            interval.logged += 1
            self._log.log(level, msg, *args)
        else:
            interval.suppressed += 1
            interval.level = max(interval.level, level)

    def flush(self, route_id: str | None = None) -> None:
        """Sum up the intervals that are over; with ``route_id`` (a route removed), end all of
        that route's intervals now."""
        now = self._clock()
        for key, interval in list(self._intervals.items()):
            if key[0] == route_id or now - interval.start >= self._window:
                self._end(key, interval, now)

    def _end(self, key: tuple[str, str], interval: _Interval, now: float) -> None:
        del self._intervals[key]
        if interval.suppressed:
            self._log.log(
                interval.level,
                "route %s: %d more %s errors in the last %.1f s (each counted in the route's errors)",
                key[0],
                interval.suppressed,
                key[1],
                now - interval.start,
            )
