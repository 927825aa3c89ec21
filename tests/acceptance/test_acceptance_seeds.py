"""The seed tutorials (../shared/seeds/*.md) as typed, two gateways on one host, defaults.

Each seed command below is the seed's own text (checked against the seed file when the
checkout has ../shared beside it), typed through ``typed()``, which changes addresses and
ports only, and only where they must change on one host:

* every VM / container address becomes a loopback address of the sandbox (the gateways
  127.0.0.1 and 127.0.0.2, the applications 127.0.0.3 and 127.0.0.4);
* a control port that two gateways of one host cannot share (the VM tutorial starts both
  on 5007) becomes another one for the second gateway;
* the iperf server listens on the port the hello announced (the seed's 5001 is not one the
  gateway forwards to) and the client connects to the consumer gateway's listener; the
  seed's ``iperf`` is Debian's ``iperf3``, and 60 s become a few seconds;
* the docker volume ``/scistream`` is a directory of the sandbox.

Around the seed commands the test does what the seeds leave to their setting: the VMs'
shared ``./vagrant`` folder, the "AWS" gateway of the SC24 tutorial, a stand-in for Globus
Auth (the only address that cannot be mapped to loopback otherwise; the secret and the
``[scopes]`` line come from the README's Globus Auth section, which the seed defers to),
and the check that bytes arrive intact.

Everything runs in a sandbox (see enter_sandbox.sh) with default state directories.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable

import pytest
from acceptance_sandbox import (
    UUID_RE,
    Clone,
    Sandbox,
    ScenarioFailed,
    background,
    finish,
    listeners_of,
    serving,
)

MOCK_UID = "4f8583bc-a4d3-11ee-9fd6-034d1fcbd7c3"

VM_MAP = {
    "192.168.10.11:5007": "127.0.0.1:5007",  # producer gateway
    "192.168.30.10:5007": "127.0.0.1:5008",  # consumer gateway: same host, so another port
    "192.168.10.11": "127.0.0.1",
    "192.168.30.10": "127.0.0.1",
    "192.168.10.10": "127.0.0.3",  # producer application host
    "192.168.20.10": "127.0.0.4",  # consumer application host
}
SC24_MAP = {
    "44.205.7.224:5002": "127.0.0.2:5002",  # the tutorial's "AWS" gateway (inbound)
    "44.205.7.224": "127.0.0.2",
    "172.17.0.2:5000": "127.0.0.1:5000",  # the local gateway in the container
    "172.17.0.2": "127.0.0.1",
    "172.31.3.153": "127.0.0.3",  # the private producer application
    '"/scistream/': '"/tmp/sc24/scistream/',
}


def typed(
    seed_text: str | None, cmd: str, mapping: dict[str, str], extra: dict[str, str] | None = None
) -> str:
    """``cmd`` as the seed prints it (checked when the seed is at hand), addresses mapped."""
    if seed_text is not None:
        norm = " ".join(seed_text.replace("\\\n", " ").split())
        assert " ".join(cmd.split()) in norm, f"not in the seed any more: {cmd!r}"
    out = cmd
    table = {**mapping, **(extra or {})}
    for old in sorted(table, key=len, reverse=True):  # "a.b.c.d:port" before "a.b.c.d"
        out = out.replace(old, table[old])
    return out


def seed(clone: Clone, name: str) -> str | None:
    path = clone.shared / "seeds" / name
    return path.read_text() if path.exists() else None


def enter_user_shell(box: Sandbox, clone: Clone) -> None:
    box.ok(f"cd {shlex.quote(str(clone.root))} && . .venv/bin/activate", "activate the venv")


@pytest.mark.timeout(300)
def test_vm_tutorial_as_typed_haproxy_two_gateways_one_host(
    user_clone: Clone, sandbox: Callable[[], Sandbox]
) -> None:
    """shared/seeds/vm-tutorial.md: `s2cs --type=Haproxy` on both sides with default state
    directories, prod-req / cons-req with `appctrl mock`, Globus login on the consumer side,
    iperf through the pair (issue 10, items 2 and 3)."""
    text = seed(user_clone, "vm-tutorial.md")
    box = sandbox()
    enter_user_shell(box, user_clone)
    w = "/tmp/vm"
    box.ok(f"mkdir -p {w}/producers2 {w}/producer {w}/consumers2 {w}/consumer {w}/vagrant", "the VMs")
    for vm in ("producer", "consumer"):  # the VMs' shared folder
        box.ok(f"ln -s {w}/vagrant {w}/{vm}/vagrant", "the vagrant shared folder")

    # "Generate Digital Certificates", on producers2.
    box.ok(f"cd {w}/producers2", "producers2")
    box.ok(typed(text, "openssl genrsa -out server.key 2048", VM_MAP), "seed: the key")
    conf = typed(text, "CN = 192.168.10.11", VM_MAP), typed(text, "subjectAltName = IP:192.168.10.11", VM_MAP)
    box.ok(
        "cat > server.conf <<'EOF'\n[req]\ndistinguished_name = req_distinguished_name\n"
        "x509_extensions = v3_req\nprompt = no\n\n[req_distinguished_name]\n"
        f"{conf[0]}\n\n[v3_req]\n{conf[1]}\nEOF",
        "seed: server.conf",
    )
    box.ok(
        typed(text, "openssl req -new -key server.key -out server.csr -config server.conf", VM_MAP),
        "seed: the CSR",
    )
    box.ok(
        typed(
            text,
            "openssl x509 -req -days 365 -in server.csr -signkey server.key -out server.crt "
            "-extfile server.conf -extensions v3_req",
            VM_MAP,
        ),
        "seed: the certificate",
    )
    box.ok(f"cp server.crt server.key {w}/vagrant/", "the shared folder holds the gateway certificate")

    # 6.2, producer gateway.
    prod_s2cs = background(
        box, typed(text, "s2cs --verbose --port=5007 --listener-ip=192.168.10.11 --type=Haproxy", VM_MAP)
    )
    serving(box, "127.0.0.1:5007", "server.crt")

    # Producer: prod-req waits for the hello; the second terminal sends it.
    box.ok(f"cd {w}/producer", "producer")
    box.ok(typed(text, "cp ./vagrant/server.crt ./server.crt", VM_MAP), "seed: the pinned certificate")
    prod_req = background(box, typed(text, "s2uc prod-req --s2cs 192.168.10.11:5007 --mock True", VM_MAP))
    box.ok(
        typed(text, f"appctrl mock {MOCK_UID} 192.168.10.11:5007 INVALID_TOKEN PROD 192.168.10.10", VM_MAP),
        "seed: the producer's hello",
    )
    out = finish(box, prod_req, "seed 6.2: prod-req after the hello")
    prod_listeners = listeners_of(out)
    assert prod_listeners, f"prod-req printed no listeners:\n{out}"
    assert "Traceback" not in prod_s2cs[0].out, prod_s2cs[0].out[-3000:]

    # Consumer gateway, with Globus Auth (reached at a loopback stand-in).
    box.ok(f"cd {w}/consumers2 && cp {w}/vagrant/server.crt {w}/vagrant/server.key .", "consumers2")
    box.ok(
        box.py("globus --port 8443 --scope https://auth.globus.org/scopes/abc/scistream") + " &",
        "the Globus Auth stand-in",
    )
    globus_env = "GLOBUS_SDK_SERVICE_URL_AUTH=http://127.0.0.1:8443/"
    cons_cmd = typed(
        text,
        "s2cs --verbose --port=5007 --listener-ip=192.168.30.10 --type=Haproxy "
        '--client-id "abc" --client-secret',
        VM_MAP,
        {"--port=5007": "--port=5008"},
    )
    cons_s2cs = background(box, f"SCISTREAM_CLIENT_SECRET=the-secret {globus_env} {cons_cmd}")
    serving(box, "127.0.0.1:5008", "server.crt")

    box.ok(f"cd {w}/consumer", "consumer")
    box.ok(typed(text, "cp ./vagrant/server.crt ./server.crt", VM_MAP), "seed: the pinned certificate")
    box.ok(
        'mkdir -p ~/.config/scistream && printf \'[scopes]\\n"127.0.0.1:5008" = "abc"\\n\' '
        "> ~/.config/scistream/s2uc.toml",
        "the README's [scopes] line for the consumer gateway",
    )
    box.ok(
        f"{globus_env} " + typed(text, 's2uc login --scope "abc"', VM_MAP),
        "seed: s2uc login",
        stdin="the-authorization-code\n",
    )
    cons_req = background(
        box,
        typed(
            text,
            f"s2uc cons-req --s2cs 192.168.30.10:5007 {MOCK_UID} 192.168.20.10:5074",
            VM_MAP,
            {"192.168.20.10:5074": prod_listeners[0]},
        ),
    )
    box.ok(
        typed(text, f"appctrl mock {MOCK_UID} 192.168.30.10:5007 INVALID_TOKEN PROD 192.168.20.10", VM_MAP),
        "seed: the consumer's hello",
    )
    out = finish(box, cons_req, "seed 6.2: cons-req after the hello")
    cons_listeners = listeners_of(out)
    assert cons_listeners, f"cons-req printed no listeners:\n{out}"

    # 6.3: iperf through the pair.
    box.ok(f"cd {w}/producer", "producer")
    box.ok(
        typed(text, "iperf -s -p 5001", VM_MAP, {"iperf": "iperf3", "5001": "5074"}) + " &",
        "seed 6.3: the iperf server",
    )
    host, port = cons_listeners[0].rsplit(":", 1)
    box.ok(f"cd {w}/consumer", "consumer")
    client = typed(
        text,
        "iperf -c 10.16.42.12 -p 5001 -t 60",
        VM_MAP,
        {"iperf": "iperf3", "10.16.42.12": host, "5001": port, "-t 60": "-t 4"},
    )
    r = box.run(client, timeout=60)
    assert r.rc == 0, f"seed 6.3: `{client}` through the gateway pair exited {r.rc}:\n{r.out[-3000:]}"
    rate = re.search(r"([\d.]+) ([KMG])bits/sec.*receiver", r.out)
    assert rate and float(rate.group(1)) > 0, f"iperf3 moved nothing:\n{r.out[-3000:]}"
    status = box.run(
        typed(
            text,
            "python src/s2uc.py check-status <uid>",
            VM_MAP,
            {"python src/s2uc.py": "s2uc", "<uid>": MOCK_UID},
        )
    )
    assert status.rc == 0, f"seed 6.3: check-status exited {status.rc}:\n{status.out[-3000:]}"
    for job in (prod_s2cs, cons_s2cs):
        assert "Traceback" not in job[0].out, job[0].out[-3000:]


@pytest.mark.timeout(300)
def test_sc24_tutorial_part2_as_typed_two_gateways_one_host(
    user_clone: Clone, sandbox: Callable[[], Sandbox]
) -> None:
    """shared/seeds/sc24-tutorial.md part 2: certificates with openssl, a StunnelSubprocess
    gateway, inbound-request at the remote gateway, outbound-request at ours, then the
    producer's content through the pair, SHA-256 checked (issue 10, item 3). Part 1 talks to
    gateways on AWS and Globus Auth: it has no local counterpart beyond what part 2 does."""
    text = seed(user_clone, "sc24-tutorial.md")
    box = sandbox()
    enter_user_shell(box, user_clone)
    vol = "/tmp/sc24/scistream"
    box.ok(f"mkdir -p {vol} /tmp/sc24/www && cd /tmp/sc24", "the docker volume")
    box.ok(typed(text, "cd scistream", SC24_MAP), "seed 2.2")
    make_cert = (
        "openssl req -x509 -nodes -days 365 -newkey rsa:2048 -keyout server.key -out server.crt "
        '-subj "/CN=172.17.0.2" -addext "subjectAltName=IP:172.17.0.2"'
    )
    box.ok(typed(text, make_cert, SC24_MAP), "seed 2.2: the certificate")
    # The AWS gateway's certificate (server1.crt, shipped with the tutorial), made the same way.
    box.ok(
        typed(text, make_cert, SC24_MAP, {"server.": "server1.", "172.17.0.2": "127.0.0.2"}),
        "the remote gateway's certificate",
    )
    local = typed(
        text,
        's2cs --server_crt="/scistream/server.crt" --server_key="/scistream/server.key" '
        '--type="StunnelSubprocess" --verbose --listener_ip=172.17.0.2',
        SC24_MAP,
    )
    # The remote gateway, run by its operator as part 2.3 runs ours.
    remote = typed(None, local, {"server.": "server1.", "--listener_ip=127.0.0.1": "--listener_ip=127.0.0.2"})
    remote_job = background(box, f"{remote} --port=5002")
    local_job = background(box, local)
    serving(box, "127.0.0.2:5002", f"{vol}/server1.crt")
    serving(box, "127.0.0.1:5000", f"{vol}/server.crt")

    # The private producer application at 172.31.3.153:80.
    box.ok("head -c 3000017 /dev/urandom > /tmp/sc24/www/index.html", "the producer's content")
    expected = box.ok("sha256sum < /tmp/sc24/www/index.html", "its SHA-256").out.split()[0]
    box.ok(
        "python3 -m http.server 80 --bind 127.0.0.3 --directory /tmp/sc24/www > /dev/null 2>&1 &",
        "the producer application",
    )

    r = box.ok(
        typed(
            text,
            's2uc inbound-request --server_cert="/scistream/server1.crt" '
            "--remote_ip 172.31.3.153 --s2cs 44.205.7.224:5002 --receiver_ports 80 "
            "--num_conn 1",
            SC24_MAP,
        ),
        "seed 2.4: inbound-request at the remote gateway",
    )
    for line in (
        "sending client request message",
        "started client request",
        "waiting for hello message",
        "Hello message sent successfully",
    ):
        assert line in r.out, f"seed 1.3's expected output lacks {line!r}:\n{r.out}"
    uid = re.search(UUID_RE, r.out)
    inbound = listeners_of(r.out)
    assert uid and len(inbound) == 1, r.out
    r = box.ok(
        typed(
            text,
            's2uc outbound-request --server_cert="/scistream/server.crt" '
            "--remote_ip 44.205.7.224 --s2cs 172.17.0.2:5000 --receiver_ports 5201 "
            "--num_conn 1 "
            "b6ed52b6-a3a9-11ef-946b-0242ac110003 44.205.7.224:5201",
            SC24_MAP,
            {"b6ed52b6-a3a9-11ef-946b-0242ac110003": uid.group(0), "44.205.7.224:5201": inbound[0]},
        ),
        "seed 2.5: outbound-request at our gateway",
    )
    outbound = listeners_of(r.out)
    assert len(outbound) == 1, r.out
    # As 1.3 does with curl, through both gateways this time.
    got = box.run(f"curl -sS --max-time 20 http://{outbound[0]}/ | sha256sum", timeout=30)
    if expected not in got.out:
        raise ScenarioFailed(
            f"curl through the gateway pair did not get the producer's bytes "
            f"(sha256 {expected}): {got.out}\n{box.log_tail()}"
        )
    for job in (remote_job, local_job):
        assert "Traceback" not in job[0].out, job[0].out[-3000:]
