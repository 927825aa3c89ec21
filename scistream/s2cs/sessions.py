"""The session state machine: states, events and the legal transitions, with no I/O.

::

    req ─► waiting_hello ──hello──► reserved ──update──► ready ──data_seen──► active
                │                      │                  │  ▲ update          │ update
                │ timeout              │ timeout          │  └───────────────┘
                ▼                      ▼                  ▼ timeout (idle)
             expired                expired            expired
    any live state ──release──► released        any live state ──error──► failed

* ``waiting_hello``: the req call is parked until the application's hello.
* ``reserved``: ports are held and the hello is known, but no update has set
  the targets yet (expires after ``reserved_timeout``).
* ``ready``: routes are applied in the data plane; no byte seen yet.
* ``active``: the data plane has carried bytes for this session.
* ``orphaned``: routes the data plane carries for this s2cs with no stored session
  (the store was lost); adopted as they are, never removed unasked, released by
  an operator.
* ``released`` / ``failed`` / ``expired`` are terminal.

The I/O that goes with each transition (ports, backend, store, events) lives in
``manager.py``; this module only says whether a transition is legal.
"""

from __future__ import annotations

import enum


class State(enum.StrEnum):
    RESERVED = "reserved"
    WAITING_HELLO = "waiting_hello"
    READY = "ready"
    ACTIVE = "active"
    RELEASED = "released"
    FAILED = "failed"
    EXPIRED = "expired"
    ORPHANED = "orphaned"

    @property
    def terminal(self) -> bool:
        return self in (State.RELEASED, State.FAILED, State.EXPIRED)

    @property
    def helloed(self) -> bool:
        return self in (State.RESERVED, State.READY, State.ACTIVE)

    @property
    def routed(self) -> bool:
        """The data plane carries routes for the session in this state."""
        return self in (State.READY, State.ACTIVE)

    @property
    def has_routes(self) -> bool:
        """The data plane carries routes for the session: routed, or orphaned."""
        return self.routed or self is State.ORPHANED


class Event(enum.StrEnum):
    REQ = "req"
    HELLO = "hello"
    UPDATE = "update"
    RELEASE = "release"
    TIMEOUT = "timeout"
    DATA_SEEN = "data_seen"
    ERROR = "error"


class IllegalTransition(Exception):
    """An event that the session's current state does not allow."""

    def __init__(self, state: State | None, event: Event) -> None:
        where = state.value if state else "new"
        super().__init__(f"event {event.value!r} is not allowed in state {where!r}")
        self.state = state
        self.event = event


_LIVE = (State.WAITING_HELLO, State.RESERVED, State.READY, State.ACTIVE)

#: (state, event) -> next state. ``None`` as state = the session does not exist yet.
TRANSITIONS: dict[tuple[State | None, Event], State] = {
    (None, Event.REQ): State.WAITING_HELLO,
    (State.WAITING_HELLO, Event.HELLO): State.RESERVED,
    (State.WAITING_HELLO, Event.TIMEOUT): State.EXPIRED,
    (State.RESERVED, Event.UPDATE): State.READY,
    (State.RESERVED, Event.TIMEOUT): State.EXPIRED,
    (State.READY, Event.UPDATE): State.READY,
    (State.READY, Event.DATA_SEEN): State.ACTIVE,
    (State.READY, Event.TIMEOUT): State.EXPIRED,
    (State.ACTIVE, Event.UPDATE): State.ACTIVE,
    (State.ACTIVE, Event.DATA_SEEN): State.ACTIVE,
    (State.ACTIVE, Event.TIMEOUT): State.EXPIRED,
    **{(s, Event.RELEASE): State.RELEASED for s in _LIVE},
    **{(s, Event.ERROR): State.FAILED for s in _LIVE},
    (State.ORPHANED, Event.RELEASE): State.RELEASED,
    (State.ORPHANED, Event.ERROR): State.FAILED,
}


def next_state(state: State | None, event: Event) -> State:
    """The state after ``event``; IllegalTransition if the event is not allowed."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(state, event) from None


class SessionMachine:
    """The state of one session and the history of its transitions."""

    def __init__(self, state: State | None = None) -> None:
        self._state = state
        self.history: list[tuple[Event, State]] = []

    @property
    def state(self) -> State:
        if self._state is None:
            raise IllegalTransition(None, Event.HELLO)  # only before the first req
        return self._state

    @property
    def started(self) -> bool:
        return self._state is not None

    def allows(self, event: Event) -> bool:
        return (self._state, event) in TRANSITIONS

    def fire(self, event: Event) -> State:
        new = next_state(self._state, event)
        self._state = new
        self.history.append((event, new))
        return new
