"""Launchers for every forwarder the benchmark compares, each in its best configuration.

A configuration starts its processes inside a private network namespace (lo up,
reno: BENCHMARKING.md), listening on ``listen_port`` and forwarding to
``target_port`` on 127.0.0.1; a *pair* chains two processes (client side plain,
a TLS leg between them, server side plain), as two gateways do. Fixed ports are
safe here because every run owns its namespace.

Forwarder CPU is read from /proc: utime+stime of every live process in each
launched process tree plus what its reaped children used (cutime+cstime).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scistream.netns import PrivateNamespace, stop_process, wait_for_listen

CLK_TCK = os.sysconf("SC_CLK_TCK")
MID_PORT = 16001  # the TLS leg of a pair


# --------------------------------------------------------------------------- CPU accounting
def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    # comm may contain spaces; fields restart after the last ')'.
    return data[data.rindex(")") + 2 :].split()


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of ``root`` and its live descendants, including reaped children."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = _stat_fields(int(entry))
            if f:
                parents[int(entry)] = int(f[1])
    tree = {root}
    changed = True
    while changed:
        changed = False
        for pid, ppid in parents.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                changed = True
    ticks = 0
    for pid in tree:
        f = _stat_fields(pid)
        if f:  # fields after ')': state=0 ppid=1 ... utime=11 stime=12 cutime=13 cstime=14
            ticks += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return ticks / CLK_TCK


@dataclass
class Forwarder:
    """The running processes of one configuration."""

    name: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    workdir: Path | None = None

    def cpu_seconds(self) -> float:
        return sum(tree_cpu_seconds(p.pid) for p in self.procs)

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def stop(self) -> None:
        for p in reversed(self.procs):
            stop_process(p)


@dataclass(frozen=True)
class Config:
    """One forwarder configuration: how to start it and what it is."""

    name: str
    label: str  # for tables and charts
    kind: str  # "direct", "1 hop", "TLS pair", "plain pair"
    start: Callable[[PrivateNamespace, Path, int, int], Forwarder]
    needs: tuple[str, ...] = ()  # executables that must exist
    check: Callable[[], str] | None = None  # "" if it can run, else why not

    def available(self) -> str:
        """ "" if it can run here, else why not."""
        for exe in self.needs:
            if not shutil.which(exe):
                return f"{exe} is not installed"
        return self.check() if self.check else ""


def _native_built() -> str:
    from scistream.dataplane import native_available

    return "" if native_available() else "the native engine is not built"


def _popen(
    ns: PrivateNamespace, argv: Sequence[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            ns.argv(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )


def _started(ns: PrivateNamespace, fwd: Forwarder, port: int, log: Path) -> Forwarder:
    """Wait until ``port`` listens; fail at once (with the log) if a process died."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and fwd.alive():
        try:
            wait_for_listen(ns.argv, port, timeout=0.2)
            return fwd
        except Exception:
            continue
    fwd.stop()
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise RuntimeError(f"{fwd.name} did not start listening on {port}:\n{tail}")


def _write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


# --------------------------------------------------------------------------- certificates
def make_certs(workdir: Path) -> dict[str, Path]:
    """A self-signed server certificate for 127.0.0.1 (openssl CLI, no project code)."""
    key, crt = workdir / "server.key", workdir / "server.crt"
    if not crt.exists():
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-nodes",
                "-days",
                "2",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-keyout",
                str(key),
                "-out",
                str(crt),
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ],
            check=True,
            capture_output=True,
        )
        key.chmod(0o600)
        _write(workdir / "server.pem", crt.read_text() + key.read_text())
    return {"key": key, "crt": crt, "pem": workdir / "server.pem"}


# --------------------------------------------------------------------------- configurations
def _direct(ns: PrivateNamespace, wd: Path, listen: int, target: int) -> Forwarder:
    return Forwarder("direct", workdir=wd)


HAPROXY_GLOBAL = """global
    tune.pipesize 1048576
    maxconn 1000
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
"""


def _haproxy_splice(ns: PrivateNamespace, wd: Path, listen: int, target: int) -> Forwarder:
    cfg = _write(
        wd / "haproxy.cfg",
        HAPROXY_GLOBAL
        + f"""
listen fwd
    option splice-request
    option splice-response
    bind 127.0.0.1:{listen}
    server t 127.0.0.1:{target}
""",
    )
    log = wd / "haproxy.log"
    fwd = Forwarder("haproxy-splice", [_popen(ns, ["haproxy", "-db", "-f", str(cfg)], log)], wd)
    return _started(ns, fwd, listen, log)


def _haproxy_tls(ns: PrivateNamespace, wd: Path, listen: int, target: int) -> Forwarder:
    c = make_certs(wd)
    server = _write(
        wd / "haproxy-s.cfg",
        HAPROXY_GLOBAL
        + f"""
listen tls_in
    bind 127.0.0.1:{MID_PORT} ssl crt {c["pem"]} ssl-min-ver TLSv1.3
    server t 127.0.0.1:{target}
""",
    )
    client = _write(
        wd / "haproxy-c.cfg",
        HAPROXY_GLOBAL
        + f"""
listen tls_out
    bind 127.0.0.1:{listen}
    server g 127.0.0.1:{MID_PORT} ssl verify required ca-file {c["crt"]} ssl-min-ver TLSv1.3
""",
    )
    log = wd / "haproxy.log"
    fwd = Forwarder("haproxy-tls", [_popen(ns, ["haproxy", "-db", "-f", str(server)], log)], wd)
    _started(ns, fwd, MID_PORT, log)
    fwd.procs.append(_popen(ns, ["haproxy", "-db", "-f", str(client)], log))
    return _started(ns, fwd, listen, log)


def _stunnel_pair(name: str, tls_options: str) -> Callable[[PrivateNamespace, Path, int, int], Forwarder]:
    def start(ns: PrivateNamespace, wd: Path, listen: int, target: int) -> Forwarder:
        psk = _write(wd / "psk.txt", f"client1:{secrets.token_hex(16)}\n")
        common = "foreground = yes\npid =\ndebug = 3\n"
        server = _write(
            wd / "stunnel-s.conf",
            common
            + f"""[in]
accept = 127.0.0.1:{MID_PORT}
connect = 127.0.0.1:{target}
PSKsecrets = {psk}
{tls_options}""",
        )
        client = _write(
            wd / "stunnel-c.conf",
            common
            + f"""[out]
client = yes
accept = 127.0.0.1:{listen}
connect = 127.0.0.1:{MID_PORT}
PSKsecrets = {psk}
PSKidentity = client1
{tls_options}""",
        )
        log = wd / "stunnel.log"
        fwd = Forwarder(name, [_popen(ns, ["stunnel", str(server)], log)], wd)
        _started(ns, fwd, MID_PORT, log)
        fwd.procs.append(_popen(ns, ["stunnel", str(client)], log))
        return _started(ns, fwd, listen, log)

    return start


#: The best stunnel here: TLS 1.3 external PSK; its PSK fails with SHA-384 suites.
STUNNEL_TLS13 = "sslVersionMin = TLSv1.3\nciphersuites = TLS_AES_128_GCM_SHA256\n"
#: What SciStream 1.x writes (PROTOCOL.md): TLS <= 1.2, ciphers eNULL; OpenSSL 3
#: needs security level 0 to offer a NULL cipher at all.
STUNNEL_1X = "sslVersionMax = TLSv1.2\nciphers = eNULL\nsecurityLevel = 0\n"


def _nginx(ns: PrivateNamespace, wd: Path, listen: int, target: int) -> Forwarder:
    cfg = _write(
        wd / "nginx.conf",
        f"""load_module /usr/lib/nginx/modules/ngx_stream_module.so;
daemon off;
worker_processes 1;
pid {wd}/nginx.pid;
error_log {wd}/nginx-error.log warn;
events {{ worker_connections 1024; }}
stream {{
    server {{
        listen 127.0.0.1:{listen};
        proxy_pass 127.0.0.1:{target};
        proxy_buffer_size 1m;
    }}
}}
""",
    )
    log = wd / "nginx.log"
    fwd = Forwarder("nginx", [_popen(ns, ["nginx", "-c", str(cfg), "-p", str(wd)], log)], wd)
    return _started(ns, fwd, listen, log)


def _socat(ns: PrivateNamespace, wd: Path, listen: int, target: int) -> Forwarder:
    log = wd / "socat.log"
    argv = [
        "socat",
        "-b",
        "262144",
        f"TCP-LISTEN:{listen},bind=127.0.0.1,reuseaddr,fork",
        f"TCP:127.0.0.1:{target}",
    ]
    fwd = Forwarder("socat", [_popen(ns, argv, log)], wd)
    return _started(ns, fwd, listen, log)


def s2ds_argv() -> list[str]:
    """How to run ``s2ds`` (the console script, else the module with this Python)."""
    exe = shutil.which("s2ds")
    return [exe] if exe else [sys.executable, "-m", "scistream.s2ds.cli"]


#: BENCH_BASELINE: a directory holding another build's ``scistream`` package (e.g. a copy
#: of the previous commit's, with its built engine): the ``*-baseline`` configurations run
#: it, so a change is measured before and after in the same run.
BASELINE = os.environ.get("BENCH_BASELINE", "")


def _s2ds(name: str, engine: str, tls: str, pythonpath: str = "",
          knobs: tuple[str, ...] = ()) -> Callable[[PrivateNamespace, Path, int, int], Forwarder]:
    """``s2ds forward`` (one process per hop): plain 1 hop, or a pair whose middle leg
    is TLS 1.3 with an external PSK (``tls="psk"``) or a pinned certificate (``"cert"``;
    the pure engine cannot do external PSKs on Python 3.11); ``knobs``: tuning options
    given to every process."""

    env = {"PYTHONPATH": pythonpath} if pythonpath else None

    def start(ns: PrivateNamespace, wd: Path, listen: int, target: int) -> Forwarder:
        log = wd / "s2ds.log"
        fwd = Forwarder(name, workdir=wd)
        base = [*s2ds_argv(), "forward", "--engine", engine, *knobs]
        if not tls:
            fwd.procs.append(
                _popen(ns, [*base, "--listen", f"127.0.0.1:{listen}", "--to", f"127.0.0.1:{target}"],
                       log, env)
            )
            return _started(ns, fwd, listen, log)
        if tls == "psk":
            key = _write(wd / "psk.txt", f"bench:{secrets.token_hex(32)}\n")
            server_tls = client_tls = ["--tls-mode", "psk", "--psk-file", str(key)]
        else:
            c = make_certs(wd)
            server_tls = ["--tls-mode", "cert", "--cert", str(c["crt"]), "--key", str(c["key"])]
            client_tls = ["--tls-mode", "cert", "--ca", str(c["crt"]), "--server-name", "127.0.0.1"]
        fwd.procs.append(
            _popen(
                ns,
                [
                    *base,
                    "--listen",
                    f"127.0.0.1:{MID_PORT}",
                    "--to",
                    f"127.0.0.1:{target}",
                    "--tls",
                    "server",
                    *server_tls,
                ],
                log,
                env,
            )
        )
        _started(ns, fwd, MID_PORT, log)
        fwd.procs.append(
            _popen(
                ns,
                [
                    *base,
                    "--listen",
                    f"127.0.0.1:{listen}",
                    "--to",
                    f"127.0.0.1:{MID_PORT}",
                    "--tls",
                    "client",
                    *client_tls,
                ],
                log,
                env,
            )
        )
        return _started(ns, fwd, listen, log)

    return start


CONFIGS: dict[str, Config] = {
    c.name: c
    for c in (
        Config("direct", "direct (no forwarder)", "direct", _direct),
        Config(
            "scistream-native",
            "scistream native, 1 hop",
            "1 hop",
            _s2ds("scistream-native", "native", ""),
            check=_native_built,
        ),
        Config(
            "scistream-pure", "scistream pure-Python, 1 hop", "1 hop", _s2ds("scistream-pure", "pure", "")
        ),
        Config("haproxy-splice", "HAProxy 2.6 forced splice, 1 hop", "1 hop", _haproxy_splice, ("haproxy",)),
        Config("nginx", "nginx stream 1 MiB buffer, 1 hop", "1 hop", _nginx, ("nginx",)),
        Config("socat", "socat -b 256k, 1 hop", "1 hop", _socat, ("socat",)),
        Config(
            "scistream-native-tls",
            "scistream native pair, TLS 1.3 PSK",
            "TLS pair",
            _s2ds("scistream-native-tls", "native", "psk"),
            check=_native_built,
        ),
        # The same pair with OpenSSL's AES-GCM, as stunnel and HAProxy have it: what the
        # record pump gains apart from intel-ipsec-mb's cipher (csrc/aesgcm.c).
        Config(
            "scistream-native-tls-openssl-gcm",
            "scistream native pair, TLS 1.3 PSK, AES-GCM by OpenSSL",
            "TLS pair",
            _s2ds("scistream-native-tls-openssl-gcm", "native", "psk", knobs=("--tls-aes-gcm", "openssl")),
            check=_native_built,
        ),
        *(
            [
                Config(
                    "scistream-native-tls-baseline",
                    "scistream native pair, TLS 1.3 PSK (BENCH_BASELINE build)",
                    "TLS pair",
                    _s2ds("scistream-native-tls-baseline", "native", "psk", BASELINE),
                    check=_native_built,
                )
            ]
            if BASELINE
            else []
        ),
        Config(
            "scistream-pure-tls",
            "scistream pure-Python pair, TLS 1.3 cert",
            "TLS pair",
            _s2ds("scistream-pure-tls", "pure", "cert"),
        ),
        Config(
            "stunnel-tls13",
            "stunnel pair, TLS 1.3 PSK AES-128-GCM",
            "TLS pair",
            _stunnel_pair("stunnel-tls13", STUNNEL_TLS13),
            ("stunnel",),
        ),
        Config(
            "stunnel-1x",
            "stunnel pair, SciStream 1.x config (TLS 1.2 eNULL)",
            "TLS pair",
            _stunnel_pair("stunnel-1x", STUNNEL_1X),
            ("stunnel",),
        ),
        Config("haproxy-tls", "HAProxy pair, TLS 1.3 cert", "TLS pair", _haproxy_tls, ("haproxy",)),
    )
}


# --------------------------------------------------------------------------- one measurement
@dataclass(frozen=True)
class Measurement:
    config: str
    streams: int
    seconds: float
    round: int
    gbps: float
    forwarder_cpu_s: float
    gbit_per_cpu_s: float | None
    retransmits: int
    load_gbps: float | None = None  # the offered load (iperf3 -b), None = as fast as it goes


def iperf3_client_argv(host: str, port: int | str, streams: int, seconds: float, *extra: str) -> list[str]:
    """An iperf3 client run with JSON output (one shape for every benchmark)."""
    return [
        "iperf3",
        "-c",
        host,
        "-p",
        str(port),
        "-t",
        f"{seconds:g}",
        "-P",
        str(streams),
        "-J",
        "--connect-timeout",
        "5000",
        *extra,
    ]


def iperf3_end(res: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The ``end`` summary of an iperf3 -J run; RuntimeError with iperf3's reason if it failed."""
    data = json.loads(res.stdout or "{}")
    if res.returncode != 0 or "error" in data:
        raise RuntimeError(f"iperf3 failed: {data.get('error') or res.stderr.strip()}")
    end: dict[str, Any] = data["end"]
    return end


def iperf3(
    ns: PrivateNamespace,
    wd: Path,
    port: int,
    target: int,
    streams: int,
    seconds: float,
    load_gbps: float | None = None,
) -> tuple[float, int]:
    """(Gbit/s received, retransmits) of an iperf3 run through ``port`` to a server on
    ``target``; ``load_gbps`` paces the streams to that total (iperf3 -b is per stream)."""
    pace = ["-b", f"{load_gbps * 1e9 / streams:.0f}"] if load_gbps else []
    server = _popen(ns, ["iperf3", "-s", "-p", str(target), "-1"], wd / "iperf3-s.log")
    try:
        wait_for_listen(ns.argv, target)
        res = subprocess.run(
            ns.argv(iperf3_client_argv("127.0.0.1", port, streams, seconds, *pace)),
            capture_output=True,
            text=True,
            timeout=seconds + 30,
            check=False,
        )
        end = iperf3_end(res)
        return (
            end["sum_received"]["bits_per_second"] / 1e9,
            int(end.get("sum_sent", {}).get("retransmits", 0)),
        )
    finally:
        stop_process(server)


def measure(
    config: Config,
    workdir: Path,
    streams: int,
    seconds: float,
    round_: int,
    prefix: str = "sstb",
    load_gbps: float | None = None,
) -> Measurement:
    """Fresh namespace, fresh processes: start the forwarder, run iperf3 (as fast as it
    goes, or paced to ``load_gbps``), read CPU, stop."""
    client_port, server_port = 16000, 16002
    with PrivateNamespace(prefix) as ns:
        fwd = config.start(ns, workdir, client_port, server_port)
        try:
            time.sleep(0.2)  # let start-up CPU settle out of the measured window
            cpu0 = fwd.cpu_seconds()
            port = server_port if config.name == "direct" else client_port
            gbps, retrans = iperf3(ns, workdir, port, server_port, streams, seconds, load_gbps)
            time.sleep(0.1)  # forked per-connection children exit and are reaped
            cpu = fwd.cpu_seconds() - cpu0
        finally:
            fwd.stop()
    per = (gbps * seconds / cpu) if cpu > 0 and config.name != "direct" else None
    return Measurement(
        config.name,
        streams,
        seconds,
        round_,
        round(gbps, 3),
        round(cpu, 3),
        round(per, 2) if per else None,
        retrans,
        load_gbps,
    )
