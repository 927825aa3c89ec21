"""One node's copy of the cluster's keys, kept current by one etcd watch.

The copy is read once at a revision, then every change after it arrives through a
watch on the whole prefix, in revision order. A broken watch is re-opened from the
next revision (nothing is missed); a compacted one makes the copy read everything
again. While the watch is down, :attr:`ClusterView.connected` is false: the copy
may be stale, so nothing is applied from it (the reconciler waits).

Whoever needs to react registers a listener; ``changed`` wakes everyone waiting for
any change (an RPC waiting for a hello, an update waiting for the nodes' acks).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from scistream.etcd import EtcdClient, EtcdCompacted, EtcdError, KeyValue
from scistream.s2cs.cluster.layout import ApplyAck, ClusterRecord, Keyspace, NodeInfo, Sealer, SealError

log = logging.getLogger(__name__)

WATCH_RETRY_S = 0.5


@dataclass
class Change:
    """What one batch of watch events changed."""

    sessions: dict[str, tuple[ClusterRecord | None, ClusterRecord | None]] = field(default_factory=dict)
    nodes: dict[str, tuple[NodeInfo | None, NodeInfo | None]] = field(default_factory=dict)
    ended: dict[str, dict[str, str]] = field(default_factory=dict)
    resync: bool = False  # the whole copy was read again


class ClusterView:
    def __init__(self, etcd: EtcdClient, keys: Keyspace, sealer: Sealer) -> None:
        self.etcd = etcd
        self.keys = keys
        self.sealer = sealer
        self.nodes: dict[str, NodeInfo] = {}
        self.sessions: dict[str, ClusterRecord] = {}
        self.acks: dict[str, dict[str, ApplyAck]] = {}  # uid -> node -> ack
        self.ports: dict[str, dict[int, str]] = {}  # node -> port -> uid
        self.usage: dict[str, bytes] = {}  # node -> its usage JSON
        self.early: dict[str, bytes] = {}  # uid -> hello JSON
        self.revision = 0
        self.connected = False
        self.listeners: list[Callable[[Change], None]] = []
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def load(self) -> Change:
        """Read every key of the prefix at one revision (the copy starts over); the copy
        counts as current from here until the watch breaks."""
        kvs, revision = await self.etcd.get(self.keys.root(), prefix=True)
        old_sessions, old_nodes = self.sessions, self.nodes
        self.nodes, self.sessions, self.acks, self.ports, self.usage, self.early = {}, {}, {}, {}, {}, {}
        change = Change(resync=True)
        scratch = Change()
        for kv in kvs:
            self._put(kv, scratch)
        for uid in set(old_sessions) | set(self.sessions):
            change.sessions[uid] = (old_sessions.get(uid), self.sessions.get(uid))
        for name in set(old_nodes) | set(self.nodes):
            change.nodes[name] = (old_nodes.get(name), self.nodes.get(name))
        self.revision = revision
        self.connected = True
        return change

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._follow())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _follow(self) -> None:
        while True:
            try:
                if not self.connected:
                    # After a break, read everything again: a read that succeeds proves etcd
                    # answers, and the watch then goes on from that revision.
                    await self._publish(await self.load())
                    self._set_connected(True)
                async for batch in self.etcd.watch(self.keys.root(), self.revision + 1):
                    change = Change()
                    for ev in batch:
                        if ev.type == "put":
                            self._put(ev.kv, change)
                        else:
                            self._delete(ev.kv.key, change)
                        self.revision = max(self.revision, ev.kv.mod_revision)
                    self._set_connected(True)
                    await self._publish(change)
            except asyncio.CancelledError:
                raise
            except EtcdCompacted:
                log.warning("the cluster's history was compacted past this node's copy; reading it again")
            except EtcdError as exc:
                if self.connected:
                    log.warning("lost the watch on the cluster's keys: %s", exc)
            except Exception:
                log.exception("the cluster watch failed; opening it again")
            self._set_connected(False)
            await asyncio.sleep(WATCH_RETRY_S)

    def _set_connected(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            if connected:
                log.info("watching the cluster's keys again (revision %d)", self.revision)

    async def _publish(self, change: Change) -> None:
        for listener in list(self.listeners):
            try:
                listener(change)
            except Exception:
                log.exception("a listener of cluster changes failed")
        async with self._changed:
            self._changed.notify_all()

    async def wait_change(self, timeout: float) -> None:
        """Wait until the next change arrives (or ``timeout`` s pass)."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)

    # ------------------------------------------------------------------ decoding

    def decode_session(self, kv: KeyValue) -> ClusterRecord | None:
        try:
            return ClusterRecord.decode(kv.value, self.sealer, kv.mod_revision)
        except SealError as exc:
            log.error("%s", exc)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("an unreadable session record %s in etcd: %s", kv.key.decode(errors="replace"), exc)
        return None

    def _put(self, kv: KeyValue, change: Change) -> None:
        kind, parts = self.keys.split(kv.key)
        try:
            if kind == "nodes" and len(parts) == 1:
                info = NodeInfo.decode(kv.value)
                change.nodes[parts[0]] = (self.nodes.get(parts[0]), info)
                self.nodes[parts[0]] = info
            elif kind == "sessions" and len(parts) == 1:
                rec = self.decode_session(kv)
                if rec is not None:
                    old = self.sessions.get(parts[0])
                    change.sessions[parts[0]] = (change.sessions.get(parts[0], (old, None))[0], rec)
                    self.sessions[parts[0]] = rec
            elif kind == "applied" and len(parts) == 2:
                self.acks.setdefault(parts[0], {})[parts[1]] = ApplyAck.decode(kv.value)
            elif kind == "ports" and len(parts) == 2:
                self.ports.setdefault(parts[0], {})[int(parts[1])] = kv.value.decode()
            elif kind == "usage" and len(parts) == 1:
                self.usage[parts[0]] = kv.value
            elif kind == "early" and len(parts) == 1:
                self.early[parts[0]] = kv.value
            elif kind == "ended" and len(parts) == 1:
                change.ended[parts[0]] = {str(k): str(v) for k, v in json.loads(kv.value).items()}
        except (ValueError, KeyError, TypeError) as exc:
            log.error("an unreadable key %s in etcd: %s", kv.key.decode(errors="replace"), exc)

    def _delete(self, key: bytes, change: Change) -> None:
        kind, parts = self.keys.split(key)
        if kind == "nodes" and len(parts) == 1:
            old = self.nodes.pop(parts[0], None)
            if old is not None:
                change.nodes[parts[0]] = (old, None)
        elif kind == "sessions" and len(parts) == 1:
            old_rec = self.sessions.pop(parts[0], None)
            if old_rec is not None:
                change.sessions[parts[0]] = (change.sessions.get(parts[0], (old_rec, None))[0], None)
        elif kind == "applied" and len(parts) == 2:
            self.acks.get(parts[0], {}).pop(parts[1], None)
            if not self.acks.get(parts[0], True):
                del self.acks[parts[0]]
        elif kind == "ports" and len(parts) == 2:
            with contextlib.suppress(ValueError):
                self.ports.get(parts[0], {}).pop(int(parts[1]), None)
        elif kind == "usage" and len(parts) == 1:
            self.usage.pop(parts[0], None)
        elif kind == "early" and len(parts) == 1:
            self.early.pop(parts[0], None)

    # ------------------------------------------------------------------ questions

    def load_of(self) -> dict[str, int]:
        """Connections each live node carries (its reserved ports)."""
        return {n: len(self.ports.get(n, {})) for n in self.nodes}
