"""This node's place in the cluster: its key under ``nodes/``, held by a lease it renews.

The lease is the node's fence. Every write the node makes is a transaction that
holds only while ``nodes/<name>`` is still attached to this lease
(:meth:`Membership.fence`), so a node whose lease expired (cut off from etcd,
stalled) cannot change anything once the other nodes have taken it for dead. And
the node knows it before etcd tells it: :attr:`valid` turns false when no renewal
has been confirmed for the lease's TTL, and the node then refuses new sessions and
applies nothing until it has its lease (or a new one) back.

A node that restarts within its TTL (same state directory, so same instance id)
takes its own lease over instead of waiting for it to expire: its peers never see
it leave, and its listeners are not moved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable

from scistream.etcd import Compare, EtcdClient, EtcdError, Op
from scistream.s2cs.cluster.layout import Keyspace, NodeInfo

log = logging.getLogger(__name__)

#: Margin taken off the lease's TTL before this node counts itself as fenced (s).
FENCE_MARGIN_S = 0.5


class MembershipError(Exception):
    """This node cannot join the cluster; the message is one sentence for the operator."""


class Membership:
    def __init__(self, etcd: EtcdClient, keys: Keyspace, me: NodeInfo, ttl: float) -> None:
        self.etcd = etcd
        self.keys = keys
        self.me = me
        self.ttl = max(2, math.ceil(ttl))
        self.lease = 0
        self._valid_until = 0.0  # monotonic
        self._task: asyncio.Task[None] | None = None
        #: Called (awaited) after the node lost its lease and joined again with a new one:
        #: the cluster may have moved its connections meanwhile, so it re-reads everything.
        self.on_rejoin: Callable[[], Awaitable[None]] | None = None
        #: Called when ``valid`` changes.
        self.on_change: Callable[[bool], None] | None = None
        self._was_valid = False

    @property
    def name(self) -> str:
        return self.me.name

    @property
    def valid(self) -> bool:
        """The lease was confirmed less than its TTL ago: this node may act for the cluster."""
        return self.lease != 0 and time.monotonic() < self._valid_until

    def fence(self) -> Compare:
        """The condition every write of this node carries."""
        return Compare.lease(self.keys.node(self.name), "==", self.lease)

    def why_not_valid(self) -> str:
        return (
            f"this gateway node ({self.name}) has lost its place in the cluster: etcd has not "
            f"confirmed its lease for {self.ttl} s; it takes no new session until it has, "
            "so ask another node of the gateway"
        )

    async def join(self) -> None:
        """Register this node (or take over its own lease after a quick restart)."""
        key = self.keys.node(self.name)
        kvs, _ = await self.etcd.get(key)
        if kvs:
            try:
                holder = NodeInfo.decode(kvs[0].value)
            except (ValueError, KeyError, TypeError):
                holder = None
            if holder is not None and holder.instance == self.me.instance and kvs[0].lease:
                sent = time.monotonic()
                if await self.etcd.lease_keepalive(kvs[0].lease) > 0:
                    self.lease = kvs[0].lease
                    await self.etcd.txn([self.fence()], [Op.put(key, self.me.encode(), lease=self.lease)])
                    self._confirmed(sent)
                    log.info("node %s: took its lease %x over after a restart", self.name, self.lease)
                    return
            elif holder is not None and holder.instance != self.me.instance:
                raise MembershipError(
                    f"the node name {self.name!r} is in use by a live node of this gateway "
                    f"(pid {holder.pid} on {holder.host or '?'}, control {holder.control}); give "
                    "each node its own --node-name (or wait until that node has been gone for "
                    f"{self.ttl} s)"
                )
        await self._register(key)

    async def _register(self, key: bytes) -> None:
        sent = time.monotonic()
        lease = await self.etcd.lease_grant(self.ttl)
        result = await self.etcd.txn(
            [Compare.create_revision(key, "==", 0)], [Op.put(key, self.me.encode(), lease=lease)]
        )
        if not result.succeeded:
            await self.etcd.lease_revoke(lease)
            raise MembershipError(
                f"the node name {self.name!r} was taken by another node while this one joined; "
                "give each node its own --node-name"
            )
        self.lease = lease
        self._confirmed(sent)
        log.info("node %s joined the cluster (lease %x, ttl %d s)", self.name, lease, self.ttl)

    def _confirmed(self, sent: float) -> None:
        self._valid_until = sent + self.ttl - FENCE_MARGIN_S
        self._notify()

    def _notify(self) -> None:
        valid = self.valid
        if valid != self._was_valid:
            self._was_valid = valid
            if valid:
                log.warning("node %s: the cluster confirms its lease again", self.name)
            else:
                log.error("node %s: %s", self.name, self.why_not_valid())
            if self.on_change is not None:
                self.on_change(valid)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._renew())

    async def _renew(self) -> None:
        period = self.ttl / 3
        while True:
            sent = time.monotonic()
            try:
                remaining = await self.etcd.lease_keepalive(self.lease)
                if remaining > 0:
                    self._confirmed(sent)
                else:
                    log.error("node %s: its lease expired; joining again", self.name)
                    await self._register(self.keys.node(self.name))
                    if self.on_rejoin is not None:
                        await self.on_rejoin()
            except asyncio.CancelledError:
                raise
            except (EtcdError, MembershipError) as exc:
                log.warning("node %s: cannot renew its lease: %s", self.name, exc)
            self._notify()
            # Renew every third of the TTL; while failing, try every half second.
            await asyncio.sleep(period if self.valid and time.monotonic() - sent < period else 0.5)
            self._notify()

    async def stop(self) -> None:
        """Stop renewing. The lease is not revoked: a restart within the TTL takes it over,
        and the routes of this node's data plane go on carrying their streams meanwhile."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
