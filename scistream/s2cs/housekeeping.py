"""Session housekeeping: what s2cs does on its own, between RPCs.

* usage polling: one ``Backend.observe`` call per ``poll_interval`` for every
  session (counters, connection audit, a proxy that died unasked, ready -> active);
* expiry: reserved sessions with no update, idle sessions;
* the data-plane watchdog: a dead or replaced s2ds is noticed within about a
  second, brought back and every live session re-applied into it;
* restart reconciliation: stored sessions matched with the data plane's routes,
  routes with no stored session adopted as orphaned;
* the metrics snapshot.

It drives the sessions through the manager's own ``_end`` and state table, so a
session's life has one set of rules (manager.py, sessions.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Collection
from typing import TYPE_CHECKING

from scistream.endpoints import InvalidEndpoint, parse_endpoint
from scistream.s2cs.backends.base import LiveSession, SessionUsage, SessionView
from scistream.s2cs.metrics import SessionSample, Snapshot
from scistream.s2cs.sessions import Event, Session, SessionMachine, State

if TYPE_CHECKING:
    from scistream.s2cs.manager import SessionManager

log = logging.getLogger(__name__)

#: How often the data-plane process is checked (a dead s2ds is noticed within ~1 s).
DATA_PLANE_CHECK_S = 0.5
#: How long to wait between attempts to bring a dead data plane back.
DATA_PLANE_RETRY_S = 1.0
#: How long one observation of the data plane may take.
OBSERVE_TIMEOUT_S = 5.0


def _traffic(u: SessionUsage) -> int:
    return (u.bytes_to_target or 0) + (u.bytes_from_target or 0) + (u.connections_total or 0)


class Housekeeping:
    """The background work of one SessionManager."""

    def __init__(self, manager: SessionManager) -> None:
        self.m = manager
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.ensure_future(self._run()),
            asyncio.ensure_future(self._watch_data_plane()),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    # ------------------------------------------------------------------ observation

    async def observe(self, chosen: Collection[Session] | None = None) -> dict[str, SessionView]:
        """One look at the data plane for ``chosen`` (None: every session), each chosen
        session's usage updated from it; {} (usage kept) if the data plane did not answer."""
        m = self.m
        uids = None if chosen is None else [s.uid for s in chosen]
        try:
            views = await asyncio.wait_for(m.backend.observe(uids), OBSERVE_TIMEOUT_S)
        except Exception as exc:
            log.debug("usage unavailable: %s", exc)
            return {}
        for s in m.sessions.values() if chosen is None else chosen:
            view = views.get(s.uid)
            self._note_usage(s, view.usage if view is not None else SessionUsage())
        return views

    def _note_usage(self, s: Session, u: SessionUsage) -> None:
        if _traffic(u) > _traffic(s.usage):
            s.last_activity = time.time()
        s.usage = u
        self._audit_connections(s, u)

    def _audit_connections(self, s: Session, u: SessionUsage) -> None:
        """One audit record per data connection the data plane reports (seen at polling
        time; the session-end record carries the exact connection total)."""
        current = {(c.listener, c.peer, c.started_at) for c in u.connections}
        for c in u.connections:
            if (c.listener, c.peer, c.started_at) not in s.seen_connections:
                self.m.audit.record(
                    event="connection",
                    uid=s.uid,
                    identity=s.owner,
                    listener=c.listener,
                    peer=c.peer,
                    target=c.target,
                    started_at=c.started_at,
                )
        s.seen_connections = current

    # ------------------------------------------------------------------ the periodic pass

    def _tick(self) -> float:
        cfg = self.m.config
        cands = [1.0, cfg.poll_interval, cfg.reserved_timeout / 4]
        if cfg.idle_timeout > 0:
            cands.append(cfg.idle_timeout / 4)
        return max(0.05, min(cands))

    async def _run(self) -> None:
        next_poll = 0.0
        while True:
            await asyncio.sleep(self._tick())
            try:
                now = time.time()
                self.m._expire_early(now)
                if now >= next_poll:
                    next_poll = now + self.m.config.poll_interval
                    await self.poll()
                await self.expire(time.time())
                self.snapshot()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("session housekeeping failed; continuing")

    async def poll(self) -> None:
        """One observation of every session: counters, a proxy that died, ready -> active."""
        m = self.m
        if not m.data_plane_ok:
            return  # the watchdog is bringing it back; counters would only time out
        routed = [s for s in m.sessions.values() if s.state.routed]
        if not routed:
            return
        views = await self.observe(routed)
        for s in routed:
            if m.sessions.get(s.uid) is not s:
                continue  # ended meanwhile
            view = views.get(s.uid)
            if view is not None and view.error is not None:
                # The proxy serving it died unasked: say so, and give its ports back.
                await m._end(s, Event.ERROR, view.error)
                continue
            if _traffic(s.usage) > 0 and s.state is State.READY:
                m.sessions.fire(s, Event.DATA_SEEN)
                m._persist(s)
                m._publish(s, "active")

    async def expire(self, now: float) -> None:
        m = self.m
        cfg = m.config
        for s in list(m.sessions.values()):
            if m.sessions.get(s.uid) is not s:
                continue  # ended meanwhile
            if s.state is State.RESERVED and cfg.reserved_timeout > 0:
                if now - max(s.hello_at, s.last_activity) > cfg.reserved_timeout:
                    await m._end(
                        s, Event.TIMEOUT, f"no update arrived within {cfg.reserved_timeout:g} s of the hello"
                    )
            elif s.state.routed and cfg.idle_timeout > 0 and now - s.last_activity > cfg.idle_timeout:
                await m._end(s, Event.TIMEOUT, f"idle for more than {cfg.idle_timeout:g} s")

    def snapshot(self) -> None:
        by_state: dict[str, int] = {st.value: 0 for st in State if st.held}
        samples = []
        for s in self.m.sessions.values():
            by_state[s.state.value] = by_state.get(s.state.value, 0) + 1
            samples.append(
                SessionSample(
                    self.m.metrics.uid_label(s.uid, s.security),
                    s.role,
                    s.state.value,
                    s.usage.bytes_to_target or 0,
                    s.usage.bytes_from_target or 0,
                    s.usage.connections_active or 0,
                )
            )
        self.m.metrics.set_snapshot(Snapshot(by_state, tuple(samples)))

    # ------------------------------------------------------------------ data-plane watchdog

    async def _watch_data_plane(self) -> None:
        """Notice a data-plane process that died (kill -9, crash) or was replaced (systemd
        restarted it) within about a second, and bring every live session back into it."""
        m = self.m
        try:
            known = await m.backend.data_plane_pid()
        except Exception as exc:
            log.debug("data-plane watchdog: %s", exc)
            known = None
        if known == 0:
            return  # this backend has no separate data-plane process to watch
        while True:
            await asyncio.sleep(DATA_PLANE_CHECK_S)
            try:
                pid = await m.backend.data_plane_pid()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("data-plane watchdog: %s", exc)
                continue
            if pid is not None and (known is None or pid == known):
                known = pid
                continue
            try:
                known = await self._recover_data_plane(known, pid)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("data-plane recovery failed; trying again")

    async def _recover_data_plane(self, old_pid: int | None, new_pid: int | None) -> int:
        """The data plane ``old_pid`` is gone (``new_pid`` None) or replaced by ``new_pid``:
        report the cut connections, get a data plane back, re-apply every live session."""
        m = self.m
        m.data_plane_ok = False
        if m.on_data_plane_change is not None:
            await m.on_data_plane_change()
        when = time.strftime("%H:%M:%S")
        gone = "stopped" if new_pid is None else "was replaced"
        what = f"the data plane (s2ds pid {old_pid or '?'}) {gone}"
        log.error("%s at %s; restarting it and re-applying %d session(s)", what, when, len(m.sessions))
        broken = [s for s in list(m.sessions.values()) if s.state.has_routes]
        for s in broken:
            cut = s.usage.connections_active or 0
            peers = ", ".join(f"{c.peer} on {c.listener}" for c in s.usage.connections[:4])
            s.error = f"{what} at {when}: {cut} connection(s) were cut" + (f" ({peers})" if peers else "")
            m.audit.record(event="data_plane_lost", uid=s.uid, identity=s.owner, connections_cut=cut)
            m._publish(s, "broken")
        while new_pid is None:
            try:
                await m.backend.restart_data_plane()
                new_pid = await m.backend.data_plane_pid()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("cannot restart the data plane: %s; trying again", exc)
            if new_pid is None:
                await asyncio.sleep(DATA_PLANE_RETRY_S)
        for s in broken:
            async with s.lock:
                if m.sessions.get(s.uid) is not s:
                    continue  # ended meanwhile
                # An orphan's key was never known here: its routes cannot come back.
                lost = s.state is State.ORPHANED
                if not lost:
                    try:
                        await m.backend.apply(s.plan())
                    except Exception as exc:
                        s.error += f"; its routes could not be re-applied: {exc}"
                        lost = True
            if lost:
                if s.state is State.ORPHANED:
                    s.error += "; the orphaned routes died with it"
                await m._end(s, Event.ERROR, s.error)
                continue
            s.error += "; routes re-applied in the new data plane"
            s.usage = SessionUsage()
            s.seen_connections = set()
            log.info("session %s: routes re-applied after the data plane restarted", s.uid)
            m._publish(s, "restored")
        m.data_plane_ok = True
        if m.on_data_plane_change is not None and not m._closing:
            await m.on_data_plane_change()
        log.info("the data plane (s2ds pid %d) serves again", new_pid)
        return new_pid

    # ------------------------------------------------------------------ restart

    async def reconcile(self) -> None:
        """Bring back stored sessions and match them with the routes the data plane has."""
        m = self.m
        records = m.store.load()
        try:
            running = {uid for uid, view in (await m.backend.observe()).items() if view.running}
        except Exception as exc:
            log.error("cannot list the data plane's sessions (%s); re-applying every routed session", exc)
            running = set()
        for data, psk in records:
            try:
                s = Session.from_record(data, psk)
            except (KeyError, ValueError, TypeError) as exc:
                log.error("dropping an unreadable stored session: %s", exc)
                continue
            if s.uid in m.sessions:
                continue
            if not s.state.held:
                continue  # never stored once ended; nothing to bring back
            m.ports.claim(s.ports)
            m.sessions.track(s)
            if s.state is State.WAITING_HELLO:
                await m._end(s, Event.ERROR, "s2cs restarted while the session waited for its hello")
            elif s.state.routed and s.uid not in running:
                try:
                    await m.backend.apply(s.plan())
                    log.info("session %s: routes re-applied after restart", s.uid)
                except Exception as exc:
                    await m._end(s, Event.ERROR, f"routes could not be re-applied after restart: {exc}")
            else:
                log.info("session %s: restored (%s)", s.uid, s.state.value)
        for uid in sorted(running - set(m.sessions)):
            # No stored session: the store may have been lost, so nothing proves these
            # routes were released. Adopt them as they are, for an operator to release.
            await self._adopt_orphan(uid)
        self.snapshot()

    async def _adopt_orphan(self, uid: str) -> None:
        m = self.m
        try:
            live = await m.backend.describe(uid)
        except Exception as exc:
            log.error("cannot describe the data-plane routes of %s (%s); adopting them as they are", uid, exc)
            live = LiveSession(uid)
        ports: list[int] = []
        for ep in live.listeners:
            with contextlib.suppress(InvalidEndpoint):
                ports.append(parse_endpoint(ep)[1])
        m.ports.claim(ports)
        s = Session(
            uid=uid,
            role=live.role or "PROD",
            owner=live.owner,
            owner_name="",
            num_conn=len(live.listeners),
            rate=0,
            rate_limit=0,
            security=live.security,
            ports=ports,
            listeners=list(live.listeners),
            machine=SessionMachine(State.ORPHANED),
            targets=list(live.targets),
            error="the data plane carries routes of this s2cs with no stored session: "
            "left running; release the session when it is no longer needed",
        )
        m.sessions.track(s)
        log.warning(
            "session %s: %d data-plane route(s) with no stored session; kept as orphaned (release "
            "it to remove them)",
            uid,
            len(live.listeners),
        )
        m._publish(s, "orphaned")
