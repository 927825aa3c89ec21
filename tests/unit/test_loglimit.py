"""The pure engine's limiter of per-connection log lines (scistream.dataplane.loglimit), on a
clock the test moves."""

from __future__ import annotations

import logging

import pytest

from scistream.dataplane.loglimit import LogLimiter

LOGGER = "test.loglimit"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def limiter(clock: Clock, caplog: pytest.LogCaptureFixture) -> LogLimiter:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    return LogLimiter(logging.getLogger(LOGGER), burst=3, window=10.0, clock=clock)


def messages(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    out = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER]
    caplog.clear()
    return out


def test_burst_then_one_summary_when_the_interval_is_over(
    limiter: LogLimiter, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    for i in range(50):
        limiter.log("r1", "accept", logging.WARNING, "route %s: accept failed (%d)", "r1", i)
        clock.now += 0.1
    assert messages(caplog) == [(logging.WARNING, f"route r1: accept failed ({i})") for i in range(3)]
    limiter.flush()  # 5 s into the interval: nothing yet
    assert messages(caplog) == []
    clock.now = 110.0
    limiter.flush()
    assert messages(caplog) == [
        (
            logging.WARNING,
            "route r1: 47 more accept errors in the last 10.0 s (each counted in the route's errors)",
        )
    ]
    limiter.flush()  # said once
    limiter.log("r1", "accept", logging.WARNING, "again")  # a new interval logs again
    assert messages(caplog) == [(logging.WARNING, "again")]


def test_the_next_line_after_the_interval_ends_it(
    limiter: LogLimiter, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    for _ in range(4):
        limiter.log("r1", "io", logging.INFO, "info")
    limiter.log("r1", "io", logging.ERROR, "error")  # suppressed, but the summary takes its level
    clock.now += 12.0
    limiter.log("r1", "io", logging.INFO, "next")
    assert messages(caplog) == [
        (logging.INFO, "info"),
        (logging.INFO, "info"),
        (logging.INFO, "info"),
        (logging.ERROR, "route r1: 2 more io errors in the last 12.0 s (each counted in the route's errors)"),
        (logging.INFO, "next"),
    ]


def test_routes_and_kinds_are_limited_apart_and_removal_ends_a_route(
    limiter: LogLimiter, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    for route, kind in (("r1", "io"), ("r1", "accept"), ("r2", "io")):
        for _ in range(5):
            limiter.log(route, kind, logging.WARNING, "%s %s", route, kind)
    assert len(messages(caplog)) == 9
    clock.now += 1.0
    limiter.flush("r1")  # r1 removed: its summaries now, r2's at the end of its interval
    assert sorted(messages(caplog)) == [
        (
            logging.WARNING,
            f"route r1: 2 more {kind} errors in the last 1.0 s (each counted in the route's errors)",
        )
        for kind in ("accept", "io")
    ]
    clock.now += 9.0
    limiter.flush()
    assert messages(caplog) == [
        (
            logging.WARNING,
            "route r2: 2 more io errors in the last 10.0 s (each counted in the route's errors)",
        )
    ]
