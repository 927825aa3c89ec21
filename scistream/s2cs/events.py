"""The ZMQ PUB socket on which s2cs publishes every session transition.

Wire format: :mod:`scistream.events`. The socket binds to ``--events``
(default ``tcp://127.0.0.1:0``, an ephemeral loopback port); the bound address
is advertised by the ``server_info`` RPC. Publishing never blocks: a slow
subscriber loses events past ZMQ's high-water mark, never stalls a session.
"""

from __future__ import annotations

import logging

import zmq

from scistream.events import SessionEvent

log = logging.getLogger(__name__)


class EventPublisher:
    def __init__(self, bind: str) -> None:
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._sock: zmq.Socket[bytes] | None = None
        self.endpoint = ""
        if not bind:
            return
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.PUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        try:
            sock.bind(bind)
        except zmq.ZMQError:
            sock.close()
            self._ctx.term()
            raise
        self._sock = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)

    @property
    def port(self) -> int:
        if self.endpoint.startswith("tcp://"):
            return int(self.endpoint.rsplit(":", 1)[1])
        return 0

    def publish(self, event: SessionEvent) -> None:
        if self._sock is None:
            return
        try:
            self._sock.send_multipart(event.encode(), flags=zmq.NOBLOCK)
        except zmq.Again:
            log.debug("event for %s dropped: subscribers too slow", event.uid)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
