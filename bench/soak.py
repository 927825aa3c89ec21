"""RELIABILITY 26, the soak: both gateways carry a steady stream for 30 minutes while
sessions come and go, and every gateway process's RSS and open fds are sampled; their
slopes must be ~0.

    python bench/soak.py [--minutes 30] [--mbit 800] [--out bench/results]

(`./dev soak` runs it.) Two s2cs with their s2ds (native backend, TLS between the
gateways) on loopback, as `scistream demo` starts them; no root needed. One long
session of 4 connections carries a paced stream from a producer to a consumer for the
whole run; meanwhile a churn loop sets up a 2-connection session, reads 1 MiB through
each connection and releases it, over and over. Every ``--interval`` seconds, between
two churn sessions, each s2cs and s2ds is sampled (VmRSS, open fds). After a warm-up (a
sixth of the run, at least 2 minutes) a least-squares slope per process is fitted. The run fails (exit 1)
when a slope is over its limit, the stream stalls for a whole interval, a long-lived
connection breaks, a churn session fails or a gateway process dies. It writes
``soak.json`` (every sample) and ``soak.md`` (the verdict) to ``--out``.

This checks leaks and liveness; byte exactness is the test suite's job.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import socket
import statistics
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from gateways import controls, loopback_gateways, release_session, setup_session

from scistream.demo import Demo, descendants

log = logging.getLogger("soak")

LONG_CONNS = 4
CHURN_CONNS = 2
CHURN_BYTES = 1 << 20
CHURN_PAUSE_S = 0.5
BLOCK = 256 << 10
RSS_LIMIT_KIB_PER_MIN = 64.0  # 2 MiB over 30 minutes
FD_LIMIT_PER_MIN = 0.05  # not one fd more over 20 minutes


class PacedProducer:
    """A TCP server that sends every connection a steady stream at ``rate`` bytes/s."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.block = os.urandom(BLOCK)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.5)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        """Send block after block on a schedule; a consumer that goes away ends it."""
        with conn, contextlib.suppress(OSError):
            conn.settimeout(30)
            due = time.monotonic()
            while not self.stop.is_set():
                conn.sendall(self.block)
                due += BLOCK / self.rate
                delay = due - time.monotonic()
                if delay > 0:
                    self.stop.wait(delay)

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        self.acceptor.join(5)
        for t in self.threads:
            t.join(35)


@dataclass
class Problems:
    """Everything that fails the soak, counted, with the first few messages kept."""

    counts: dict[str, int] = field(default_factory=dict)
    first: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, message: str) -> None:
        with self.lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            if len(self.first) < 10:
                self.first.append(f"{kind}: {message}")
        log.warning("%s: %s", kind, message)


class Consumer:
    """Reads the long session's connections for the whole run, counting bytes. A connection
    that ends before the run does is a problem; the consumer then connects again."""

    def __init__(self, listeners: list[str], problems: Problems) -> None:
        self.bytes = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.problems = problems
        self.threads = [threading.Thread(target=self._read, args=(ep,), daemon=True) for ep in listeners]
        for t in self.threads:
            t.start()

    def _read(self, endpoint: str) -> None:
        host, port = endpoint.rsplit(":", 1)
        buf = bytearray(1 << 20)
        while not self.stop.is_set():
            try:
                with socket.create_connection((host, int(port)), timeout=10) as s:
                    while not self.stop.is_set():
                        n = s.recv_into(buf)
                        if n == 0:
                            raise ConnectionError("EOF from the consumer's gateway")
                        with self.lock:
                            self.bytes += n
            except OSError as exc:
                if not self.stop.is_set():
                    self.problems.add("long connection broke", f"{endpoint}: {exc}")
                    self.stop.wait(1)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)


def read_exactly(endpoint: str, n: int) -> None:
    host, port = endpoint.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as s:
        buf = bytearray(1 << 20)
        got = 0
        while got < n:
            k = s.recv_into(buf, min(len(buf), n - got))
            if k == 0:
                raise ConnectionError(f"EOF after {got} of {n} bytes")
            got += k


def churn(
    demo: Demo,
    producer: str,
    stop: threading.Event,
    problems: Problems,
    done: list[int],
    in_session: threading.Lock,
) -> None:
    """Set up a session, read through each of its connections, release it; until stopped.
    ``in_session`` is held from set-up to release, so a sampler that takes it counts the
    gateways' fds between sessions, not a churn session's transient ones."""
    prod, cons = controls(demo)
    try:
        while not stop.is_set():
            uid = str(uuid.uuid4())
            try:
                with in_session:
                    listeners = setup_session(prod, cons, uid, CHURN_CONNS, [producer] * CHURN_CONNS)
                    try:
                        for ep in listeners:
                            read_exactly(ep, CHURN_BYTES)
                    finally:
                        release_session(prod, cons, uid)
                done[0] += 1
            except Exception as exc:  # every failure is counted and fails the soak
                problems.add("churn session failed", f"{uid}: {exc}")
            stop.wait(CHURN_PAUSE_S)
    finally:
        prod.close()
        cons.close()


def process_name(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [Path(a.decode(errors="replace")).name for a in argv if a]
    for name in ("s2cs", "s2ds"):
        if any(name in w for w in words):
            return name
    return words[0] if words else "?"


def sample_process(pid: int) -> tuple[int, int] | None:
    """(VmRSS in KiB, open fds) or None when the process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    rss = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return rss, fds


def gateway_pids(demo: Demo) -> dict[str, int]:
    """'producer s2cs' -> pid, ... for both gateways' s2cs and s2ds."""
    out: dict[str, int] = {}
    for fac in demo.facilities.values():
        pids: set[int] = set()
        for proc in fac.procs:
            pids |= {proc.pid} | descendants(proc.pid)
        for pid in sorted(pids):
            out[f"{fac.name} {process_name(pid)} ({pid})"] = pid
    return out


def slope_per_minute(times: list[float], values: list[float]) -> float:
    """Least-squares slope of values over times (seconds), per minute."""
    if len(times) < 3:
        return 0.0
    return float(statistics.linear_regression(times, values).slope) * 60


@dataclass
class Sample:
    t: float  # seconds since the start
    mbit: float  # the long stream over the last interval
    procs: dict[str, tuple[int, int]]  # process -> (VmRSS KiB, open fds)


@dataclass
class Trend:
    """One gateway process over the samples after the warm-up."""

    process: str
    rss_kib: list[float]
    fds: list[float]
    rss_slope: float  # KiB per minute
    fd_slope: float  # fds per minute

    @property
    def ok(self) -> bool:
        return self.rss_slope <= RSS_LIMIT_KIB_PER_MIN and abs(self.fd_slope) <= FD_LIMIT_PER_MIN

    def as_dict(self) -> dict[str, object]:
        return {
            "process": self.process,
            "rss_first_kib": self.rss_kib[0],
            "rss_last_kib": self.rss_kib[-1],
            "rss_max_kib": max(self.rss_kib),
            "rss_slope_kib_per_min": self.rss_slope,
            "fds_min": min(self.fds),
            "fds_max": max(self.fds),
            "fds_slope_per_min": self.fd_slope,
            "ok": self.ok,
        }


def trends(samples: list[Sample], warmup_s: float) -> list[Trend]:
    kept = [s for s in samples if s.t >= warmup_s]
    out = []
    for name in sorted({n for s in samples for n in s.procs}):
        pts = [(s.t, s.procs[name]) for s in kept if name in s.procs]
        if not pts:
            continue
        t = [p[0] for p in pts]
        rss = [float(p[1][0]) for p in pts]
        fds = [float(p[1][1]) for p in pts]
        out.append(Trend(name, rss, fds, slope_per_minute(t, rss), slope_per_minute(t, fds)))
    return out


def render(meta: dict[str, float | int | str], rows: list[Trend], problems: Problems, ok: bool) -> str:
    lines = [
        "# Soak (RELIABILITY 26)",
        "",
        f"Run {meta['date']}, {meta['minutes']} min, kernel {meta['kernel']}, {meta['cpus']} CPUs: "
        f"{LONG_CONNS} long connections at {meta['mbit']} Mbit/s in all (TLS between the gateways), "
        f"{meta['churn_sessions']} churn sessions of {CHURN_CONNS} connections set up, read and "
        f"released; stream average {float(meta['stream_mbit']):.0f} Mbit/s, slowest interval "
        f"{float(meta['stream_min_mbit']):.0f} Mbit/s. Slopes are fitted after a "
        f"{float(meta['warmup_min']):.0f}-minute warm-up.",
        "",
        "| process | RSS first → last (MiB) | RSS max (MiB) | RSS slope (KiB/min) | fds min-max "
        "| fd slope (/min) | ok |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.process} | {r.rss_kib[0] / 1024:.1f} → {r.rss_kib[-1] / 1024:.1f} "
            f"| {max(r.rss_kib) / 1024:.1f} | {r.rss_slope:+.1f} | {min(r.fds):.0f}-{max(r.fds):.0f} "
            f"| {r.fd_slope:+.3f} | {'yes' if r.ok else '**no**'} |"
        )
    lines += [
        "",
        f"Limits: RSS slope <= {RSS_LIMIT_KIB_PER_MIN:.0f} KiB/min, |fd slope| <= {FD_LIMIT_PER_MIN} /min.",
        f"Problems: {problems.counts or 'none'}",
        *[f"- {m}" for m in problems.first],
        "",
        f"**Verdict: {'pass' if ok else 'FAIL'}**",
        "",
    ]
    return "\n".join(lines)


def run(minutes: float, mbit: float, interval: float, out: Path) -> bool:
    problems = Problems()
    samples: list[Sample] = []
    rates: list[float] = []
    churned = [0]
    # data ports: the long session's, and room for churn sessions released lazily
    with loopback_gateways(num_conn=64) as demo:
        producer = PacedProducer(mbit * 1e6 / 8 / LONG_CONNS)
        prod, cons = controls(demo)
        uid = str(uuid.uuid4())
        consumer: Consumer | None = None
        stop = threading.Event()
        in_session = threading.Lock()
        churner = threading.Thread(
            target=churn, args=(demo, producer.address, stop, problems, churned, in_session)
        )
        try:
            listeners = setup_session(prod, cons, uid, LONG_CONNS, [producer.address] * LONG_CONNS)
            consumer = Consumer(listeners, problems)
            churner.start()
            pids = gateway_pids(demo)
            log.info("soak: %.0f min, gateway processes %s", minutes, ", ".join(pids))
            t0 = time.monotonic()
            last_bytes, last_t = 0, t0
            while (now := time.monotonic()) - t0 < minutes * 60:
                time.sleep(min(interval, max(0.0, t0 + minutes * 60 - now)))
                now = time.monotonic()
                with consumer.lock:
                    total = consumer.bytes
                mbit_now = (total - last_bytes) * 8 / 1e6 / (now - last_t)
                last_bytes, last_t = total, now
                rates.append(mbit_now)
                if mbit_now == 0:
                    problems.add("stream stalled", f"no byte in {interval:.0f} s at t={now - t0:.0f} s")
                procs: dict[str, tuple[int, int]] = {}
                with in_session:  # between two churn sessions
                    for name, pid in pids.items():
                        got = sample_process(pid)
                        if got is None:
                            problems.add("gateway process died", name)
                        else:
                            procs[name] = got
                pids = {n: p for n, p in pids.items() if n in procs}
                samples.append(Sample(now - t0, mbit_now, procs))
                log.info(
                    "t=%4.0f s  %6.0f Mbit/s  churn %d  %s", now - t0, mbit_now, churned[0],
                    "  ".join(f"{n.split(' (')[0]} {v[0] // 1024} MiB {v[1]} fds" for n, v in procs.items()),
                )
        finally:
            stop.set()
            if churner.is_alive():
                churner.join(60)
            if consumer:
                consumer.close()
            with contextlib.suppress(Exception):
                release_session(prod, cons, uid)
            prod.close()
            cons.close()
            producer.close()
    warmup_s = min(max(120.0, minutes * 60 / 6), minutes * 60 / 2)  # short trial runs keep half
    rows = trends(samples, warmup_s)
    ok = bool(rows) and all(r.ok for r in rows) and not problems.counts
    meta: dict[str, float | int | str] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "minutes": minutes,
        "mbit": mbit,
        "interval_s": interval,
        "warmup_min": warmup_s / 60,
        "kernel": os.uname().release,
        "cpus": os.cpu_count() or 0,
        "churn_sessions": churned[0],
        "stream_mbit": statistics.fmean(rates) if rates else 0.0,
        "stream_min_mbit": min(rates) if rates else 0.0,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "rows": [r.as_dict() for r in rows],
                "problems": problems.counts,
                "samples": [dataclasses.asdict(s) for s in samples],
            },
            indent=1,
        )
    )
    (out / "soak.md").write_text(render(meta, rows, problems, ok))
    log.info("soak: wrote %s and %s; %s", out / "soak.json", out / "soak.md", "pass" if ok else "FAIL")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the run (30)")
    parser.add_argument("--mbit", type=float, default=800.0, help="the long stream's total rate (800)")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples (10)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output folder")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.mbit <= 0 or args.interval <= 0:
        parser.error("--minutes, --mbit and --interval must be positive")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    return 0 if run(args.minutes, args.mbit, args.interval, args.out) else 1


if __name__ == "__main__":
    sys.exit(main())
