"""The demo's producer and consumer applications: a deterministic byte stream, verified.

The stream is ``size`` bytes cut into 1 MiB blocks; block *j* is 16 bytes of
(seed, j) followed by a slice of a seed-derived random pool, so every block is
distinct and in place, yet producing it costs a memory copy, not a random
generator. Connection *k* of *K* asks for the k-th contiguous slice with a
20-byte request (``SSD1`` + offset + length); the producer answers with exactly
those bytes and closes. The consumer hashes what it reads; the demo compares
each slice's SHA-256 with the one it computed from the seed itself.

    python -m scistream.demo_apps producer --listen HOST:PORT --seed S
    python -m scistream.demo_apps consumer --connect A,B,.. --size N --seed S

Both print one JSON object per line on stdout (``listening``, ``progress``,
``result``) so the demo can follow them across namespaces.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from scistream.endpoints import format_endpoint, parse_endpoint

BLOCK = 1 << 20
POOL_BLOCKS = 16
MAGIC = b"SSD1"
HEADER = struct.Struct(">4sQQ")


class Stream:
    """The deterministic byte stream of one seed."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        rng = random.Random(seed)
        self._pool = [rng.randbytes(BLOCK) for _ in range(POOL_BLOCKS)]

    def block(self, j: int) -> bytes:
        return struct.pack(">QQ", self.seed, j) + self._pool[(j * 7 + self.seed) % POOL_BLOCKS][16:]

    def chunks(self, offset: int, length: int) -> Iterator[memoryview]:
        """The bytes [offset, offset + length) as a sequence of views."""
        end = offset + length
        pos = offset
        while pos < end:
            j, within = divmod(pos, BLOCK)
            take = min(BLOCK - within, end - pos)
            yield memoryview(self.block(j))[within : within + take]
            pos += take

    def sha256(self, offset: int, length: int) -> str:
        h = hashlib.sha256()
        for chunk in self.chunks(offset, length):
            h.update(chunk)
        return h.hexdigest()


def slices(size: int, parts: int) -> list[tuple[int, int]]:
    """(offset, length) of each connection's share, block-aligned, in order."""
    blocks = max(1, -(-size // BLOCK))
    out = []
    for k in range(parts):
        lo, hi = k * blocks // parts * BLOCK, (k + 1) * blocks // parts * BLOCK
        lo, hi = min(lo, size), min(hi, size)
        out.append((lo, hi - lo))
    return out


def _emit(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- producer
def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed before sending its request")
        buf += chunk
    return bytes(buf)


def _serve_one(conn: socket.socket, stream: Stream, corrupt_at: int) -> None:
    with conn:
        try:
            magic, offset, length = HEADER.unpack(_recv_exact(conn, HEADER.size))
            if magic != MAGIC:
                return
            pos = offset
            for chunk in stream.chunks(offset, length):
                out: bytes | memoryview = chunk
                if pos <= corrupt_at < pos + len(chunk):  # the demo's self-test of its check
                    bad = bytearray(chunk)
                    bad[corrupt_at - pos] ^= 0xFF
                    out = bytes(bad)
                conn.sendall(out)
                pos += len(chunk)
            conn.shutdown(socket.SHUT_WR)
            # Wait for the consumer to close so the last bytes are not cut by a reset.
            conn.settimeout(30)
            while conn.recv(65536):
                pass
        except OSError:
            pass  # the consumer went away; it reports that side


def run_producer(listen: str, seed: int, corrupt_at: int = -1) -> None:
    host, port = parse_endpoint(listen, allow_port_zero=True)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(128)
    stream = Stream(seed)
    _emit({"listening": format_endpoint(host, srv.getsockname()[1])})
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_serve_one, args=(conn, stream, corrupt_at), daemon=True).start()


# --------------------------------------------------------------------------- consumer
@dataclass
class SliceResult:
    endpoint: str
    offset: int
    length: int
    received: int = 0
    sha256: str = ""
    error: str = ""


def _fetch(endpoint: str, res: SliceResult, counter: list[int], lock: threading.Lock,
           timeout: float) -> None:
    host, port = parse_endpoint(endpoint)
    h = hashlib.sha256()
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(HEADER.pack(MAGIC, res.offset, res.length))
            while True:
                n = sock.recv_into(view)
                if n == 0:
                    break
                h.update(view[:n])
                res.received += n
                with lock:
                    counter[0] += n
        if res.received != res.length:
            res.error = f"got {res.received} of {res.length} bytes"
    except OSError as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    res.sha256 = h.hexdigest()


def run_consumer(endpoints: list[str], size: int, timeout: float, interval: float) -> int:
    parts = slices(size, len(endpoints))
    results = [SliceResult(ep, off, n) for ep, (off, n) in zip(endpoints, parts, strict=True)]
    counter = [0]
    lock = threading.Lock()
    t0 = time.monotonic()
    threads = [threading.Thread(target=_fetch, args=(r.endpoint, r, counter, lock, timeout), daemon=True)
               for r in results]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(interval)
        _emit({"progress": counter[0]})
    seconds = time.monotonic() - t0
    _emit({"result": {"seconds": seconds, "bytes": counter[0],
                      "slices": [asdict(r) for r in results]}})
    return 0 if all(not r.error for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scistream.demo_apps")
    sub = parser.add_subparsers(dest="role", required=True)
    p = sub.add_parser("producer")
    p.add_argument("--listen", required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--corrupt-at", type=int, default=-1, help=argparse.SUPPRESS)
    c = sub.add_parser("consumer")
    c.add_argument("--connect", required=True, help="comma-separated host:port, one per connection")
    c.add_argument("--size", type=int, required=True)
    c.add_argument("--timeout", type=float, default=60.0, help="seconds without progress on a socket")
    c.add_argument("--interval", type=float, default=0.2)
    args = parser.parse_args(argv)
    try:
        if args.role == "producer":
            run_producer(args.listen, args.seed, args.corrupt_at)
            return 0
        return run_consumer([e for e in args.connect.split(",") if e], args.size, args.timeout,
                            args.interval)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
