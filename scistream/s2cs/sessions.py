"""The session state machine: states, events and the legal transitions, with no I/O.

::

    req ─► waiting_hello ──hello──► reserved ──update──► ready ──data_seen──► active
                │                      │                  │  ▲ update          │ update
                │ timeout              │ timeout          │  └───────────────┘
                ▼                      ▼                  ▼ timeout (idle)
             expired                expired            expired
    any live state ──release──► released        any live state ──error──► failed

    any live state ──end──► ending ──release / timeout / error──► released / expired / failed

* ``waiting_hello``: the req call is parked until the application's hello.
* ``reserved``: ports are held and the hello is known, but no update has set
  the targets yet (expires after ``reserved_timeout``).
* ``ready``: routes are applied in the data plane; no byte seen yet.
* ``active``: the data plane has carried bytes for this session.
* ``orphaned``: routes the data plane carries for this s2cs with no stored session
  (the store was lost); adopted as they are, never removed unasked, released by
  an operator.
* ``ending``: the session is being torn down (routes, ports, stored row); it
  answers as gone from the moment it enters this state, never as ready.
* ``released`` / ``failed`` / ``expired`` are terminal.

The machine is the one source of truth for a session's liveness: the
:class:`SessionTable` holds a session exactly while its state is *held* (live or
orphaned), and every transition goes through :meth:`SessionTable.fire`, which
keeps the table in step. The manager goes out through ``ending`` (``end`` first,
the outcome when the teardown is done); the direct live -> outcome transitions
remain for a machine used on its own. The I/O that goes with each transition
(ports, backend, store, events) lives in ``manager.py`` and ``housekeeping.py``.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from scistream.certs import SessionCredentials, is_credentials
from scistream.keys import compat_key_bytes
from scistream.s2cs.backends.base import RoutePlan, SessionPlan, SessionUsage


class State(enum.StrEnum):
    RESERVED = "reserved"
    WAITING_HELLO = "waiting_hello"
    READY = "ready"
    ACTIVE = "active"
    RELEASED = "released"
    FAILED = "failed"
    EXPIRED = "expired"
    ORPHANED = "orphaned"
    ENDING = "ending"

    @property
    def terminal(self) -> bool:
        return self in (State.RELEASED, State.FAILED, State.EXPIRED)

    @property
    def held(self) -> bool:
        """The session is live (or orphaned): it is in the table, its uid is taken."""
        return not self.terminal and self is not State.ENDING

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
    END = "end"  # the teardown starts; the outcome (release, timeout, error) follows


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
    **{(s, Event.END): State.ENDING for s in (*_LIVE, State.ORPHANED)},
    (State.ENDING, Event.RELEASE): State.RELEASED,
    (State.ENDING, Event.TIMEOUT): State.EXPIRED,
    (State.ENDING, Event.ERROR): State.FAILED,
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


@dataclass
class Session:
    uid: str
    role: str  # "PROD" | "CONS"
    owner: str
    owner_name: str
    num_conn: int
    rate: int
    rate_limit: int
    security: str
    ports: list[int]
    listeners: list[str]
    machine: SessionMachine
    psk: bytes = field(default=b"", repr=False)
    psk_identity: str = ""
    prod_listeners: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)
    last_activity: float = field(default_factory=time.time)
    hello_at: float = 0.0
    error: str = ""
    # runtime only
    waiter: asyncio.Future[None] | None = field(default=None, repr=False)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    usage: SessionUsage = field(default_factory=SessionUsage, repr=False)
    seen_connections: set[tuple[str, str, float]] = field(default_factory=set, repr=False)
    # in a cluster (status only): the node carrying each listener, connections lost with a node
    listener_nodes: list[str] = field(default_factory=list, repr=False)
    lost: list[str] = field(default_factory=list, repr=False)

    @property
    def state(self) -> State:
        return self.machine.state

    def record(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "role": self.role,
            "owner": self.owner,
            "owner_name": self.owner_name,
            "num_conn": self.num_conn,
            "rate": self.rate,
            "rate_limit": self.rate_limit,
            "security": self.security,
            "ports": self.ports,
            "listeners": self.listeners,
            "state": self.state.value,
            "psk_identity": self.psk_identity,
            "prod_listeners": self.prod_listeners,
            "targets": self.targets,
            "created_at": self.created_at,
            "last_activity": self.last_activity,
            "hello_at": self.hello_at,
        }

    @classmethod
    def from_record(cls, data: dict[str, Any], psk: bytes) -> Session:
        if data["security"] == "compat":
            psk = compat_key_bytes(psk)  # a row of a version that kept the 1.x key as text
        return cls(
            uid=str(data["uid"]),
            role=str(data["role"]),
            owner=str(data.get("owner", "anonymous")),
            owner_name=str(data.get("owner_name", "")),
            num_conn=int(data["num_conn"]),
            rate=int(data.get("rate", 0)),
            rate_limit=int(data.get("rate_limit", 0)),
            security=str(data["security"]),
            ports=[int(p) for p in data["ports"]],
            listeners=[str(x) for x in data["listeners"]],
            machine=SessionMachine(State(data["state"])),
            psk=psk,
            psk_identity=str(data.get("psk_identity", "")),
            prod_listeners=[str(x) for x in data.get("prod_listeners", [])],
            targets=[str(x) for x in data.get("targets", [])],
            created_at=float(data.get("created_at", time.time())),
            last_activity=float(data.get("last_activity", time.time())),
            hello_at=float(data.get("hello_at", 0.0)),
        )

    def requester_key(self) -> bytes:
        """What the PROD requester gets as ``session_key``: the PSK, or the session's
        certificates without the listener's key; nothing for other roles or modes."""
        if self.role != "PROD" or self.security != "tls" or not self.psk:
            return b""
        if is_credentials(self.psk):
            return SessionCredentials.decode(self.psk).for_consumer().encode()
        return self.psk

    def plan(self) -> SessionPlan:
        routes = tuple(
            RoutePlan(f"{self.uid}/{i}", self.listeners[i], self.targets[i]) for i in range(self.num_conn)
        )
        return SessionPlan(
            uid=self.uid,
            role="PROD" if self.role == "PROD" else "CONS",
            routes=routes,
            security=self.security,  # type: ignore[arg-type]
            psk_identity=self.psk_identity,
            psk_key=self.psk,
            rate_limit=self.rate_limit,
            owner=self.owner,
        )


class SessionTable(Mapping[str, Session]):
    """The sessions this s2cs holds, by uid: a session is here exactly while its
    machine's state is held (live or orphaned), because every transition goes
    through :meth:`fire`. Read-only otherwise."""

    def __init__(self) -> None:
        self._by_uid: dict[str, Session] = {}

    def __getitem__(self, uid: str) -> Session:
        return self._by_uid[uid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_uid)

    def __len__(self) -> int:
        return len(self._by_uid)

    def fire(self, s: Session, event: Event) -> State:
        """The one way a session changes state; IllegalTransition (nothing changed) if
        ``event`` is not allowed. A new session (req) enters the table here, and a
        session leaves it as it starts ending."""
        new = s.machine.fire(event)
        self.track(s)
        return new

    def track(self, s: Session) -> None:
        """Put ``s`` (restored from the store, adopted) in or out of the table by its state."""
        if s.machine.started and s.state.held:
            self._by_uid[s.uid] = s
        elif self._by_uid.get(s.uid) is s:
            del self._by_uid[s.uid]
