"""Helpers of the robustness tests: what /proc says about a process, and attackers that open
many sockets and never finish what they started (RELIABILITY 17, 19)."""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import ssl
import time
from dataclasses import dataclass

from scistream.endpoints import parse_endpoint

log = logging.getLogger(__name__)
_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcSample:
    """What the kernel says one process holds."""

    fds: int
    threads: int
    rss: int  # bytes
    cpu: float  # user + system CPU seconds since start


def sample(pid: int) -> ProcSample:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = len(os.listdir(f"/proc/{pid}/task"))
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        # Fields after the ")" that closes the command name; utime and stime are 14 and 15.
        rest = f.read().rpartition(")")[2].split()
    cpu = (int(rest[11]) + int(rest[12])) / _TICK
    rss = 0
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return ProcSample(fds=fds, threads=threads, rss=rss, cpu=cpu)


def client_hello() -> bytes:
    """The first flight of a real TLS client (Python's ssl: TLS 1.2 and 1.3 offered)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16", "not a TLS handshake record"
    return hello


class Attack:
    """Sockets a test opened against one address and keeps open until the peer closes them.

    ``idle``: connect and never send a byte (slowloris). ``stalled_tls``: send all of a
    ClientHello but its last bytes, so the server sits mid-record in its handshake.
    """

    def __init__(self) -> None:
        self.socks: list[socket.socket] = []

    def idle(self, address: str, n: int) -> None:
        for _ in range(n):
            self.socks.append(socket.create_connection(parse_endpoint(address), timeout=10))

    def stalled_tls(self, address: str, n: int) -> None:
        partial = client_hello()[:-7]
        for _ in range(n):
            s = socket.create_connection(parse_endpoint(address), timeout=10)
            self.socks.append(s)
            s.sendall(partial)

    def open_count(self, wait: float = 0.0) -> int:
        """How many sockets the peer has not closed (EOF or reset) yet; polls for ``wait`` s."""
        return len(self.still_open(wait))

    def still_open(self, wait: float) -> list[socket.socket]:
        """Read every socket the peer has something for (alerts are read past); return the
        ones still open after ``wait`` seconds, or sooner once every one is closed."""
        live = set(self.socks)
        deadline = time.monotonic() + wait
        with selectors.DefaultSelector() as sel:
            for s in live:
                sel.register(s, selectors.EVENT_READ)
            while live:
                left = deadline - time.monotonic()
                for key, _ in sel.select(max(left, 0)):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    try:
                        data = sock.recv(4096, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        sel.unregister(sock)
                        live.discard(sock)
                if left <= 0:
                    break
        return [s for s in self.socks if s in live]

    def close(self) -> None:
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.close()
        self.socks.clear()


def short_connections(address: str, n: int, batch: int = 100, payload_size: int = 8) -> int:
    """``n`` short connections in batches of ``batch`` open at once: connect, send a few bytes
    (distinct per connection), read their echo, close. Returns the bytes echoed."""
    host, port = parse_endpoint(address)
    done = echoed = 0
    while done < n:
        socks: list[tuple[socket.socket, bytes]] = []
        try:
            for i in range(min(batch, n - done)):
                s = socket.create_connection((host, port), timeout=10)
                payload = (b"%08d" % (done + i)) * (payload_size // 8 or 1)
                socks.append((s, payload))
                s.sendall(payload)
            for s, payload in socks:
                got = b""
                while len(got) < len(payload):
                    chunk = s.recv(len(payload) - len(got))
                    assert chunk, f"connection {done} closed before its echo ({got!r})"
                    got += chunk
                assert got == payload
                echoed += len(got)
        finally:
            for s, _ in socks:
                s.close()
        done += len(socks)
    return echoed
