"""The VM tutorial (shared/seeds/vm-tutorial.md) as typed, with ``s2cs --type=Haproxy`` on both sides.

HAProxy cannot use an external PSK, so the PROD s2cs mints per-session
certificates and s2uc carries them to the CONS s2cs like a PSK (DESIGN
decision 9). The commands are the tutorial's, with loopback addresses, free
ports, and ``server.crt`` in the working directory as the tutorial copies it.
Bytes go producer app -> HAProxy (PROD, TLS server) -> HAProxy (CONS, TLS
client) -> consumer and are compared by SHA-256; the test also checks that
the WAN listener refuses a client without the session's certificate, that
no secret is printed, and that the key files are gone after release.

Also here: the mixed pairs (PROD HAProxy with a native or stunnel CONS) and
the refusal of HAProxy/nginx with the 1.x compat mode at start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from s2cs_process import Gateway, background, run, start_s2cs, stop_s2cs
from test_seeds_s2uc import Producer, fetch, listeners

from scistream.certs import make_self_signed
from scistream.demo import free_port_range
from scistream.s2cs.backends.native import stop_spawned_s2ds

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.haproxy,
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed"),
]
MOCK_UID = "4f8583bc-a4d3-11ee-9fd6-034d1fcbd7c3"
SECRET_MARKERS = ("PRIVATE KEY", "BEGIN CERTIFICATE", "S2WC")


@dataclass
class Env:
    dir: Path
    prod: Gateway
    cons: dict[str, Gateway]  # backend -> CONS gateway
    env: dict[str, str]

    def session_dir(self, name: str, uid: str = MOCK_UID) -> Path:
        return self.dir / f"state-{name}" / "sessions" / uid


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    d = tmp_path_factory.mktemp("vm")
    # The tutorial's server.crt, where s2uc and appctrl look for it by default.
    cert, key = make_self_signed(d, ["127.0.0.1"], ["localhost"])
    common = (f"--server_crt={cert}", f"--server_key={key}", "--hello-timeout", "30", "--verbose")
    started: list[Gateway] = []
    cons: dict[str, Gateway] = {}
    try:
        prod = start_s2cs(d, "prod", *common, "--type=Haproxy")
        started.append(prod)
        for name, typ in (("haproxy", "Haproxy"), ("native", "native"), ("stunnel", "Stunnel")):
            cons[name] = start_s2cs(d, f"cons-{name}", *common, f"--type={typ}")
            started.append(cons[name])
    except Exception:
        for g in started:
            stop_s2cs(g.proc)
        stop_spawned_s2ds(str(d / "state-cons-native"))
        raise
    env = dict(os.environ, SCISTREAM_HOME=str(d / "home"))
    for k in [k for k in env if k.startswith("SCISTREAM_S2UC_")]:
        del env[k]
    try:
        yield Env(d, prod, cons, env)
    finally:
        for g in started:
            stop_s2cs(g.proc)
        stop_spawned_s2ds(str(d / "state-cons-native"))
        for g in started:
            text = g.log.read_text(errors="replace")
            assert "Traceback" not in text, text[-3000:]
            # --verbose s2cs logs name sessions, never their keys or certificates
            assert not [m for m in SECRET_MARKERS if m in text]


def prod_side(e: Env, app_port: int, prod: Gateway | None = None) -> tuple[str, str]:
    """``s2uc prod-req --mock True`` + ``appctrl mock ... PROD`` against ``prod`` (the fixture's
    PROD s2cs unless given); returns (inbound listener, output)."""
    prod = prod or e.prod
    prod_req = background(e, "s2uc", "prod-req", "--s2cs", prod.address, "--mock", "True")
    try:
        r = run(
            e, "appctrl", "mock", MOCK_UID, prod.address, "INVALID_TOKEN", "PROD", "127.0.0.1",
            "--ports", str(app_port),
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        out, err = prod_req.communicate(timeout=30)
    finally:
        if prod_req.poll() is None:
            prod_req.kill()
            prod_req.communicate()
    assert prod_req.returncode == 0, out + err
    inbound = re.search(r"^Listeners: \['([^']+)'", out, re.MULTILINE)
    assert inbound, out
    return inbound.group(1), out + err + r.stdout + r.stderr


def cons_side(e: Env, cons: Gateway, inbound: str) -> tuple[subprocess.Popen[str], str]:
    """``s2uc cons-req`` + ``appctrl mock`` on the CONS side (the tutorial's role PROD)."""
    cons_req = background(e, "s2uc", "cons-req", "--s2cs", cons.address, MOCK_UID, inbound)
    r = run(e, "appctrl", "mock", MOCK_UID, cons.address, "INVALID_TOKEN", "PROD", "127.0.0.1")
    assert r.returncode == 0, r.stdout + r.stderr
    cons_req.wait(timeout=30)
    return cons_req, r.stdout + r.stderr


def release(e: Env, *gws: Gateway) -> subprocess.CompletedProcess[str]:
    args = [a for g in gws for a in ("--s2cs", g.address)]
    return run(e, "s2uc", "release", MOCK_UID, *args)


def assert_no_secret(text: str, key_hex: str) -> None:
    for marker in SECRET_MARKERS:
        assert marker not in text
    assert key_hex and key_hex not in text and key_hex[:64] not in text


def stored_key_hex(e: Env) -> str:
    record = json.loads((e.dir / "home" / "sessions" / f"{MOCK_UID}.json").read_text())
    return str(record["session_key"])


def refused_without_session_cert(inbound: str) -> None:
    """A TLS client that knows no session certificate gets no producer byte."""
    host, port = inbound.rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    got = b""
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw) as tls:
                assert tls.version() == "TLSv1.3"
                while chunk := tls.recv(65536):
                    got += chunk
        except (ssl.SSLError, OSError):
            pass
    assert got == b""
    # A plain TCP client (the 1.x anonymous suites' equivalent) gets nothing either.
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(b"GET / HTTP/1.0\r\n\r\n")
        try:
            plain = raw.recv(65536)
        except OSError:
            plain = b""
    assert len(plain) < 64  # at most a TLS alert, never the producer's stream


def test_vm_tutorial_as_typed_with_haproxy_on_both_sides(vm: Env) -> None:
    e, app = vm, Producer()
    cons = e.cons["haproxy"]
    try:
        inbound, prod_out = prod_side(e, app.port)
        assert "HAProxy cannot" not in prod_out
        # The PROD session runs with its minted certificates, 0600, in its private directory.
        pdir = e.session_dir("prod")
        for name in ("own.crt", "own.key", "own.pem", "peer.crt"):
            assert stat.S_IMODE((pdir / name).stat().st_mode) == 0o600, name
        assert stat.S_IMODE(pdir.stat().st_mode) == 0o700
        cons_req, cons_out = cons_side(e, cons, inbound)
        out, err = cons_req.communicate(timeout=30)
        assert cons_req.returncode == 0, out + err
        outbound = listeners(out)
        assert len(outbound) == 5  # the tutorial's default num_conn
        assert (e.session_dir("cons-haproxy") / "own.key").is_file()
        # Bytes through both HAProxy gateways and the pinned-certificate TLS leg between them.
        assert fetch(outbound[0]) == app.sha
        assert fetch(outbound[4]) == app.sha
        refused_without_session_cert(inbound)
        key_hex = stored_key_hex(e)
        assert_no_secret(prod_out + cons_out + out + err, key_hex)
        st = run(e, "s2uc", "check-status", MOCK_UID, "--s2cs", e.prod.address, "--json")
        assert st.returncode == 0, st.stderr
        assert json.loads(st.stdout)[0]["security"] == "tls"
        assert_no_secret(st.stdout + st.stderr, key_hex)
    finally:
        r = release(e, e.prod, cons)
        app.close()
    assert r.returncode == 0, r.stdout + r.stderr
    # Nothing of the session is left on disk on either side.
    assert not e.session_dir("prod").exists()
    assert not e.session_dir("cons-haproxy").exists()
    for name in ("prod", "cons-haproxy"):
        leftovers = [p for p in (e.dir / f"state-{name}").rglob("*") if p.suffix in (".key", ".pem", ".crt")]
        assert leftovers == []


def test_prod_req_json_prints_no_secret(vm: Env) -> None:
    e, app = vm, Producer(size=1024)
    prod_req = background(e, "s2uc", "prod-req", "--s2cs", e.prod.address, "--mock", "True", "--json")
    try:
        r = run(
            e, "appctrl", "mock", MOCK_UID, e.prod.address, "INVALID_TOKEN", "PROD", "127.0.0.1",
            "--ports", str(app.port),
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        out, err = prod_req.communicate(timeout=30)
        assert prod_req.returncode == 0, err
        doc = json.loads(out)
        assert doc["has_session_key"] is True and doc["security"] == "tls"
        assert_no_secret(out + err, stored_key_hex(e))
    finally:
        if prod_req.poll() is None:
            prod_req.kill()
            prod_req.communicate()
        r = release(e, e.prod)
        app.close()
    assert r.returncode == 0, r.stderr
    assert not e.session_dir("prod").exists()


def test_haproxy_prod_with_native_cons_presents_the_session_client_certificate(vm: Env) -> None:
    e, app = vm, Producer()
    cons = e.cons["native"]
    try:
        inbound, _ = prod_side(e, app.port)
        cons_req, _ = cons_side(e, cons, inbound)
        out, err = cons_req.communicate(timeout=30)
        assert cons_req.returncode == 0, out + err
        outbound = listeners(out)
        assert fetch(outbound[0]) == app.sha
        # s2ds loaded the certificates; their files did not outlive the update.
        assert not list((e.dir / "state-cons-native").glob(".tls-*"))
    finally:
        r = release(e, e.prod, cons)
        app.close()
    assert r.returncode == 0, r.stdout + r.stderr


def test_haproxy_prod_with_stunnel_cons_is_refused_at_update_with_a_reason(vm: Env) -> None:
    if shutil.which("stunnel4") is None and shutil.which("stunnel") is None:
        pytest.skip("stunnel is not installed")
    e, app = vm, Producer(size=1024)
    cons = e.cons["stunnel"]
    try:
        inbound, _ = prod_side(e, app.port)
        cons_req, _ = cons_side(e, cons, inbound)
        _out, err = cons_req.communicate(timeout=30)
        assert cons_req.returncode != 0
        assert "per-session certificates" in err and "stunnel backend" in err, err
        assert "Traceback" not in err
    finally:
        release(e, e.prod, cons)
        app.close()


def test_backend_security_pairs_that_never_work_are_refused_at_start(tmp_path: Path) -> None:
    for typ in ("Haproxy", "Nginx"):
        with pytest.raises(RuntimeError, match=r"cannot run the SciStream 1\.x compat mode"):
            start_s2cs(tmp_path, f"compat-{typ}", "--ssl", "False", f"--type={typ}", "--scistream1-compat")
        with pytest.raises(RuntimeError, match=r"cannot run the SciStream 1\.x compat mode"):
            start_s2cs(tmp_path, f"compat2-{typ}", "--ssl", "False", f"--type={typ}", "--security", "compat")
    with pytest.raises(RuntimeError, match="cannot carry --security plain"):
        start_s2cs(tmp_path, "plain-stunnel", "--ssl", "False", "--type=Stunnel", "--security", "plain")


def test_a_mode_the_backend_cannot_carry_is_refused_at_req_not_after(vm: Env) -> None:
    e, stunnel = vm, vm.cons["stunnel"]
    r = run(e, "s2uc", "prod-req", "--s2cs", stunnel.address, "--mock", "True", "--security", "plain")
    assert r.returncode != 0
    assert "cannot carry security 'plain'" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_native_prod_with_haproxy_cons_is_refused_at_update_with_a_reason(vm: Env) -> None:
    e, app = vm, Producer(size=1024)
    prod, cons = e.cons["native"], e.cons["haproxy"]  # any s2cs takes either role
    try:
        inbound, _ = prod_side(e, app.port, prod)
        cons_req, _ = cons_side(e, cons, inbound)
        _out, err = cons_req.communicate(timeout=30)
        assert cons_req.returncode != 0
        assert "pre-shared key" in err and "haproxy backend" in err, err
    finally:
        release(e, prod, cons)
        app.close()


def test_minted_session_survives_a_prod_s2cs_restart_and_its_files_go_at_release(vm: Env) -> None:
    """The stored session (with its certificates) is re-applied by the restarted s2cs."""
    e, app = vm, Producer()
    cons = e.cons["haproxy"]
    lo, hi = free_port_range(12)
    args = (
        f"--server_crt={e.dir / 'server.crt'}", f"--server_key={e.dir / 'server.key'}",
        "--hello-timeout", "30", "--type=Haproxy", "--port_range", f"{lo}-{hi}",
    )  # fmt: skip
    prod = start_s2cs(e.dir, "prod-restart", *args)
    try:
        inbound, _ = prod_side(e, app.port, prod)
        cons_req, _ = cons_side(e, cons, inbound)
        out, err = cons_req.communicate(timeout=30)
        assert cons_req.returncode == 0, err
        outbound = listeners(out)[0]
        assert fetch(outbound) == app.sha
        stop_s2cs(prod.proc)  # its HAProxy stops with it; the session stays in its store
        prod = start_s2cs(e.dir, "prod-restart", *args)  # same state directory
        assert fetch(outbound) == app.sha
        assert (e.session_dir("prod-restart") / "own.key").is_file()
    finally:
        r = release(e, prod, cons)
        stop_s2cs(prod.proc)
        app.close()
    assert r.returncode == 0, r.stdout + r.stderr
    assert not e.session_dir("prod-restart").exists()
    assert "Traceback" not in prod.log.read_text(errors="replace")
