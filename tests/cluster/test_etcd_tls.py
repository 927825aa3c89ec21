"""TLS to etcd: https:// endpoints, the members' certificates checked against --etcd-ca,
this node's client certificate presented to an etcd that runs with --client-cert-auth.

One etcd member serving clients over TLS only, with certificates of a CA made for the
test (tests/etcd_cluster.py, ``tls=True``); what a client without the right credentials
gets, and gateway nodes that run a session over it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_support import GatewayCluster, req_with_hello, status_of
from etcd_cluster import ETCD, EtcdCluster

from scistream.certs import make_gateway_cert
from scistream.etcd import EtcdClient, EtcdTls, EtcdUnavailable
from scistream.s2cs.clusterkey import write_cluster_key

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def tls_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    if not os.access(ETCD, os.X_OK):
        pytest.skip(f"{ETCD} is missing: install Debian's etcd-server (./dev setup does)")
    cluster = EtcdCluster(1, parent=tmp_path_factory.getbasetemp(), tls=True)
    try:
        cluster.start_all()
        yield cluster
    finally:
        cluster.close()


def test_a_client_with_the_clusters_credentials_reads_writes_and_watches(tls_etcd: EtcdCluster) -> None:
    async def main() -> None:
        c = EtcdClient(tls_etcd.endpoints, tls=tls_etcd.client_tls())
        try:
            rev = await c.put(b"/tls/a", b"1")
            (kv,), _ = await c.get(b"/tls/a")
            assert (kv.value, kv.mod_revision) == (b"1", rev)
            lease = await c.lease_grant(5)
            await c.put(b"/tls/leased", b"x", lease=lease)
            watch = c.watch(b"/tls/", rev + 1).__aiter__()
            await c.put(b"/tls/b", b"2")
            events: list[bytes] = []
            while b"/tls/b" not in events:
                batch = await asyncio.wait_for(watch.__anext__(), 10)
                events += [e.kv.key for e in batch]
            await c.lease_revoke(lease)
            assert (await c.get(b"/tls/leased"))[0] == []
        finally:
            await c.close()

    asyncio.run(main())


def _refused(endpoints: list[str], tls: EtcdTls | None) -> str:
    async def main() -> str:
        c = EtcdClient(endpoints, timeout=3.0, tls=tls)
        try:
            with pytest.raises(EtcdUnavailable) as err:
                await c.put(b"/tls/x", b"must not land")
            return str(err.value)
        finally:
            await c.close()

    return asyncio.run(main())


def test_what_lacks_the_credentials_is_refused(tls_etcd: EtcdCluster, tmp_path: Path) -> None:
    good = tls_etcd.client_tls()
    plain = [e.replace("https://", "http://") for e in tls_etcd.endpoints]
    stranger = make_gateway_cert(tmp_path, "stranger", ["127.0.0.1"], ca_name="other-ca")
    other_ca = stranger.ca_cert.read_bytes()
    cases = {
        "no client certificate": (tls_etcd.endpoints, EtcdTls(ca=good.ca)),
        "a client certificate of another CA": (
            tls_etcd.endpoints,
            EtcdTls(ca=good.ca, cert=stranger.cert.read_bytes(), key=stranger.key.read_bytes()),
        ),
        "members checked against another CA": (
            tls_etcd.endpoints,
            EtcdTls(ca=other_ca, cert=good.cert, key=good.key),
        ),
        "the system's CAs only": (tls_etcd.endpoints, None),
        "plaintext to a TLS member": (plain, None),
    }
    for what, (endpoints, tls) in cases.items():
        message = _refused(endpoints, tls)
        assert "127.0.0.1" in message and "cannot be reached (" in message, (what, message)
        if what.startswith(("members", "the system's")):  # our check of the members failed: said so
            assert "CERTIFICATE_VERIFY_FAILED" in message, (what, message)

    async def nothing_landed() -> None:
        c = EtcdClient(tls_etcd.endpoints, tls=good)
        try:
            assert (await c.get(b"/tls/x"))[0] == []
        finally:
            await c.close()

    asyncio.run(nothing_landed())


def test_gateway_nodes_run_a_session_over_tls_etcd(tls_etcd: EtcdCluster, tmp_path: Path) -> None:
    pki = tls_etcd.client_pki
    assert pki is not None
    creds = ("--etcd-ca", str(pki.ca_cert), "--etcd-cert", str(pki.cert), "--etcd-key", str(pki.key))
    with GatewayCluster(tmp_path, tls_etcd.endpoints, size=2, extra=creds) as gw:
        uid = "tls-" + secrets.token_hex(4)
        resp = req_with_hello(gw.nodes[0].stub, uid, "PROD", 2, ["127.0.0.1:9"], hello_stub=gw.nodes[1].stub)
        assert len(resp.listeners) == 2
        (a,) = status_of(gw.nodes[0].stub, uid)
        (b,) = status_of(gw.nodes[1].stub, uid)
        assert a == b
        assert sorted(a.listener_nodes) == ["n0", "n1"], a  # spread over both nodes


def test_a_node_that_cannot_trust_etcd_stops_saying_why(tls_etcd: EtcdCluster, tmp_path: Path) -> None:
    pki = tls_etcd.client_pki
    assert pki is not None
    stranger = make_gateway_cert(tmp_path / "other", "stranger", ["127.0.0.1"], ca_name="other-ca")
    key = tmp_path / "cluster.key"
    write_cluster_key(key)
    url = tls_etcd.endpoints[0]
    proc = subprocess.run(
        [sys.executable, "-m", "scistream.s2cs.cli", "--ssl", "False", "--port", "0",
         "--etcd", url, "--etcd-key-file", str(key), "--node-name", "a",
         "--etcd-ca", str(stranger.ca_cert), "--etcd-cert", str(pki.cert), "--etcd-key", str(pki.key)],
        check=False, capture_output=True, text=True, timeout=60,
        env={**os.environ, "SCISTREAM_STATE_DIR": str(tmp_path / "state")},
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1]
    assert last.startswith(f"s2cs: cannot join the gateway cluster at {url}: "), last
    assert "CERTIFICATE_VERIFY_FAILED" in last and "check that --etcd-ca is the CA" in last, last
    assert "Traceback" not in proc.stderr
