"""The two seed tutorials' command sequences, typed as users type them, in the topology.

Adaptations to the four namespaces (shared/seeds/): each s2cs advertises the
address its peers can reach (producer gateway: its WAN side 192.168.20.10;
consumer gateway: its LAN side 192.168.30.10), applications talk to their own
gateway's LAN address, and the demo's producer/consumer applications stand in
for iperf so that every byte is checked by SHA-256. One server.crt for both
control servers, as the VM tutorial copies one file everywhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PREFIX, expected_sha, read_result

from scistream import netns
from scistream.certs import make_self_signed
from scistream.demo_apps import slices
from scistream.s2cs.backends.native import stop_spawned_s2ds

A = netns.ADDR
MOCK_UID = "4f8583bc-a4d3-11ee-9fd6-034d1fcbd7c3"  # s2uc --mock True (PROTOCOL.md)
SIZE = 24 << 20
SEED = 5


class Hosts:
    """The topology plus a work dir and the environment every command runs with."""

    def __init__(self, topo: netns.Topology, workdir: Path) -> None:
        self.topo = topo
        self.dir = workdir
        self.state: list[Path] = []
        # One s2uc home for both sides: the SC24 flow hands the data-channel key
        # from inbound-request to outbound-request through s2uc's session store.
        self.env = {**os.environ, "SCISTREAM_HOME": str(workdir / "home"), "PYTHONUNBUFFERED": "1"}
        make_self_signed(workdir, [A["prod_gw_lan"], A["prod_gw_wan"], A["cons_gw_lan"]], name="server")

    def start(self, host: netns.Host, *argv: str, stdout: Any = None) -> subprocess.Popen[bytes]:
        log = open(self.dir / f"{host}-{Path(argv[0]).name}.log", "ab")  # noqa: SIM115
        try:
            return self.topo.popen(host, list(argv), stdout=stdout or log, stderr=log, env=self.env,
                                   cwd=self.dir)
        finally:
            log.close()

    def run(self, host: netns.Host, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        res = self.topo.run(host, list(argv), env=self.env, cwd=self.dir, timeout=timeout, check=False,
                            text=True)
        assert res.returncode == 0, f"{' '.join(argv)}: {res.stderr.strip()[-1500:]}"
        return res

    def s2cs(self, host: netns.Host, *options: str) -> None:
        state = self.dir / f"state-{host}"
        self.state.append(state)
        port = next((o.split("=", 1)[1] for o in options if o.startswith("--port=")), "5000")
        self.start(host, "s2cs", *options, "--server_crt=server.crt", "--server_key=server.key",
                   f"--state-dir={state}", "--events=off")
        netns.wait_for_listen(lambda argv: self.topo.argv(host, argv), int(port), timeout=20)

    def producer_app(self) -> int:
        proc = self.start("producer", sys.executable, "-m", "scistream.demo_apps", "producer",
                          "--listen", f"{A['producer']}:0", "--seed", str(SEED), stdout=subprocess.PIPE)
        assert proc.stdout is not None
        return int(json.loads(proc.stdout.readline())["listening"].rsplit(":", 1)[1])

    def consume(self, listeners: list[str]) -> None:
        proc = self.start("consumer", sys.executable, "-m", "scistream.demo_apps", "consumer",
                          "--connect", ",".join(listeners), "--size", str(SIZE), "--timeout", "30",
                          stdout=subprocess.PIPE)
        result = read_result(proc, timeout=90)
        for s, (off, n) in zip(result["slices"], slices(SIZE, len(listeners)), strict=True):
            assert not s["error"], s["error"]
            assert s["received"] == n and s["sha256"] == expected_sha(SEED, off, n)

    def close(self) -> None:
        # s2cs first: a running s2cs would start a new s2ds for the one stopped under it.
        self.topo.close()
        for state in self.state:
            stop_spawned_s2ds(str(state))


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    with netns.Topology(PREFIX) as topo:
        h = Hosts(topo, tmp_path)
        try:
            yield h
        finally:
            h.close()


def _json(res: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    return dict(json.loads(res.stdout))


def _s2uc_json(hosts: Hosts, proc: subprocess.Popen[bytes], name: str) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, (hosts.dir / name).read_text(errors="replace")[-1500:] \
        if (hosts.dir / name).exists() else f"{name} failed"
    return dict(json.loads(out))


@pytest.mark.parametrize(("backend", "security", "num_conn"), [
    ("native", "tls", 1),
    ("native", "tls", 8),
    # the tutorial's --type=Haproxy: no TLS-PSK, so per-session certificates minted by the PROD s2cs
    ("Haproxy", "tls", 8),
])
def test_vm_tutorial(hosts: Hosts, backend: str, security: str, num_conn: int) -> None:
    """shared/seeds/vm-tutorial.md 6.2-6.3: prod-req --mock True + appctrl mock on the
    producer, cons-req + appctrl mock on the consumer, then stream producer -> consumer."""
    app_port = hosts.producer_app()
    # vagrant ssh producers2: s2cs --verbose --port=5007 --listener-ip=... --type=Haproxy
    hosts.s2cs("prod_gw", "--verbose", "--port=5007", f"--listener-ip={A['prod_gw_wan']}",
               f"--type={backend}", f"--security={security}")
    hosts.s2cs("cons_gw", "--verbose", "--port=5007", f"--listener-ip={A['cons_gw_lan']}",
               f"--type={backend}", f"--security={security}")
    prod_s2cs, cons_s2cs = f"{A['prod_gw_lan']}:5007", f"{A['cons_gw_lan']}:5007"
    # The data-channel key travels from the producer side to the consumer side by file.
    key = ["--key-file", str(hosts.dir / "session.key")] if security == "tls" else []
    # vagrant ssh producer: s2uc prod-req --s2cs 192.168.10.11:5007 --mock True (waits for hello)
    prod_req = hosts.start("producer", "s2uc", "prod-req", "--s2cs", prod_s2cs, "--mock", "True",
                           "--server_cert", "server.crt", "--num_conn", str(num_conn), *key,
                           "--json", stdout=subprocess.PIPE)
    # second terminal: appctrl mock <uid> 192.168.10.11:5007 INVALID_TOKEN PROD 192.168.10.10
    hosts.run("producer", "appctrl", "mock", MOCK_UID, prod_s2cs, "INVALID_TOKEN", "PROD", A["producer"],
              "--ports", str(app_port), "--server_cert", "server.crt")
    prod = _s2uc_json(hosts, prod_req, "producer-s2uc.log")
    assert len(prod["listeners"]) == num_conn
    assert all(ep.startswith(A["prod_gw_wan"] + ":") for ep in prod["listeners"])
    # vagrant ssh consumer: s2uc cons-req --s2cs 192.168.30.10:5007 <uid> <producer listeners>
    cons_req = hosts.start("consumer", "s2uc", "cons-req", "--s2cs", cons_s2cs, "--server_cert",
                           "server.crt", "--num_conn", str(num_conn), *key, "--json",
                           MOCK_UID, *prod["listeners"], stdout=subprocess.PIPE)
    # ...and its hello, with the 1.x quirk of saying PROD on the consumer side.
    hosts.run("consumer", "appctrl", "mock", MOCK_UID, cons_s2cs, "INVALID_TOKEN", "PROD",
              A["prod_gw_wan"], "--server_cert", "server.crt")
    cons = _s2uc_json(hosts, cons_req, "consumer-s2uc.log")
    assert len(cons["listeners"]) == num_conn
    hosts.consume(cons["listeners"])
    hosts.run("producer", "s2uc", "release", "--s2cs", prod_s2cs, "--server_cert", "server.crt", MOCK_UID)
    hosts.run("consumer", "s2uc", "release", "--s2cs", cons_s2cs, "--server_cert", "server.crt", MOCK_UID)


@pytest.mark.parametrize("s2cs_type", ["native", "StunnelSubprocess"])
def test_sc24_tutorial_part2(hosts: Hosts, s2cs_type: str) -> None:
    """shared/seeds/sc24-tutorial.md part 2: inbound-request (s2uc sends the hello for
    --remote_ip:--receiver_ports), outbound-request with the inbound listener."""
    app_port = hosts.producer_app()
    hosts.s2cs("prod_gw", f"--type={s2cs_type}", "--verbose", f"--listener_ip={A['prod_gw_wan']}")
    hosts.s2cs("cons_gw", f"--type={s2cs_type}", "--verbose", f"--listener_ip={A['cons_gw_lan']}")
    inbound = _json(hosts.run(
        "producer", "s2uc", "inbound-request", "--server_cert=server.crt", "--remote_ip", A["producer"],
        "--s2cs", f"{A['prod_gw_lan']}:5000", "--receiver_ports", str(app_port), "--num_conn", "1",
        "--json"))
    (listener,) = inbound["listeners"]
    uid = inbound["uid"]
    port = listener.rsplit(":", 1)[1]
    outbound = _json(hosts.run(
        "consumer", "s2uc", "outbound-request", "--server_cert=server.crt", "--remote_ip", A["prod_gw_wan"],
        "--s2cs", f"{A['cons_gw_lan']}:5000", "--receiver_ports", port, "--num_conn", "1", "--json",
        uid, listener))
    hosts.consume(outbound["listeners"])
    for host, s2cs in (("producer", A["prod_gw_lan"]), ("consumer", A["cons_gw_lan"])):
        with contextlib.suppress(AssertionError):
            hosts.run(host, "s2uc", "release", "--s2cs", f"{s2cs}:5000", "--server_cert", "server.crt",
                      uid)
