"""Session events: what s2cs publishes on its ZMQ PUB socket and appctrl / s2uc read.

Wire form: a two-frame ZMQ message ``[topic, json]``; the topic is
``session/<uid>`` (subscribe to ``session/`` for all, ``session/<uid>`` for one),
the body the JSON of :class:`SessionEvent`. The PUB endpoint is advertised by the
``server_info`` RPC (``ServerInfo.events``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

# broken: the data plane died and cut the session's connections (error says how many);
# restored: its routes were re-applied in a new data plane; orphaned: routes adopted with
# no stored session (see s2cs/sessions.py).
EventKind = Literal[
    "created", "hello", "ready", "active", "released", "failed", "expired", "broken", "restored", "orphaned"
]
EVENT_KINDS: tuple[str, ...] = (
    "created", "hello", "ready", "active", "released", "failed", "expired", "broken", "restored", "orphaned"
)  # fmt: skip
TOPIC_PREFIX = "session/"


@dataclass(frozen=True)
class SessionEvent:
    event: EventKind
    uid: str
    role: str
    state: str
    listeners: list[str] = field(default_factory=list)
    prod_listeners: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    security: str = ""
    error: str = ""
    ts: float = field(default_factory=time.time)

    def topic(self) -> bytes:
        return f"{TOPIC_PREFIX}{self.uid}".encode()

    def encode(self) -> list[bytes]:
        return [self.topic(), json.dumps(asdict(self), separators=(",", ":")).encode()]

    @classmethod
    def decode(cls, frames: list[bytes]) -> SessionEvent:
        if len(frames) != 2 or not frames[0].startswith(TOPIC_PREFIX.encode()):
            raise ValueError("not a session event")
        data = json.loads(frames[1])
        if data.get("event") not in EVENT_KINDS:
            raise ValueError(f"unknown session event {data.get('event')!r}")
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def topic_for(uid: str | None) -> bytes:
    """Subscription prefix: one session, or every session when uid is None."""
    return f"{TOPIC_PREFIX}{uid}".encode() if uid else TOPIC_PREFIX.encode()
