"""A session being torn down reads as ending, never as ready, and its uid is free at once."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
from s2cs_support import FakeBackend, ServerThread, make_config, new_uid, prod_flow

from scistream._proto import scistream_pb2 as pb
from scistream._proto import scistream_pb2_grpc
from scistream.s2cs.sessions import Event, State


class SlowRemove(FakeBackend):
    """Holds every remove until ``go`` is set (set from the server's loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.go: asyncio.Event | None = None
        self.removing = False

    async def remove(self, uid: str, *, drain: bool = False, _record: bool = True) -> None:
        if _record and self.go is not None:
            self.removing = True
            await self.go.wait()
        await super().remove(uid, drain=drain, _record=_record)


def test_a_session_reads_ending_while_it_is_torn_down(tmp_path: Any) -> None:
    backend = SlowRemove()
    st = ServerThread(make_config(tmp_path), backend)
    try:
        with grpc.insecure_channel(st.address) as ch:
            stub = scistream_pb2_grpc.ControlStub(ch)
            uid = new_uid()
            prod_flow(stub, uid, ["127.0.0.1:5074"])
            s = st.manager.sessions[uid]
            assert s.state is State.READY

            async def arm() -> None:
                backend.go = asyncio.Event()

            st.call(arm())
            release = stub.release.future(pb.Release(uid=uid), timeout=10)
            deadline = time.monotonic() + 5
            while not backend.removing and time.monotonic() < deadline:
                time.sleep(0.01)
            assert backend.removing
            # Mid-teardown: out of the table, ending (the poll runs meanwhile: never ready).
            time.sleep(0.5)
            assert s.state is State.ENDING and uid not in st.manager.sessions
            try:
                stub.status(pb.StatusRequest(uid=uid), timeout=5)
                raise AssertionError("status answered for a session being torn down")
            except grpc.RpcError as err:
                assert err.code() is grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]

            async def finish() -> None:
                assert backend.go is not None
                backend.go.set()

            st.call(finish())
            release.result()
            assert s.state is State.RELEASED and uid not in st.manager.sessions
            assert [e for e, _ in s.machine.history][-2:] == [Event.END, Event.RELEASE]
    finally:
        st.stop()
