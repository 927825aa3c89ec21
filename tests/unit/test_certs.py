"""Certificate generation: SANs, key modes, and what openssl and gRPC make of the files."""

from __future__ import annotations

import ipaddress
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509

from scistream.certs import make_ca_and_leaf, make_self_signed
from scistream.cli import main as scistream_main

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl binary not installed")
pytestmark = pytest.mark.timeout(60)


def _sans(cert_path: Path) -> tuple[list[str], list[str]]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(i) for i in ext.get_values_for_type(x509.IPAddress)], ext.get_values_for_type(x509.DNSName)


@pytest.mark.parametrize("key_type", ["ec", "rsa"])
def test_self_signed_has_sans_and_private_key(tmp_path: Path, key_type: str) -> None:
    cert, key = make_self_signed(tmp_path, ["192.168.10.11", "::1"], ["gw.example.org"], key_type=key_type)
    ips, dns = _sans(cert)
    assert [ipaddress.ip_address(i) for i in ips] == [
        ipaddress.ip_address("192.168.10.11"),
        ipaddress.ip_address("::1"),
    ]
    assert dns == ["gw.example.org"]
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert x509.load_pem_x509_certificate(cert.read_bytes()).subject.rfc4514_string() == "CN=192.168.10.11"


@needs_openssl
def test_openssl_verifies_self_signed_and_ca_leaf(tmp_path: Path) -> None:
    cert, _ = make_self_signed(tmp_path / "ss", ["127.0.0.1"], [])
    r = subprocess.run(
        ["openssl", "verify", "-CAfile", str(cert), "-verify_ip", "127.0.0.1", str(cert)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    made = make_ca_and_leaf(tmp_path / "ca", ["10.0.0.1"], ["gw"])
    r = subprocess.run(
        ["openssl", "verify", "-CAfile", str(made.ca_cert), "-verify_hostname", "gw", str(made.cert)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    # The wrong name must fail: the SANs are what is checked.
    r = subprocess.run(
        ["openssl", "verify", "-CAfile", str(made.ca_cert), "-verify_ip", "10.9.9.9", str(made.cert)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode != 0
    assert stat.S_IMODE(made.ca_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(made.key.stat().st_mode) == 0o600


def test_leaf_authenticates_clients_only_when_asked(tmp_path: Path) -> None:
    def purposes(cert: Path, ca: Path) -> tuple[bool, bool]:
        """(valid for a TLS server, valid for a TLS client) by openssl verify -purpose."""

        def check(purpose: str) -> bool:
            argv = ["openssl", "verify", "-CAfile", str(ca), "-purpose", purpose, str(cert)]
            return subprocess.run(argv, capture_output=True, check=False).returncode == 0

        return check("sslserver"), check("sslclient")

    server_only = make_ca_and_leaf(tmp_path / "a", ["127.0.0.1"])
    assert purposes(server_only.cert, server_only.ca_cert) == (True, False)
    both = make_ca_and_leaf(tmp_path / "b", ["127.0.0.1"], client_auth=True)
    assert purposes(both.cert, both.ca_cert) == (True, True)


def test_cli_writes_files_and_refuses_to_overwrite(tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(
        scistream_main, ["certs", "--out", str(tmp_path), "--ip", "127.0.0.1,10.1.1.1", "--dns", "localhost"]
    )
    assert r.exit_code == 0, r.output
    assert "IP:127.0.0.1, IP:10.1.1.1, DNS:localhost" in r.output
    assert _sans(tmp_path / "server.crt")[0] == ["127.0.0.1", "10.1.1.1"]
    r = runner.invoke(scistream_main, ["certs", "--out", str(tmp_path)])
    assert r.exit_code != 0 and "--force" in r.output
    r = runner.invoke(
        scistream_main, ["certs", "--out", str(tmp_path), "--ca", "--force", "--ip", "127.0.0.1"]
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "ca.crt").exists()
    r = runner.invoke(scistream_main, ["certs", "--out", str(tmp_path / "x"), "--ip", "not-an-ip"])
    assert r.exit_code != 0 and "not an IP address" in r.output
