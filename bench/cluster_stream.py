"""One session spread over a facility's gateway nodes, bytes verified: the measuring side of
test_cluster_stream.py, run by it inside a private network namespace (lo up, reno), so that
etcd, every node, the consumer's gateway and the load share one fresh loopback.

    ip netns exec NS python bench/cluster_stream.py --config etcd-3 --conn-per-node 2 --seconds 5

Producer facility: ``--config`` (see cluster.py: ``sqlite-1`` or ``etcd-N``, placement
spread); consumer facility: one plain s2cs. One session with the TLS leg between the
facilities, its connections placed by the producer's nodes. A producer (threads in this
process) serves a seeded stream on each connection for ``--seconds``: 1 MiB chunks, chunk
i stamped with i; a consumer thread per listener of the consumer's gateway reads to EOF and
compares every chunk with what it must be (byte for byte: cheaper than hashing, which on
these 2 cores would take the CPU the gateways need). Prints one JSON object: bytes sent and
verified, Gbit/s over the window from the first byte to the last EOF, CPU-seconds of every
process by role over that window, and which node carries each connection.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from random import Random
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from cluster import Facility, Route, cpu_of, machine_busy_seconds, node_count, release, setup, status

MiB = 1 << 20
SEED = 12


def pattern(seed: int = SEED) -> bytearray:
    return bytearray(Random(seed).randbytes(MiB))


class Producer:
    """Serves the seeded stream on every accepted connection for ``seconds`` (whole chunks),
    then half-closes; counts what it sent."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = int(self.sock.getsockname()[1])
        self.sent: list[int] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        block = pattern()
        sent = 0
        deadline = time.monotonic() + self.seconds
        try:
            with conn:
                index = 0
                while time.monotonic() < deadline:
                    struct.pack_into("<Q", block, 0, index)
                    conn.sendall(block)
                    sent += MiB
                    index += 1
                conn.shutdown(socket.SHUT_WR)
        except OSError as exc:
            with self._lock:
                self.errors.append(f"producer: {exc}")
        with self._lock:
            self.sent.append(sent)

    def close(self) -> None:
        self.sock.close()


@dataclass
class Consumer:
    """Reads one connection to EOF, checking every chunk against the pattern."""

    address: str
    received: int = 0
    first: float | None = None
    last: float | None = None
    error: str | None = None
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        expected = pattern()
        buf = bytearray(MiB)
        view = memoryview(buf)
        host, port = self.address.rsplit(":", 1)
        try:
            with socket.create_connection((host, int(port)), timeout=60) as sock:
                index = 0
                while True:
                    got = 0
                    while got < MiB:
                        n = sock.recv_into(view[got:], MiB - got)
                        if n == 0:
                            break
                        if self.first is None:
                            self.first = time.perf_counter()
                        got += n
                    if got == 0:
                        break
                    struct.pack_into("<Q", expected, 0, index)
                    if got < MiB or buf != expected:
                        self.error = f"chunk {index} differs ({got} bytes) on {self.address}"
                        return
                    self.received += got
                    index += 1
                self.last = time.perf_counter()
        except OSError as exc:
            self.error = f"{self.address}: {exc}"


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(config: str, conn_per_node: int, total_conn: int, seconds: float) -> dict[str, Any]:
    nodes = node_count(config)
    num_conn = total_conn or conn_per_node * nodes
    producer = Producer(seconds)
    try:
        with Facility(config, ports=max(20, 2 * num_conn)) as prod, Facility("sqlite-1", name="cons") as cons:
            uid = "s" + uuid.uuid4().hex[:12]
            p_stub = prod.stubs()[0]
            c_stub = cons.stubs()[0]
            p_route = Route(p_stub, p_stub, p_stub, p_stub)
            c_route = Route(c_stub, c_stub, c_stub, c_stub)
            t0 = time.perf_counter()
            p = setup(p_route, uid, "PROD", num_conn, producer=[f"127.0.0.1:{producer.port}"])
            c = setup(c_route, uid, "CONS", num_conn, remote=list(p.listeners), session_key=p.session_key)
            setup_s = time.perf_counter() - t0
            placed = list(status(p_stub, uid).listener_nodes)
            pids = {**prod.processes(), **{f"cons-{k}": v for k, v in cons.processes().items()}}
            before, self_before, busy_before = cpu_of(pids), _self_cpu(), machine_busy_seconds()
            consumers = [Consumer(ep) for ep in c.listeners]
            for x in consumers:
                x.thread.start()
            for x in consumers:
                x.thread.join(seconds + 120)
            after, self_after, busy_after = cpu_of(pids), _self_cpu(), machine_busy_seconds()
            release(p_route, uid)
            release(c_route, uid)
    finally:
        producer.close()
    received = sum(x.received for x in consumers)
    errors = [x.error for x in consumers if x.error] + producer.errors
    errors += [f"{x.address}: no EOF" for x in consumers if x.thread.is_alive()]
    starts = [x.first for x in consumers if x.first is not None]
    ends = [x.last for x in consumers if x.last is not None]
    window = max(ends) - min(starts) if starts and ends else 0.0
    cpu = {role: after[role] - before[role] for role in pids}
    gateway = sum(v for k, v in cpu.items() if "etcd:" not in k)
    gb = received / 1e9
    return {
        "config": config,
        "nodes": nodes,
        "num_conn": num_conn,
        "listener_nodes": placed,
        "seconds": seconds,
        "window_s": window,
        "bytes_sent": sum(producer.sent),
        "bytes_verified": received,
        "verified": not errors and received == sum(producer.sent) and len(producer.sent) == num_conn,
        "errors": errors[:5],
        "gbps": received * 8 / window / 1e9 if window else None,
        "setup_s": setup_s,
        "cpu_s": cpu,
        "gateway_cpu_s_per_gb": gateway / gb if gb else None,
        "load_cpu_s": self_after - self_before,
        "machine_busy_s": busy_after - busy_before,
        "load_cpu_s_per_gb": (self_after - self_before) / gb if gb else None,
    }


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    # The benchmark stops an overdue run with SIGTERM: unwind, so every context manager
    # stops what it started (etcd, nodes, their s2ds) before the namespace goes.
    raise SystemExit(f"stopped by signal {signum}")


def main() -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="etcd-3")
    ap.add_argument("--conn-per-node", type=int, default=2)
    ap.add_argument("--total-conn", type=int, default=0, help="the same total for every config (0: per node)")
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    out = measure(args.config, args.conn_per_node, args.total_conn, args.seconds)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
