"""Re-derive proto/etcd/*.proto (and proto/etcd/PINNED) from etcd's upstream v3 API protos.

    python tools/etcd_protos.py --tag v3.4.23 --source "..." RPC_PROTO KV_PROTO AUTH_PROTO

(proto/etcd/PINNED was made from Debian's golang-etcd-server-dev 3.4.23-4, which ships the
upstream tree: ``apt-get download golang-etcd-server-dev``, ``dpkg-deb -x`` it, and pass the
three files under usr/share/gocode/src/go.etcd.io/etcd/.)

RPC_PROTO, KV_PROTO and AUTH_PROTO are upstream's etcdserver/etcdserverpb/rpc.proto,
mvcc/mvccpb/kv.proto and auth/authpb/auth.proto. The derivation only removes code-generation
hints that change nothing on the wire and renames imports:

* gogoproto: its import and every ``option (gogoproto.*)`` (Go marshaller hints);
* google.api: its import (with its "for grpc-gateway" comment) and every
  ``option (google.api.http) = {...};`` block (grpc-gateway's REST mapping);
* imports of the sibling protos point at ``scistream/_proto/etcd/`` so that protoc puts the
  stubs in the package ``scistream._proto.etcd``. The proto ``package`` lines (etcdserverpb,
  mvccpb, authpb) stay: they are part of the gRPC method names on the wire.

Everything else (messages, field numbers, comments) is kept byte for byte, so a diff against
upstream shows only the stripped lines. The output is deterministic: running the tool on the
same upstream files reproduces the pinned files and PINNED exactly.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

PINNED_DIR = Path(__file__).resolve().parent.parent / "proto" / "etcd"
IMPORT_PREFIX = "scistream/_proto/etcd/"

# pinned name -> (upstream path inside the etcd tree, upstream import path to rename)
FILES: dict[str, tuple[str, str]] = {
    "rpc.proto": ("etcdserver/etcdserverpb/rpc.proto", "etcd/etcdserver/etcdserverpb/rpc.proto"),
    "kv.proto": ("mvcc/mvccpb/kv.proto", "etcd/mvcc/mvccpb/kv.proto"),
    "auth.proto": ("auth/authpb/auth.proto", "etcd/auth/authpb/auth.proto"),
}

STRIPPED = (
    'import "gogoproto/gogo.proto" and every option (gogoproto.*) line',
    'import "google/api/annotations.proto", its "// for grpc-gateway" comment and every '
    "option (google.api.http) = {...}; block (an rpc left with an empty body becomes {})",
    "imports of etcd/mvcc/mvccpb/kv.proto and etcd/auth/authpb/auth.proto renamed to "
    f"{IMPORT_PREFIX}kv.proto and {IMPORT_PREFIX}auth.proto",
)

_GOGO_IMPORT = re.compile(r'^import "gogoproto/gogo\.proto";\n', re.M)
_GOGO_OPTION = re.compile(r"^option \(gogoproto\.[a-z_]+\) = (?:true|false);\n", re.M)
_API_IMPORT = re.compile(r'^(?:// for grpc-gateway\n)?import "google/api/annotations\.proto";\n', re.M)
# An rpc whose body holds only the http annotation: `rpc X(..) returns (..) {\n option ... };\n }`;
# the annotation may nest one level (additional_bindings {...}).
_HTTP_RPC_BODY = re.compile(r"\{\s*option \(google\.api\.http\) = \{(?:[^{}]|\{[^{}]*\})*\};\s*\}")


NO_COMMIT = "not recorded (taken from a release source tree; the sha256 below identify the files)"


class DeriveError(Exception):
    """Upstream text is not what this tool knows how to strip (a new upstream layout)."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def derive(name: str, upstream: str) -> str:
    """The pinned text of ``name`` from the upstream text."""
    text = _GOGO_IMPORT.sub("", upstream)
    text = _GOGO_OPTION.sub("", text)
    text = _API_IMPORT.sub("", text)
    text = _HTTP_RPC_BODY.sub("{}", text)
    for _, (_, import_path) in FILES.items():
        pinned = IMPORT_PREFIX + import_path.rsplit("/", 1)[1]
        text = text.replace(f'import "{import_path}";', f'import "{pinned}";')
    # Collapse the blank lines the removed option block leaves behind the package line.
    text = re.sub(r"\n{3,}", "\n\n", text)
    leftovers = [w for w in ("gogoproto", "google.api", 'import "etcd/') if w in text]
    if leftovers:
        raise DeriveError(f"{name}: upstream has {', '.join(leftovers)} this tool does not strip")
    return text


def pinned_record(
    tag: str, commit: str, source: str, upstream: dict[str, bytes], pinned: dict[str, bytes]
) -> str:
    lines = [
        "# etcd v3 API protos used by scistream/etcd, pinned (re-derive: tools/etcd_protos.py).",
        f"upstream-tag: {tag}",
        f"upstream-commit: {commit or NO_COMMIT}",
        f"source: {source}",
        *(f"stripped: {s}" for s in STRIPPED),
        "# file <pinned name> <upstream path> <upstream sha256> <pinned sha256>",
    ]
    for name in sorted(FILES):
        lines.append(f"file {name} {FILES[name][0]} {sha256(upstream[name])} {sha256(pinned[name])}")
    return "\n".join(lines) + "\n"


def parse_pinned(text: str) -> dict[str, tuple[str, str, str]]:
    """PINNED -> {pinned name: (upstream path, upstream sha256, pinned sha256)}."""
    out: dict[str, tuple[str, str, str]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[0] == "file":
            out[parts[1]] = (parts[2], parts[3], parts[4])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tag", required=True, help="upstream tag the files come from, e.g. v3.4.23")
    ap.add_argument("--commit", default="", help="upstream commit of the tag, when known")
    ap.add_argument("--source", required=True, help="where the upstream files were taken from")
    ap.add_argument("--out", type=Path, default=PINNED_DIR, help="default: proto/etcd/")
    ap.add_argument("rpc", type=Path, help="upstream etcdserver/etcdserverpb/rpc.proto")
    ap.add_argument("kv", type=Path, help="upstream mvcc/mvccpb/kv.proto")
    ap.add_argument("auth", type=Path, help="upstream auth/authpb/auth.proto")
    args = ap.parse_args(argv)
    upstream = {
        "rpc.proto": args.rpc.read_bytes(),
        "kv.proto": args.kv.read_bytes(),
        "auth.proto": args.auth.read_bytes(),
    }
    try:
        pinned = {n: derive(n, data.decode()).encode() for n, data in upstream.items()}
    except DeriveError as exc:
        sys.stderr.write(f"etcd_protos: {exc}\n")
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in pinned.items():
        (args.out / name).write_bytes(data)
    (args.out / "PINNED").write_text(pinned_record(args.tag, args.commit, args.source, upstream, pinned))
    return 0


if __name__ == "__main__":
    sys.exit(main())
