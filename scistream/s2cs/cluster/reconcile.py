"""What each node does on its own in a cluster: converge, count, watch, keep house.

* **converge**: bring this node's data plane in line with the desired state in etcd,
  session by session, whenever the copy (view.py) says a session changed: apply the
  routes of the connections placed here, acknowledge the record revision applied
  (``applied/<uid>/<node>``), remove the routes of sessions that ended (and give their
  ports back) or drain those whose connections moved elsewhere. Nothing is applied
  while this node's lease is unconfirmed or its copy is not being watched: a node cut
  off from etcd never acts on a plan that may be stale, and never touches the
  streams its data plane carries.
* **count**: every poll interval, one observation of the data plane, written as
  ``usage/<node>`` (on the node's lease) when it changed.
* **watch the data plane**: an s2ds that died is restarted and every route of this
  node applied again.
* **keep house** (only the live node first by name, so the work is done once; every
  write is a compare-and-swap anyway): expire sessions past their timeouts (also those
  whose coordinating node died while they waited for a hello), mark sessions active
  when a node counted bytes, and move the connections of a node that left the cluster
  to live nodes, so new connections find a listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Collection
from typing import TYPE_CHECKING

from scistream.etcd import Compare, EtcdError, Op
from scistream.s2cs.backends.base import RoutePlan, SessionPlan, SessionView
from scistream.s2cs.cluster.layout import ApplyAck, ClusterRecord, Placement
from scistream.s2cs.cluster.view import Change
from scistream.s2cs.errors import ControlError
from scistream.s2cs.metrics import SessionSample, Snapshot
from scistream.s2cs.ports import _bindable
from scistream.s2cs.sessions import Event, State

if TYPE_CHECKING:
    from scistream.s2cs.cluster.manager import ClusterManager

log = logging.getLogger(__name__)

DATA_PLANE_CHECK_S = 0.5
KEEPER_TICK_S = 1.0
#: Grace past hello_timeout before the keeper ends a session still waiting for its hello (s).
ORPHAN_HELLO_GRACE_S = 5.0


def _fingerprint(rec: ClusterRecord, mine: list[int]) -> str:
    """What this node's routes of a session depend on: same fingerprint, nothing to do."""
    s = rec.session
    h = hashlib.sha256()
    for part in (s.role, s.security, s.psk_identity, str(s.rate_limit), str(s.num_conn), s.owner):
        h.update(part.encode() + b"\0")
    h.update(s.psk)
    for i in mine:
        h.update(f"{i}|{rec.placement[i].listener}|{s.targets[i] if i < len(s.targets) else ''}\0".encode())
    return h.hexdigest()


def node_plan(rec: ClusterRecord, mine: list[int]) -> SessionPlan:
    """The part of a session's plan this node carries (route ids keep the global index,
    and the rate cap is this node's share of the session's)."""
    s = rec.session
    full = s.plan()
    routes = tuple(RoutePlan(f"{s.uid}/{i}", rec.placement[i].listener, s.targets[i]) for i in mine)
    share = s.rate_limit * len(mine) // s.num_conn if s.rate_limit else 0
    return SessionPlan(
        uid=full.uid,
        role=full.role,
        routes=routes,
        security=full.security,
        psk_identity=full.psk_identity,
        psk_key=full.psk_key,
        rate_limit=max(1, share) if s.rate_limit else 0,
        owner=full.owner,
    )


class NodeReconciler:
    def __init__(self, manager: ClusterManager) -> None:
        self.m = manager
        self.node = manager.node
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._applied: dict[str, str] = {}  # uid -> fingerprint of what this node's data plane has
        self._tasks: list[asyncio.Task[None]] = []
        self._last_usage = b""
        self._seen: dict[str, set[tuple[str, str, float]]] = {}  # uid -> connections audited
        self._traffic: dict[str, tuple[int, float]] = {}  # keeper: uid -> (traffic, when it grew)
        manager.view.listeners.append(self._on_change)

    # ------------------------------------------------------------------ start / stop

    async def first_pass(self) -> None:
        """At start: what the data plane carries now, and everything in the copy, converged."""
        try:
            carried = await self.m.backend.observe()
        except Exception as exc:
            log.error("cannot list the data plane's sessions (%s); applying every session of this node", exc)
            carried = {}
        # A route carried now but absent from the desired state is removed by converge.
        for uid in carried:
            self._applied[uid] = "carried before this start"
        self._dirty.update(carried)
        self._dirty.update(self.m.view.sessions)
        await self._converge_dirty()
        await self._clean_ports()

    def start(self) -> None:
        self._tasks = [
            asyncio.ensure_future(self._run()),
            asyncio.ensure_future(self._count()),
            asyncio.ensure_future(self._keep_house()),
            asyncio.ensure_future(self._watch_data_plane()),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def resync(self) -> None:
        """After this node lost its lease and joined again: read everything again."""
        change = await self.m.view.load()
        self._on_change(change)
        await self._clean_ports()

    # ------------------------------------------------------------------ converge

    def _on_change(self, change: Change) -> None:
        self._dirty.update(change.sessions)
        if change.resync:
            self._dirty.update(self._applied)
        self._wake.set()

    def _may_act(self) -> bool:
        return self.m.membership.valid and self.m.view.connected and self.m.data_plane_ok

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while not self._may_act():
                await asyncio.sleep(0.2)  # no stale plan is applied: wait for the lease and the watch
            try:
                await self._converge_dirty()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("converging this node's routes failed; trying again")
                await asyncio.sleep(1.0)
                self._wake.set()

    async def _converge_dirty(self) -> None:
        while self._dirty:
            uid = min(self._dirty)
            self._dirty.discard(uid)
            await self._converge(uid)

    async def _converge(self, uid: str) -> None:
        m = self.m
        rec = m.view.sessions.get(uid)
        placed = rec.on_node(self.node) if rec is not None else []
        if rec is not None and placed and not rec.session.state.routed and uid not in self._applied:
            await self._confirm_ports(rec, placed)
            return
        mine = placed if rec is not None and rec.session.state.routed else []
        if rec is not None and mine:
            fp = _fingerprint(rec, mine)
            error = ""
            if self._applied.get(uid) != fp:
                try:
                    await m.backend.apply(node_plan(rec, mine))
                    self._applied[uid] = fp
                    log.info(
                        "session %s: %d route(s) of this node applied (revision %d)",
                        uid,
                        len(mine),
                        rec.mod_revision,
                    )
                except Exception as exc:
                    error = str(exc) or type(exc).__name__
                    self._applied.pop(uid, None)
                    log.error("session %s: this node's data plane refused its routes: %s", uid, error)
            await self._ack(rec, error)
            return
        if uid in self._applied:
            # Ended (remove now), or this node's connections moved elsewhere / the session
            # is no longer routed (drain: a connection still flowing finishes).
            try:
                await m.backend.remove(uid, drain=rec is not None)
                log.info(
                    "session %s: this node's routes %s", uid, "drained" if rec is not None else "removed"
                )
            except Exception as exc:
                log.error("session %s: cannot remove this node's routes: %s", uid, exc)
                return
            del self._applied[uid]
        await self._give_back(uid, rec)

    async def _ack(self, rec: ClusterRecord, error: str) -> None:
        """Tell the cluster which revision of the session this node has made true (and
        why not, with ``error``), unless it already said so."""
        m = self.m
        uid = rec.session.uid
        ack = m.view.acks.get(uid, {}).get(self.node)
        if ack is None or ack.rev < rec.mod_revision or ack.error != error:
            await self._write(
                [
                    Op.put(
                        m.keys.applied(uid, self.node),
                        ApplyAck(rec.mod_revision, error).encode(),
                        lease=m.membership.lease,
                    )
                ]
            )

    async def _confirm_ports(self, rec: ClusterRecord, placed: list[int]) -> None:
        """A new session's ports on this node: only this node can test-bind them on its
        address (a port another process holds here, which the node that placed the session
        could not see, is swapped for a free one before the req returns its listeners)."""
        m = self.m
        uid = rec.session.uid
        ack = m.view.acks.get(uid, {}).get(self.node)
        if ack is not None and ack.rev >= rec.mod_revision:
            return
        ip = m.view.nodes[self.node].listener_ip if self.node in m.view.nodes else m.config.listener_ip
        busy = [i for i in placed if not _bindable(ip, rec.placement[i].port)]
        if not busy:
            await self._ack(rec, "")
            return
        fresh = m._free_ports(self.node, len(busy))
        if len(fresh) < len(busy):
            await self._ack(rec, f"node {self.node} has no free data port left for it")
            return
        current = await m._read(uid)
        if current is None or current.mod_revision != rec.mod_revision:
            return  # changed meanwhile: the change brings it back here
        s = current.session
        old_keys = []
        for i, port in zip(busy, fresh, strict=True):
            old_keys.append(m.keys.port(self.node, current.placement[i].port))
            current.placement[i] = Placement(self.node, port, m._listener(self.node, port))
            s.ports[i], s.listeners[i] = port, current.placement[i].listener
        new_keys = [m.keys.port(self.node, port) for port in fresh]
        key = m.keys.session(uid)
        ok = await self._write(
            [
                Op.put(key, current.encode(m.sealer)),
                *(Op.put(k, uid.encode()) for k in new_keys),
                *(Op.delete(k) for k in old_keys),
            ],
            [
                Compare.mod_revision(key, "==", rec.mod_revision),
                *(Compare.create_revision(k, "==", 0) for k in new_keys),
            ],
        )
        if ok:
            log.warning(
                "session %s: port(s) %s of this node are held by another process; moved to %s",
                uid,
                ", ".join(str(rec.placement[i].port) for i in busy),
                ", ".join(map(str, fresh)),
            )

    async def _give_back(self, uid: str, rec: ClusterRecord | None) -> None:
        """In one write: this node's port reservations for ``uid`` that its record no longer
        holds (each only while it still names ``uid``), and its ack of the session."""
        m = self.m
        keep = {p.port for p in rec.placement if p.node == self.node} if rec is not None else set()
        ports = [
            m.keys.port(self.node, port)
            for port, holder in m.view.ports.get(self.node, {}).items()
            if holder == uid and port not in keep
        ]
        ops = [Op.delete(k) for k in ports]
        if self.node in m.view.acks.get(uid, {}):
            ops.append(Op.delete(m.keys.applied(uid, self.node)))
        if ops:
            await self._write(ops, [Compare.value(k, "==", uid.encode()) for k in ports])

    async def _clean_ports(self) -> None:
        """Reservations of this node for sessions that no longer exist (ended while it was away)."""
        for port, uid in list(self.m.view.ports.get(self.node, {}).items()):
            if uid not in self.m.view.sessions:
                key = self.m.keys.port(self.node, port)
                await self._write([Op.delete(key)], [Compare.value(key, "==", uid.encode())])

    async def _write(self, ops: list[Op], compare: list[Compare] | None = None) -> bool:
        """A fenced write of this node; False (logged) if it did not happen."""
        try:
            result = await self.m.etcd.txn([self.m.membership.fence(), *(compare or [])], ops)
        except EtcdError as exc:
            log.warning("node %s: a write to etcd failed: %s", self.node, exc)
            return False
        return result.succeeded

    # ------------------------------------------------------------------ count

    def _audit_connections(self, views: dict[str, SessionView]) -> None:
        """One audit record per data connection this node's data plane reports (as the
        single node does; seen at polling time)."""
        for uid, view in views.items():
            rec = self.m.view.sessions.get(uid)
            seen = self._seen.get(uid, set())
            now = {(c.listener, c.peer, c.started_at) for c in view.usage.connections}
            for c in view.usage.connections:
                if (c.listener, c.peer, c.started_at) not in seen:
                    self.m.audit.record(
                        event="connection",
                        uid=uid,
                        identity=rec.session.owner if rec is not None else "",
                        listener=c.listener,
                        peer=c.peer,
                        target=c.target,
                        started_at=c.started_at,
                        node=self.node,
                    )
            self._seen[uid] = now
        for uid in [u for u in self._seen if u not in views]:
            del self._seen[uid]

    def snapshot(self) -> None:
        """The metrics of this node: every session of the cluster by state, and the
        counters of the sessions this node carries."""
        m = self.m
        by_state: dict[str, int] = {st.value: 0 for st in State if st.held}
        samples = []
        mine = json.loads(self._last_usage or b"{}")
        for uid, rec in m.view.sessions.items():
            s = rec.session
            by_state[s.state.value] = by_state.get(s.state.value, 0) + 1
            u = mine.get(uid)
            if u is not None:
                samples.append(
                    SessionSample(
                        m.metrics.uid_label(uid, s.security),
                        s.role,
                        s.state.value,
                        int(u["b2t"]),
                        int(u["bft"]),
                        int(u["act"]),
                    )
                )
        m.metrics.set_snapshot(Snapshot(by_state, tuple(samples)))

    async def _count(self) -> None:
        while True:
            await asyncio.sleep(self.m.config.poll_interval)
            self.snapshot()
            if not self._may_act() or not self._applied:
                continue
            try:
                views = await asyncio.wait_for(self.m.backend.observe(list(self._applied)), 5.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("usage unavailable: %s", exc)
                continue
            report = {}
            for uid, view in sorted(views.items()):
                u = view.usage
                report[uid] = {
                    "b2t": u.bytes_to_target or 0,
                    "bft": u.bytes_from_target or 0,
                    "act": u.connections_active or 0,
                    "tot": u.connections_total or 0,
                    "conns": [
                        [c.listener, c.peer, c.target, c.bytes_to_target, c.bytes_from_target, c.started_at]
                        for c in u.connections[:64]
                    ],
                }
            self._audit_connections(views)
            body = json.dumps(report, separators=(",", ":"), sort_keys=True).encode()
            if body != self._last_usage and await self._write(
                [Op.put(self.m.keys.usage(self.node), body, lease=self.m.membership.lease)]
            ):
                self._last_usage = body

    # ------------------------------------------------------------------ the data plane

    async def _watch_data_plane(self) -> None:
        m = self.m
        try:
            known = await m.backend.data_plane_pid()
        except Exception:
            known = None
        if known == 0:
            return
        while True:
            await asyncio.sleep(DATA_PLANE_CHECK_S)
            try:
                pid = await m.backend.data_plane_pid()
                if pid is not None and (known is None or pid == known):
                    known = pid
                    continue
                log.error("the data plane (s2ds pid %s) is gone; restarting it and re-applying", known)
                cut = self._tell(
                    f"the data plane (s2ds pid {known}) of node {self.node} stopped at "
                    f"{time.strftime('%H:%M:%S')}: its connections were cut",
                    "broken",
                )
                m.data_plane_ok = False
                if m.on_data_plane_change is not None:
                    await m.on_data_plane_change()
                while pid is None:
                    try:
                        await m.backend.restart_data_plane()
                        pid = await m.backend.data_plane_pid()
                    except Exception as exc:
                        log.error("cannot restart the data plane: %s; trying again", exc)
                        await asyncio.sleep(1.0)
                known = pid
                self._dirty.update(self._applied)
                self._applied.clear()
                m.data_plane_ok = True
                if m.on_data_plane_change is not None:
                    await m.on_data_plane_change()
                self._wake.set()
                await self._converge_dirty()
                self._tell(
                    f"the routes of node {self.node} were applied again in a new data plane",
                    "restored",
                    only=cut,
                )
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("data-plane watchdog failed; continuing")

    def _tell(self, error: str, kind: str, only: Collection[str] | None = None) -> list[str]:
        """Publish ``kind`` for every session this node carries (or ``only`` those)."""
        told = []
        for uid in sorted(self._applied if only is None else only):
            rec = self.m.view.sessions.get(uid)
            if rec is None or (only is not None and uid not in self._applied):
                continue
            rec.session.error = error
            self.m._publish(rec.session, kind)
            told.append(uid)
        return told

    # ------------------------------------------------------------------ keep house

    def is_keeper(self) -> bool:
        live = sorted(self.m.view.nodes)
        return bool(live) and live[0] == self.node and self._may_act()

    async def _keep_house(self) -> None:
        while True:
            await asyncio.sleep(KEEPER_TICK_S)
            if not self.is_keeper():
                continue
            try:
                await self.keep_house(time.time())
            except asyncio.CancelledError:
                raise
            except ControlError as exc:
                log.warning("cluster housekeeping: %s", exc.message)
            except Exception:
                log.exception("cluster housekeeping failed; continuing")

    async def keep_house(self, now: float) -> None:
        m = self.m
        cfg = m.config
        traffic = self._traffic_by_session()
        for uid, rec in list(m.view.sessions.items()):
            s = rec.session
            t = traffic.get(uid, 0)
            seen, since = self._traffic.get(uid, (0, s.last_activity))
            if t > seen:
                since = now
            self._traffic[uid] = (t, since)
            if any(p.node not in m.view.nodes for p in rec.placement):
                current = await m._read(uid)  # a fresh copy: the view's is never changed in place
                if current is not None:
                    await self._replace(current)
                continue
            if s.state is State.WAITING_HELLO:
                # Its coordinator ends it at hello_timeout; this catches the one that died
                # meanwhile, or whose req write reached etcd without it knowing.
                if now - s.created_at > cfg.hello_timeout + ORPHAN_HELLO_GRACE_S:
                    await m._end_uid(uid, Event.TIMEOUT, f"no hello arrived within {cfg.hello_timeout:g} s")
            elif s.state is State.RESERVED and cfg.reserved_timeout > 0:
                if now - max(s.hello_at, s.last_activity) > cfg.reserved_timeout:
                    await m._end_uid(
                        uid,
                        Event.TIMEOUT,
                        f"no update arrived within {cfg.reserved_timeout:g} s of the hello",
                    )
            elif (
                s.state.routed
                and cfg.idle_timeout > 0
                and now - max(since, s.last_activity) > cfg.idle_timeout
            ):
                await m._end_uid(uid, Event.TIMEOUT, f"idle for more than {cfg.idle_timeout:g} s")
            elif s.state is State.READY and t > 0:
                current = await m._read(uid)
                if current is not None and current.session.state is State.READY:
                    current.session.machine.fire(Event.DATA_SEEN)
                    current.session.last_activity = now
                    await m._cas(current)
        for uid in [u for u in self._traffic if u not in m.view.sessions]:
            del self._traffic[uid]
        # Reservations of nodes that are gone, for sessions that are gone.
        for node, held in list(m.view.ports.items()):
            if node in m.view.nodes:
                continue
            for port, uid in list(held.items()):
                if uid not in m.view.sessions:
                    key = m.keys.port(node, port)
                    await self._write([Op.delete(key)], [Compare.value(key, "==", uid.encode())])

    def _traffic_by_session(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for raw in self.m.view.usage.values():
            try:
                report = json.loads(raw)
            except ValueError:
                continue
            for uid, u in report.items():
                out[uid] = (
                    out.get(uid, 0) + int(u.get("b2t", 0)) + int(u.get("bft", 0)) + int(u.get("tot", 0))
                )
        return out

    async def _replace(self, rec: ClusterRecord) -> None:
        """Move the connections of nodes that left the cluster to live nodes (new
        listeners); the lost ones are kept as sentences for status."""
        gone = [i for i, p in enumerate(rec.placement) if p.node not in self.m.view.nodes]
        if gone and self.m.view.nodes:
            await self.m._move(rec, gone, lost="the node left the cluster")
