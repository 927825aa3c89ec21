"""The session verbs of a gateway node in a cluster: req, hello, update, release, status.

Same rules as the single node (it subclasses :class:`SessionManager` for every check
and every key it makes), but a session's truth is its record in etcd, never this
node's memory:

* req reserves its ports on the nodes the placement chose and creates the record in
  one transaction that holds only if the uid and every port are still free and this
  node's lease is still its own: of concurrent reqs for one uid, on any nodes,
  exactly one wins and the others hold nothing;
* hello, update and release are compare-and-swap writes on the record (its mod
  revision), so two nodes never both act on the same version;
* update returns once every live node that carries a connection of the session has
  applied it (each acknowledges the record revision it applied; reconcile.py);
* status reads the records, the nodes' counters and the membership in one
  transaction, so every node answers the same for the same moment.

Every write carries this node's fence (membership.py). Any etcd failure becomes
UNAVAILABLE with a sentence, within the client's deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import grpc

from scistream.endpoints import format_endpoint
from scistream.etcd import Compare, EtcdClient, EtcdError, Op, TxnResult
from scistream.events import SessionEvent
from scistream.s2cs import validate
from scistream.s2cs.audit import AuditLog
from scistream.s2cs.auth import Identity
from scistream.s2cs.backends.base import Backend, ConnectionUsage, SessionUsage
from scistream.s2cs.cluster.layout import ENDED_TTL, ClusterRecord, Keyspace, Placement, Sealer
from scistream.s2cs.cluster.membership import Membership
from scistream.s2cs.cluster.placement import NoRoom, place
from scistream.s2cs.cluster.view import Change, ClusterView
from scistream.s2cs.config import ServerConfig
from scistream.s2cs.errors import ControlError, not_found, precondition
from scistream.s2cs.events import EventPublisher
from scistream.s2cs.manager import EARLY_HELLO_ANSWER_WAIT, SessionManager
from scistream.s2cs.metrics import Metrics
from scistream.s2cs.ports import PortAllocator, _bindable
from scistream.s2cs.sessions import Event, Session, State, next_state
from scistream.s2cs.targets import TargetPolicy

log = logging.getLogger(__name__)

#: How many times a write that lost a race (a port taken, the record changed) is retried.
WRITE_TRIES = 10
#: How long update waits for the nodes that carry the session to apply it (s).
APPLY_WAIT_S = 10.0
#: How long a req waits for the nodes it placed connections on to confirm their ports (s).
PORTS_CONFIRM_S = 5.0
#: How long release waits for those nodes to remove the routes (s).
REMOVE_WAIT_S = 5.0


def _unavailable(exc: EtcdError) -> ControlError:
    return ControlError(
        grpc.StatusCode.UNAVAILABLE,
        f"the gateway's cluster store (etcd) cannot take the change now ({exc}); retry shortly",
    )


class ClusterManager(SessionManager):
    """A node's SessionManager whose sessions live in etcd (see the module docstring)."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        backend: Backend,
        ports: PortAllocator,
        policy: TargetPolicy,
        events: EventPublisher,
        audit: AuditLog,
        metrics: Metrics,
        auth_enabled: bool,
        etcd: EtcdClient,
        keys: Keyspace,
        sealer: Sealer,
        membership: Membership,
        view: ClusterView,
    ) -> None:
        super().__init__(
            config,
            backend=backend,
            ports=ports,
            policy=policy,
            store=None,  # type: ignore[arg-type]  # etcd is the store; the SQLite paths are overridden
            events=events,
            audit=audit,
            metrics=metrics,
            auth_enabled=auth_enabled,
        )
        self.etcd = etcd
        self.keys = keys
        self.sealer = sealer
        self.membership = membership
        self.view = view
        self.node = membership.name
        #: Ports a req of this node is reserving right now (node -> ports), so two of its
        #: own reqs do not race each other for them.
        self._pending: dict[str, set[int]] = {}
        view.listeners.append(self._publish_changes)
        from scistream.s2cs.cluster.reconcile import NodeReconciler  # reconcile imports this module

        self.reconciler = NodeReconciler(self)

    # ------------------------------------------------------------------ helpers

    def _persist(self, s: Session) -> None:
        raise AssertionError("a clustered node writes its sessions to etcd, never to SQLite")

    def max_num_conn(self) -> int:
        return self.config.max_num_conn

    def _require_member(self) -> None:
        if self._closing:
            raise ControlError(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down")
        if not self.membership.valid:
            raise ControlError(grpc.StatusCode.UNAVAILABLE, self.membership.why_not_valid())

    async def _txn(self, compare: list[Compare], success: list[Op], failure: Sequence[Op] = ()) -> TxnResult:
        """A write of this node: fenced by its lease; UNAVAILABLE if etcd cannot take it, or
        if the fence failed (this node is no longer the holder of its lease)."""
        node_key = self.keys.node(self.node)
        try:
            result = await self.etcd.txn(
                [self.membership.fence(), *compare], success, [*failure, Op.get(node_key)]
            )
        except EtcdError as exc:
            raise _unavailable(exc) from None
        if not result.succeeded:
            node = result.responses[-1]
            if not node or node[0].lease != self.membership.lease:
                raise ControlError(grpc.StatusCode.UNAVAILABLE, self.membership.why_not_valid())
        return result

    async def _read(self, uid: str) -> ClusterRecord | None:
        try:
            kvs, _ = await self.etcd.get(self.keys.session(uid))
        except EtcdError as exc:
            raise _unavailable(exc) from None
        return self.view.decode_session(kvs[0]) if kvs else None

    async def _cas(self, rec: ClusterRecord, extra: Sequence[Op] = ()) -> int:
        """Write ``rec`` if nobody changed it since it was read: its new revision, or 0."""
        key = self.keys.session(rec.session.uid)
        result = await self._txn(
            [Compare.mod_revision(key, "==", rec.mod_revision)],
            [Op.put(key, rec.encode(self.sealer)), *extra],
        )
        return result.revision if result.succeeded else 0

    def _owned_record(self, identity: Identity, rec: ClusterRecord | None, uid: str) -> ClusterRecord:
        if rec is None:
            raise not_found(uid)
        self._check_owner(identity, uid, rec.session.owner)
        return rec

    async def _wait_for(
        self, uid: str, done: Callable[[ClusterRecord | None], bool], timeout: float
    ) -> ClusterRecord | None:
        """The record once ``done`` says so (as this node's copy sees it); TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            rec = self.view.sessions.get(uid)
            if done(rec):
                return rec
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            await self.view.wait_change(min(left, 1.0))

    # ------------------------------------------------------------------ placement

    def _free_ports(self, node: str, count: int) -> list[int]:
        """``count`` ports of ``node`` that no session holds and no req of this node is
        taking, in random order: concurrent reqs on several nodes rarely pick the same."""
        info = self.view.nodes[node]
        held = self.view.ports.get(node, {})
        pending = self._pending.get(node, set())
        candidates = [
            p for p in range(info.port_low, info.port_high + 1) if p not in held and p not in pending
        ]
        random.shuffle(candidates)
        out: list[int] = []
        for port in candidates:
            # On this node a port some other process holds is skipped, as on a single node.
            if node == self.node and self.ports.test_bind and not _bindable(info.listener_ip, port):
                continue
            out.append(port)
            if len(out) == count:
                break
        return out

    def _place(self, count: int, avoid: Collection[str] = ()) -> list[Placement]:
        """``count`` connections over the live nodes by the placement policy, each with a
        free port of its node. A node that turns out to have fewer free ports than the
        policy gave it (this node's own ports are test-bound: another process may hold
        some) is left out and the placement made again over the others."""
        left_out = set(avoid)
        while True:
            nodes = [n for n in self.view.nodes if n not in left_out]
            room = {n: self._room(n) for n in nodes}
            try:
                chosen = place(count, nodes, self.view.load_of(), room, self.config.placement)
            except NoRoom as exc:
                raise ControlError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
            ports = {node: self._free_ports(node, chosen.count(node)) for node in dict.fromkeys(chosen)}
            short = {node for node, got in ports.items() if len(got) < chosen.count(node)}
            if not short:
                break
            log.warning(
                "node(s) %s have fewer bindable data ports than etcd says; placing without them",
                ", ".join(sorted(short)),
            )
            left_out |= short
        out: list[Placement] = []
        for node in chosen:
            port = ports[node].pop(0)
            out.append(Placement(node, port, self._listener(node, port)))
        return out

    async def _move_off(self, uid: str, node: str, why: str) -> None:
        """Move every connection of ``uid`` off ``node`` (retrying while the record changes
        under it, as a hello may); RESOURCE_EXHAUSTED with ``why`` if it cannot be done."""
        for _ in range(WRITE_TRIES):
            current = await self._read(uid)
            if current is None or node not in current.nodes():
                return
            if await self._move(current, current.on_node(node)):
                return
        raise ControlError(grpc.StatusCode.RESOURCE_EXHAUSTED, why)

    async def _move(self, rec: ClusterRecord, indices: list[int], *, lost: str = "") -> bool:
        """Give connections ``indices`` of ``rec`` new listeners on other nodes (ports
        reserved, the old ones given back) if the record is still as read. With ``lost``
        (why), each moved connection leaves a sentence for status (it was cut)."""
        s = rec.session
        away = {rec.placement[i].node for i in indices}
        fresh = self._place(len(indices), avoid=away)
        when = time.strftime("%H:%M:%S")
        old_keys = []
        for i, new in zip(indices, fresh, strict=True):
            old = rec.placement[i]
            old_keys.append(self.keys.port(old.node, old.port))
            if lost:
                rec.lost.append(
                    f"connection {i} via {old.listener} on node {old.node} failed at {when}: {lost}; "
                    f"its listener moved to {new.listener} on node {new.node}"
                )
            rec.placement[i] = new
            s.listeners[i], s.ports[i] = new.listener, new.port
        new_keys = [self.keys.port(p.node, p.port) for p in fresh]
        key = self.keys.session(s.uid)
        result = await self._txn(
            [
                Compare.mod_revision(key, "==", rec.mod_revision),
                *(Compare.create_revision(k, "==", 0) for k in new_keys),
            ],
            [
                Op.put(key, rec.encode(self.sealer)),
                *(Op.put(k, s.uid.encode()) for k in new_keys),
                *(Op.delete(k) for k in old_keys),
            ],
        )
        if result.succeeded:
            log.warning(
                "session %s: %d connection(s) moved from node(s) %s to %s",
                s.uid,
                len(indices),
                ", ".join(sorted(away)),
                ", ".join(p.node for p in fresh),
            )
        return result.succeeded

    def _room(self, node: str) -> int:
        info = self.view.nodes[node]
        return info.port_high - info.port_low + 1 - len(self.view.ports.get(node, {}))

    def _listener(self, node: str, port: int) -> str:
        return format_endpoint(self.view.nodes[node].listener_ip, port)

    # ------------------------------------------------------------------ req

    async def req(
        self,
        identity: Identity,
        uid: str,
        *,
        role: str,
        num_conn: int,
        rate: int,
        security: str = "",
        rate_limit: int = 0,
    ) -> Session:
        args = self._req_args(
            uid, role, num_conn=num_conn, rate=rate, security=security, rate_limit=rate_limit
        )
        uid = args.uid
        self._require_member()
        if uid in self.view.sessions:
            raise ControlError(grpc.StatusCode.ALREADY_EXISTS, f"a session with uid {uid!r} already exists")
        key = self.keys.session(uid)
        s: Session | None = None
        for attempt in range(WRITE_TRIES):
            placement = self._place(args.num_conn)
            s = self._new_session(
                identity, args, [p.port for p in placement], [p.listener for p in placement]
            )
            s.machine.fire(Event.REQ)
            rec = ClusterRecord(s, placement, coordinator=self.node)
            port_keys = [self.keys.port(p.node, p.port) for p in placement]
            for p in placement:
                self._pending.setdefault(p.node, set()).add(p.port)
            try:
                result = await self._txn(
                    [
                        Compare.create_revision(key, "==", 0),
                        *(Compare.create_revision(k, "==", 0) for k in port_keys),
                    ],
                    [Op.put(key, rec.encode(self.sealer)), *(Op.put(k, uid.encode()) for k in port_keys)],
                    [Op.get(key)],
                )
            finally:
                for p in placement:
                    self._pending[p.node].discard(p.port)
            if result.succeeded:
                # Until the watch brings them, this node's copy must not offer them again.
                for p in placement:
                    self.view.ports.setdefault(p.node, {})[p.port] = uid
            if result.succeeded:
                break
            if result.responses[0]:
                raise ControlError(
                    grpc.StatusCode.ALREADY_EXISTS, f"a session with uid {uid!r} already exists"
                )
            # A port was taken meanwhile by another node's req: wait for the copy to see it.
            await self.view.wait_change(0.05 * (attempt + 1))
        else:
            raise ControlError(
                grpc.StatusCode.UNAVAILABLE,
                f"could not reserve data ports for {uid!r}: other requests took them {WRITE_TRIES} "
                "times in a row; retry",
            )
        assert s is not None
        log.info(
            "session %s: req %s num_conn=%d security=%s by %s, on node(s) %s",
            uid,
            s.role,
            s.num_conn,
            s.security,
            identity,
            ", ".join(sorted({p.node for p in placement})),
        )
        await self._wait_ports_confirmed(uid)
        await self._consume_early(uid)
        try:
            created = result.revision  # until the copy has reached it, "absent" means "not yet seen"
            rec2 = await self._wait_for(
                uid,
                lambda r: (
                    r.session.state is not State.WAITING_HELLO
                    if r is not None
                    else self.view.revision >= created
                ),
                self.config.hello_timeout,
            )
        except TimeoutError:
            await self._end_uid(
                uid,
                Event.TIMEOUT,
                f"no hello arrived within {self.config.hello_timeout:g} s",
                only_in=State.WAITING_HELLO,
            )
            last = await self._read(uid)
            if last is not None and last.session.state.helloed:
                return last.session  # the hello came at the last moment
            raise ControlError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no hello for session {uid!r} arrived within {self.config.hello_timeout:g} s; "
                "its ports were released",
            ) from None
        except asyncio.CancelledError:
            self._spawn(
                self._end_uid(
                    uid,
                    Event.RELEASE,
                    "the requester went away before the hello",
                    only_in=State.WAITING_HELLO,
                )
            )
            raise
        if rec2 is None:
            raise precondition(f"session {uid!r} ended before its hello arrived")
        return rec2.session

    async def _wait_ports_confirmed(self, uid: str) -> None:
        """Until each live node the session is placed on has test-bound its ports (and swapped
        any another process holds: reconcile.py), so the listeners a req returns can be bound.
        A node that cannot confirm ends the req with its sentence; one that is slow is not
        waited for past PORTS_CONFIRM_S (it still swaps a busy port before the update)."""
        deadline = time.monotonic() + PORTS_CONFIRM_S
        while time.monotonic() < deadline:
            rec = self.view.sessions.get(uid)
            if rec is not None:
                acks = self.view.acks.get(uid, {})
                waiting = False
                for node in set(rec.nodes()) & set(self.view.nodes):
                    ack = acks.get(node)
                    if ack is None or ack.rev < rec.mod_revision:
                        waiting = True
                    elif ack.error:
                        # That node has no bindable port for it: place its part elsewhere.
                        try:
                            await self._move_off(uid, node, ack.error)
                        except ControlError:
                            await self._end_uid(uid, Event.ERROR, ack.error)
                            raise
                        waiting = True
                        break
                if not waiting:
                    return
            await self.view.wait_change(0.2)
        log.warning("session %s: not every node confirmed its ports within %g s", uid, PORTS_CONFIRM_S)

    async def _consume_early(self, uid: str) -> None:
        """A hello that came before this req (to any node): apply it now."""
        try:
            kvs, _ = await self.etcd.get(self.keys.early(uid))
        except EtcdError as exc:
            log.warning("session %s: cannot look for an early hello: %s", uid, exc)
            return
        if not kvs:
            return
        data = json.loads(kvs[0].value)
        owner = str(data.get("owner", ""))
        rec = await self._read(uid)
        if rec is None or rec.session.state is not State.WAITING_HELLO:
            return
        if self.auth_enabled and owner != rec.session.owner:
            log.warning("session %s: the hello that came before the req was sent by another identity", uid)
            await self._txn([], [Op.delete(self.keys.early(uid))])
            return
        try:
            await self._accept(rec, [str(x) for x in data.get("prod_listeners", [])])
        except ControlError as exc:
            log.warning("session %s: early hello refused: %s", uid, exc.message)

    # ------------------------------------------------------------------ hello

    async def _accept(self, rec: ClusterRecord, prod_listeners: list[str]) -> bool:
        s = rec.session
        if s.role == "PROD":
            await self._check_targets(prod_listeners)
        s.machine.fire(Event.HELLO)
        now = time.time()
        s.prod_listeners = prod_listeners
        s.hello_at = s.last_activity = now
        if await self._cas(rec, [Op.delete(self.keys.early(s.uid))]):
            self.metrics.hello_latency.observe(max(0.0, now - s.created_at))
            log.info("session %s: hello with %d endpoint(s)", s.uid, len(prod_listeners))
            return True
        return False

    async def hello(
        self, identity: Identity, uid: str, prod_listeners: list[str], role: str
    ) -> tuple[str, list[str]]:
        uid = validate.uid(uid)
        prod_listeners = validate.endpoints("prod_listeners", list(prod_listeners), required=False)
        for _ in range(WRITE_TRIES):
            rec = await self._read(uid)
            if rec is None:
                answer = await self._early_hello_cluster(identity, uid, prod_listeners, role)
                if answer is not None:
                    return answer
                continue  # the req came meanwhile: answer as a normal hello
            s = rec.session
            self._check_owner(identity, uid, s.owner)
            if s.state.helloed:
                if prod_listeners == s.prod_listeners:
                    return self._hello_answer(s)
                raise precondition(
                    f"session {uid!r} already received its hello; its endpoints cannot be changed"
                )
            if s.state is not State.WAITING_HELLO:
                raise precondition(f"session {uid!r} is {s.state.value}")
            self._require_member()
            if await self._accept(rec, prod_listeners):
                return self._hello_answer(s)
        raise ControlError(
            grpc.StatusCode.UNAVAILABLE, f"session {uid!r} kept changing; send the hello again"
        )

    async def _early_hello_cluster(
        self, identity: Identity, uid: str, prod_listeners: list[str], role: str
    ) -> tuple[str, list[str]] | None:
        """Keep a hello whose req has not come yet (on a lease of hello_timeout); None if
        the req came meanwhile."""
        self._require_member()
        key = self.keys.early(uid)
        role = role.strip().upper()
        existing = self.view.early.get(uid)
        if existing is not None:
            data = json.loads(existing)
            self._check_owner(identity, uid, str(data.get("owner", "")))
            if data.get("prod_listeners") != prod_listeners:
                raise precondition(f"a different hello for {uid!r} is already waiting for its request")
        else:
            if len(self.view.early) >= self.config.early_hello_limit:
                raise ControlError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "too many hellos are waiting for their request; send the request first",
                )
            try:
                lease = await self.etcd.lease_grant(max(1, math.ceil(self.config.hello_timeout)))
            except EtcdError as exc:
                raise _unavailable(exc) from None
            body = json.dumps({"prod_listeners": prod_listeners, "role": role, "owner": identity.sub})
            await self._txn(
                [Compare.create_revision(key, "==", 0)], [Op.put(key, body.encode(), lease=lease)]
            )
            log.info("session %s: hello arrived before its req; kept", uid)
        rec = await self._read(uid)
        if rec is not None:
            return None
        if role == "PROD":
            return "Hello message recorded; it will be used when the request arrives", []
        try:
            got = await self._wait_for(
                uid, lambda r: r is not None and r.session.state.helloed, EARLY_HELLO_ANSWER_WAIT
            )
        except TimeoutError:
            return "Hello message recorded; it will be used when the request arrives", []
        assert got is not None
        return "Hello message sent successfully", list(got.session.listeners)

    # ------------------------------------------------------------------ update

    async def update(
        self, identity: Identity, uid: str, remote_listeners: list[str], role: str, session_key: bytes
    ) -> Session:
        uid = validate.uid(uid)
        for _ in range(WRITE_TRIES):
            rec = self._owned_record(identity, await self._read(uid), uid)
            s = rec.session
            targets = self._update_targets(s, remote_listeners, role)
            self._require_member()
            psk = self._update_key(s, session_key)
            await self._check_targets(targets)
            s.targets = [targets[i % len(targets)] for i in range(s.num_conn)]
            s.psk = psk
            first = s.state is State.RESERVED
            s.machine.fire(Event.UPDATE)
            s.last_activity = time.time()
            revision = await self._cas(rec)
            if revision:
                break
        else:
            raise ControlError(
                grpc.StatusCode.UNAVAILABLE, f"session {uid!r} kept changing; send the update again"
            )
        await self._wait_applied(rec, revision)
        log.info("session %s: routes to %s%s", uid, ", ".join(s.targets), " (first)" if first else "")
        return s

    async def _wait_applied(self, rec: ClusterRecord, revision: int) -> None:
        """Until every live node carrying a connection of the session acknowledged
        ``revision`` (UNAVAILABLE with the node's own sentence if one could not)."""
        uid = rec.session.uid
        deadline = time.monotonic() + APPLY_WAIT_S
        while True:
            pending = []
            for node in sorted(set(rec.nodes())):
                if node not in self.view.nodes:
                    continue  # gone: its connections are reported lost and re-placed
                ack = self.view.acks.get(uid, {}).get(node)
                if ack is None or ack.rev < revision:
                    pending.append(node)
                elif ack.error:
                    raise ControlError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"the data plane of node {node} could not set up its routes: {ack.error}",
                    )
            if not pending:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise ControlError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"node(s) {', '.join(pending)} did not set up the routes of {uid!r} within "
                    f"{APPLY_WAIT_S:g} s; they will when they can (see status)",
                )
            await self.view.wait_change(min(left, 0.5))

    # ------------------------------------------------------------------ release / end

    async def release(self, identity: Identity, uid: str) -> None:
        uid = validate.uid(uid)
        rec = self._owned_record(identity, await self._read(uid), uid)
        self._require_member()
        if not await self._end_record(rec, Event.RELEASE, "released by its owner"):
            raise not_found(uid)

    async def _end_uid(self, uid: str, event: Event, reason: str, *, only_in: State | None = None) -> None:
        """End the session ``uid`` if it still exists (timeouts, a requester gone), and,
        with ``only_in``, only while it is still in that state (a hello that came at the
        last moment wins over the timeout)."""
        for _ in range(WRITE_TRIES):
            try:
                rec = await self._read(uid)
                if rec is None or (only_in is not None and rec.session.state is not only_in):
                    return
                if await self._end_record(rec, event, reason):
                    return
            except ControlError as exc:
                log.warning("session %s: cannot end it now: %s", uid, exc.message)
                return

    async def _end_record(self, rec: ClusterRecord, event: Event, reason: str) -> bool:
        """Delete the record (and the ports of nodes that are gone) if it is still as read,
        leaving how it ended under ``ended/``; wait for the live nodes to remove its routes.
        False if the record changed meanwhile."""
        s = rec.session
        uid = s.uid
        outcome = next_state(State.ENDING, event)
        usage = self._usage_of(uid)
        try:
            lease = await self.etcd.lease_grant(ENDED_TTL)
        except EtcdError as exc:
            raise _unavailable(exc) from None
        ended = json.dumps(
            {"state": outcome.value, "reason": "" if event is Event.RELEASE else reason, "node": self.node}
        )
        gone = [p for p in rec.placement if p.node not in self.view.nodes]
        key = self.keys.session(uid)
        result = await self._txn(
            [Compare.mod_revision(key, "==", rec.mod_revision)],
            [
                Op.delete(key),
                Op.delete(self.keys.early(uid)),
                Op.put(self.keys.ended(uid), ended.encode(), lease=lease),
                *(Op.delete(self.keys.port(p.node, p.port)) for p in gone),
            ],
        )
        if not result.succeeded:
            return False
        log.info("session %s: %s (%s)", uid, outcome.value, reason)
        self.metrics.sessions_ended.labels(outcome.value).inc()
        self.audit.record(
            event="session_end",
            uid=uid,
            identity=s.owner,
            state=outcome.value,
            reason=reason,
            bytes_to_target=usage.bytes_to_target or 0,
            bytes_from_target=usage.bytes_from_target or 0,
            connections_total=usage.connections_total or 0,
        )
        held = {(p.node, p.port) for p in rec.placement if p.node in self.view.nodes}
        deadline = time.monotonic() + REMOVE_WAIT_S
        while held and time.monotonic() < deadline:
            held = {(n, port) for n, port in held if self.view.ports.get(n, {}).get(port) == uid}
            if held:
                await self.view.wait_change(0.5)
        return True

    # ------------------------------------------------------------------ status

    async def status(self, identity: Identity, uid: str) -> list[Session]:
        if uid:
            uid = validate.uid(uid)
            wanted = self.keys.session(uid)
            ops = [Op.get(wanted)]
        else:
            ops = [Op.get(self.keys.sessions(), prefix=True)]
        try:
            # One transaction: records, counters and members of the same revision.
            result = await self.etcd.txn(
                [], [*ops, Op.get(self.keys.usages(), prefix=True), Op.get(self.keys.nodes(), prefix=True)]
            )
        except EtcdError as exc:
            raise _unavailable(exc) from None
        records = [r for r in (self.view.decode_session(kv) for kv in result.responses[0]) if r is not None]
        usages: dict[str, Any] = {}
        for kv in result.responses[1]:
            try:
                usages[self.keys.split(kv.key)[1][0]] = json.loads(kv.value)
            except (ValueError, IndexError):
                continue
        live = {self.keys.split(kv.key)[1][0] for kv in result.responses[2] if self.keys.split(kv.key)[1]}
        if uid:
            if not records:
                raise not_found(uid)
            self._check_owner(identity, uid, records[0].session.owner)
        elif self.auth_enabled:
            records = [r for r in records if r.session.owner == identity.sub]
        out = []
        for rec in sorted(records, key=lambda r: r.session.created_at):
            s = rec.session
            s.usage = _sum_usage(s.uid, usages)
            s.listener_nodes = rec.nodes()
            s.lost = list(rec.lost) + [
                f"connection {i} via {p.listener} on node {p.node}: the node has left the cluster"
                for i, p in enumerate(rec.placement)
                if p.node not in live
            ]
            out.append(s)
        return out

    def _usage_of(self, uid: str) -> SessionUsage:
        usages: dict[str, Any] = {}
        for node, raw in self.view.usage.items():
            try:
                usages[node] = json.loads(raw)
            except ValueError:
                continue
        return _sum_usage(uid, usages)

    # ------------------------------------------------------------------ events

    def _publish_changes(self, change: Change) -> None:
        """Every node tells its own subscribers what the cluster's keys say changed."""
        for uid, (old, new) in change.sessions.items():
            if new is None:
                if old is not None and uid in change.ended:
                    how = change.ended[uid]
                    old.session.error = how.get("reason", "")
                    self._publish_state(old.session, how.get("state", "released"))
                continue
            s = new.session
            before = old.session.state if old is not None else None
            if old is None and change.resync:
                continue  # read again after a break, not created: nothing to tell
            if old is None:
                self._publish(s, "created")
            if before is not s.state:
                kind = {State.RESERVED: "hello", State.READY: "ready", State.ACTIVE: "active"}.get(s.state)
                if kind is not None and (before is not None or s.state is not State.WAITING_HELLO):
                    self._publish(s, kind)
            if old is not None and len(new.lost) > len(old.lost):
                s.error = new.lost[-1]
                self._publish(s, "restored")
        for name, (old_node, new_node) in change.nodes.items():
            if old_node is not None and new_node is None:
                self._node_gone(name)

    def _publish_state(self, s: Session, state: str) -> None:
        self.events.publish(
            SessionEvent(
                event=state if state in ("released", "failed", "expired") else "released",  # type: ignore[arg-type]
                uid=s.uid,
                role=s.role,
                state=state,
                listeners=list(s.listeners),
                prod_listeners=list(s.prod_listeners),
                targets=list(s.targets),
                security=s.security,
                error=s.error,
            )
        )

    def _node_gone(self, name: str) -> None:
        when = time.strftime("%H:%M:%S")
        log.error("node %s left the cluster at %s (its lease expired)", name, when)
        for rec in list(self.view.sessions.values()):
            lost = rec.on_node(name)
            if not lost:
                continue
            s = rec.session
            s.error = (
                f"node {name} left the cluster at {when}: connection(s) "
                + ", ".join(f"{i} ({rec.placement[i].listener})" for i in lost)
                + " failed; their listeners are being moved to live nodes"
            )
            self._publish(s, "broken")

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.reconciler.start()

    async def reconcile(self) -> None:
        """Read the cluster's keys and bring this node's data plane in line with them."""
        await self.reconciler.first_pass()

    async def shutdown(self) -> None:
        self._closing = True
        await self.reconciler.stop()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _sum_usage(uid: str, usages: dict[str, Any]) -> SessionUsage:
    """A session's counters: the sum of what each node reports for it."""
    total = [0, 0, 0, 0]
    conns: list[ConnectionUsage] = []
    seen = False
    for node in sorted(usages):
        u = usages[node].get(uid) if isinstance(usages[node], dict) else None
        if not u:
            continue
        seen = True
        for i, k in enumerate(("b2t", "bft", "act", "tot")):
            total[i] += int(u.get(k, 0))
        for c in u.get("conns", []):
            conns.append(ConnectionUsage(str(c[0]), str(c[1]), str(c[2]), int(c[3]), int(c[4]), float(c[5])))
    if not seen:
        return SessionUsage(0, 0, 0, 0)
    conns.sort(key=lambda c: (c.started_at, c.listener, c.peer))
    return SessionUsage(total[0], total[1], total[2], total[3], tuple(conns))
