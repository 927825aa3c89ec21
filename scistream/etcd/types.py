"""The etcd client's values and errors, and their mapping to and from etcd's v3 protos.

The rest of SciStream sees only these frozen dataclasses, never a protobuf message, so the
cluster code does not depend on the generated stubs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from scistream._proto.etcd import kv_pb2, rpc_pb2


class EtcdError(Exception):
    """Any etcd failure; the message is one sentence naming the endpoints."""


class EtcdUnavailable(EtcdError):
    """No member answered in time: unreachable, no leader, quorum lost or the deadline passed.

    Raised by a write, it can also mean the write's outcome is unknown (the member may have
    applied it before the connection broke): re-read to know.
    """


class EtcdCompacted(EtcdError):
    """A watch's start revision is older than etcd's last compaction."""

    def __init__(self, message: str, compact_revision: int) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def from_pb(cls, kv: kv_pb2.KeyValue) -> KeyValue:
        return cls(kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease)


@dataclass(frozen=True)
class WatchEvent:
    """One change; for a delete, only ``kv.key`` and ``kv.mod_revision`` (the deletion's) are set."""

    type: Literal["put", "delete"]
    kv: KeyValue

    @classmethod
    def from_pb(cls, ev: kv_pb2.Event) -> WatchEvent:
        kind: Literal["put", "delete"] = "delete" if ev.type == kv_pb2.Event.DELETE else "put"
        return cls(kind, KeyValue.from_pb(ev.kv))


@dataclass(frozen=True)
class TxnResult:
    """``responses`` has one list per executed op: the kvs of a get, [] for a put or delete."""

    succeeded: bool
    revision: int
    responses: list[list[KeyValue]] = field(default_factory=list)


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix`` (etcd's range_end).

    Trailing 0xff bytes cannot be incremented and are dropped; an empty or all-0xff prefix
    means "to the end of the keyspace", which etcd spells b"\\0".
    """
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\0"
    return stripped[:-1] + bytes([stripped[-1] + 1])


_RESULTS = {
    "==": rpc_pb2.Compare.EQUAL,
    "!=": rpc_pb2.Compare.NOT_EQUAL,
    "<": rpc_pb2.Compare.LESS,
    ">": rpc_pb2.Compare.GREATER,
}


@dataclass(frozen=True)
class Compare:
    """One guard of a transaction; build it with the static methods, e.g.
    ``Compare.create_revision(key, "==", 0)`` (the key does not exist)."""

    key: bytes
    target: Literal["version", "create_revision", "mod_revision", "value", "lease"]
    op: str
    operand: int | bytes

    def __post_init__(self) -> None:
        if self.op not in _RESULTS:
            raise ValueError(f"etcd compare operator must be one of ==, !=, <, >, not {self.op!r}")

    @staticmethod
    def create_revision(key: bytes, op: str, value: int) -> Compare:
        return Compare(key, "create_revision", op, value)

    @staticmethod
    def mod_revision(key: bytes, op: str, value: int) -> Compare:
        return Compare(key, "mod_revision", op, value)

    @staticmethod
    def version(key: bytes, op: str, value: int) -> Compare:
        return Compare(key, "version", op, value)

    @staticmethod
    def value(key: bytes, op: str, value: bytes) -> Compare:
        return Compare(key, "value", op, value)

    @staticmethod
    def lease(key: bytes, op: str, lease_id: int) -> Compare:
        return Compare(key, "lease", op, lease_id)

    def to_pb(self) -> rpc_pb2.Compare:
        targets = {
            "version": rpc_pb2.Compare.VERSION,
            "create_revision": rpc_pb2.Compare.CREATE,
            "mod_revision": rpc_pb2.Compare.MOD,
            "value": rpc_pb2.Compare.VALUE,
            "lease": rpc_pb2.Compare.LEASE,
        }
        # The proto's oneof member has the target's name (value, lease, version, ...).
        operand: dict[str, Any] = {self.target: self.operand}
        return rpc_pb2.Compare(key=self.key, result=_RESULTS[self.op], target=targets[self.target], **operand)


@dataclass(frozen=True)
class Op:
    """One operation of a transaction; build it with ``Op.put``, ``Op.delete``, ``Op.get``."""

    kind: Literal["put", "delete", "get"]
    key: bytes
    data: bytes = b""
    lease_id: int = 0
    prefix: bool = False

    @staticmethod
    def put(key: bytes, value: bytes, lease: int = 0) -> Op:
        return Op("put", key, value, lease)

    @staticmethod
    def delete(key: bytes, prefix: bool = False) -> Op:
        return Op("delete", key, prefix=prefix)

    @staticmethod
    def get(key: bytes, prefix: bool = False) -> Op:
        return Op("get", key, prefix=prefix)

    def to_pb(self) -> rpc_pb2.RequestOp:
        range_end = prefix_end(self.key) if self.prefix else b""
        if self.kind == "put":
            return rpc_pb2.RequestOp(
                request_put=rpc_pb2.PutRequest(key=self.key, value=self.data, lease=self.lease_id)
            )
        if self.kind == "delete":
            return rpc_pb2.RequestOp(
                request_delete_range=rpc_pb2.DeleteRangeRequest(key=self.key, range_end=range_end)
            )
        return rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=self.key, range_end=range_end))


def txn_result(resp: rpc_pb2.TxnResponse) -> TxnResult:
    responses = [
        [KeyValue.from_pb(kv) for kv in r.response_range.kvs] if r.HasField("response_range") else []
        for r in resp.responses
    ]
    return TxnResult(resp.succeeded, resp.header.revision, responses)
