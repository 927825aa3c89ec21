"""What a facility's gateway keeps in etcd, and how: key names, node and session records.

Every key lives under one versioned prefix P (``--etcd-prefix``, default
``/scistream/v1/``):

========================  =====================================================
``P nodes/<name>``        a live node (NodeInfo JSON), on the node's lease: it
                          vanishes when the node stops renewing it
``P sessions/<uid>``      a session's desired state (its record JSON, the key
                          sealed): written by whichever node takes the RPC
``P ports/<node>/<port>`` a data port reserved for a session (value: its uid),
                          created only if absent, so no port is handed out twice
``P applied/<uid>/<node>`` what a node has applied of a session (ApplyAck JSON),
                          on that node's lease
``P usage/<node>``        a node's counters of the sessions it carries, on its lease
``P early/<uid>``         a hello that came before its req, on a lease of
                          ``hello_timeout``
``P ended/<uid>``         how a session ended (outcome and reason), written in the
                          same transaction that deletes it, on a short lease, so
                          every node can tell its subscribers
========================  =====================================================

Session keys never reach etcd in clear: they are sealed with AES-256-GCM under the
operator's cluster key (``--etcd-key-file``), the uid bound as associated data so a
sealed key cannot be moved to another session.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from scistream.s2cs.sessions import Session

#: How long the outcome of an ended session stays readable (s).
ENDED_TTL = 60
NONCE_BYTES = 12


class SealError(Exception):
    """A sealed session key that this cluster key cannot open (one sentence)."""


class Keyspace:
    """The names of every key, under one prefix."""

    def __init__(self, prefix: str) -> None:
        if not prefix.startswith("/") or not prefix.endswith("/"):
            raise ValueError(f"etcd prefix {prefix!r} must start and end with '/'")
        self.prefix = prefix

    def _k(self, *parts: str) -> bytes:
        return (self.prefix + "/".join(parts)).encode()

    def root(self) -> bytes:
        return self.prefix.encode()

    def node(self, name: str) -> bytes:
        return self._k("nodes", name)

    def nodes(self) -> bytes:
        return self._k("nodes", "")

    def session(self, uid: str) -> bytes:
        return self._k("sessions", uid)

    def sessions(self) -> bytes:
        return self._k("sessions", "")

    def port(self, node: str, port: int) -> bytes:
        return self._k("ports", node, str(port))

    def ports(self, node: str = "") -> bytes:
        return self._k("ports", node, "") if node else self._k("ports", "")

    def applied(self, uid: str, node: str) -> bytes:
        return self._k("applied", uid, node)

    def applied_of(self, uid: str) -> bytes:
        return self._k("applied", uid, "")

    def usage(self, node: str) -> bytes:
        return self._k("usage", node)

    def usages(self) -> bytes:
        return self._k("usage", "")

    def early(self, uid: str) -> bytes:
        return self._k("early", uid)

    def ended(self, uid: str) -> bytes:
        return self._k("ended", uid)

    def split(self, key: bytes) -> tuple[str, list[str]]:
        """("sessions", [uid]) for a key under the prefix; ("", []) for anything else."""
        text = key.decode(errors="replace")
        if not text.startswith(self.prefix):
            return "", []
        kind, _, rest = text[len(self.prefix) :].partition("/")
        return kind, rest.split("/") if rest else []


@dataclass(frozen=True)
class NodeInfo:
    """A gateway node as the cluster sees it."""

    name: str
    instance: str  # the node's s2cs instance id (its state directory): tells a restart from a namesake
    listener_ip: str
    port_low: int
    port_high: int
    control: str  # where its gRPC service listens (host:port), for operators and clients
    pid: int = 0
    host: str = ""
    started_at: float = 0.0

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> NodeInfo:
        d = json.loads(data)
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class Placement:
    """Where connection i of a session is carried: a node, its port and listener."""

    node: str
    port: int
    listener: str


@dataclass(frozen=True)
class ApplyAck:
    """A node's report of what it applied of a session: the session record revision
    (``rev``), and an error sentence if its data plane refused it."""

    rev: int
    error: str = ""

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> ApplyAck:
        d = json.loads(data)
        return cls(int(d["rev"]), str(d.get("error", "")))


@dataclass
class ClusterRecord:
    """A session as etcd holds it: the single-node record plus where each connection is
    carried, the coordinator that took its req, and the connections lost with a node."""

    session: Session
    placement: list[Placement]
    coordinator: str
    lost: list[str] = field(default_factory=list)  # one sentence per lost connection
    mod_revision: int = 0  # of the key this was read from (0: not yet written)

    def nodes(self) -> list[str]:
        return [p.node for p in self.placement]

    def on_node(self, node: str) -> list[int]:
        return [i for i, p in enumerate(self.placement) if p.node == node]

    def encode(self, sealer: Sealer) -> bytes:
        s = self.session
        data: dict[str, Any] = s.record()
        data["placement"] = [asdict(p) for p in self.placement]
        data["coordinator"] = self.coordinator
        data["lost"] = self.lost
        data["error"] = s.error
        data["key"] = sealer.seal(s.uid, s.psk) if s.psk else ""
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, value: bytes, sealer: Sealer, mod_revision: int = 0) -> ClusterRecord:
        data = json.loads(value)
        psk = sealer.open(str(data["uid"]), data["key"]) if data.get("key") else b""
        s = Session.from_record(data, psk)
        s.error = str(data.get("error", ""))
        placement = [Placement(str(p["node"]), int(p["port"]), str(p["listener"])) for p in data["placement"]]
        return cls(
            s,
            placement,
            str(data.get("coordinator", "")),
            [str(x) for x in data.get("lost", [])],
            mod_revision,
        )


class Sealer:
    """Seals session keys for etcd with the cluster key (AES-256-GCM, uid as associated data)."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("the cluster key must be 32 bytes")
        self._aead = AESGCM(key)

    def seal(self, uid: str, secret: bytes) -> str:
        nonce = os.urandom(NONCE_BYTES)
        return base64.b64encode(nonce + self._aead.encrypt(nonce, secret, uid.encode())).decode()

    def open(self, uid: str, sealed: str) -> bytes:
        try:
            raw = base64.b64decode(sealed, validate=True)
            return self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], uid.encode())
        except (InvalidTag, ValueError) as exc:
            raise SealError(
                f"the key of session {uid!r} in etcd does not open with this node's cluster key "
                "(every node of a facility needs the same --etcd-key-file)"
            ) from exc
