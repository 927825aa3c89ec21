"""How a session's data plane is realised: the contract every backend keeps.

A session of ``num_conn`` listeners is ``num_conn`` routes; route i listens on
``listeners[i]`` and forwards to ``targets[i]`` (PROTOCOL.md: connection i of
listener i goes to target i). PROD: the listeners are the TLS server side (WAN),
targets the producer application (plain). CONS: the listeners are plain (the
consumer application connects), targets the PROD gateway's listeners over TLS
(client side). With security "plain" both legs are plain.

The session layer calls ``apply`` after update (and again on reconcile after a
restart); ``apply`` is idempotent for the same plan. ``remove`` must give back
every port, process and file of the session on every path. Everything the session
layer learns from the data plane comes from one bulk call, ``observe``: a view of
every session it carries (or of those asked for), never one question per session.
"""

from __future__ import annotations

import abc
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal

Role = Literal["PROD", "CONS"]
Security = Literal["tls", "plain", "compat"]


@dataclass(frozen=True)
class RoutePlan:
    route_id: str  # "<uid>/<i>"
    listen: str  # "host:port" the gateway listens on
    target: str  # "host:port" it forwards to


@dataclass(frozen=True)
class SessionPlan:
    uid: str
    role: Role
    routes: tuple[RoutePlan, ...]
    security: Security
    psk_identity: str = ""  # uid (tls) or "client1" (compat); "" for plain
    psk_key: bytes = field(default=b"", repr=False)  # never logged; or SessionCredentials.encode()
    rate_limit: int = 0  # bytes/s for the whole session; 0 = none
    owner: str = ""  # the identity that owns the session (kept with the routes where it can be)


@dataclass(frozen=True)
class LiveSession:
    """What the data plane itself says about a session's live routes: all s2cs knows
    of a session whose stored row is lost (it is then adopted as orphaned)."""

    uid: str
    role: str = ""
    listeners: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    security: str = ""
    owner: str = ""


@dataclass(frozen=True)
class ConnectionUsage:
    listener: str
    peer: str
    target: str
    bytes_to_target: int
    bytes_from_target: int
    started_at: float


@dataclass(frozen=True)
class SessionUsage:
    """What the data plane reports about one session; None fields = unknown to this backend."""

    bytes_to_target: int | None = None
    bytes_from_target: int | None = None
    connections_active: int | None = None
    connections_total: int | None = None
    connections: tuple[ConnectionUsage, ...] = ()
    errors: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class SessionView:
    """One session as the data plane sees it at one moment (``Backend.observe``)."""

    running: bool = True  # its routes are live now
    usage: SessionUsage = field(default_factory=SessionUsage)
    error: str | None = None  # why its data plane died on its own (one sentence); None while it runs


@dataclass(frozen=True)
class BackendOptions:
    """What every backend constructor receives from s2cs."""

    state_dir: str  # s2cs's state directory; backends keep config/key files under it (0600)
    listener_ip: str  # the address listeners bind to / are advertised on
    s2ds_address: str = ""  # native: the s2ds control socket; "" = the state dir's default ipc://
    spawn_s2ds: bool = True  # native: start s2ds if none answers
    instance_id: str = ""  # this s2cs's id: namespaces its routes in an s2ds shared by several
    tcp_user_timeout_ms: int = 0
    extra: Mapping[str, str] = field(default_factory=dict)  # backend-specific settings


class BackendError(Exception):
    """The backend could not realise a plan; the message is one human sentence."""


class Backend(abc.ABC):
    """One instance per s2cs; shared by all sessions."""

    #: canonical --type name, e.g. "native", "stunnel", "haproxy", "nginx"
    name: ClassVar[str]
    #: What the backend can secure a ``tls`` WAN leg with: "psk" (the session's external
    #: PSK) and/or "certs" (per-session certificates, see scistream.certs.SessionCredentials).
    wan_keys: ClassVar[frozenset[str]] = frozenset({"psk"})
    #: The security modes it can carry at all; s2cs refuses the others when it starts
    #: (as its default) and at req (asked for by a client), never later.
    security_modes: ClassVar[frozenset[str]] = frozenset({"tls", "plain", "compat"})
    #: The keys of ``BackendOptions.extra`` this backend reads (``s2cs --backend-option
    #: KEY=VALUE``); create_backend refuses any other key, so a misspelling is a startup error.
    known_settings: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: BackendOptions) -> None:
        self.options = options

    @abc.abstractmethod
    async def start(self) -> None:
        """Prepare (connect to or spawn s2ds, check the proxy binary exists)."""

    @abc.abstractmethod
    async def apply(self, plan: SessionPlan) -> None:
        """Create or replace the session's routes; idempotent for the same plan."""

    @abc.abstractmethod
    async def remove(self, uid: str, *, drain: bool = False) -> None:
        """Tear the session's routes down; no error if it has none."""

    @abc.abstractmethod
    async def observe(self, uids: Collection[str] | None = None) -> dict[str, SessionView]:
        """One look at the data plane: a view of every session it carries or that died on
        its own (``uids``: of those sessions only), in as few round trips as the
        backend allows. A session it knows nothing of is absent."""

    async def running_sessions(self) -> set[str]:
        """Uids whose routes are live now."""
        return {uid for uid, view in (await self.observe()).items() if view.running}

    async def usage(self, uid: str) -> SessionUsage:
        """Counters of one session (empty SessionUsage if the backend has none)."""
        view = (await self.observe((uid,))).get(uid)
        return view.usage if view is not None else SessionUsage()

    def prod_credentials(self) -> Literal["psk", "mint", "operator"]:
        """How a PROD ``tls`` session of this backend is secured: "psk" (s2cs makes a random
        PSK), "mint" (s2cs mints per-session certificates), "operator" (the operator's
        gateway certificates; there is no key to carry)."""
        return "psk" if "psk" in self.wan_keys else "mint"

    def cons_operator_certs(self) -> bool:
        """Whether a CONS ``tls`` session may do without a key from the client because the
        operator configured certificates that authenticate the PROD gateway."""
        return False

    async def describe(self, uid: str) -> LiveSession:
        """What the data plane knows of a running session (see LiveSession)."""
        return LiveSession(uid)

    async def data_plane_pid(self) -> int | None:
        """The pid of the separate data-plane process that carries every session, None
        while it does not answer; 0 for a backend with no such process to watch."""
        return 0

    async def restart_data_plane(self) -> None:
        """Bring the data-plane process back after data_plane_pid() saw it gone (its routes
        are then re-applied by the session layer); BackendError if it cannot. Backends
        with no such process (data_plane_pid() is 0) are never asked."""
        raise BackendError(f"the {self.name} backend has no data-plane process to restart")

    @abc.abstractmethod
    async def close(self) -> None:
        """s2cs is stopping. Native: leave s2ds and its routes running (streams
        outlive the control server). Subprocess backends: stop their children."""
