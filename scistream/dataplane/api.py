"""The data-plane API: what a route is, how it is tuned, what it reports.

Both engines (the native C engine behind ``_engine.pyx`` and the pure-Python
reference engine in ``pyengine.py``) implement :class:`EngineBase` with these
value types, and the same tests run against both. Other code imports only from
``scistream.dataplane``.

Directions are named from the route's point of view: *to_target* is what the
accepted client sends towards the route's target, *from_target* the reverse.
"""

from __future__ import annotations

import abc
import enum
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from scistream import keys as _keys
from scistream.endpoints import format_endpoint, parse_endpoint


class EngineError(Exception):
    """A data-plane command was refused; the message is one human sentence."""

    code = "internal"


class RouteExists(EngineError):
    code = "already_exists"


class RouteNotFound(EngineError):
    code = "not_found"


class InvalidRoute(EngineError):
    code = "invalid"


class AddressInUse(EngineError):
    code = "address_in_use"


class TlsRole(enum.StrEnum):
    """Which leg of a route speaks TLS."""

    SERVER = "server"  # accepted connections are TLS (the PROD gateway's WAN side)
    CLIENT = "client"  # connections to the targets are TLS (the CONS gateway's WAN side)


class TlsMode(enum.StrEnum):
    PSK = "psk"  # TLS 1.3 external PSK (SHA-256), AES-128-GCM / ChaCha20-Poly1305 (default)
    COMPAT = "compat"  # SciStream 1.x stunnel: TLS 1.2 PSK, identity client1 (PSK suites only)
    CERT = "cert"  # server certificate + pinned CA, TLS 1.3


#: TLS 1.3 suites of PSK mode. An external PSK is bound to one hash, SHA-256 here
#: (RFC 8446's default, and what stunnel and openssl s_client/s_server use), and
#: a PSK handshake works only with a suite of that hash: the native engine keeps
#: only the SHA-256 suites of any list it is given (refusing a list with none), and
#: its server picks by this order (server preference), whatever a client lists
#: first. AES-128-GCM first: the cheapest per byte on CPUs with AES-NI.
DEFAULT_TLS13_PSK_SUITES = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256"
#: TLS 1.3 suites of certificate mode (server preference, in this order).
DEFAULT_TLS13_CERT_SUITES = (
    "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384"
)
#: Kept for callers of the old name: the certificate-mode list.
DEFAULT_TLS13_SUITES = DEFAULT_TLS13_CERT_SUITES
#: TLS 1.2 cipher list of the 1.x interoperability mode: PSK suites only, never
#: an anonymous (aNULL) suite; PSK-NULL-SHA256 is what a 1.x stunnel with
#: ``ciphers = eNULL`` can agree on.
COMPAT_TLS12_CIPHERS = (
    "ECDHE-PSK-AES128-CBC-SHA256:PSK-AES128-GCM-SHA256:PSK-AES256-GCM-SHA384:"
    "PSK-NULL-SHA256"
)
# The 1.x key rule lives in scistream.keys; re-exported here for the engines' callers.
COMPAT_PSK_IDENTITY = _keys.COMPAT_PSK_IDENTITY
compat_key_from_uid = _keys.compat_key
psk_key_from_text = _keys.key_from_stunnel_text

INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1
#: What may seal TLS 1.3 AES-GCM records in the native engine (Tuning.tls_aes_gcm).
AES_GCM_CHOICES = ("auto", "openssl", "ipsec-mb")
MAX_TIMEOUT_S = 1e9  # about 31 years; times 1e9 ns still fits an int64


@dataclass(frozen=True)
class Tls:
    """TLS on one leg of a route."""

    role: TlsRole
    mode: TlsMode = TlsMode.PSK
    psk_identity: str = ""
    psk_key: bytes = field(default=b"", repr=False)
    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""
    server_name: str = ""
    ciphers: str = ""  # empty: the mode's default (see above)

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", TlsRole(self.role))
        object.__setattr__(self, "mode", TlsMode(self.mode))
        if self.mode in (TlsMode.PSK, TlsMode.COMPAT):
            if not self.psk_identity or not self.psk_key:
                raise InvalidRoute(f"TLS mode {self.mode.value} needs a PSK identity and key")
            if len(self.psk_key) > 256:
                raise InvalidRoute("a PSK is at most 256 bytes")
        if self.mode is TlsMode.CERT:
            if self.role is TlsRole.SERVER and not (self.cert_file and self.key_file):
                raise InvalidRoute("TLS server in cert mode needs cert_file and key_file")
            if self.role is TlsRole.CLIENT and not self.ca_file:
                raise InvalidRoute("TLS client in cert mode needs ca_file (the pinned CA)")


@dataclass(frozen=True)
class Tuning:
    """Engine-wide knobs. Every field is documented in docs/TUNING.md."""

    workers: int = 0  # worker threads, one epoll loop each; 0 = online cores
    pipe_size: int = 1 << 20  # bytes per splice pipe (one pipe per direction)
    tls_buffer_size: int = 256 << 10  # bytes of userspace buffer per TLS direction
    sndbuf: int = 0  # SO_SNDBUF; 0 = kernel autotuning
    rcvbuf: int = 0  # SO_RCVBUF; 0 = kernel autotuning
    nodelay: bool = True  # TCP_NODELAY on every socket
    congestion: str = ""  # TCP_CONGESTION by name ("bbr", "cubic"); "" = system default
    notsent_lowat: int = 0  # TCP_NOTSENT_LOWAT; 0 = unset
    cpu_affinity: bool = False  # pin worker i to online CPU i mod n
    backlog: int = 1024  # listen() backlog
    max_connections: int = 0  # per route, when the route sets none; 0 = unlimited
    connect_timeout: float = 10.0  # seconds to connect to a target (and finish a TLS handshake)
    idle_timeout: float = 0.0  # seconds without a byte either way; 0 = never cut an idle stream
    tcp_user_timeout: int = 0  # TCP_USER_TIMEOUT in ms; 0 = kernel default
    # TLS 1.3 KeyUpdate after this many bytes sent per key; 0 = never, and then the native
    # engine uses kernel TLS where the kernel has it (docs/TUNING.md)
    tls_key_update_bytes: int = 1 << 36
    # who seals TLS 1.3 AES-GCM records: "auto" = intel-ipsec-mb on CPUs with VAES where the
    # build has it, else OpenSSL; "openssl"; "ipsec-mb" (an error where it cannot be)
    tls_aes_gcm: str = "auto"

    def __post_init__(self) -> None:
        for name in ("workers", "pipe_size", "tls_buffer_size", "sndbuf", "rcvbuf",
                     "notsent_lowat", "backlog", "max_connections", "tcp_user_timeout",
                     "tls_key_update_bytes"):
            if getattr(self, name) < 0:
                raise InvalidRoute(f"tuning {name} must not be negative")
        # The C engine keeps these in an int, a uint64 and nanosecond int64s: refuse what
        # would not fit (or not be a time at all) instead of overflowing there.
        for name in ("workers", "pipe_size", "tls_buffer_size", "sndbuf", "rcvbuf",
                     "notsent_lowat", "backlog", "max_connections", "tcp_user_timeout"):
            if getattr(self, name) > INT32_MAX:
                raise InvalidRoute(f"tuning {name} {getattr(self, name)} is too large (at most {INT32_MAX})")
        if self.tls_key_update_bytes > UINT64_MAX:
            raise InvalidRoute(f"tuning tls_key_update_bytes is too large (at most {UINT64_MAX})")
        for name in ("connect_timeout", "idle_timeout"):
            value = getattr(self, name)
            if not math.isfinite(value) or value > MAX_TIMEOUT_S:
                raise InvalidRoute(
                    f"tuning {name} {value!r} is not a number of seconds up to {MAX_TIMEOUT_S:g}"
                )
        if self.tls_aes_gcm not in AES_GCM_CHOICES:
            raise InvalidRoute(
                f"tuning tls_aes_gcm {self.tls_aes_gcm!r} is not one of {', '.join(AES_GCM_CHOICES)}"
            )
        if self.connect_timeout <= 0:
            raise InvalidRoute("tuning connect_timeout must be positive")
        if self.idle_timeout < 0:
            raise InvalidRoute("tuning idle_timeout must not be negative")

    @property
    def effective_workers(self) -> int:
        return self.workers or len(os.sched_getaffinity(0)) or 1


@dataclass(frozen=True)
class Route:
    """A listening socket, its targets, the TLS leg and the rate cap.

    Connection k accepted on the route goes to ``targets[k % len(targets)]``.
    """

    route_id: str
    listen: str = "127.0.0.1:0"  # "host:port" / "[v6]:port"; port 0 lets the kernel pick
    targets: tuple[str, ...] = ()
    tls: Tls | None = None
    rate_limit: int = 0  # bytes/s over all connections and both directions; 0 = none
    max_connections: int = 0  # 0 = Tuning.max_connections
    listen_fd: int = -1  # an already-bound listening socket to adopt instead of ``listen``
    labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if not self.route_id:
            raise InvalidRoute("a route needs a route_id")
        if not self.targets:
            raise InvalidRoute(f"route {self.route_id} needs at least one target")
        for t in self.targets:
            parse_endpoint(t)  # raises InvalidEndpoint (a ValueError) with a clear message
        if self.listen_fd < 0:
            parse_endpoint(self.listen, allow_port_zero=True)
        if self.rate_limit < 0 or self.max_connections < 0:
            raise InvalidRoute("rate_limit and max_connections must not be negative")
        if self.rate_limit > UINT64_MAX or self.max_connections > INT32_MAX:
            raise InvalidRoute(f"route {self.route_id}: rate_limit or max_connections is too large")


@dataclass(frozen=True)
class RouteInfo:
    """A route as the engine runs it; ``bound`` is the address actually bound."""

    route: Route
    bound: str


@dataclass(frozen=True)
class ConnectionStats:
    conn_id: int
    peer: str
    target: str
    bytes_to_target: int
    bytes_from_target: int
    started_at: float  # unix seconds


#: Error kinds counted per route. Engines count only these keys.
ERROR_KINDS = (
    "accept",  # accept() failed (e.g. EMFILE)
    "connect_refused",  # the target refused
    "connect_timeout",  # the target did not answer within connect_timeout
    "connect_error",  # any other connect failure (unreachable, ...)
    "tls_handshake",  # TLS handshake failed (wrong key, wrong version, garbage)
    "reset",  # a peer reset an established connection
    "idle_timeout",  # cut by idle_timeout
    "max_connections",  # refused because the route was full
    "io",  # any other read/write error
)


@dataclass(frozen=True)
class RouteStats:
    route_id: str
    bound: str
    targets: tuple[str, ...]
    bytes_to_target: int
    bytes_from_target: int
    connections_active: int
    connections_total: int
    errors: Mapping[str, int]  # keys from ERROR_KINDS; absent key = 0
    started_at: float
    connections: tuple[ConnectionStats, ...] = ()  # filled when asked for
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineStats:
    engine: str  # "native" or "pure"
    workers: int
    routes: Mapping[str, RouteStats]


@dataclass(frozen=True)
class ResourceCounts:
    """Live resources an engine holds; all return to zero when it is idle.

    Both engines count these in every build."""

    fds: int
    pipes: int
    ssl_objects: int
    connections: int


def format_listen(host: str, port: int) -> str:
    return format_endpoint(host, port)


class EngineBase(abc.ABC):
    """One engine multiplexes all routes of a node over ``tuning.workers`` threads.

    Every method is thread-safe and returns once the command has taken effect.
    """

    name: str = "abstract"

    def __init__(self, tuning: Tuning | None = None) -> None:
        self.tuning = tuning or Tuning()

    @abc.abstractmethod
    def add_route(self, route: Route) -> RouteInfo:
        """Bind and start accepting. Raises RouteExists, AddressInUse, InvalidRoute."""

    @abc.abstractmethod
    def retarget(self, route_id: str, targets: Sequence[str]) -> None:
        """New connections go to the new targets; established ones keep streaming."""

    @abc.abstractmethod
    def remove_route(self, route_id: str, *, drain: bool = False) -> None:
        """Close the listener at once; with drain, established connections finish
        by themselves, else they are closed now. Raises RouteNotFound."""

    @abc.abstractmethod
    def routes(self) -> list[RouteInfo]: ...

    @abc.abstractmethod
    def stats(self, route_id: str | None = None, *, connections: bool = False) -> EngineStats:
        """Counters of one route (RouteNotFound if unknown) or all, without pausing traffic."""

    @abc.abstractmethod
    def drain(self, timeout: float | None = None) -> bool:
        """Stop accepting on every route, wait until all connections ended or
        ``timeout`` passed; True if every connection finished."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close every route and connection and stop the workers. Idempotent."""

    @abc.abstractmethod
    def resource_counts(self) -> ResourceCounts: ...

    def __enter__(self) -> EngineBase:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
