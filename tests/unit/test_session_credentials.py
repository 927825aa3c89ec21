"""Per-session WAN certificates: what is minted, what the requester gets, what is refused."""

from __future__ import annotations

import datetime as dt

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from scistream.certs import (
    CREDENTIALS_MAGIC,
    SESSION_SERVER_NAME,
    SessionCredentials,
    is_credentials,
    mint_session_credentials,
)
from scistream.cli import main as scistream_main


def test_minted_certificates_are_fresh_self_signed_and_fit_their_roles() -> None:
    a, b = mint_session_credentials("u1"), mint_session_credentials("u1")
    assert a.server_cert != b.server_cert and a.client_key != b.client_key
    server = x509.load_pem_x509_certificate(a.server_cert)
    client = x509.load_pem_x509_certificate(a.client_cert)
    assert server.issuer == server.subject and client.issuer == client.subject
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [SESSION_SERVER_NAME]
    eku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert server.not_valid_before_utc <= dt.datetime.now(dt.UTC) < server.not_valid_after_utc


def test_the_requester_never_gets_the_listener_key() -> None:
    creds = mint_session_credentials("u2")
    blob = creds.encode()
    assert is_credentials(blob) and blob.startswith(CREDENTIALS_MAGIC) and len(blob) > 64
    assert SessionCredentials.decode(blob) == creds
    given = creds.for_consumer().encode()
    assert creds.server_key not in given
    back = SessionCredentials.decode(given)
    assert back.server_key == b"" and back.client_key == creds.client_key
    assert "PRIVATE" not in repr(creds)  # keys are kept out of repr (and so out of logs)


def test_a_psk_is_not_credentials() -> None:
    assert not is_credentials(b"\x00" * 32)
    assert not is_credentials(b"")


@pytest.mark.parametrize(
    "mangle",
    [
        lambda b: b[:40],  # truncated
        lambda b: CREDENTIALS_MAGIC + b"\xff\xff\xff",  # not a message
        lambda b: b.replace(b"BEGIN CERTIFICATE", b"BEGIN CERTIFICATX", 1),  # bad PEM
    ],
)
def test_malformed_credentials_are_refused_in_one_sentence(mangle: object) -> None:
    blob = mint_session_credentials("u3").for_consumer().encode()
    with pytest.raises(ValueError) as info:
        SessionCredentials.decode(mangle(blob))  # type: ignore[operator]
    assert "PRIVATE" not in str(info.value) and "\n" not in str(info.value)


def test_a_client_key_of_another_session_is_refused() -> None:
    a, b = mint_session_credentials("a"), mint_session_credentials("b")
    mixed = SessionCredentials(a.server_cert, a.client_cert, b.client_key)
    with pytest.raises(ValueError, match="does not match"):
        SessionCredentials.decode(mixed.encode())


def test_certs_gateway_command_issues_ca_once_and_refuses_overwrite(tmp_path: object) -> None:
    runner = CliRunner()
    out = str(tmp_path)
    first = runner.invoke(scistream_main, ["certs", "--gateway", "prod", "--ip", "127.0.0.1", "--out", out])
    assert first.exit_code == 0, first.output
    assert "tls_ca=" in first.output and "tls_cert=" in first.output
    second = runner.invoke(scistream_main, ["certs", "--gateway", "cons", "--out", out])
    assert second.exit_code == 0, second.output
    again = runner.invoke(scistream_main, ["certs", "--gateway", "prod", "--out", out])
    assert again.exit_code != 0 and "--force" in again.output
    bad = runner.invoke(scistream_main, ["certs", "--gateway", "../x", "--out", out])
    assert bad.exit_code != 0
