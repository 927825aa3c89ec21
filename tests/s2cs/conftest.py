"""Fixtures of the s2cs tests (helpers live in s2cs_support.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from s2cs_support import FakeBackend, ServerThread, make_config

from scistream._proto import scistream_pb2_grpc
from scistream.s2cs.auth import Authenticator
from scistream.s2cs.backends.base import Backend


@pytest.fixture
def s2cs_factory(tmp_path: Any) -> Iterator[Callable[..., ServerThread]]:
    """``s2cs_factory(backend=None, authenticator=None, **config)``: start an s2cs (FakeBackend
    by default); stopped at teardown."""
    started: list[ServerThread] = []

    def start(
        backend: Backend | None = None, authenticator: Authenticator | None = None, **overrides: Any
    ) -> ServerThread:
        if started and "state_dir" not in overrides:
            # One s2cs per state directory (it is locked): a second server gets its own.
            overrides["state_dir"] = str(tmp_path / f"state-{len(started)}")
        cfg = make_config(tmp_path, **overrides)
        st = ServerThread(cfg, backend or FakeBackend(), authenticator)
        started.append(st)
        return st

    yield start
    for st in reversed(started):
        st.stop()


@pytest.fixture
def s2cs(s2cs_factory: Callable[..., ServerThread]) -> ServerThread:
    return s2cs_factory()


@pytest.fixture
def stub_for() -> Iterator[Callable[[ServerThread], scistream_pb2_grpc.ControlStub]]:
    channels: list[grpc.Channel] = []

    def make(st: ServerThread) -> scistream_pb2_grpc.ControlStub:
        ch = grpc.insecure_channel(st.address)
        channels.append(ch)
        return scistream_pb2_grpc.ControlStub(ch)

    yield make
    for ch in channels:
        ch.close()


@pytest.fixture
def stub(s2cs: ServerThread, stub_for: Callable[[ServerThread], scistream_pb2_grpc.ControlStub]) -> Any:
    return stub_for(s2cs)
