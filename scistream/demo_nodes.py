"""``scistream demo --nodes N``: two facilities of N gateway nodes each, on etcd.

Each facility is N gateway namespaces (``p1``..``pN`` and ``c1``..``cN``, see
:class:`scistream.netns.FacilityTopology`) sharing a 3-member etcd cluster that
runs in the facility's own gateway namespaces on its LAN (member ``j`` on gateway
``j mod N``). Every node is an s2cs with its own s2ds, state directory and
listener address, joined to its facility's cluster with ``--etcd``/``--node-name``
and the facility's key file (``scistream cluster-key``). One session of ``2N``
connections is then set up and verified exactly like the two-gateway demo; the
request goes to node 1 of each facility and the applications' hellos to node N,
because any node answers for any session. Everything runs as root in network
namespaces and is stopped by PID, the namespaces removed, at the end, on failure
and on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from scistream import netns
from scistream.demo import Demo, DemoError, Facility, Options
from scistream.endpoints import format_endpoint, parse_endpoint
from scistream.programs import tool_argv

ETCD_MEMBERS = 3
CONTROL_PORT = 5000
PORT_RANGE = (5100, 5199)
ETCD_START_SECONDS = 20.0

#: Run inside a gateway namespace: wait until every etcd member's /health says
#: true (it does once the cluster has a leader and serves reads), or time out.
HEALTH_CHECK = (
    "import json,sys,time,urllib.request\n"
    "deadline=time.monotonic()+float(sys.argv[1])\n"
    "why=''\n"
    "while time.monotonic()<deadline:\n"
    "    try:\n"
    "        if all(json.load(urllib.request.urlopen(u+'/health',timeout=1)).get('health')=='true'\n"
    "               for u in sys.argv[2:]): sys.exit(0)\n"
    "        why='no leader yet'\n"
    "    except OSError as e: why=str(e)\n"
    "    time.sleep(0.1)\n"
    "print(why); sys.exit(1)\n"
)


@dataclass(frozen=True)
class EtcdMember:
    name: str
    host: str  # the gateway namespace it runs in
    ip: str  # its address on the facility's LAN
    client_port: int
    peer_port: int

    @property
    def client_url(self) -> str:
        return f"http://{format_endpoint(self.ip, self.client_port)}"

    @property
    def peer_url(self) -> str:
        return f"http://{format_endpoint(self.ip, self.peer_port)}"


class NodesDemo(Demo):
    """The demo with ``opts.nodes`` gateway nodes per facility (see the module doc)."""

    def __init__(self, opts: Options, echo: Callable[[str], None]) -> None:
        super().__init__(opts, echo)
        self.gateways_step = (f"starting 2 x {opts.nodes} gateway nodes (s2cs + s2ds each) "
                              f"and 2 x {ETCD_MEMBERS} etcd members")
        self.ctopo: netns.FacilityTopology | None = None
        self.etcd: dict[str, list[EtcdMember]] = {}
        self.key_files: dict[str, str] = {}
        self.node_of_ip: dict[str, str] = {}  # listener address -> node name
        self.etcd_procs: list[subprocess.Popen[bytes]] = []

    # -- where things run ----------------------------------------------------
    @property
    def topology(self) -> netns.FacilityTopology:
        if self.ctopo is None:
            raise DemoError("the namespaces are not built yet")
        return self.ctopo

    @property
    def namespaced(self) -> bool:
        return True

    def wrap(self, host: str | None, argv: Sequence[str]) -> list[str]:
        if self.ctopo is not None and host:
            return self.ctopo.argv(host, argv)
        return list(argv)

    def app_host(self, role: str) -> str | None:
        return role

    def app_addr(self, role: str) -> str:
        return self.topology.addr(role)

    def s2uc_host(self) -> str | None:
        return "c1"  # the consumer facility's first node, as cons_gw in the tutorial

    def node(self, side: str, i: int) -> Facility:
        return self.facilities[f"{side}-{side[0]}{i}"]

    def control_address(self, side: str) -> str:
        return self.node(side, 1).control

    def hello_address(self, side: str) -> str:
        # Not the node that got the request: any node answers for any session.
        return self.node(side, self.opts.nodes).hello_control

    def listener_hosts(self) -> list[tuple[str | None, list[str]]]:
        by_host: dict[str, list[str]] = {}
        for eps in self.report.listeners.values():
            for ep in eps:
                host = self.node_of_ip.get(parse_endpoint(ep)[0])
                if host is None:
                    raise DemoError(f"listener {ep} is on no gateway node's address")
                by_host.setdefault(host, []).append(ep)
        return list(by_host.items())

    # -- steps ---------------------------------------------------------------
    def build_hosts(self) -> None:
        if shutil.which("etcd") is None:
            raise DemoError("--nodes needs etcd (Debian: apt-get install etcd-server)")
        topo = netns.FacilityTopology(self.opts.nodes, prefix="ssdemo")
        topo.__enter__()
        self.ctopo = topo
        self.stack.callback(topo.close)  # after the processes are stopped (Demo.close)
        ips: list[str] = []
        for side, lan in (("producer", "plan"), ("consumer", "clan")):
            for host in topo.gateways[side]:
                wan, local = topo.addr(host, "wan"), topo.addr(host, lan)
                ips += [wan, local]
                # The producer's listeners face the WAN (the consumer's gateways
                # connect to them); the consumer's face its LAN (the consumer does).
                listener_ip = wan if side == "producer" else local
                self.node_of_ip[listener_ip] = host
                # s2uc runs on c1: it reaches the producer's nodes across the WAN.
                control = format_endpoint(wan if side == "producer" else local, CONTROL_PORT)
                fac = Facility(f"{side}-{host}", host, self.workdir / host, control,
                               format_endpoint(local, CONTROL_PORT), listener_ip, PORT_RANGE)
                self.facilities[fac.name] = fac
            # Member j on gateway j mod N; with fewer than 3 nodes a gateway holds
            # two members, on ports 10 apart.
            self.etcd[side] = []
            for j in range(ETCD_MEMBERS):
                host, shift = topo.gateways[side][j % self.opts.nodes], 10 * (j // self.opts.nodes)
                self.etcd[side].append(EtcdMember(f"{side[0]}e{j}", host, topo.addr(host, lan),
                                                  2379 + shift, 2380 + shift))
        from scistream.certs import make_self_signed

        make_self_signed(self.workdir, ips, name="server")

    def start_gateways(self) -> None:
        self.start_etcd()
        for side, members in self.etcd.items():
            key = self.workdir / f"{side}-cluster.key"
            res = self.run_cmd(None, [*tool_argv("scistream"), "cluster-key", str(key)], timeout=30)
            if res.returncode != 0:
                raise DemoError(f"scistream cluster-key failed: {(res.stderr or res.stdout).strip()}")
            self.key_files[side] = str(key)
            for fac in self.facilities.values():
                if fac.name.startswith(side + "-"):
                    fac.s2cs_extra = ["--etcd", ",".join(m.client_url for m in members),
                                      "--node-name", fac.host or "", "--etcd-key-file", str(key),
                                      "--placement", "spread"]
        super().start_gateways()

    def start_etcd(self) -> None:
        """Each facility's 3 members, started together; wait until both clusters serve."""
        tag = self.topology.tag
        for side, members in self.etcd.items():
            initial = ",".join(f"{m.name}={m.peer_url}" for m in members)
            for m in members:
                self.etcd_procs.append(self.popen(m.host, [
                    "etcd", "--name", m.name, "--data-dir", str(self.workdir / "etcd" / m.name),
                    "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
                    "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
                    "--initial-cluster", initial, "--initial-cluster-state", "new",
                    "--initial-cluster-token", f"{tag}-{side}",
                    "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn"],
                    f"etcd-{m.name}"))
        for side, members in self.etcd.items():
            res = self.run_cmd(members[0].host, [
                sys.executable, "-c", HEALTH_CHECK, str(ETCD_START_SECONDS),
                *(m.client_url for m in members)], timeout=ETCD_START_SECONDS + 10)
            if res.returncode != 0:
                logs = " | ".join(self.log_tail(f"etcd-{m.name}", 2) for m in members)
                raise DemoError(f"the {side} facility's etcd cluster did not come up within "
                                f"{ETCD_START_SECONDS:.0f} s ({res.stdout.strip()}): {logs}")

    def stop_processes(self) -> None:
        """The s2cs nodes and applications at once (one by one takes long on a loaded
        host), then the s2ds daemons their s2cs may still talk to while stopping, then
        the etcd members one by one: a leader stopping hands its leadership over first,
        which takes the full timeout when its followers are stopping too."""
        s2ds = [p for fac in self.facilities.values() for p in fac.procs[:-1]]  # [s2ds, s2cs]
        netns.stop_processes([p for p in self.procs if p not in s2ds and p not in self.etcd_procs],
                             timeout=5.0)
        netns.stop_processes(s2ds)
        for proc in reversed(self.etcd_procs):
            netns.stop_process(proc)

    def transfer(self, connect: list[str], on_progress: Callable[[int], None]) -> None:
        super().transfer(connect, on_progress)
        self.report.placement = self.placement(connect)

    def status(self, side: str) -> dict[str, Any]:
        """The session as ``s2uc check-status --json`` shows it from ``side``'s node 1."""
        res = self.s2uc(["check-status", "--json", "--s2cs", self.control_address(side),
                         "--server_cert", str(self.cert), self.report.uid], timeout=30)
        if res.returncode != 0:
            raise DemoError(f"s2uc check-status failed: {(res.stderr or res.stdout).strip()}")
        sessions = [s for s in json.loads(res.stdout) if s.get("uid") == self.report.uid]
        if not sessions:
            raise DemoError(f"the {side} facility does not know session {self.report.uid}")
        return dict(sessions[0])

    @staticmethod
    def listener_node(session: dict[str, Any], ep: str) -> str:
        """The node carrying listener ``ep``, as the gateway's status says ("?": it does not)."""
        nodes = session.get("listener_nodes") or []
        if len(nodes) != len(session.get("listeners", [])):
            return "?"
        return str(dict(zip(session["listeners"], nodes, strict=True)).get(ep, "?"))

    def placement(self, connect: list[str]) -> list[dict[str, Any]]:
        """Connection by connection: the consumer node it entered, the producer
        listener that node forwarded it to and the producer node behind that."""
        cons, prod = self.status("consumer"), self.status("producer")
        target_of = dict(zip(cons.get("listeners", []), cons.get("targets", []), strict=False))
        rows = []
        for i, (ep, got) in enumerate(zip(connect, self.report.slices, strict=True)):
            target = target_of.get(ep, "")
            rows.append({"connection": i, "consumer_listener": ep,
                         "consumer_node": self.listener_node(cons, ep),
                         "producer_listener": target,
                         "producer_node": self.listener_node(prod, target) if target else "?",
                         "bytes": got["received"], "ok": bool(got.get("ok"))})
        return rows

    def keep_running(self, connect: list[str]) -> None:
        topo = self.topology

        def pre(host: str) -> str:
            return f"ip netns exec {topo.ns[host]} "

        env = f"SCISTREAM_HOME={self.env['SCISTREAM_HOME']} "
        s2uc = " ".join(tool_argv("s2uc"))
        lines = ["The gateway nodes stay up; poke at them from another terminal:"]
        for side in ("producer", "consumer"):
            every = ",".join(self.node(side, i).control for i in range(1, self.opts.nodes + 1))
            lines.append(f"  {env}{pre('c1')}{s2uc} check-status --s2cs {every} "
                         f"--server_cert {self.cert} {self.report.uid}")
        for side, members in self.etcd.items():
            lines.append(f"  {pre(members[0].host)}etcdctl --endpoints "
                         f"{','.join(m.client_url for m in members)} get --prefix --keys-only "
                         f"/scistream/v1/   # the {side} facility's shared state")
        lines += [
            f"  {pre('consumer')}{sys.executable} -m scistream.demo_apps consumer "
            f"--connect {','.join(connect)} --size {self.opts.size}",
            f"  logs: {self.workdir}/*.log",
            "Press Ctrl-C to release the session and stop everything.",
        ]
        self._keep(lines)

    def _keep(self, lines: list[str]) -> None:
        with contextlib.suppress(KeyboardInterrupt):  # a Ctrl-C already while printing counts
            for line in lines:
                self.echo(line)
            running = [p for p in self.procs if p.poll() is None]  # gateways, etcd, producer
            while all(p.poll() is None for p in running):
                time.sleep(0.5)
            self.echo("a gateway or etcd process exited; cleaning up")
