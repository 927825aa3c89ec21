"""Demo applications: a ZMQ producer/consumer with real payloads, and iperf3 wrappers.

The producer is the TCP server (it binds an XPUB socket, as 1.x's demo bound
PUB), the consumer connects through the gateway. Every message carries a
sequence number, its send time and a payload derived from the sequence number,
so the consumer reports messages, bytes, losses and corrupt payloads.
The producer waits for the first subscription before sending (no slow-joiner
loss) and never drops on a full queue (XPUB_NODROP): losses are real ones.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import time
from dataclasses import asdict, dataclass

import zmq

from scistream.cliutil import zmq_reason
from scistream.endpoints import parse_endpoint


class AppError(Exception):
    """A demo application cannot run; the message is one sentence."""


HEADER = struct.Struct("!QdI")  # sequence, send time (unix s), payload length
END_SEQ = 2**64 - 1


def payload_for(seq: int, size: int) -> bytes:
    """Deterministic from the sequence number: the consumer can check every byte."""
    if size <= 0:
        return b""
    word = seq.to_bytes(8, "big")
    return (word * (size // 8 + 1))[:size]


def zmq_address(endpoint: str) -> str:
    host, port = parse_endpoint(endpoint)
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


@dataclass
class Report:
    role: str
    messages: int = 0
    bytes: int = 0
    lost: int = 0
    corrupt: int = 0
    out_of_order: int = 0
    expected: int | None = None
    seconds: float = 0.0
    complete: bool = False

    @property
    def rate_bps(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> str:
        data = asdict(self)
        data["rate_bytes_per_s"] = round(self.rate_bps, 1)
        return json.dumps(data, sort_keys=True)

    def summary(self) -> str:
        exp = f"/{self.expected}" if self.expected is not None else ""
        return (
            f"{self.role}: {self.messages}{exp} messages, {self.bytes} bytes in {self.seconds:.2f} s "
            f"({self.rate_bps * 8 / 1e6:.1f} Mbit/s), lost {self.lost}, corrupt {self.corrupt}, "
            f"out of order {self.out_of_order}"
        )


def run_producer(
    bind: str,
    *,
    count: int = 1000,
    size: int = 1024,
    rate: float = 0.0,
    wait_subscriber: float = 60.0,
    linger: float = 10.0,
) -> Report:
    """Bind ``host:port``, wait for a subscriber, send ``count`` messages of ``size`` bytes.

    ``rate`` is messages per second (0: as fast as the path takes them).
    """
    ctx = zmq.Context()
    sock = ctx.socket(zmq.XPUB)
    report = Report(role="producer", expected=count)
    try:
        sock.setsockopt(zmq.XPUB_NODROP, 1)
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.setsockopt(zmq.LINGER, int(linger * 1000))
        try:
            sock.bind(zmq_address(bind))
        except zmq.ZMQError as exc:
            raise AppError(f"cannot listen on {bind}: {zmq_reason(exc)}") from None
        if not sock.poll(int(wait_subscriber * 1000), zmq.POLLIN):
            raise TimeoutError(f"no subscriber connected to {bind} within {wait_subscriber:g} s")
        sock.recv()  # the subscription message
        start = time.monotonic()
        interval = 1.0 / rate if rate > 0 else 0.0
        for seq in range(count):
            if interval:
                due = start + seq * interval
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            body = payload_for(seq, size)
            sock.send(HEADER.pack(seq, time.time(), len(body)) + body)
            report.messages += 1
            report.bytes += len(body)
        sock.send(HEADER.pack(END_SEQ, time.time(), 8) + count.to_bytes(8, "big"))
        report.seconds = time.monotonic() - start
        report.complete = True
        return report
    finally:
        sock.close()  # lingers until the queue is flushed (or linger expires)
        ctx.term()


def run_consumer(connect: str, *, timeout: float = 60.0, idle_timeout: float = 30.0) -> Report:
    """Connect to ``host:port``, receive until the end marker; count, check and report."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    report = Report(role="consumer")
    seen_max = -1
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        try:
            sock.connect(zmq_address(connect))
        except zmq.ZMQError as exc:
            raise AppError(f"cannot connect to {connect}: {zmq_reason(exc)}") from None
        deadline = time.monotonic() + timeout
        start: float | None = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            wait = min(left, idle_timeout) if start is not None else left
            if not sock.poll(int(wait * 1000), zmq.POLLIN):
                break
            msg = sock.recv()
            if len(msg) < HEADER.size:
                report.corrupt += 1
                continue
            seq, _sent, length = HEADER.unpack_from(msg)
            body = msg[HEADER.size :]
            if start is None:
                start = time.monotonic()
            if seq == END_SEQ:
                report.expected = int.from_bytes(body[:8], "big")
                report.complete = True
                break
            report.messages += 1
            report.bytes += len(body)
            if len(body) != length or body != payload_for(seq, length):
                report.corrupt += 1
            if seq < seen_max:
                report.out_of_order += 1
            seen_max = max(seen_max, seq)
        report.seconds = time.monotonic() - start if start is not None else 0.0
        if report.expected is not None:
            report.lost = max(report.expected - report.messages, 0)
        else:
            report.lost = max(seen_max + 1 - report.messages, 0)
        return report
    finally:
        sock.close(0)
        ctx.term()


def iperf3_binary() -> str:
    path = shutil.which("iperf3")
    if not path:
        raise FileNotFoundError("iperf3 is not installed (Debian package iperf3)")
    return path


def iperf_server_cmd(port: int, *, bind: str | None = None, one_off: bool = True) -> list[str]:
    cmd = [iperf3_binary(), "-s", "-p", str(port)]
    if bind:
        cmd += ["-B", bind]
    if one_off:
        cmd.append("-1")
    return cmd


def iperf_client_cmd(
    target: str,
    *,
    seconds: float = 10.0,
    nbytes: int = 0,
    parallel: int = 1,
    reverse: bool = False,
    as_json: bool = False,
) -> list[str]:
    host, port = parse_endpoint(target)
    cmd = [iperf3_binary(), "-c", host, "-p", str(port)]
    cmd += ["-n", str(nbytes)] if nbytes else ["-t", f"{seconds:g}"]
    if parallel > 1:
        cmd += ["-P", str(parallel)]
    if reverse:
        cmd.append("-R")
    if as_json:
        cmd.append("-J")
    return cmd


def run_foreground(cmd: list[str]) -> int:
    """Run a child in the foreground; Ctrl-C stops it, not us mid-report."""
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            return proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
