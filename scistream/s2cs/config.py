"""Everything an s2cs instance is configured with, in one typed object.

The CLI (cli.py) fills it from options, ``SCISTREAM_*`` environment variables
and a TOML file; tests build it directly.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CLIENT_ID = "c42c0dac-0a52-408e-a04f-5d31bfe0aef8"
SECURITY_MODES = ("tls", "plain", "compat")
PLACEMENTS = ("spread", "pack", "load")
#: A node's name in the cluster: it is part of etcd keys (nodes/<name>, ports/<name>/...).
NODE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,63}$")


def default_node_name() -> str:
    """This host's name made a valid node name: other characters become '-', cut to 63."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:63].strip("-")
    return name or "node"


def default_state_dir(port: int | None = None) -> str:
    """$SCISTREAM_STATE_DIR, else ``/var/lib/scistream/<port>`` as root, else
    ``~/.scistream/<port>``: one directory per control port, so several s2cs on one
    host (the tutorials replayed on one machine) never share a store or an s2ds."""
    env = os.environ.get("SCISTREAM_STATE_DIR")
    if env:
        return env
    base = Path("/var/lib/scistream") if os.geteuid() == 0 else Path.home() / ".scistream"
    return str(base / str(port)) if port is not None else str(base)


def listener_ip_problem(listener_ip: str) -> str | None:
    """Why peers could not use ``listener_ip`` as the address s2cs advertises (one sentence),
    or None. Empty, 0.0.0.0 and :: bind every interface but name none a peer can reach."""
    text = listener_ip.strip().strip("[]")
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        addr = None  # a host name: resolved when listeners bind
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if text and (addr is None or not addr.is_unspecified):
        return None
    shown = f"--listener-ip {listener_ip}" if text else "--listener-ip is empty: it"
    return (
        f"{shown} is not an address peers can connect to, yet s2cs advertises it to them as "
        "this gateway's listeners; set it to the address the peer facility reaches this gateway "
        "at (e.g. --listener-ip 192.0.2.10, SCISTREAM_LISTENER_IP=192.0.2.10, or listener_ip "
        "in the config file)"
    )


@dataclass
class ServerConfig:
    # control channel
    port: int = 5000
    bind: str = "0.0.0.0"  # the gRPC port's address; 1.x listens on every interface
    ssl: bool = True
    server_crt: str = "server.crt"
    server_key: str = "server.key"
    handshake_timeout: float = 10.0  # s; a control connection's TLS + HTTP/2 setup (gRPC: 120)
    # data plane
    listener_ip: str = "127.0.0.1"
    port_range: tuple[int, int] = (5100, 5200)
    backend_type: str = "native"
    s2ds_address: str = ""
    backend_extra: dict[str, str] = field(default_factory=dict)
    # security of the data channel
    default_security: str = "tls"
    compat_allowed: bool = False  # --scistream1-compat
    enforce_rate: bool = False  # 1.x `rate` as kB/s (rate * 1000 bytes/s)
    allow_targets: list[str] = field(default_factory=list)  # CIDRs; empty = every unicast net
    # auth
    client_id: str = DEFAULT_CLIENT_ID
    client_secret: str = ""
    allowed_identities: list[str] = field(default_factory=list)
    allowed_domains: list[str] = field(default_factory=list)
    introspect_timeout: float = 5.0
    token_cache_ttl: float = 60.0  # s a positive introspection is trusted (never past exp)
    # sessions
    hello_timeout: float = 180.0
    reserved_timeout: float = 3600.0  # helloed but never updated
    idle_timeout: float = 0.0  # 0 = off: an idle stream is never cut by default
    early_hello_limit: int = 1024
    max_num_conn: int = 64
    poll_interval: float = 2.0  # data-plane usage polling (active detection, metrics)
    # operations
    state_dir: str = ""  # "" = default_state_dir(port)
    fresh_state: bool = False  # start with an empty store even where one should exist
    events: str = "ipc"  # ZMQ PUB bind: "ipc" = ipc://<state_dir>/events.sock; "" = off
    events_curve_secret_file: str = ""  # tcp:// events only: s2cs's CURVE .key_secret
    events_curve_client_keys: str = ""  # tcp:// events only: admitted subscribers' *.key
    metrics_port: int | None = None  # None = off; 0 = ephemeral
    audit_log: str = ""  # "" = <state_dir>/audit.log
    log_file: str = ""
    # multi-node gateway (issue 12): empty etcd = one node with its embedded SQLite store
    etcd: list[str] = field(default_factory=list)  # "http(s)://HOST:PORT" endpoints of one cluster
    etcd_ca: str = ""  # https:// etcd: the CA of the members' certificates ("" = the system's roots)
    etcd_cert: str = ""  # https:// etcd: this node's client certificate (with etcd_key)
    etcd_key: str = ""
    node_name: str = ""  # this node's name in the cluster ("" = the host name)
    node_ttl: float = 10.0  # s; the node's etcd lease: how long a dead node counts as alive
    etcd_key_file: str = ""  # 32-byte key that encrypts session keys at rest in etcd
    etcd_prefix: str = "/scistream/v1/"  # every key of this facility's gateway lives under it
    placement: str = "spread"  # how a session's connections go over the nodes: spread|pack|load

    def __post_init__(self) -> None:
        if not self.state_dir:
            self.state_dir = default_state_dir(self.port)

    def audit_path(self) -> str:
        return self.audit_log or os.path.join(self.state_dir, "audit.log")

    def events_address(self) -> str:
        """The events bind address, "ipc" resolved to the private socket in the state dir."""
        text = self.events.strip()
        if text.lower() == "ipc":
            return f"ipc://{Path(self.state_dir).absolute() / 'events.sock'}"
        return "" if text.lower() in ("off", "none", "no", "false") else text

    @property
    def clustered(self) -> bool:
        return bool(self.etcd)

    def db_path(self) -> str:
        return os.path.join(self.state_dir, "s2cs.db")
