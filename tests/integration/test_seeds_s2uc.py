"""The seed tutorials' command lines, as subprocesses, against two real local s2cs.

Two s2cs (native backend, TLS control channel with a certificate from
``scistream certs``) stand for the producer and consumer facilities on
loopback. The commands are those of shared/seeds/*.md with local addresses;
bytes go producer app -> inbound gateway -> TLS -> outbound gateway -> consumer
and are compared by SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from s2cs_process import Gateway, PairEnv, background, gateway_pair, run

from scistream.certs import make_self_signed

pytestmark = pytest.mark.timeout(120)
MOCK_UID = "4f8583bc-a4d3-11ee-9fd6-034d1fcbd7c3"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


Env = PairEnv  # the seed tutorials need nothing beyond the pair itself


@pytest.fixture(scope="module")
def gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    d = tmp_path_factory.mktemp("seeds")
    cert, key = make_self_signed(d, ["127.0.0.1"], ["localhost"])
    args = (f"--server_crt={cert}", f"--server_key={key}", "--hello-timeout", "30")
    with gateway_pair(d, *args) as (prod, cons, env):
        yield Env(d, cert, prod, cons, env)
    for g in (prod, cons):
        assert "Traceback" not in g.log.read_text(errors="replace"), g.log.read_text()[-3000:]


class Producer:
    """A TCP server application: every connection gets ``size`` random bytes, then EOF."""

    def __init__(self, size: int = 2 * 1024 * 1024) -> None:
        self.data = random.randbytes(size)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(self.data)

    def close(self) -> None:
        self.sock.close()

    @property
    def sha(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def fetch(endpoint: str, timeout: float = 30) -> str:
    host, port = endpoint.rsplit(":", 1)
    h = hashlib.sha256()
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        while chunk := s.recv(1 << 16):
            h.update(chunk)
    return h.hexdigest()


def listeners(stdout: str) -> list[str]:
    return re.findall(r'^listeners: "([^"]+)"$', stdout, re.MULTILINE)


def bytes_seen(e: Env, uid: str, gw: Gateway) -> int:
    deadline = time.time() + 10
    total = 0
    while time.time() < deadline:
        r = run(e, "s2uc", "check-status", uid, "--s2cs", gw.address, "--server_cert", str(e.cert), "--json")
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)[0]
        total = doc["bytes_to_target"] + doc["bytes_from_target"]
        if total:
            break
        time.sleep(0.5)
    return total


def test_sc24_inbound_then_outbound_request(gateways: Env) -> None:
    e, app = gateways, Producer()
    try:
        # SC24 1.3: s2uc sends the hello itself (--remote_ip/--receiver_ports).
        r = run(
            e,
            "s2uc",
            "inbound-request",
            f"--server_cert={e.cert}",
            "--remote_ip",
            "127.0.0.1",
            "--s2cs",
            e.prod.address,
            "--receiver_ports",
            str(app.port),
            "--num_conn",
            "1",
        )
        assert r.returncode == 0, r.stderr
        for line in (
            "sending client request message",
            "started client request",
            "waiting for hello message",
            "sending for hello message",
            "Hello message sent successfully",
        ):
            assert line in r.stdout
        uid = r.stdout.splitlines()[1].split()[0]
        inbound = listeners(r.stdout)
        assert len(inbound) == 1
        # SC24 2.5: outbound-request ... <uid> <inbound listener>
        r = run(
            e,
            "s2uc",
            "outbound-request",
            f"--server_cert={e.cert}",
            "--remote_ip",
            "127.0.0.1",
            "--s2cs",
            e.cons.address,
            "--receiver_ports",
            "5201",
            "--num_conn",
            "1",
            uid,
            inbound[0],
        )
        assert r.returncode == 0, r.stderr
        outbound = listeners(r.stdout)
        assert fetch(outbound[0]) == app.sha
        assert bytes_seen(e, uid, e.cons) > 0
        r = run(
            e, "s2uc", "check-status", uid, "--s2cs", e.prod.address, "--server_cert", str(e.cert), "--json"
        )
        assert json.loads(r.stdout)[0]["security"] == "tls"
        # An outbound gateway with the wrong key gets nothing: the WAN leg is authenticated.
        keyfile = e.dir / "wrong.key"
        keyfile.write_text(os.urandom(32).hex())
        rogue = f"rogue-{random.randrange(1 << 30)}"
        r = run(
            e,
            "s2uc",
            "outbound-request",
            f"--server_cert={e.cert}",
            "--remote_ip",
            "127.0.0.1",
            "--s2cs",
            e.cons.address,
            "--num_conn",
            "1",
            "--key-file",
            str(keyfile),
            rogue,
            inbound[0],
        )
        assert r.returncode == 0, r.stderr
        try:
            got = fetch(listeners(r.stdout)[0], timeout=10)
        except OSError:
            got = ""
        assert got != app.sha
        run(e, "s2uc", "release", rogue, "--s2cs", e.cons.address, "--server_cert", str(e.cert))
        r = run(e, "s2uc", "release", uid, "--server_cert", str(e.cert))
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("Release completed") == 2
    finally:
        app.close()


def test_vm_tutorial_prod_req_cons_req_with_appctrl_mock_and_zmq_apps(gateways: Env) -> None:
    e = gateways
    zport = free_port()
    prod_req = background(
        e, "s2uc", "prod-req", "--s2cs", e.prod.address, "--mock", "True", "--server_cert", str(e.cert)
    )
    try:
        r = run(
            e,
            "appctrl",
            "mock",
            MOCK_UID,
            e.prod.address,
            "INVALID_TOKEN",
            "PROD",
            "127.0.0.1",
            "--ports",
            str(zport),
            "--server-cert",
            str(e.cert),
        )
        assert r.returncode == 0, r.stderr
        out, err = prod_req.communicate(timeout=30)
        assert prod_req.returncode == 0, err
        assert f"{MOCK_UID} {e.prod.address} INVALID_TOKEN PROD" in out
        inbound = re.search(r"^Listeners: \['([^']+)'", out, re.MULTILINE)
        assert inbound, out
        cons_req = background(
            e,
            "s2uc",
            "cons-req",
            "--s2cs",
            e.cons.address,
            "--num_conn",
            "1",
            "--server_cert",
            str(e.cert),
            MOCK_UID,
            inbound.group(1),
        )
        time.sleep(0.3)
        r = run(
            e,
            "appctrl",
            "mock",
            MOCK_UID,
            e.cons.address,
            "INVALID_TOKEN",
            "PROD",
            "127.0.0.1",
            "--server-cert",
            str(e.cert),
        )
        assert r.returncode == 0, r.stderr
        out, err = cons_req.communicate(timeout=30)
        assert cons_req.returncode == 0, err
        outbound = listeners(out)[0]
        # The 1.x demo apps, through both gateways: numbered messages, none lost or corrupt.
        producer = background(e, "appctrl", "run-producer", str(zport), "--count", "500", "--size", "4096")
        sub = run(e, "appctrl", "subscribe", outbound, "--timeout", "30", "--json")
        producer.communicate(timeout=30)
        assert sub.returncode == 0, sub.stdout + sub.stderr
        rep = json.loads(sub.stdout)
        assert (rep["messages"], rep["bytes"], rep["lost"], rep["corrupt"]) == (500, 500 * 4096, 0, 0)
        assert producer.returncode == 0
    finally:
        r = run(
            e,
            "s2uc",
            "release",
            MOCK_UID,
            "--s2cs",
            e.prod.address,
            "--s2cs",
            e.cons.address,
            "--server_cert",
            str(e.cert),
        )
        for p in (prod_req,):
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert r.returncode == 0, r.stderr


def test_stream_one_call_tls_and_release_both_in_one_call(gateways: Env) -> None:
    e, app = gateways, Producer(size=3 * 1024 * 1024 + 17)
    try:
        r = run(
            e,
            "s2uc",
            "stream",
            "--prod-s2cs",
            e.prod.address,
            "--cons-s2cs",
            e.cons.address,
            "--server_cert",
            str(e.cert),
            "--producer",
            f"127.0.0.1:{app.port}",
            "--num_conn",
            "2",
            "--json",
        )
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["security"] == "tls" and len(doc["connect"]) == 2
        for ep in doc["connect"]:
            assert fetch(ep) == app.sha
        r = run(e, "s2uc", "release", doc["uid"], "--server_cert", str(e.cert))
        assert r.returncode == 0, r.stderr
        for gw in (e.prod, e.cons):
            r = run(
                e,
                "s2uc",
                "check-status",
                doc["uid"],
                "--s2cs",
                gw.address,
                "--server_cert",
                str(e.cert),
                "--json",
            )
            assert r.returncode != 0 or json.loads(r.stdout)[0]["state"] == "released"
    finally:
        app.close()


def test_appctrl_run_on_both_sides_with_stream_waiting_for_them(gateways: Env) -> None:
    e = gateways
    zport = free_port()
    uid = f"run-{random.randrange(1 << 30)}"
    stream = background(
        e,
        "s2uc",
        "stream",
        "--prod-s2cs",
        e.prod.address,
        "--cons-s2cs",
        e.cons.address,
        "--server_cert",
        str(e.cert),
        "--appctrl",
        "--uid",
        uid,
        "--num_conn",
        "1",
        "--json",
    )
    try:
        prod = background(
            e,
            "appctrl",
            "run",
            "--uid",
            uid,
            "--s2cs",
            e.prod.address,
            "--role",
            "PROD",
            "--listen",
            f"127.0.0.1:{zport}",
            "--server-cert",
            str(e.cert),
            "--",
            "appctrl",
            "run-producer",
            "{prod_listener}",
            "--count",
            "200",
            "--size",
            "1000",
        )
        time.sleep(0.5)
        cons = background(
            e,
            "appctrl",
            "run",
            "--uid",
            uid,
            "--s2cs",
            e.cons.address,
            "--role",
            "CONS",
            "--server-cert",
            str(e.cert),
            "--",
            "appctrl",
            "subscribe",
            "{listener}",
            "--json",
            "--timeout",
            "30",
        )
        out, err = cons.communicate(timeout=60)
        assert cons.returncode == 0, err
        rep = json.loads(out)
        assert (rep["messages"], rep["lost"], rep["corrupt"]) == (200, 0, 0)
        prod.communicate(timeout=30)
        assert prod.returncode == 0
        out, err = stream.communicate(timeout=30)
        assert stream.returncode == 0, err
        assert json.loads(out)["uid"] == uid
    finally:
        for p in (stream,):
            if p.poll() is None:
                p.kill()
                p.communicate()
        run(
            e,
            "s2uc",
            "release",
            uid,
            "--s2cs",
            e.prod.address,
            "--s2cs",
            e.cons.address,
            "--server_cert",
            str(e.cert),
        )


def test_errors_against_real_s2cs_are_one_line(gateways: Env, tmp_path: Path) -> None:
    e = gateways
    r = run(e, "s2uc", "release", "no-such-uid", "--s2cs", e.prod.address, "--server_cert", str(e.cert))
    assert r.returncode == 5 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    other, _ = make_self_signed(tmp_path, ["127.0.0.1"], [])
    r = run(e, "s2uc", "check-status", "--s2cs", e.prod.address, "--server_cert", str(other))
    assert r.returncode == 3 and "does not match --server_cert" in r.stderr
    assert r.stderr.count("\n") == 1, r.stderr  # gRPC's own handshake log stays quiet
    r = run(
        e,
        "s2uc",
        "outbound-request",
        "--s2cs",
        e.cons.address,
        "--server_cert",
        str(e.cert),
        "--num_conn",
        "1",
        "--remote_ip",
        "127.0.0.1",
        "--timeout",
        "10",
        f"nokey-{random.randrange(1 << 30)}",
        "127.0.0.1:1",
    )
    # No key anywhere for a tls session: s2uc says so, the s2cs refuses, one line each.
    assert r.returncode != 0 and "no data-channel key" in r.stderr and "Traceback" not in r.stderr
    assert sys.executable  # the subprocesses used the installed entry points


def test_iperf3_through_a_stream_with_appctrl_wrappers(gateways: Env) -> None:
    e = gateways
    port = free_port()
    server = background(e, "appctrl", "iperf-server", str(port), "--bind", "127.0.0.1")
    try:
        r = run(
            e,
            "s2uc",
            "stream",
            "--prod-s2cs",
            e.prod.address,
            "--cons-s2cs",
            e.cons.address,
            "--server_cert",
            str(e.cert),
            "--producer",
            f"127.0.0.1:{port}",
            "--num_conn",
            "1",
            "--json",
        )
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        time.sleep(0.3)  # iperf3 -s is listening well before this, but give a slow machine a moment
        total = 256 * 1024 * 1024
        c = run(e, "appctrl", "iperf-client", doc["connect"][0], "--bytes", str(total), "--json")
        assert c.returncode == 0, c.stdout[-2000:] + c.stderr
        end = json.loads(c.stdout)["end"]
        assert end["sum_sent"]["bytes"] == total
        # iperf3's server stops counting when the end-of-test message arrives on its
        # control connection, which can overtake the last data the two gateways still
        # buffer on the data connection; byte-exactness is checked by the SHA-256 tests.
        assert end["sum_received"]["bytes"] >= 0.8 * total, end["sum_received"]
        assert run(e, "s2uc", "release", doc["uid"], "--server_cert", str(e.cert)).returncode == 0
        server.communicate(timeout=20)
        assert server.returncode == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()


def test_create_appctrl_both_sides(gateways: Env) -> None:
    e = gateways
    zport = free_port()
    uid = f"create-{random.randrange(1 << 30)}"
    stream = background(
        e,
        "s2uc",
        "stream",
        "--prod-s2cs",
        e.prod.address,
        "--cons-s2cs",
        e.cons.address,
        "--server_cert",
        str(e.cert),
        "--appctrl",
        "--uid",
        uid,
        "--num_conn",
        "1",
    )
    prod = cons = None
    try:
        prod = background(
            e,
            "appctrl",
            "create-appctrl",
            uid,
            e.prod.address,
            "INVALID_TOKEN",
            "PROD",
            "--port",
            str(zport),
            "--count",
            "100",
            "--size",
            "512",
            "--server-cert",
            str(e.cert),
        )
        time.sleep(0.5)
        cons = background(
            e,
            "appctrl",
            "create_appctrl",
            uid,
            e.cons.address,
            "INVALID_TOKEN",
            "CONS",
            "--server-cert",
            str(e.cert),
        )
        out, err = cons.communicate(timeout=60)
        assert cons.returncode == 0, out + err
        assert "consumer: 100/100 messages, 51200 bytes" in out and "lost 0, corrupt 0" in out
        prod.communicate(timeout=30)
        assert prod.returncode == 0
        stream.communicate(timeout=30)
        assert stream.returncode == 0
    finally:
        for p in (stream, prod, cons):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate()
        run(e, "s2uc", "release", uid, "--server_cert", str(e.cert))
