"""The session manager: req / hello / update / release and every timeout, with their I/O.

All methods run on the server's asyncio loop. Lookups and state changes that
must be atomic (uid registration, port allocation) happen with no ``await`` in
between, so concurrent RPCs never see half a session. Backend calls for one
session are serialised by that session's lock.

Every way out of a session (release, hello timeout, requester gone, reserved or
idle expiry, failure, restart reconciliation) goes through :meth:`_end`, which
moves it to ``ending`` (out of the table), removes the routes, returns the ports,
deletes the stored row, moves it to its outcome and publishes an event. Every
state change goes through ``self.sessions.fire`` (sessions.SessionTable), so
membership in ``self.sessions`` always follows from the state.

Housekeeping (usage polling, expiry, restart reconciliation, the data-plane
watchdog, metrics snapshots) lives in ``housekeeping.py``; this module keeps the
RPC verbs.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from scistream.certs import SessionCredentials, is_credentials, mint_session_credentials
from scistream.clienttext import excerpt
from scistream.endpoints import format_endpoint
from scistream.events import SessionEvent
from scistream.keys import COMPAT_PSK_IDENTITY, compat_key
from scistream.s2cs import validate
from scistream.s2cs.audit import AuditLog
from scistream.s2cs.auth import Identity
from scistream.s2cs.backends.base import Backend
from scistream.s2cs.config import SECURITY_MODES, ServerConfig
from scistream.s2cs.errors import ControlError, not_found, precondition
from scistream.s2cs.events import EventPublisher
from scistream.s2cs.housekeeping import Housekeeping
from scistream.s2cs.metrics import Metrics
from scistream.s2cs.ports import PortAllocator, PortsExhausted
from scistream.s2cs.sessions import Event, IllegalTransition, Session, SessionMachine, SessionTable, State
from scistream.s2cs.store import SessionStore
from scistream.s2cs.targets import TargetPolicy, TargetRefused

log = logging.getLogger(__name__)

KEY_BYTES = 32
#: How long a CONS hello that came before its req waits for the req, to answer
#: with the listeners (a PROD hello needs no listeners and is answered at once).
EARLY_HELLO_ANSWER_WAIT = 5.0


@dataclass
class EarlyHello:
    prod_listeners: list[str]
    role: str
    expires_at: float
    answered: asyncio.Future[list[str]]
    owner: str = "anonymous"  # the hello's identity: the req must come from the same one


@dataclass(frozen=True)
class ReqArgs:
    uid: str
    role: str
    num_conn: int
    rate: int
    rate_limit: int
    security: str


def _fail_early(early: EarlyHello, exc: ControlError) -> None:
    """Answer a parked early hello with an error (if it is still waiting)."""
    if not early.answered.done():
        early.answered.set_exception(exc)
        early.answered.exception()  # retrieved: no "never retrieved" warning when nobody waits


class SessionManager:
    def __init__(
        self,
        config: ServerConfig,
        *,
        backend: Backend,
        ports: PortAllocator,
        policy: TargetPolicy,
        store: SessionStore,
        events: EventPublisher,
        audit: AuditLog,
        metrics: Metrics,
        auth_enabled: bool,
    ) -> None:
        self.config = config
        self.backend = backend
        self.ports = ports
        self.policy = policy
        self.store = store
        self.events = events
        self.audit = audit
        self.metrics = metrics
        self.auth_enabled = auth_enabled
        self.sessions = SessionTable()
        self.early: OrderedDict[str, EarlyHello] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self.data_plane_ok = True
        #: Called when data_plane_ok changes (the server derives its health from it).
        self.on_data_plane_change: Callable[[], Awaitable[None]] | None = None
        self.housekeeping = Housekeeping(self)

    # ------------------------------------------------------------------ helpers

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _persist(self, s: Session) -> None:
        if s.state.terminal or s.state is State.ORPHANED:
            return  # an orphan has no key or record to keep: the data plane is its record
        self.store.save(s.uid, s.record(), s.psk)

    def _publish(self, s: Session, kind: str) -> None:
        self.events.publish(
            SessionEvent(
                event=kind,  # type: ignore[arg-type]
                uid=s.uid,
                role=s.role,
                state=s.state.value,
                listeners=list(s.listeners),
                prod_listeners=list(s.prod_listeners),
                targets=list(s.targets),
                security=s.security,
                error=s.error,
            )
        )

    def _fire(self, s: Session, event: Event) -> State:
        """A transition an RPC asked for: one the state does not allow is the caller's error."""
        try:
            return self.sessions.fire(s, event)
        except IllegalTransition as exc:
            raise precondition(f"session {s.uid}: {exc}") from None

    def _owned(self, identity: Identity, uid: str) -> Session:
        s = self.sessions.get(uid)
        if s is None:
            raise not_found(uid)
        if not (s.state is State.ORPHANED and not s.owner):  # an adopted route has no owner
            self._check_owner(identity, uid, s.owner)
        return s

    def _check_owner(self, identity: Identity, uid: str, owner: str) -> None:
        if self.auth_enabled and owner != identity.sub:
            raise ControlError(
                grpc.StatusCode.PERMISSION_DENIED, f"session {uid!r} belongs to another identity"
            )

    def max_num_conn(self) -> int:
        return min(self.config.max_num_conn, self.ports.size)

    def _security(self, requested: str) -> str:
        mode = (requested or self.config.default_security).strip().lower()
        if mode not in SECURITY_MODES:
            raise validate.invalid(
                f"security {excerpt(requested, 40)} is not one of {', '.join(SECURITY_MODES)}"
            )
        if mode == "compat" and not self.config.compat_allowed:
            raise precondition(
                "the SciStream 1.x compatibility mode is off on this gateway; "
                "its operator enables it with --scistream1-compat"
            )
        if mode not in self.backend.security_modes:
            raise precondition(
                f"the {self.backend.name} backend of this gateway cannot carry security {mode!r}; "
                f"it carries {', '.join(sorted(self.backend.security_modes))}"
            )
        return mode

    async def _check_targets(self, endpoints: list[str]) -> None:
        for ep in dict.fromkeys(endpoints):
            try:
                await self.policy.check(ep)
            except TargetRefused as exc:
                raise ControlError(grpc.StatusCode.PERMISSION_DENIED, str(exc)) from None

    # ------------------------------------------------------------------ req

    def _req_args(
        self, uid: str, role: str, *, num_conn: int, rate: int, security: str, rate_limit: int
    ) -> ReqArgs:
        """A req's arguments, checked (INVALID_ARGUMENT / FAILED_PRECONDITION otherwise)."""
        args = ReqArgs(
            uid=validate.uid(uid),
            role=validate.role(role),
            num_conn=validate.num_conn(num_conn, self.max_num_conn()),
            rate=validate.non_negative("rate", rate),
            rate_limit=validate.non_negative("rate_limit", rate_limit),
            security=self._security(security),
        )
        if self._closing:
            raise ControlError(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down")
        return args

    def _new_session(
        self, identity: Identity, args: ReqArgs, ports: list[int], listeners: list[str]
    ) -> Session:
        """The session a req creates (not yet in any table), with its data-channel key."""
        uid, role, mode = args.uid, args.role, args.security
        psk, psk_identity = b"", ""
        if mode == "tls":
            psk_identity = uid
            if role == "PROD":
                # A PSK, or (HAProxy, nginx) certificates minted for this session only; an
                # operator's gateway certificates need neither.
                kind = self.backend.prod_credentials()
                if kind == "psk":
                    psk = secrets.token_bytes(KEY_BYTES)
                elif kind == "mint":
                    psk = mint_session_credentials(uid).encode()
        elif mode == "compat":
            psk, psk_identity = compat_key(uid), COMPAT_PSK_IDENTITY
        return Session(
            uid=uid,
            role=role,
            owner=identity.sub,
            owner_name=identity.username,
            num_conn=args.num_conn,
            rate=args.rate,
            rate_limit=args.rate_limit or (args.rate * 1000 if self.config.enforce_rate else 0),
            security=mode,
            ports=ports,
            listeners=listeners,
            machine=SessionMachine(),
            psk=psk,
            psk_identity=psk_identity,
        )

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
        self.store.check_writable()
        if uid in self.sessions:
            raise ControlError(grpc.StatusCode.ALREADY_EXISTS, f"a session with uid {uid!r} already exists")
        self._refuse_foreign_early_hello(identity, uid)
        try:
            ports = self.ports.allocate(args.num_conn)
        except PortsExhausted as exc:
            raise ControlError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
        listeners = [format_endpoint(self.config.listener_ip, p) for p in ports]
        s = self._new_session(identity, args, ports, listeners)
        s.waiter = asyncio.get_running_loop().create_future()
        self._fire(s, Event.REQ)
        try:
            self._persist(s)
        except Exception:
            self.sessions.fire(s, Event.ERROR)  # never existed for anyone: no event, no audit
            self.ports.release(ports)
            raise
        log.info(
            "session %s: req %s num_conn=%d security=%s by %s", uid, s.role, s.num_conn, s.security, identity
        )
        self._publish(s, "created")
        early = self.early.pop(uid, None)
        if early is not None:
            await self._consume_early_hello(s, early)
        await self._wait_for_hello(s)
        return s

    def _refuse_foreign_early_hello(self, identity: Identity, uid: str) -> None:
        """A hello that came first from another identity: refuse the req and drop that hello
        (whoever sent it named a session it does not own), so the owner's next try is clean."""
        early = self.early.get(uid)
        if early is None or not self.auth_enabled or early.owner == identity.sub:
            return
        del self.early[uid]
        log.warning("session %s: the hello that came before the req was sent by another identity", uid)
        _fail_early(
            early,
            ControlError(grpc.StatusCode.PERMISSION_DENIED, f"session {uid!r} belongs to another identity"),
        )
        raise ControlError(
            grpc.StatusCode.PERMISSION_DENIED,
            f"a hello for session {uid!r} came from another identity before this request; it was "
            "dropped: send the hello again with your own token",
        )

    async def _wait_for_hello(self, s: Session) -> None:
        assert s.waiter is not None
        try:
            await asyncio.wait_for(asyncio.shield(s.waiter), self.config.hello_timeout)
        except TimeoutError:
            await self._end(s, Event.TIMEOUT, f"no hello arrived within {self.config.hello_timeout:g} s")
            raise ControlError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no hello for session {s.uid!r} arrived within {self.config.hello_timeout:g} s; "
                "its ports were released",
            ) from None
        except asyncio.CancelledError:
            # The requester gave up (deadline or disconnect): give everything back.
            if not s.state.helloed:
                self._spawn(self._end(s, Event.RELEASE, "the requester went away before the hello"))
            raise
        if s.state.terminal:
            if self._closing:
                raise ControlError(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down")
            raise precondition(f"session {s.uid!r} ended before its hello arrived: {s.error}")

    # ------------------------------------------------------------------ hello

    def _accept_hello(self, s: Session, prod_listeners: list[str]) -> None:
        self._fire(s, Event.HELLO)
        now = time.time()
        s.prod_listeners = prod_listeners
        s.hello_at = s.last_activity = now
        self.metrics.hello_latency.observe(max(0.0, now - s.created_at))
        self._persist(s)
        self._publish(s, "hello")
        if s.waiter is not None and not s.waiter.done():
            s.waiter.set_result(None)
        log.info("session %s: hello with %d endpoint(s)", s.uid, len(prod_listeners))

    async def _consume_early_hello(self, s: Session, early: EarlyHello) -> None:
        try:
            if s.role == "PROD":
                await self._check_targets(early.prod_listeners)
        except ControlError as exc:
            log.warning("session %s: early hello refused: %s", s.uid, exc.message)
            _fail_early(early, exc)
            return
        if s.state is State.WAITING_HELLO:
            self._accept_hello(s, early.prod_listeners)
            if not early.answered.done():
                early.answered.set_result(list(s.listeners))

    async def hello(
        self, identity: Identity, uid: str, prod_listeners: list[str], role: str
    ) -> tuple[str, list[str]]:
        """With token checks on, only the session's owner may send its hello (or, hello
        first, the req must come from the hello's identity); without them, knowledge of
        the uid authorises it, as in 1.x. It can never change the endpoints of a session
        that already had its hello."""
        uid = validate.uid(uid)
        prod_listeners = validate.endpoints("prod_listeners", list(prod_listeners), required=False)
        s = self.sessions.get(uid)
        if s is None:
            return await self._early_hello(identity, uid, prod_listeners, role)
        self._check_owner(identity, uid, s.owner)
        if s.state.helloed:
            if prod_listeners == s.prod_listeners:
                return self._hello_answer(s)
            raise precondition(f"session {uid!r} already received its hello; its endpoints cannot be changed")
        if s.state is not State.WAITING_HELLO:
            raise precondition(f"session {uid!r} is {s.state.value}")
        self.store.check_writable()
        if s.role == "PROD":
            await self._check_targets(prod_listeners)
        if s.state is State.WAITING_HELLO and self.sessions.get(uid) is s:
            self._accept_hello(s, prod_listeners)
        return self._hello_answer(s)

    def _hello_answer(self, s: Session) -> tuple[str, list[str]]:
        msg = "Hello message sent successfully"
        return msg, ([] if s.role == "PROD" else list(s.listeners))

    async def _early_hello(
        self, identity: Identity, uid: str, prod_listeners: list[str], role: str
    ) -> tuple[str, list[str]]:
        now = time.time()
        self._expire_early(now)
        early = self.early.get(uid)
        if early is not None:
            self._check_owner(identity, uid, early.owner)
        if early is None:
            if len(self.early) >= self.config.early_hello_limit:
                raise ControlError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "too many hellos are waiting for their request; send the request first",
                )
            early = EarlyHello(
                prod_listeners,
                role.strip().upper(),
                now + self.config.hello_timeout,
                asyncio.get_running_loop().create_future(),
                identity.sub,
            )
            self.early[uid] = early
            log.info("session %s: hello arrived before its req; kept", uid)
        elif early.prod_listeners != prod_listeners:
            raise precondition(f"a different hello for {uid!r} is already waiting for its request")
        if early.role == "PROD":
            return "Hello message recorded; it will be used when the request arrives", []
        try:
            listeners = await asyncio.wait_for(asyncio.shield(early.answered), EARLY_HELLO_ANSWER_WAIT)
        except TimeoutError:
            return "Hello message recorded; it will be used when the request arrives", []
        return "Hello message sent successfully", listeners

    def _expire_early(self, now: float) -> None:
        for uid in [u for u, e in self.early.items() if e.expires_at <= now]:
            _fail_early(
                self.early.pop(uid),
                ControlError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"no request for session {uid!r} arrived within "
                    f"{self.config.hello_timeout:g} s of its hello",
                ),
            )

    # ------------------------------------------------------------------ update

    async def update(
        self, identity: Identity, uid: str, remote_listeners: list[str], role: str, session_key: bytes
    ) -> Session:
        uid = validate.uid(uid)
        s = self._owned(identity, uid)
        targets = self._update_targets(s, remote_listeners, role)
        if not self.data_plane_ok:
            raise ControlError(
                grpc.StatusCode.UNAVAILABLE,
                "the data plane (s2ds) stopped and is being restarted; retry in a few seconds",
            )
        self.store.check_writable()
        psk = self._update_key(s, session_key)
        await self._check_targets(targets)
        expanded = [targets[i % len(targets)] for i in range(s.num_conn)]
        async with s.lock:
            if self.sessions.get(uid) is not s or not s.state.helloed:
                raise precondition(f"session {uid!r} ended while it was being updated")
            old_targets, old_psk = s.targets, s.psk
            s.targets, s.psk = expanded, psk
            try:
                await self.backend.apply(s.plan())
            except Exception as exc:
                s.targets, s.psk = old_targets, old_psk
                msg = str(exc) or type(exc).__name__
                log.error("session %s: the data plane refused the routes: %s", uid, msg)
                raise ControlError(
                    grpc.StatusCode.UNAVAILABLE, f"the data plane could not set up the routes: {msg}"
                ) from None
            first = s.state is State.RESERVED
            self._fire(s, Event.UPDATE)
            s.last_activity = time.time()
            self._persist(s)
        if first:
            self._publish(s, "ready")
        log.info("session %s: routes to %s", uid, ", ".join(expanded))
        return s

    def _update_targets(self, s: Session, remote_listeners: list[str], role: str) -> list[str]:
        """An update's targets, checked, and whether the session's state allows one."""
        targets = validate.endpoints("remote_listeners", list(remote_listeners), required=True)
        if role.strip() and role.strip().upper() not in ("PROD", "CONS"):
            raise validate.invalid(f"role {excerpt(role, 40)} is not PROD or CONS")
        if s.state is State.WAITING_HELLO:
            raise precondition(
                f"session {s.uid!r} has not received its hello yet; update it after the req returns"
            )
        if not s.state.helloed:
            raise precondition(f"session {s.uid!r} is {s.state.value}")
        return targets

    def _update_key(self, s: Session, session_key: bytes) -> bytes:
        """The key the session's routes use after an update that carried ``session_key``."""
        psk = s.psk
        if s.security == "tls" and s.role == "CONS":
            if session_key:
                psk = self._consumer_key(bytes(session_key))
            elif not psk and not self.backend.cons_operator_certs():
                raise precondition(
                    "this gateway encrypts the data channel (security tls) and the update carries "
                    "no session key: give this side the key the producer's s2cs issued (s2uc "
                    "stream does it, or inbound-request --key-file FILE then outbound-request "
                    "--key-file FILE); a SciStream 1.x s2uc never carries one, so with it ask both "
                    "operators for gateway certificates (scistream certs --gateway), which need no "
                    "key, or, with a 1.x gateway, for the 1.x compatibility mode "
                    "(s2cs --scistream1-compat)"
                )
        return psk

    def _consumer_key(self, key: bytes) -> bytes:
        """Check the key an update carries for a CONS session against what the backend can use."""
        wan_keys = self.backend.wan_keys
        if is_credentials(key):
            try:
                SessionCredentials.decode(key)
            except ValueError as exc:
                raise validate.invalid(str(exc)) from None
            if "certs" not in wan_keys:
                raise precondition(
                    "the producer gateway secures this session with per-session certificates "
                    f"(its backend cannot use a pre-shared key), which the {self.backend.name} backend "
                    "of this gateway cannot present; use the native, haproxy or nginx backend here"
                )
            return key
        if not 16 <= len(key) <= 64:
            raise validate.invalid("session_key must be between 16 and 64 bytes")
        if "psk" not in wan_keys:
            raise precondition(
                "the producer gateway secures this session with a pre-shared key, which the "
                f"{self.backend.name} backend of this gateway cannot use; use the native or stunnel "
                "backend here, or the haproxy or nginx backend on the producer side too"
            )
        return key

    # ------------------------------------------------------------------ release / end

    async def release(self, identity: Identity, uid: str) -> None:
        uid = validate.uid(uid)
        s = self._owned(identity, uid)
        await self._end(s, Event.RELEASE, "released by its owner")

    async def _end(self, s: Session, event: Event, reason: str) -> None:
        """End ``s`` as ``event`` (release, timeout or error) says; a no-op once it is ending."""
        if not s.state.held:
            return
        had_routes = s.state.has_routes
        # Out of the table first: the uid is free again as soon as release returns, and
        # nobody sees the session as live while it is torn down.
        self.sessions.fire(s, Event.END)
        async with s.lock:
            if had_routes and self.data_plane_ok:
                await self.housekeeping.observe([s])
            usage = s.usage
            try:
                await self.backend.remove(s.uid)
            except Exception as exc:
                log.error("session %s: the data plane failed to remove its routes: %s", s.uid, exc)
            self.ports.release(s.ports)
            try:
                self.store.delete(s.uid)
            except Exception as exc:
                log.error("session %s: cannot delete its stored row: %s", s.uid, exc)
            # Torn down: only now does it read as its outcome (and a parked req learn of it).
            final = self.sessions.fire(s, event)
            s.error = "" if event is Event.RELEASE else reason
            if s.waiter is not None and not s.waiter.done():
                s.waiter.set_result(None)
        log.info("session %s: %s (%s)", s.uid, final.value, reason)
        self._publish(s, final.value)
        self.metrics.sessions_ended.labels(final.value).inc()
        self.audit.record(
            event="session_end",
            uid=s.uid,
            identity=s.owner,
            state=final.value,
            reason=reason,
            bytes_to_target=usage.bytes_to_target or 0,
            bytes_from_target=usage.bytes_from_target or 0,
            connections_total=usage.connections_total or 0,
        )

    # ------------------------------------------------------------------ status

    async def status(self, identity: Identity, uid: str) -> list[Session]:
        if uid:
            uid = validate.uid(uid)
            chosen = [self._owned(identity, uid)]
        else:
            chosen = [
                s
                for s in self.sessions.values()
                if not self.auth_enabled
                or s.owner == identity.sub
                or (s.state is State.ORPHANED and not s.owner)
            ]
        routed = [s for s in chosen if s.state.has_routes]
        if routed and self.data_plane_ok:
            await self.housekeeping.observe(routed)
        return chosen

    # ------------------------------------------------------------------ housekeeping

    def start(self) -> None:
        self.housekeeping.start()

    async def reconcile(self) -> None:
        """Bring back stored sessions and match them with the routes the data plane has."""
        await self.housekeeping.reconcile()

    async def shutdown(self) -> None:
        """Stop housekeeping; fail sessions still waiting for a hello (their callers are
        being cut off). Routed sessions stay: their routes outlive s2cs."""
        self._closing = True
        await self.housekeeping.stop()
        for s in list(self.sessions.values()):
            if s.state is State.WAITING_HELLO:
                await self._end(s, Event.ERROR, "s2cs stopped while the session waited for its hello")
        for e in self.early.values():
            _fail_early(e, ControlError(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down"))
        self.early.clear()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
