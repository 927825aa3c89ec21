"""A throw-away etcd cluster on loopback for tests (Debian's etcd 3.4, started by PID).

Each member has its own data dir and log file in one temp dir, a client and a peer port on
127.0.0.1, and short election settings so failover tests take seconds. ``close()`` kills
every member this object started and removes the temp dir, also after a failed start.

    with EtcdCluster(3) as cluster:
        client = EtcdClient(cluster.endpoints)
        cluster.kill(cluster.leader())

With ``tls=True`` the members serve clients over TLS only (https://, ``--client-cert-auth``)
with certificates of a CA made in the temp dir; ``client_tls()`` is what a client presents.

Importable from tests as ``from etcd_cluster import EtcdCluster`` (tests/ is on sys.path).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from scistream.certs import CaAndLeaf, make_gateway_cert
from scistream.etcd import EtcdTls

ETCD = "/usr/bin/etcd"
HOST = "127.0.0.1"


def _free_ports(n: int) -> list[int]:
    """n distinct ports the kernel just handed out (held together, so no duplicates)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


class EtcdClusterError(Exception):
    pass


class EtcdCluster:
    def __init__(
        self,
        size: int = 3,
        *,
        etcd: str = ETCD,
        parent: Path | None = None,
        also_listen: tuple[str, ...] = (),
        tls: bool = False,
    ) -> None:
        self.size = size
        #: More addresses the members take clients on (a test's veth address, for a node in
        #: a network namespace), besides 127.0.0.1.
        self.also_listen = also_listen
        self.etcd = etcd
        self.dir = Path(tempfile.mkdtemp(prefix="etcd-cluster-", dir=parent))
        ports = _free_ports(2 * size)
        self.client_ports = ports[:size]
        self.peer_ports = ports[size:]
        self.names = [f"m{i}" for i in range(size)]
        self.token = self.dir.name  # a unique cluster token: members of other clusters never join
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * size
        self._logs: list[IO[bytes] | None] = [None] * size
        self.scheme = "https" if tls else "http"
        #: With tls: the members' certificate (one for all, naming 127.0.0.1 and also_listen)
        #: and a client's, both from one CA made here.
        self.server_pki: CaAndLeaf | None = None
        self.client_pki: CaAndLeaf | None = None
        if tls:
            pki = self.dir / "pki"
            self.server_pki = make_gateway_cert(pki, "member", [HOST, *also_listen], ca_name="etcd-ca")
            self.client_pki = make_gateway_cert(pki, "client", [HOST], ca_name="etcd-ca")

    def client_tls(self) -> EtcdTls:
        """The CA, certificate and key a client of this (tls) cluster presents."""
        assert self.client_pki is not None, "not a tls cluster"
        p = self.client_pki
        return EtcdTls(ca=p.ca_cert.read_bytes(), cert=p.cert.read_bytes(), key=p.key.read_bytes())

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self.client_pki is None:
            return None
        ctx = ssl.create_default_context(cafile=str(self.client_pki.ca_cert))
        ctx.load_cert_chain(str(self.client_pki.cert), str(self.client_pki.key))
        return ctx

    # -- addresses -----------------------------------------------------------------------
    @property
    def endpoints(self) -> list[str]:
        return self.endpoints_on(HOST)

    def endpoints_on(self, host: str) -> list[str]:
        return [f"{self.scheme}://{host}:{p}" for p in self.client_ports]

    def log_path(self, i: int) -> Path:
        return self.dir / f"{self.names[i]}.log"

    def data_dir(self, i: int) -> Path:
        return self.dir / self.names[i]

    # -- life cycle ----------------------------------------------------------------------
    def _cmd(self, i: int) -> list[str]:
        initial = ",".join(f"{n}=http://{HOST}:{p}" for n, p in zip(self.names, self.peer_ports, strict=True))
        client = f"{self.scheme}://{HOST}:{self.client_ports[i]}"
        peer = f"http://{HOST}:{self.peer_ports[i]}"
        extra = [f"{self.scheme}://{h}:{self.client_ports[i]}" for h in self.also_listen]
        tls: list[str] = []
        if self.server_pki is not None:
            p = self.server_pki
            tls = ["--cert-file", str(p.cert), "--key-file", str(p.key),
                   "--trusted-ca-file", str(p.ca_cert), "--client-cert-auth"]  # fmt: skip
        return [
            self.etcd,
            "--name", self.names[i],
            "--data-dir", str(self.data_dir(i)),
            "--listen-client-urls", ",".join([client, *extra]),
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", initial,
            "--initial-cluster-state", "new",  # ignored on a restart: the data dir decides
            "--initial-cluster-token", self.token,
            "--heartbeat-interval", "100",
            "--election-timeout", "1000",
            "--snapshot-count", "5000",
            "--auto-compaction-retention", "0",
            "--logger", "zap",
            "--log-level", "warn",
            *tls,
        ]  # fmt: skip

    def start(self, i: int) -> None:
        """Start member i (again, with its data dir); does not wait for health."""
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            raise EtcdClusterError(f"etcd member {self.names[i]} is already running")
        if self._logs[i] is None:
            self._logs[i] = open(self.log_path(i), "ab")  # noqa: SIM115 (closed in close())
        self.procs[i] = subprocess.Popen(
            self._cmd(i), stdin=subprocess.DEVNULL, stdout=self._logs[i], stderr=subprocess.STDOUT
        )

    def start_all(self, timeout: float = 20.0) -> None:
        for i in range(self.size):
            self.start(i)
        self.wait_healthy(timeout=timeout)

    def _signal(self, i: int, sig: signal.Signals, wait: float) -> None:
        proc = self.procs[i]
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(5)

    def kill(self, i: int) -> None:
        """SIGKILL member i and reap it."""
        self._signal(i, signal.SIGKILL, 5)

    def stop(self, i: int) -> None:
        """SIGTERM member i and wait for it to exit (SIGKILL after 10 s)."""
        self._signal(i, signal.SIGTERM, 10)

    def running(self, i: int) -> bool:
        proc = self.procs[i]
        return proc is not None and proc.poll() is None

    def close(self) -> None:
        for i in range(self.size):
            self.kill(i)
        for f in self._logs:
            if f is not None:
                f.close()
        self._logs = [None] * self.size
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        try:
            self.start_all()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- observation (etcd's JSON gateway on the client port: no etcdctl needed) ------------
    def _post(self, i: int, path: str, body: dict[str, Any], timeout: float = 1.0) -> dict[str, Any]:
        req = urllib.request.Request(
            f"{self.scheme}://{HOST}:{self.client_ports[i]}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=timeout, context=self._ssl_context()) as resp:
            out: dict[str, Any] = json.load(resp)
            return out

    def healthy(self, i: int) -> bool:
        """Member i runs and has a leader that answers (etcd's /health does a quorum read)."""
        if not self.running(i):
            return False
        try:
            url = f"{self.scheme}://{HOST}:{self.client_ports[i]}/health"
            with urllib.request.urlopen(url, timeout=2, context=self._ssl_context()) as r:
                return bool(json.load(r).get("health") == "true")
        except (OSError, ValueError):
            return False

    def wait_healthy(self, members: list[int] | None = None, timeout: float = 20.0) -> None:
        todo = list(range(self.size)) if members is None else list(members)
        deadline = time.monotonic() + timeout
        while todo:
            for i in list(todo):
                proc = self.procs[i]
                if proc is None or proc.poll() is not None:
                    rc = None if proc is None else proc.returncode
                    raise EtcdClusterError(f"etcd member {self.names[i]} exited ({rc})\n{self.log_tail(i)}")
                if self.healthy(i):
                    todo.remove(i)
            if not todo:
                return
            if time.monotonic() > deadline:
                raise EtcdClusterError(
                    f"etcd members {[self.names[i] for i in todo]} not healthy after {timeout} s\n"
                    + self.logs_text()
                )
            time.sleep(0.1)

    def leader(self, timeout: float = 10.0) -> int:
        """Index of the current leader, as the running members report it (waits for one)."""
        deadline = time.monotonic() + timeout
        while True:
            ids: dict[str, int] = {}
            leaders: set[str] = set()
            for i in range(self.size):
                if not self.running(i):
                    continue
                try:
                    st = self._post(i, "/v3/maintenance/status", {})
                except (OSError, ValueError):
                    continue
                ids[str(st["header"]["member_id"])] = i
                if str(st.get("leader", "0")) != "0":
                    leaders.add(str(st["leader"]))
            if len(leaders) == 1 and (lead := leaders.pop()) in ids:
                return ids[lead]
            if time.monotonic() > deadline:
                raise EtcdClusterError(f"no etcd leader among the running members after {timeout} s")
            time.sleep(0.1)

    def compact(self, revision: int) -> None:
        """Compact the history up to ``revision`` (physically, so watches see it at once)."""
        i = next(i for i in range(self.size) if self.running(i))
        self._post(i, "/v3/kv/compaction", {"revision": str(revision), "physical": True}, timeout=5)

    def log_tail(self, i: int, lines: int = 30) -> str:
        try:
            text = self.log_path(i).read_text(errors="replace").splitlines()
        except OSError:
            return f"--- {self.names[i]}: no log"
        return "\n".join([f"--- {self.names[i]} ({self.log_path(i)}):", *text[-lines:]])

    def logs_text(self, lines: int = 30) -> str:
        return "\n".join(self.log_tail(i, lines) for i in range(self.size))
