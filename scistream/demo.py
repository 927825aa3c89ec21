"""``scistream demo``: the whole product in one command, verified end to end.

Two facilities, each an s2cs with its own s2ds (separate state directories and
ports); a producer application serving a deterministic stream; the two-sided
``s2uc stream`` over TLS control channels sets both gateways up (the producer's
application controller says hello); a consumer reads everything through both
gateways; then ``s2uc release`` gives every port and process back, and the demo
checks that it did. With ``--netns`` (root) the four hosts of the VM tutorial
are network namespaces and the producer can reach the consumer only through the
gateways. With ``--nodes N`` (root; :mod:`scistream.demo_nodes`) each facility is
N gateway nodes on an etcd cluster of its own, and the session spreads over them.
Everything started is stopped by PID at the end, on failure and on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, cast

import click

from scistream import netns
from scistream.cliutil import Seconds
from scistream.demo_apps import Stream, slices
from scistream.endpoints import format_endpoint, parse_endpoint
from scistream.programs import tool_argv

log = logging.getLogger(__name__)

CLK_TCK = os.sysconf("SC_CLK_TCK")


class DemoError(Exception):
    """A step of the demo failed; the message is one sentence for the user."""


# --------------------------------------------------------------------------- processes
def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(")") + 2 :].split()  # comm may contain spaces


def descendants(root: int) -> set[int]:
    """Live PIDs of ``root``'s process tree, root included (if alive)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields and fields[0] != "Z":
                parents[int(entry)] = int(fields[1])
    tree = {root} if root in parents else set()
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return tree


def tree_cpu_seconds(root: int) -> float:
    """utime+stime of ``root`` and its live descendants, plus their reaped children."""
    ticks = 0
    for pid in descendants(root) or {root}:
        f = _stat_fields(pid)
        if f:  # after ')': state ppid ... utime=11 stime=12 cutime=13 cstime=14
            ticks += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return ticks / CLK_TCK


# --------------------------------------------------------------------------- ports
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_port_range(count: int, host: str = "127.0.0.1") -> tuple[int, int]:
    """``count`` consecutive ports that are free now (the s2cs data port range)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000 - count)
        socks: list[socket.socket] = []
        try:
            for p in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind((host, p))
            return base, base + count - 1
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise DemoError(f"found no {count} consecutive free ports on {host}")


BIND_CHECK = (
    "import socket,sys\n"
    "bad=[]\n"
    "for ep in sys.argv[1:]:\n"
    "    h,_,p=ep.rpartition(':')\n"
    "    s=socket.socket(socket.AF_INET6 if ':' in h else socket.AF_INET)\n"
    # SO_REUSEADDR: connections in TIME_WAIT do not count, only a listener does.
    "    s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
    "    try: s.bind((h.strip('[]'),int(p)))\n"
    "    except OSError: bad.append(ep)\n"
    "    finally: s.close()\n"
    "print(','.join(bad))\n"
)


# --------------------------------------------------------------------------- the run
CLUSTER_ENV = frozenset(f"SCISTREAM_{v}" for v in (
    "ETCD", "NODE_NAME", "NODE_TTL", "ETCD_KEY_FILE", "ETCD_PREFIX", "PLACEMENT"))

@dataclass
class Options:
    size: int
    num_conn: int
    security: str
    backend: str
    use_netns: bool
    keep: bool
    seed: int
    engine: str
    timeout: float
    corrupt_at: int = -1  # tests: the producer flips the byte at this offset
    s2ds_args: tuple[str, ...] = ()  # tests: extra `s2ds serve` options (e.g. --tcp-user-timeout)
    nodes: int = 1  # gateway nodes per facility; more than 1: etcd clusters in namespaces


@dataclass
class Facility:
    """One side's gateway node: its s2ds (native backend) and s2cs."""

    name: str  # "producer" / "consumer" (with --nodes: "producer-p1", ...)
    host: str | None  # the gateway namespace with --netns / --nodes
    state_dir: Path
    control: str  # host:port s2uc reaches the s2cs at
    hello_control: str  # host:port the application's controller reaches it at
    listener_ip: str
    port_range: tuple[int, int]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    children_seen: set[int] = field(default_factory=set)
    s2cs_argv: list[str] = field(default_factory=list)
    s2cs_extra: list[str] = field(default_factory=list)  # e.g. a cluster node's etcd options

    def cpu_seconds(self) -> float:
        return sum(tree_cpu_seconds(p.pid) for p in self.procs)

    def snapshot_children(self) -> None:
        for p in self.procs:
            self.children_seen |= descendants(p.pid)


@dataclass
class Report:
    ok: bool = False
    uid: str = ""
    size: int = 0
    num_conn: int = 0
    security: str = ""
    backend: str = ""
    netns: bool = False
    setup_seconds: float = 0.0
    transfer_seconds: float = 0.0
    gbps: float = 0.0
    gateway_cpu: dict[str, float] = field(default_factory=dict)
    slices_ok: int = 0
    slices: list[dict[str, Any]] = field(default_factory=list)
    stream_digest: str = ""
    expected_digest: str = ""
    released: bool = False
    ports_rebindable: bool = False
    ports_still_bound: list[str] = field(default_factory=list)
    processes_left: list[int] = field(default_factory=list)
    listeners: dict[str, list[str]] = field(default_factory=dict)
    nodes: int = 1
    placement: list[dict[str, Any]] = field(default_factory=list)  # --nodes: connection -> nodes
    workdir: str = ""
    error: str = ""


def _combine(digests: Sequence[str]) -> str:
    """One digest for the stream: SHA-256 over the slices' SHA-256s in order."""
    return hashlib.sha256("".join(digests).encode()).hexdigest()


class Demo:
    """Runs the demo once; ``close`` undoes everything it started, in reverse."""

    gateways_step = "starting two gateways (s2cs + s2ds each)"

    def __init__(self, opts: Options, echo: Callable[[str], None]) -> None:
        self.opts = opts
        self.echo = echo
        self.stack = contextlib.ExitStack()
        self.topo: netns.Topology | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self.workdir = Path(tempfile.mkdtemp(prefix="scistream-demo-"))
        self.report = Report(size=opts.size, num_conn=opts.num_conn, security=opts.security,
                             backend=opts.backend, netns=opts.use_netns, nodes=opts.nodes,
                             workdir=str(self.workdir))
        # --nodes alone decides whether the gateways form clusters: an operator's
        # SCISTREAM_ETCD & co. (read by every s2cs) must not turn the demo's into nodes.
        self.env = {k: v for k, v in os.environ.items() if k not in CLUSTER_ENV}
        self.env.update(SCISTREAM_HOME=str(self.workdir / "s2uc"), PYTHONUNBUFFERED="1")
        if opts.engine:
            self.env["SCISTREAM_ENGINE"] = opts.engine
        self.facilities: dict[str, Facility] = {}
        self.producer_endpoint = ""
        self.producer_proc: subprocess.Popen[bytes] | None = None
        self.cert = self.workdir / "server.crt"
        self._expected: list[str] = []
        self._expected_thread: threading.Thread | None = None

    # -- process plumbing ----------------------------------------------------
    @property
    def namespaced(self) -> bool:
        return self.topo is not None

    def wrap(self, host: str | None, argv: Sequence[str]) -> list[str]:
        """``argv`` run in ``host``'s namespace (as is on loopback, or for no host)."""
        if self.topo is not None and host:
            return self.topo.argv(cast(netns.Host, host), argv)
        return list(argv)

    def app_host(self, role: str) -> str | None:
        """Where the ``role`` ("producer"/"consumer") application runs (None: here)."""
        return role if self.namespaced else None

    def app_addr(self, role: str) -> str:
        return netns.ADDR[role] if self.namespaced else "127.0.0.1"

    def popen(self, host: str | None, argv: Sequence[str], log_name: str,
              stdout: int | IO[bytes] | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` (in ``host``'s namespace with --netns), logging to the work dir.

        New session: a Ctrl-C in the terminal reaches only the demo, which then
        stops its children in order instead of them all dying at once."""
        logf = open(self.workdir / f"{log_name}.log", "ab")  # noqa: SIM115 - closed below
        self.stack.callback(logf.close)
        proc = subprocess.Popen(self.wrap(host, argv), stdout=stdout if stdout is not None else logf,
                                stderr=logf, env=self.env, cwd=self.workdir, start_new_session=True)
        self.procs.append(proc)
        return proc

    def run_cmd(self, host: str | None, argv: Sequence[str], timeout: float
                ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.wrap(host, argv), capture_output=True, text=True, env=self.env,
                              cwd=self.workdir, timeout=timeout, check=False)

    def log_tail(self, name: str, lines: int = 5) -> str:
        path = self.workdir / f"{name}.log"
        if not path.exists():
            return ""
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])

    def close(self) -> None:
        for proc in reversed(self.procs):
            netns.stop_process(proc)
        self.stack.close()
        if self.topo is not None:
            self.topo.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- steps ---------------------------------------------------------------
    def build_hosts(self) -> None:
        o = self.opts
        if o.use_netns:
            self.topo = netns.Topology(prefix="ssdemo")
            self.topo.__enter__()
            a = netns.ADDR
            # s2uc runs on the consumer gateway; it reaches the producer's s2cs
            # across the WAN and its own on the consumer LAN side; each
            # application controller reaches its gateway on its LAN.
            prod_port, cons_port = 5000, 5000
            self.facilities["producer"] = Facility(
                "producer", "prod_gw", self.workdir / "prod", format_endpoint(a["prod_gw_wan"], prod_port),
                format_endpoint(a["prod_gw_lan"], prod_port), a["prod_gw_wan"], (5100, 5200))
            self.facilities["consumer"] = Facility(
                "consumer", "cons_gw", self.workdir / "cons", format_endpoint(a["cons_gw_lan"], cons_port),
                format_endpoint(a["cons_gw_lan"], cons_port), a["cons_gw_lan"], (5100, 5200))
            ips = [a["prod_gw_lan"], a["prod_gw_wan"], a["cons_gw_lan"], a["cons_gw_wan"]]
        else:
            for name in ("producer", "consumer"):
                port = free_port()
                ep = format_endpoint("127.0.0.1", port)
                self.facilities[name] = Facility(
                    name, None, self.workdir / name[:4], ep, ep, "127.0.0.1",
                    free_port_range(max(o.num_conn, 4)))
            ips = ["127.0.0.1"]
        from scistream.certs import make_self_signed

        # One control-channel certificate for both s2cs, so a single pinned file
        # (s2uc --server_cert) trusts both, as in the tutorial.
        make_self_signed(self.workdir, ips, name="server")

    def start_gateways(self) -> None:
        for fac in self.facilities.values():
            fac.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            control_sock = f"ipc://{fac.state_dir / 's2ds.sock'}"
            if self.opts.backend == "native":
                argv = [*tool_argv("s2ds"), "serve", "--control", control_sock]
                if self.opts.engine:
                    argv += ["--engine", self.opts.engine]
                argv += list(self.opts.s2ds_args)
                fac.procs.append(self.popen(fac.host, argv, f"{fac.name}-s2ds"))
            host, port = parse_endpoint(fac.control)
            argv = [*tool_argv("s2cs"), "--port", str(port), "--bind", "0.0.0.0" if self.namespaced else host,
                    "--listener-ip", fac.listener_ip,
                    "--port-range", f"{fac.port_range[0]}-{fac.port_range[1]}",
                    "--type", self.opts.backend, "--state-dir", str(fac.state_dir),
                    "--server_crt", str(self.cert), "--server_key", str(self.workdir / "server.key"),
                    "--security", self.opts.security, "--events", "off"]
            if self.opts.backend == "native":
                argv += ["--s2ds", control_sock]
            argv += fac.s2cs_extra
            fac.s2cs_argv = argv
            fac.procs.append(self.popen(fac.host, argv, f"{fac.name}-s2cs"))
        for fac in self.facilities.values():
            self._wait_listening(fac)

    def restart_s2cs(self, side: str) -> subprocess.Popen[bytes]:
        """Start ``side``'s s2cs again with the same options (after it was killed)."""
        fac = self.facilities[side]
        proc = self.popen(fac.host, fac.s2cs_argv, f"{fac.name}-s2cs")
        fac.procs = [p for p in fac.procs if p.poll() is None] + [proc]
        self._wait_listening(fac)
        return proc

    def s2ds_control(self, side: str) -> str:
        return f"ipc://{self.facilities[side].state_dir / 's2ds.sock'}"

    def _wait_listening(self, fac: Facility) -> None:
        _, port = parse_endpoint(fac.control)
        deadline = time.monotonic() + 20
        wrap: Callable[[Sequence[str]], list[str]] = functools.partial(self.wrap, fac.host)
        while time.monotonic() < deadline:
            for p in fac.procs:
                if p.poll() is not None:
                    why = self.log_tail(fac.name + "-s2cs") or self.log_tail(fac.name + "-s2ds")
                    raise DemoError(f"the {fac.name} gateway exited at start: {why}")
            try:
                netns.wait_for_listen(wrap, port, timeout=0.3)
                return
            except netns.NetnsError:
                continue
        raise DemoError(f"the {fac.name} s2cs did not listen on {fac.control} within 20 s")

    def start_producer(self) -> None:
        listen = format_endpoint(self.app_addr("producer"), 0)
        proc = self.popen(self.app_host("producer"), [
            sys.executable, "-m", "scistream.demo_apps", "producer", "--listen", listen,
            "--seed", str(self.opts.seed), "--corrupt-at", str(self.opts.corrupt_at)],
            "producer-app", stdout=subprocess.PIPE)
        self.producer_proc = proc
        assert proc.stdout is not None
        line = proc.stdout.readline()
        try:
            self.producer_endpoint = json.loads(line)["listening"]
        except (ValueError, KeyError):
            why = self.log_tail("producer-app")
            raise DemoError(f"the producer application did not start: {why}") from None

    def control_address(self, side: str) -> str:
        """Where s2uc reaches ``side``'s s2cs (HOST:PORT, or a list of them)."""
        return self.facilities[side].control

    def hello_address(self, side: str) -> str:
        """Where ``side``'s application controller says hello."""
        return self.facilities[side].hello_control

    def listener_hosts(self) -> list[tuple[str | None, list[str]]]:
        """The session's listeners grouped by the host (namespace) they live in."""
        return [(self.facilities[side].host, self.report.listeners.get(side, []))
                for side in ("producer", "consumer")]

    def s2uc_host(self) -> str | None:
        """Where s2uc runs: the consumer's gateway, as in the tutorial."""
        return "cons_gw" if self.namespaced else None

    def s2uc(self, args: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.run_cmd(self.s2uc_host(), [*tool_argv("s2uc"), *args], timeout)

    def setup_stream(self) -> list[str]:
        """The two-sided set-up as users type it: ``s2uc stream --appctrl`` on the
        consumer's gateway while each application's controller says hello to its
        own gateway (``appctrl mock``, as in the tutorial). Returns where the
        consumer connects."""
        uid = str(uuid.uuid1())
        self.report.uid = uid
        t0 = time.monotonic()
        s2uc = self.popen(self.s2uc_host(), [
            *tool_argv("s2uc"), "stream", "--prod-s2cs", self.control_address("producer"),
            "--cons-s2cs", self.control_address("consumer"),
            "--server_cert", str(self.cert), "--num_conn", str(self.opts.num_conn),
            "--security", self.opts.security, "--uid", uid, "--appctrl", "--json"],
            "s2uc", stdout=subprocess.PIPE)
        app_host, app_port = parse_endpoint(self.producer_endpoint)
        hellos = [
            self.popen(self.app_host("producer"), [
                *tool_argv("appctrl"), "mock", uid, self.hello_address("producer"), "INVALID_TOKEN",
                "PROD", app_host,
                "--ports", str(app_port), "--server_cert", str(self.cert)], "appctrl-producer"),
            self.popen(self.app_host("consumer"), [
                *tool_argv("appctrl"), "mock", uid, self.hello_address("consumer"), "INVALID_TOKEN",
                "CONS", self.app_addr("consumer"), "--ports", "5074",
                "--server_cert", str(self.cert)], "appctrl-consumer"),
        ]
        try:
            out, _ = s2uc.communicate(timeout=120)
            for h in hellos:
                h.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise DemoError("the stream set-up took more than 2 minutes") from None
        self.report.setup_seconds = time.monotonic() - t0
        for name, proc in (("s2uc", s2uc), ("appctrl-producer", hellos[0]),
                           ("appctrl-consumer", hellos[1])):
            if proc.returncode != 0:
                raise DemoError(f"{name} failed: {self.log_tail(name, 2)}")
        doc = json.loads(out)
        self.report.listeners = {"producer": list(doc["producer"]["listeners"]),
                                 "consumer": list(doc["consumer"]["listeners"])}
        return list(doc["connect"])

    def start_expected(self) -> None:
        """Compute the expected digests from the seed alone (not by either
        application), in a thread while the control plane is being set up."""
        def work() -> None:
            stream = Stream(self.opts.seed)
            self._expected = [stream.sha256(off, n)
                              for off, n in slices(self.opts.size, self.opts.num_conn)]

        self._expected = []
        self._expected_thread = threading.Thread(target=work, daemon=True)
        self._expected_thread.start()

    def transfer(self, connect: list[str], on_progress: Callable[[int], None]) -> None:
        if self._expected_thread is not None:
            self._expected_thread.join()
        expected = self._expected
        cpu0 = {n: f.cpu_seconds() for n, f in self.facilities.items()}
        t0 = time.monotonic()
        proc = self.popen(self.app_host("consumer"), [
            sys.executable, "-m", "scistream.demo_apps", "consumer", "--connect", ",".join(connect),
            "--size", str(self.opts.size), "--timeout", str(self.opts.timeout)],
            "consumer-app", stdout=subprocess.PIPE)
        assert proc.stdout is not None
        result: dict[str, Any] | None = None
        for raw in proc.stdout:
            msg = json.loads(raw)
            if "progress" in msg:
                on_progress(int(msg["progress"]))
            elif "result" in msg:
                result = msg["result"]
        proc.wait()
        elapsed = time.monotonic() - t0
        for fac in self.facilities.values():
            fac.snapshot_children()
        r = self.report
        r.gateway_cpu = {n: round(f.cpu_seconds() - cpu0[n], 3) for n, f in self.facilities.items()}
        if result is None:
            raise DemoError(f"the consumer application failed: {self.log_tail('consumer-app')}")
        r.transfer_seconds = float(result["seconds"]) or elapsed
        r.gbps = result["bytes"] * 8 / r.transfer_seconds / 1e9
        for got, want in zip(result["slices"], expected, strict=True):
            got["expected_sha256"] = want
            got["ok"] = not got["error"] and got["sha256"] == want
        r.slices = result["slices"]
        r.slices_ok = sum(1 for s in r.slices if s["ok"])
        r.stream_digest = _combine([s["sha256"] for s in r.slices])
        r.expected_digest = _combine(expected)

    def release(self) -> None:
        for fac in self.facilities.values():
            fac.snapshot_children()
        res = self.s2uc(["release", "--s2cs", self.control_address("producer"),
                         "--s2cs", self.control_address("consumer"),
                         "--server_cert", str(self.cert), self.report.uid])
        self.report.released = res.returncode == 0
        if not self.report.released:
            self.report.error = f"s2uc release failed: {(res.stderr or res.stdout).strip()}"
        # Ports must be bindable again at once: try each listener where it lives.
        still: list[str] = []
        deadline = time.monotonic() + 3
        for host, eps in self.listener_hosts():
            while eps:
                out = self.run_cmd(host, [sys.executable, "-c", BIND_CHECK, *eps], timeout=30)
                bad = [e for e in out.stdout.strip().split(",") if e]
                if not bad or time.monotonic() > deadline:
                    still += bad
                    break
                time.sleep(0.1)
        self.report.ports_still_bound = still
        self.report.ports_rebindable = not still

    def stop_processes(self) -> None:
        """Stop every process started, by PID (SIGTERM, then SIGKILL), newest first."""
        for proc in reversed(self.procs):
            netns.stop_process(proc)

    def stop_all(self) -> None:
        """Stop everything and check nothing is left."""
        self.stop_processes()
        seen: set[int] = set()
        for fac in self.facilities.values():
            seen |= fac.children_seen
        seen |= {p.pid for p in self.procs}
        time.sleep(0.1)
        self.report.processes_left = sorted(pid for pid in seen if _alive(pid))

    def keep_running(self, connect: list[str]) -> None:
        prod, cons = self.facilities["producer"], self.facilities["consumer"]
        topo = self.topo

        def pre(host: netns.Host) -> str:
            return f"ip netns exec {topo.ns[host]} " if topo else ""

        env = f"SCISTREAM_HOME={self.env['SCISTREAM_HOME']} "
        s2uc = " ".join(tool_argv("s2uc"))  # the full path: the venv need not be on PATH
        lines = [
            "The gateways stay up; poke at them from another terminal:",
            f"  {env}{pre('cons_gw')}{s2uc} check-status --s2cs {prod.control} "
            f"--server_cert {self.cert} {self.report.uid}",
            f"  {env}{pre('cons_gw')}{s2uc} check-status --s2cs {cons.control} "
            f"--server_cert {self.cert} {self.report.uid}",
            f"  {pre('consumer')}{sys.executable} -m scistream.demo_apps consumer "
            f"--connect {','.join(connect)} --size {self.opts.size}",
            f"  logs: {self.workdir}/*.log",
            "Press Ctrl-C to release the session and stop everything.",
        ]
        with contextlib.suppress(KeyboardInterrupt):  # a Ctrl-C already while printing counts
            for line in lines:
                self.echo(line)
            while all(p.poll() is None for f in self.facilities.values() for p in f.procs):
                time.sleep(0.5)
            self.echo("a gateway process exited; cleaning up")


def _alive(pid: int) -> bool:
    f = _stat_fields(pid)
    return f is not None and f[0] != "Z"


# --------------------------------------------------------------------------- output
def _render(report: Report, console: Any) -> None:
    from rich.table import Table

    table = Table(title="scistream demo", show_header=False, title_style="bold")
    table.add_column(style="bold")
    table.add_column()
    mark = {True: "[green]yes[/]", False: "[red]NO[/]"}
    if report.nodes > 1:
        table.add_row("topology", f"2 facilities x {report.nodes} gateway nodes, a 3-member etcd "
                                  "cluster each, in network namespaces")
    else:
        table.add_row("topology", "4 network namespaces (VM tutorial)" if report.netns else "loopback")
    table.add_row("data channel", f"{report.security}, backend {report.backend}, "
                                  f"{report.num_conn} connection(s)")
    table.add_row("session", report.uid or "-")
    table.add_row("set-up (s2uc stream + hellos)", f"{report.setup_seconds * 1000:.0f} ms")
    table.add_row("transferred", f"{report.size / 2**20:.1f} MiB in {report.transfer_seconds:.2f} s")
    table.add_row("throughput", f"{report.gbps:.2f} Gbit/s")
    for side, cpu in report.gateway_cpu.items():
        cores = cpu / report.transfer_seconds if report.transfer_seconds else 0.0
        table.add_row(f"{side} gateway CPU", f"{cpu:.2f} s ({cores:.2f} cores)")
    table.add_row("SHA-256 verified", f"{mark[report.slices_ok == report.num_conn and report.ok]} "
                                      f"({report.slices_ok}/{report.num_conn} connections)")
    table.add_row("stream digest", report.stream_digest[:32] + "…" if report.stream_digest else "-")
    table.add_row("released", mark[report.released])
    still = f" still bound: {', '.join(report.ports_still_bound)}" if report.ports_still_bound else ""
    table.add_row("ports re-bindable", mark[report.ports_rebindable] + still)
    table.add_row("processes left", mark[not report.processes_left].replace("yes", "none")
                  .replace("NO", f"{len(report.processes_left)}"))
    console.print(table)
    if report.placement:
        _render_placement(report, console)
    for s in report.slices:
        if not s.get("ok"):
            console.print(f"[red]connection via {s['endpoint']}: "
                          f"{s['error'] or 'SHA-256 differs from the expected'}[/]")
    if report.error:
        console.print(f"[red]{report.error}[/]")


def _render_placement(report: Report, console: Any) -> None:
    """--nodes: which gateway node carried each connection, on both sides."""
    from rich.table import Table

    table = Table(title="connections over the gateway nodes", title_style="bold")
    table.add_column("#", justify="right")
    for col in ("consumer node, listener", "producer node, listener"):
        table.add_column(col, no_wrap=True)
    table.add_column("bytes", justify="right", no_wrap=True)
    table.add_column("SHA-256")
    for row in report.placement:
        table.add_row(str(row["connection"]), f"{row['consumer_node']} {row['consumer_listener']}",
                      f"{row['producer_node']} {row['producer_listener'] or '-'}",
                      f"{row['bytes'] / 2**20:.1f} MiB",
                      "[green]ok[/]" if row["ok"] else "[red]differs[/]")
    console.print(table)


class _Signals:
    """Ctrl-C, SIGTERM and SIGHUP unwind alike, as KeyboardInterrupt, and only once: the
    clean-up that follows must run to its end (a second Ctrl-C would leave processes and
    namespaces behind; every step of it is bounded in time). Once interrupted, the demo
    stays deaf to them until it exits, having printed its report."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.interrupted = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        self._old = {s: signal.signal(s, self._interrupt) for s in self.SIGNALS}
        return self

    def _interrupt(self, signum: int, frame: FrameType | None) -> None:
        self.interrupted = True
        self.deaf()  # at once: the next Ctrl-C may come before the clean-up starts
        raise KeyboardInterrupt

    def deaf(self) -> None:
        for s in self.SIGNALS:
            signal.signal(s, signal.SIG_IGN)

    def __exit__(self, *exc: object) -> None:
        if not self.interrupted:
            for s, h in self._old.items():
                signal.signal(s, h)


def run_demo(opts: Options, console: Any, show_progress: bool) -> Report:
    """Run the demo; always stop what it started. The report says what happened."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    def echo(line: str) -> None:
        console.print(line, markup=False, highlight=False, soft_wrap=True)

    if opts.nodes > 1:
        from scistream.demo_nodes import NodesDemo

        demo: Demo = NodesDemo(opts, echo)
    else:
        demo = Demo(opts, echo)
    report = demo.report
    try:
        with _Signals() as signals:
            try:
                status = console.status if show_progress else (lambda _m: contextlib.nullcontext())
                with status("building the hosts and certificates"):
                    demo.build_hosts()
                with status(demo.gateways_step):
                    demo.start_gateways()
                    demo.start_producer()
                demo.start_expected()
                with status("setting the stream up: s2uc stream + appctrl hellos on both sides"):
                    connect = demo.setup_stream()
                progress = Progress(TextColumn("consumer"), BarColumn(), DownloadColumn(binary_units=True),
                                    TransferSpeedColumn(), TimeRemainingColumn(), console=console,
                                    disable=not show_progress, transient=True)
                with progress:
                    task = progress.add_task("bytes", total=opts.size)
                    demo.transfer(connect, lambda n: progress.update(task, completed=n))
                report.ok = (report.slices_ok == opts.num_conn
                             and report.stream_digest == report.expected_digest)
                if opts.keep:
                    demo.keep_running(connect)
                demo.release()
            except DemoError as exc:
                report.error = str(exc)
            except KeyboardInterrupt:
                report.error = "interrupted; everything started was stopped"
                report.ok = False
            finally:
                signals.deaf()  # the clean-up runs to its end
                try:
                    demo.stop_all()
                finally:
                    demo.close()
    finally:
        demo.close()  # a no-op when it ran above
    return report


def _parse_size(text: str) -> int:
    from scistream.s2ds.units import parse_size

    try:
        size = parse_size(text.replace("iB", "").replace("B", "") if text[-1:] in "Bb" else text)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if size <= 0:
        raise click.BadParameter("the size must be positive")
    return size


@click.command("demo")
@click.option("--size", default="1GiB", show_default=True,
              help="Bytes the producer streams (K, M, G suffixes, binary).")
@click.option("--num-conn", "--num_conn", "num_conn", type=click.IntRange(1, 64), default=None,
              help="Parallel connections through the gateways [4; with --nodes N: 2N].")
@click.option("--security", type=click.Choice(["tls", "plain"]), default="tls", show_default=True,
              help="Data channel between the gateways: TLS 1.3 with a per-session key, or plain TCP.")
@click.option("--backend", type=click.Choice(["native", "stunnel", "haproxy"]), default="native",
              show_default=True, help="How the gateways move bytes (s2cs --type).")
@click.option("--netns", "use_netns", is_flag=True,
              help="Root: run the VM tutorial's four hosts as network namespaces.")
@click.option("--nodes", type=click.IntRange(1, netns.MAX_NODES), default=1, show_default=True,
              help="Root: gateway nodes per facility; above 1, each facility is N s2cs nodes on a "
                   "3-member etcd cluster in network namespaces and the session spreads over them.")
@click.option("--keep", is_flag=True, help="Leave it running and print commands to poke at it; Ctrl-C ends.")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=None,
              help="Seed of the producer's data [random].")  # packed as a uint64
@click.option("--engine", type=click.Choice(["native", "pure", "auto"]), default=None,
              help="s2ds engine [$SCISTREAM_ENGINE or auto].")
@click.option("--timeout", type=Seconds(0.1), default=60.0, show_default=True,
              help="Seconds the consumer waits on a silent connection.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON document.")
@click.option("--corrupt-at", type=int, default=-1, hidden=True,
              help="Self-test: the producer flips the byte at this offset; the demo must fail.")
def demo(*, size: str, num_conn: int | None, security: str, backend: str, use_netns: bool,
         nodes: int, keep: bool, seed: int | None, engine: str | None, timeout: float, as_json: bool,
         corrupt_at: int) -> None:
    """Two gateways, a producer, a consumer, real TLS: stream and verify every byte.

    Certificates, two s2cs (each with its s2ds), a producer application and the
    two-sided `s2uc stream` set-up; a consumer reads the stream through both
    gateways and its SHA-256 is checked; `s2uc release` gives everything back.
    With --nodes N each facility is N gateway nodes sharing a 3-member etcd
    cluster, and the session's connections spread over the nodes.
    Exits 1 if any byte differs or anything is left behind.
    """
    from rich.console import Console

    if use_netns and os.geteuid() != 0:
        raise click.ClickException("--netns needs root (network namespaces)")
    if nodes > 1 and os.geteuid() != 0:
        raise click.UsageError("--nodes needs root: the gateway nodes run in network namespaces")
    if num_conn is None:
        num_conn = 2 * nodes if nodes > 1 else 4  # every node carries connections
    opts = Options(size=_parse_size(size), num_conn=num_conn, security=security, backend=backend,
                   use_netns=use_netns or nodes > 1, keep=keep, nodes=nodes,
                   seed=seed if seed is not None else secrets.randbelow(2**31),
                   engine=engine or "", timeout=timeout, corrupt_at=corrupt_at)
    console = Console(stderr=as_json)
    report = run_demo(opts, console, show_progress=not as_json and console.is_terminal)
    clean = report.released and report.ports_rebindable and not report.processes_left
    if as_json:
        click.echo(json.dumps(report.__dict__, indent=1))
    else:
        _render(report, console)
    if not (report.ok and clean):
        raise SystemExit(1)
