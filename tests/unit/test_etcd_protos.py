"""Drift check of the pinned etcd protos (proto/etcd/) the etcd client is compiled from.

* the pinned files still hash to what proto/etcd/PINNED records (an edit is caught);
* every service method, message and field number scistream.etcd puts on the wire exists in
  the compiled descriptors with etcd's number and type (a wrong re-pin is caught);
* tools/etcd_protos.py strips exactly the code-generation hints and fails loudly on any
  upstream construct it does not know.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf.descriptor import FieldDescriptor

ROOT = Path(__file__).resolve().parents[2]
PINNED_DIR = ROOT / "proto" / "etcd"


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("etcd_protos", ROOT / "tools" / "etcd_protos.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["etcd_protos"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_pinned_files_hash_to_pinned_record() -> None:
    tool = _tool()
    record = tool.parse_pinned((PINNED_DIR / "PINNED").read_text())
    assert (
        set(record) == {p.name for p in PINNED_DIR.glob("*.proto")} == {"rpc.proto", "kv.proto", "auth.proto"}
    )
    for name, (upstream_path, upstream_sha, pinned_sha) in record.items():
        data = (PINNED_DIR / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == pinned_sha, f"proto/etcd/{name} was edited: re-derive it"
        assert upstream_path == tool.FILES[name][0]
        assert len(upstream_sha) == 64
    text = (PINNED_DIR / "PINNED").read_text()
    assert "upstream-tag: v3.4.23" in text
    assert text.count("stripped:") == len(tool.STRIPPED)


# (message, field, number, type) of everything the client sets or reads.
T = FieldDescriptor
USED_FIELDS = [
    ("etcdserverpb.ResponseHeader", "revision", 3, T.TYPE_INT64),
    ("etcdserverpb.RangeRequest", "key", 1, T.TYPE_BYTES),
    ("etcdserverpb.RangeRequest", "range_end", 2, T.TYPE_BYTES),
    ("etcdserverpb.RangeRequest", "keys_only", 8, T.TYPE_BOOL),
    ("etcdserverpb.RangeResponse", "header", 1, T.TYPE_MESSAGE),
    ("etcdserverpb.RangeResponse", "kvs", 2, T.TYPE_MESSAGE),
    ("etcdserverpb.PutRequest", "key", 1, T.TYPE_BYTES),
    ("etcdserverpb.PutRequest", "value", 2, T.TYPE_BYTES),
    ("etcdserverpb.PutRequest", "lease", 3, T.TYPE_INT64),
    ("etcdserverpb.PutResponse", "header", 1, T.TYPE_MESSAGE),
    ("etcdserverpb.DeleteRangeRequest", "key", 1, T.TYPE_BYTES),
    ("etcdserverpb.DeleteRangeRequest", "range_end", 2, T.TYPE_BYTES),
    ("etcdserverpb.DeleteRangeResponse", "header", 1, T.TYPE_MESSAGE),
    ("etcdserverpb.RequestOp", "request_range", 1, T.TYPE_MESSAGE),
    ("etcdserverpb.RequestOp", "request_put", 2, T.TYPE_MESSAGE),
    ("etcdserverpb.RequestOp", "request_delete_range", 3, T.TYPE_MESSAGE),
    ("etcdserverpb.ResponseOp", "response_range", 1, T.TYPE_MESSAGE),
    ("etcdserverpb.Compare", "result", 1, T.TYPE_ENUM),
    ("etcdserverpb.Compare", "target", 2, T.TYPE_ENUM),
    ("etcdserverpb.Compare", "key", 3, T.TYPE_BYTES),
    ("etcdserverpb.Compare", "version", 4, T.TYPE_INT64),
    ("etcdserverpb.Compare", "create_revision", 5, T.TYPE_INT64),
    ("etcdserverpb.Compare", "mod_revision", 6, T.TYPE_INT64),
    ("etcdserverpb.Compare", "value", 7, T.TYPE_BYTES),
    ("etcdserverpb.Compare", "lease", 8, T.TYPE_INT64),
    ("etcdserverpb.TxnRequest", "compare", 1, T.TYPE_MESSAGE),
    ("etcdserverpb.TxnRequest", "success", 2, T.TYPE_MESSAGE),
    ("etcdserverpb.TxnRequest", "failure", 3, T.TYPE_MESSAGE),
    ("etcdserverpb.TxnResponse", "header", 1, T.TYPE_MESSAGE),
    ("etcdserverpb.TxnResponse", "succeeded", 2, T.TYPE_BOOL),
    ("etcdserverpb.TxnResponse", "responses", 3, T.TYPE_MESSAGE),
    ("etcdserverpb.WatchRequest", "create_request", 1, T.TYPE_MESSAGE),
    ("etcdserverpb.WatchCreateRequest", "key", 1, T.TYPE_BYTES),
    ("etcdserverpb.WatchCreateRequest", "range_end", 2, T.TYPE_BYTES),
    ("etcdserverpb.WatchCreateRequest", "start_revision", 3, T.TYPE_INT64),
    ("etcdserverpb.WatchResponse", "created", 3, T.TYPE_BOOL),
    ("etcdserverpb.WatchResponse", "canceled", 4, T.TYPE_BOOL),
    ("etcdserverpb.WatchResponse", "compact_revision", 5, T.TYPE_INT64),
    ("etcdserverpb.WatchResponse", "cancel_reason", 6, T.TYPE_STRING),
    ("etcdserverpb.WatchResponse", "events", 11, T.TYPE_MESSAGE),
    ("etcdserverpb.LeaseGrantRequest", "TTL", 1, T.TYPE_INT64),
    ("etcdserverpb.LeaseGrantResponse", "ID", 2, T.TYPE_INT64),
    ("etcdserverpb.LeaseGrantResponse", "error", 4, T.TYPE_STRING),
    ("etcdserverpb.LeaseRevokeRequest", "ID", 1, T.TYPE_INT64),
    ("etcdserverpb.LeaseKeepAliveRequest", "ID", 1, T.TYPE_INT64),
    ("etcdserverpb.LeaseKeepAliveResponse", "TTL", 3, T.TYPE_INT64),
    ("mvccpb.KeyValue", "key", 1, T.TYPE_BYTES),
    ("mvccpb.KeyValue", "create_revision", 2, T.TYPE_INT64),
    ("mvccpb.KeyValue", "mod_revision", 3, T.TYPE_INT64),
    ("mvccpb.KeyValue", "version", 4, T.TYPE_INT64),
    ("mvccpb.KeyValue", "value", 5, T.TYPE_BYTES),
    ("mvccpb.KeyValue", "lease", 6, T.TYPE_INT64),
    ("mvccpb.Event", "type", 1, T.TYPE_ENUM),
    ("mvccpb.Event", "kv", 2, T.TYPE_MESSAGE),
]
USED_ENUMS = [
    ("etcdserverpb.Compare.CompareResult", {"EQUAL": 0, "GREATER": 1, "LESS": 2, "NOT_EQUAL": 3}),
    ("etcdserverpb.Compare.CompareTarget", {"VERSION": 0, "CREATE": 1, "MOD": 2, "VALUE": 3, "LEASE": 4}),
    ("mvccpb.Event.EventType", {"PUT": 0, "DELETE": 1}),
]
# (service, method, client streaming, server streaming)
USED_METHODS = [
    ("etcdserverpb.KV", "Range", False, False),
    ("etcdserverpb.KV", "Put", False, False),
    ("etcdserverpb.KV", "DeleteRange", False, False),
    ("etcdserverpb.KV", "Txn", False, False),
    ("etcdserverpb.Lease", "LeaseGrant", False, False),
    ("etcdserverpb.Lease", "LeaseRevoke", False, False),
    ("etcdserverpb.Lease", "LeaseKeepAlive", True, True),
    ("etcdserverpb.Watch", "Watch", True, True),
]


def _pool():  # type: ignore[no-untyped-def]
    from google.protobuf import descriptor_pool

    from scistream._proto.etcd import kv_pb2, rpc_pb2  # noqa: F401  (registers the descriptors)

    return descriptor_pool.Default()


@pytest.mark.parametrize(("message", "name", "number", "ftype"), USED_FIELDS)
def test_client_fields_exist_with_etcds_numbers(message: str, name: str, number: int, ftype: int) -> None:
    field = _pool().FindMessageTypeByName(message).fields_by_name.get(name)
    assert field is not None, f"{message}.{name} is gone from proto/etcd"
    assert (field.number, field.type) == (number, ftype)


def test_client_enums_and_methods_exist() -> None:
    pool = _pool()
    for enum_name, values in USED_ENUMS:
        enum = pool.FindEnumTypeByName(enum_name)
        assert {v.name: v.number for v in enum.values if v.name in values} == values
    for service, method, client_streaming, server_streaming in USED_METHODS:
        m = pool.FindServiceByName(service).methods_by_name[method]
        assert (m.client_streaming, m.server_streaming) == (client_streaming, server_streaming)


UPSTREAM_LIKE = """syntax = "proto3";
package etcdserverpb;

import "gogoproto/gogo.proto";
import "etcd/mvcc/mvccpb/kv.proto";

// for grpc-gateway
import "google/api/annotations.proto";

option (gogoproto.marshaler_all) = true;

service KV {
  // Range gets keys.
  rpc Range(RangeRequest) returns (RangeResponse) {
      option (google.api.http) = {
        post: "/v3/kv/range"
        body: "*"
        additional_bindings {
            post: "/v3alpha/kv/range"
            body: "*"
        }
    };
  }
}

message RangeRequest {
  bytes key = 1;
}
"""


def test_derivation_strips_only_codegen_hints() -> None:
    tool = _tool()
    out = tool.derive("rpc.proto", UPSTREAM_LIKE)
    assert "gogoproto" not in out and "google.api" not in out and "grpc-gateway" not in out
    assert 'import "scistream/_proto/etcd/kv.proto";' in out
    assert "package etcdserverpb;" in out
    assert "  // Range gets keys.\n  rpc Range(RangeRequest) returns (RangeResponse) {}\n" in out
    assert "message RangeRequest {\n  bytes key = 1;\n}\n" in out
    with pytest.raises(tool.DeriveError, match="gogoproto"):
        tool.derive(
            "rpc.proto",
            UPSTREAM_LIKE.replace("bytes key = 1;", "bytes key = 1 [(gogoproto.nullable) = false];"),
        )
