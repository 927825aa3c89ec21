"""The VM tutorial's four hosts as Linux network namespaces (root only).

::

    producer 192.168.10.10 ── lan_prod ── 192.168.10.11 producer gateway 192.168.20.10
        ── wan ── 192.168.20.11 consumer gateway 192.168.30.10 ── lan_cons ── 192.168.30.11 consumer

Every host has routes towards the far side through its gateway, but the gateways
do not forward IP (``net.ipv4.ip_forward=0``): the producer and the consumer can
reach each other only through a proxy running on the gateways, exactly as in the
tutorial's VMs. The veth ends are created directly inside the namespaces, so no
interface ever appears in the root namespace and concurrent topologies never
collide; namespace names carry a prefix, the creator's PID and a random suffix.

Nothing here sends traffic from the root namespace to the 192.168 addresses:
they exist only inside the namespaces.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

log = logging.getLogger(__name__)

Host = Literal["producer", "prod_gw", "cons_gw", "consumer"]
Link = Literal["lan_prod", "wan", "lan_cons"]

HOSTS: tuple[Host, ...] = ("producer", "prod_gw", "cons_gw", "consumer")
DEFAULT_PREFIX = "sst"
NETNS_DIR = "/var/run/netns"


@dataclass(frozen=True)
class LinkSpec:
    """One veth pair: (host, interface, address) at each end."""

    name: Link
    a_host: Host
    a_dev: str
    a_addr: str
    b_host: Host
    b_dev: str
    b_addr: str


#: The tutorial's addressing (shared/seeds/vm-tutorial.md). Interface names are
#: only unique per namespace, which is all they need to be.
LINKS: tuple[LinkSpec, ...] = (
    LinkSpec("lan_prod", "producer", "lan0", "192.168.10.10", "prod_gw", "lan0", "192.168.10.11"),
    LinkSpec("wan", "prod_gw", "wan0", "192.168.20.10", "cons_gw", "wan0", "192.168.20.11"),
    LinkSpec("lan_cons", "cons_gw", "lan0", "192.168.30.10", "consumer", "lan0", "192.168.30.11"),
)

#: Static routes that would let producer and consumer talk if the gateways
#: forwarded IP; they make "the gateways do not forward" the only barrier.
ROUTES: Mapping[Host, tuple[tuple[str, str], ...]] = {
    "producer": (("default", "192.168.10.11"),),
    "prod_gw": (("192.168.30.0/24", "192.168.20.11"),),
    "cons_gw": (("192.168.10.0/24", "192.168.20.10"),),
    "consumer": (("default", "192.168.30.10"),),
}

#: Convenient names for the addresses the tutorial uses.
ADDR: Mapping[str, str] = {
    "producer": "192.168.10.10",
    "prod_gw_lan": "192.168.10.11",
    "prod_gw_wan": "192.168.20.10",
    "cons_gw_wan": "192.168.20.11",
    "cons_gw_lan": "192.168.30.10",
    "consumer": "192.168.30.11",
}


class NetnsError(RuntimeError):
    """A namespace command failed; the message names the command and its error."""


def require_root() -> None:
    if os.geteuid() != 0:
        raise NetnsError("network namespaces need root (run as root or with sudo)")


def _ip(*args: str) -> None:
    _check(["ip", *args])


def _check(argv: Sequence[str]) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def list_namespaces(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Names of existing namespaces that start with ``prefix``."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Delete namespaces ``<prefix><pid>-...`` whose creating process is gone.

    A topology cleans up after itself; this catches what a SIGKILLed run left.
    Namespaces of live creators are never touched.
    """
    removed = []
    for name in list_namespaces(prefix):
        pid_text = name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
            removed.append(name)
    return removed


def ns_argv(ns: str, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside namespace ``ns`` (``ip netns exec`` execs it: same PID)."""
    return ["ip", "netns", "exec", ns, *argv]


class Topology:
    """Context manager: build the four namespaces on enter, remove them on exit.

    Processes started with :meth:`popen` are stopped (SIGTERM, then SIGKILL) before
    the namespaces go, so nothing keeps a namespace alive after exit.
    """

    def __init__(self, prefix: str = DEFAULT_PREFIX, *, congestion: str = "",
                 mtu: int = 0) -> None:
        self.prefix = prefix
        self.tag = f"{prefix}{os.getpid()}-{secrets.token_hex(3)}"
        self.congestion = congestion  # e.g. "reno" for comparable throughput figures
        self.mtu = mtu
        self.ns: dict[Host, str] = {h: f"{self.tag}-{h.replace('_', '')}" for h in HOSTS}
        self._procs: list[subprocess.Popen[Any]] = []
        self._created: list[str] = []
        self._cuts: set[Link] = set()

    # -- lifecycle -----------------------------------------------------------
    def __enter__(self) -> Topology:
        require_root()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _build(self) -> None:
        for host in HOSTS:
            _ip("netns", "add", self.ns[host])
            self._created.append(self.ns[host])
            self.sh(host, "ip", "link", "set", "lo", "up")
            forward = "0"  # the gateways are proxies, not routers
            self.sh(host, "sysctl", "-qw", f"net.ipv4.ip_forward={forward}")
            if self.congestion:
                self.sh(host, "sysctl", "-qw", f"net.ipv4.tcp_congestion_control={self.congestion}")
        for link in LINKS:
            _ip("link", "add", link.a_dev, "netns", self.ns[link.a_host], "type", "veth",
                "peer", "name", link.b_dev, "netns", self.ns[link.b_host])
            for host, dev, addr in ((link.a_host, link.a_dev, link.a_addr),
                                    (link.b_host, link.b_dev, link.b_addr)):
                self.sh(host, "ip", "addr", "add", f"{addr}/24", "dev", dev)
                if self.mtu:
                    self.sh(host, "ip", "link", "set", dev, "mtu", str(self.mtu))
                self.sh(host, "ip", "link", "set", dev, "up")
        for host, routes in ROUTES.items():
            for dest, via in routes:
                self.sh(host, "ip", "route", "add", dest, "via", via)
        log.debug("topology %s up", self.tag)

    def close(self) -> None:
        """Stop the processes this topology started, then delete its namespaces."""
        for proc in reversed(self._procs):
            stop_process(proc)
        self._procs.clear()
        for name in reversed(self._created):
            proc = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True,
                                  check=False)
            if proc.returncode != 0 and name in list_namespaces(self.prefix):
                log.warning("could not delete namespace %s: %s", name, proc.stderr.strip())
        self._created.clear()

    # -- running things ------------------------------------------------------
    def argv(self, host: Host, argv: Sequence[str]) -> list[str]:
        return ns_argv(self.ns[host], argv)

    def popen(self, host: Host, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``host``; stopped by :meth:`close` if still running."""
        proc = subprocess.Popen(self.argv(host, argv), **kwargs)
        self._procs.append(proc)
        return proc

    def run(self, host: Host, argv: Sequence[str], *, timeout: float = 60,
            check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        kwargs.setdefault("capture_output", True)
        return subprocess.run(self.argv(host, argv), timeout=timeout, check=check, **kwargs)

    def sh(self, host: Host, *argv: str) -> str:
        """Run a set-up command in ``host``; NetnsError with its stderr on failure."""
        return _check(self.argv(host, argv))

    # -- impairments ---------------------------------------------------------
    def _ends(self, link: Link) -> Iterator[tuple[Host, str]]:
        for spec in LINKS:
            if spec.name == link:
                yield spec.a_host, spec.a_dev
                yield spec.b_host, spec.b_dev
                return
        raise NetnsError(f"unknown link {link!r}; links: {', '.join(s.name for s in LINKS)}")

    def shape(self, link: Link, rate: str, *, burst: str = "", latency: str = "50ms") -> None:
        """Token-bucket (tbf) both ends of ``link`` to ``rate`` (e.g. "100mbit")."""
        # A burst of ~1/100 s of the rate (at least 32 KiB) keeps tbf accurate
        # without starving TCP's segmentation offload.
        burst = burst or f"{max(32 * 1024, _rate_bits(rate) // 8 // 100)}b"
        for host, dev in self._ends(link):
            self.sh(host, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                    "rate", rate, "burst", burst, "latency", latency)

    def unshape(self, link: Link) -> None:
        for host, dev in self._ends(link):
            subprocess.run(self.argv(host, ["tc", "qdisc", "del", "dev", dev, "root"]),
                           capture_output=True, check=False)

    def cut(self, link: Link) -> None:
        """Silently drop every packet on ``link`` (both ends, both directions).

        iptables DROP rather than ``ip link set down``: a downed link flushes
        routes and makes the kernel answer with errors at once, while a real WAN
        outage is silence, which is what TCP must ride out.
        """
        for host, dev in self._ends(link):
            self.sh(host, "iptables", "-I", "INPUT", "-i", dev, "-j", "DROP")
            self.sh(host, "iptables", "-I", "OUTPUT", "-o", dev, "-j", "DROP")
        self._cuts.add(link)

    def restore(self, link: Link) -> None:
        """Undo :meth:`cut`."""
        for host, dev in self._ends(link):
            self.sh(host, "iptables", "-D", "INPUT", "-i", dev, "-j", "DROP")
            self.sh(host, "iptables", "-D", "OUTPUT", "-o", dev, "-j", "DROP")
        self._cuts.discard(link)

    def blackhole(self, host: Host, dest: str) -> None:
        """Route ``dest`` (address or prefix) to nowhere from ``host``: packets vanish."""
        self.sh(host, "ip", "route", "add", "blackhole", dest)

    def unblackhole(self, host: Host, dest: str) -> None:
        self.sh(host, "ip", "route", "del", "blackhole", dest)


def _rate_bits(rate: str) -> int:
    """Bits per second of a tc rate such as ``100mbit`` / ``1gbit`` / ``500kbit``."""
    text = rate.strip().lower()
    for suffix, mult in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3), ("bit", 1)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * mult)
    return int(text)


def stop_process(proc: subprocess.Popen[Any], timeout: float = 3.0) -> None:
    """SIGTERM, wait, then SIGKILL: stop one process we started, by its PID."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass


def stop_processes(procs: Sequence[subprocess.Popen[Any]], timeout: float = 3.0) -> None:
    """:func:`stop_process` for many at once: SIGTERM to all, one shared wait, then
    SIGKILL to what is left, so stopping N processes takes one timeout, not N."""
    live = [p for p in procs if p.poll() is None]
    for proc in live:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in live:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


class PrivateNamespace:
    """One namespace with only ``lo`` up (BENCHMARKING.md's measuring method)."""

    def __init__(self, prefix: str = DEFAULT_PREFIX, *, congestion: str = "reno") -> None:
        self.prefix = prefix
        self.name = f"{prefix}{os.getpid()}-{secrets.token_hex(3)}-bench"
        self.congestion = congestion

    def __enter__(self) -> PrivateNamespace:
        require_root()
        _ip("netns", "add", self.name)
        try:
            _check(ns_argv(self.name, ["ip", "link", "set", "lo", "up"]))
            if self.congestion:
                _check(ns_argv(self.name, ["sysctl", "-qw",
                                           f"net.ipv4.tcp_congestion_control={self.congestion}"]))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ns_argv(self.name, argv)

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)


def wait_for_listen(wrap: Callable[[Sequence[str]], list[str]], port: int,
                    timeout: float = 10.0) -> None:
    """Wait until a TCP socket listens on ``port`` where ``wrap`` runs commands
    (e.g. ``functools.partial(topo.argv, "producer")`` or ``private_ns.argv``)."""
    deadline = time.monotonic() + timeout
    argv = wrap(["ss", "-Hltn", f"sport = :{port}"])
    while time.monotonic() < deadline:
        if subprocess.run(argv, capture_output=True, text=True, check=False).stdout.strip():
            return
        time.sleep(0.05)
    raise NetnsError(f"nothing listens on port {port} after {timeout:.0f} s")


# --------------------------------------------------------------------------- multi-node facilities
#: The three segments of a facility topology and their /24s. The WAN is shared by
#: both facilities' gateways; each LAN by one facility's gateways and its host.
SEGMENTS: Mapping[str, str] = {"plan": "192.168.10", "wan": "192.168.20", "clan": "192.168.30"}
MAX_NODES = 5


class FacilityTopology:
    """Two facilities of ``nodes`` gateway namespaces each, as network namespaces.

    ::

        producer .10 ─ plan 192.168.10/24 ─ p1..pN .11-.15 ─ wan 192.168.20/24 (p .11-.15, c .21-.25)
            ─ c1..cN .11-.15 ─ clan 192.168.30/24 ─ consumer .10

    Each segment is a bridge in a namespace of its own (``sw``), so no interface
    ever appears in the root namespace. As in :class:`Topology` the gateways do not
    forward IP: producer and consumer meet only through a proxy on a gateway. Hosts
    are ``producer``, ``consumer``, ``p1``..``pN`` (the producer facility's gateway
    nodes) and ``c1``..``cN`` (the consumer's).
    """

    def __init__(self, nodes: int, prefix: str = DEFAULT_PREFIX) -> None:
        if not 1 <= nodes <= MAX_NODES:
            raise NetnsError(f"a facility has 1 to {MAX_NODES} gateway nodes, not {nodes}")
        self.nodes = nodes
        self.prefix = prefix
        self.tag = f"{prefix}{os.getpid()}-{secrets.token_hex(3)}"
        self.gateways: dict[str, list[str]] = {
            "producer": [f"p{i}" for i in range(1, nodes + 1)],
            "consumer": [f"c{i}" for i in range(1, nodes + 1)],
        }
        self.hosts = ["producer", "consumer", *self.gateways["producer"], *self.gateways["consumer"]]
        self.ns: dict[str, str] = {h: f"{self.tag}-{h}" for h in [*self.hosts, "sw"]}
        # (host, segment) -> address; a host's interface on a segment is named after it.
        self.addrs: dict[tuple[str, str], str] = {
            ("producer", "plan"): f"{SEGMENTS['plan']}.10",
            ("consumer", "clan"): f"{SEGMENTS['clan']}.10",
        }
        for i in range(1, nodes + 1):
            self.addrs[(f"p{i}", "plan")] = f"{SEGMENTS['plan']}.{10 + i}"
            self.addrs[(f"p{i}", "wan")] = f"{SEGMENTS['wan']}.{10 + i}"
            self.addrs[(f"c{i}", "wan")] = f"{SEGMENTS['wan']}.{20 + i}"
            self.addrs[(f"c{i}", "clan")] = f"{SEGMENTS['clan']}.{10 + i}"
        self._procs: list[subprocess.Popen[Any]] = []
        self._created: list[str] = []

    def addr(self, host: str, segment: str = "") -> str:
        """``host``'s address on ``segment`` (default: its only one, or its LAN)."""
        if not segment:
            segment = "plan" if host == "producer" or host.startswith("p") else "clan"
        try:
            return self.addrs[(host, segment)]
        except KeyError:
            raise NetnsError(f"{host} has no address on {segment}") from None

    # -- lifecycle -----------------------------------------------------------
    def __enter__(self) -> FacilityTopology:
        require_root()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _build(self) -> None:
        for host in ["sw", *self.hosts]:
            _ip("netns", "add", self.ns[host])
            self._created.append(self.ns[host])
            self.sh(host, "ip", "link", "set", "lo", "up")
            self.sh(host, "sysctl", "-qw", "net.ipv4.ip_forward=0")  # proxies, not routers
        for segment in SEGMENTS:
            self.sh("sw", "ip", "link", "add", f"br-{segment}", "type", "bridge")
            self.sh("sw", "ip", "link", "set", f"br-{segment}", "up")
        for (host, segment), addr in self.addrs.items():
            port = f"{host}-{segment}"  # the switch side: unique in the sw namespace
            _ip("link", "add", segment, "netns", self.ns[host], "type", "veth",
                "peer", "name", port, "netns", self.ns["sw"])
            self.sh("sw", "ip", "link", "set", port, "master", f"br-{segment}", "up")
            self.sh(host, "ip", "addr", "add", f"{addr}/24", "dev", segment)
            self.sh(host, "ip", "link", "set", segment, "up")
        # Routes that would join producer and consumer if a gateway forwarded IP,
        # so that "the gateways do not forward" stays the only barrier.
        self.sh("producer", "ip", "route", "add", "default", "via", self.addr("p1", "plan"))
        self.sh("consumer", "ip", "route", "add", "default", "via", self.addr("c1", "clan"))
        for p in self.gateways["producer"]:
            self.sh(p, "ip", "route", "add", f"{SEGMENTS['clan']}.0/24", "via", self.addr("c1", "wan"))
        for c in self.gateways["consumer"]:
            self.sh(c, "ip", "route", "add", f"{SEGMENTS['plan']}.0/24", "via", self.addr("p1", "wan"))
        log.debug("facility topology %s up (%d nodes each)", self.tag, self.nodes)

    def close(self) -> None:
        """Stop the processes started with :meth:`popen`, then delete the namespaces."""
        for proc in reversed(self._procs):
            stop_process(proc)
        self._procs.clear()
        for name in reversed(self._created):
            proc = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True,
                                  check=False)
            if proc.returncode != 0 and name in list_namespaces(self.prefix):
                log.warning("could not delete namespace %s: %s", name, proc.stderr.strip())
        self._created.clear()

    # -- running things ------------------------------------------------------
    def argv(self, host: str, argv: Sequence[str]) -> list[str]:
        return ns_argv(self.ns[host], argv)

    def popen(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``host``; stopped by :meth:`close` if still running."""
        proc = subprocess.Popen(self.argv(host, argv), **kwargs)
        self._procs.append(proc)
        return proc

    def sh(self, host: str, *argv: str) -> str:
        """Run a set-up command in ``host``; NetnsError with its stderr on failure."""
        return _check(self.argv(host, argv))
