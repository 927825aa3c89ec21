"""The session state machine on its own: every legal path, every illegal event refused."""

from __future__ import annotations

import pytest

from scistream.s2cs.sessions import (
    TRANSITIONS,
    Event,
    IllegalTransition,
    Session,
    SessionMachine,
    SessionTable,
    State,
    next_state,
)


def test_normal_life_prod() -> None:
    m = SessionMachine()
    assert m.fire(Event.REQ) is State.WAITING_HELLO
    assert m.fire(Event.HELLO) is State.RESERVED
    assert m.fire(Event.UPDATE) is State.READY
    assert m.fire(Event.DATA_SEEN) is State.ACTIVE
    assert m.fire(Event.UPDATE) is State.ACTIVE  # re-targeting keeps it active
    assert m.fire(Event.RELEASE) is State.RELEASED
    events = [e for e, _ in m.history]
    assert events == [Event.REQ, Event.HELLO, Event.UPDATE, Event.DATA_SEEN, Event.UPDATE, Event.RELEASE]


@pytest.mark.parametrize("state", [State.WAITING_HELLO, State.RESERVED, State.READY, State.ACTIVE])
def test_every_live_state_can_end(state: State) -> None:
    assert next_state(state, Event.RELEASE) is State.RELEASED
    assert next_state(state, Event.ERROR) is State.FAILED
    assert next_state(state, Event.TIMEOUT) is State.EXPIRED


@pytest.mark.parametrize("state", [State.RELEASED, State.FAILED, State.EXPIRED])
def test_terminal_states_accept_nothing(state: State) -> None:
    assert state.terminal
    for event in Event:
        with pytest.raises(IllegalTransition):
            next_state(state, event)


def test_illegal_transitions_raise_clear_error() -> None:
    m = SessionMachine()
    with pytest.raises(IllegalTransition, match="'hello' is not allowed in state 'new'"):
        m.fire(Event.HELLO)
    m.fire(Event.REQ)
    with pytest.raises(IllegalTransition, match="'update' is not allowed in state 'waiting_hello'"):
        m.fire(Event.UPDATE)
    with pytest.raises(IllegalTransition):
        m.fire(Event.REQ)  # a second req for the same session
    assert m.state is State.WAITING_HELLO  # an illegal event changes nothing
    m.fire(Event.HELLO)
    with pytest.raises(IllegalTransition):
        m.fire(Event.HELLO)  # a second hello cannot reopen the session
    with pytest.raises(IllegalTransition):
        m.fire(Event.DATA_SEEN)  # no data before routes exist


def test_table_is_closed_over_states() -> None:
    # Every target state is a State, every live state has a way out.
    live = {s for s in State if not s.terminal}
    assert {dst for dst in TRANSITIONS.values()} <= set(State)
    for s in live:
        assert any(src == s for src, _ in TRANSITIONS)


def test_restored_machine_continues() -> None:
    m = SessionMachine(State.READY)
    assert m.state.routed
    assert m.allows(Event.DATA_SEEN) and not m.allows(Event.HELLO)
    assert m.fire(Event.DATA_SEEN) is State.ACTIVE


def _session(uid: str = "u1") -> Session:
    return Session(
        uid=uid,
        role="PROD",
        owner="",
        owner_name="",
        num_conn=1,
        rate=0,
        rate_limit=0,
        security="plain",
        ports=[],
        listeners=[],
        machine=SessionMachine(),
    )


def test_table_membership_follows_the_state() -> None:
    table = SessionTable()
    s = _session()
    assert table.fire(s, Event.REQ) is State.WAITING_HELLO and table["u1"] is s
    table.fire(s, Event.HELLO)
    table.fire(s, Event.UPDATE)
    assert table.fire(s, Event.END) is State.ENDING
    assert "u1" not in table and not s.state.held  # the uid is free while it is torn down
    with pytest.raises(IllegalTransition):
        table.fire(s, Event.END)  # ending once is all
    with pytest.raises(IllegalTransition):
        table.fire(s, Event.UPDATE)  # an ending session never reads ready again
    assert table.fire(s, Event.TIMEOUT) is State.EXPIRED and "u1" not in table


@pytest.mark.parametrize(
    "start", [State.WAITING_HELLO, State.RESERVED, State.READY, State.ACTIVE, State.ORPHANED]
)
def test_every_held_state_ends_through_ending(start: State) -> None:
    for outcome, final in ((Event.RELEASE, State.RELEASED), (Event.ERROR, State.FAILED)):
        table = SessionTable()
        s = _session()
        s.machine = SessionMachine(start)
        table.track(s)
        assert table["u1"] is s
        assert table.fire(s, Event.END) is State.ENDING and len(table) == 0
        assert table.fire(s, outcome) is final and final.terminal
