"""scistream.etcd's pure parts: endpoint parsing, prefix ranges, txn builders (no etcd needed)."""

from __future__ import annotations

import pytest

from scistream._proto.etcd import rpc_pb2
from scistream.etcd import Compare, EtcdClient, EtcdTls, Op
from scistream.etcd.client import parse_endpoint
from scistream.etcd.types import prefix_end


@pytest.mark.parametrize(
    ("endpoint", "target"),
    [
        ("http://127.0.0.1:2379", "127.0.0.1:2379"),
        ("127.0.0.1:22379", "127.0.0.1:22379"),
        ("http://etcd-a:2379/", "etcd-a:2379"),
        ("etcd-b", "etcd-b:2379"),
        ("http://[::1]:2379", "[::1]:2379"),
        ("https://etcd-a:2379", "etcd-a:2379"),
        ("https://etcd-a", "etcd-a:2379"),
    ],
)
def test_endpoints(endpoint: str, target: str) -> None:
    assert parse_endpoint(endpoint) == target


@pytest.mark.parametrize(
    "bad", ["ftp://h:2379", "unix:///run/etcd.sock", "http://h:2379/v3", "http://h:99999", ""]
)
def test_bad_endpoints_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="etcd endpoint"):
        parse_endpoint(bad)


def test_client_arguments() -> None:
    assert EtcdClient(["http://127.0.0.1:1", "127.0.0.1:2"]).endpoints == ["127.0.0.1:1", "127.0.0.1:2"]
    with pytest.raises(ValueError):
        EtcdClient([])
    with pytest.raises(ValueError):
        EtcdClient(["127.0.0.1:1"], timeout=0)


def test_tls_arguments() -> None:
    with pytest.raises(ValueError, match="mix http:// and https://"):
        EtcdClient(["https://127.0.0.1:1", "http://127.0.0.1:2"])
    with pytest.raises(ValueError, match="need https:// endpoints"):
        EtcdClient(["http://127.0.0.1:1"], tls=EtcdTls(ca=b"x"))
    with pytest.raises(ValueError, match="needs its key"):
        EtcdTls(cert=b"x")
    assert EtcdClient(["https://127.0.0.1:1"]).endpoints == ["127.0.0.1:1"]  # the system's roots


def test_prefix_end() -> None:
    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"a\xfe\xff\xff") == b"a\xff"
    assert prefix_end(b"") == b"\0"
    assert prefix_end(b"\xff\xff") == b"\0"


def test_builders_map_to_etcds_messages() -> None:
    c = Compare.lease(b"/n/a", "==", 7).to_pb()
    assert (c.key, c.target, c.result, c.lease) == (b"/n/a", rpc_pb2.Compare.LEASE, rpc_pb2.Compare.EQUAL, 7)
    c = Compare.value(b"k", "!=", b"v").to_pb()
    assert (c.target, c.result, c.value) == (rpc_pb2.Compare.VALUE, rpc_pb2.Compare.NOT_EQUAL, b"v")
    c = Compare.create_revision(b"k", "<", 3).to_pb()
    assert (c.target, c.result, c.create_revision) == (rpc_pb2.Compare.CREATE, rpc_pb2.Compare.LESS, 3)
    assert Compare.mod_revision(b"k", ">", 1).to_pb().target == rpc_pb2.Compare.MOD
    assert Compare.version(b"k", "==", 0).to_pb().target == rpc_pb2.Compare.VERSION
    with pytest.raises(ValueError, match="operator"):
        Compare.version(b"k", "<=", 0)
    put = Op.put(b"k", b"v", lease=5).to_pb()
    assert (put.request_put.key, put.request_put.value, put.request_put.lease) == (b"k", b"v", 5)
    rng = Op.get(b"/p/", prefix=True).to_pb()
    assert (rng.request_range.key, rng.request_range.range_end) == (b"/p/", b"/p0")
    dele = Op.delete(b"k").to_pb()
    assert (dele.request_delete_range.key, dele.request_delete_range.range_end) == (b"k", b"")
