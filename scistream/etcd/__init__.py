"""etcd v3 client for the multi-node gateway (issue 12): KV, transactions, leases, watches.

Built on grpcio aio and stubs compiled from the pinned protos in proto/etcd/ (see
proto/etcd/PINNED and tools/etcd_protos.py).
"""

from scistream.etcd.client import EtcdClient, EtcdTls
from scistream.etcd.types import (
    Compare,
    EtcdCompacted,
    EtcdError,
    EtcdUnavailable,
    KeyValue,
    Op,
    TxnResult,
    WatchEvent,
)

__all__ = [
    "Compare",
    "EtcdClient",
    "EtcdCompacted",
    "EtcdError",
    "EtcdTls",
    "EtcdUnavailable",
    "KeyValue",
    "Op",
    "TxnResult",
    "WatchEvent",
]
