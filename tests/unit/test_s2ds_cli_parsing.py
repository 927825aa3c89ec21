"""s2ds command-line parsing: sizes, rates, PSK files, TLS options, tuning knobs."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import click
import pytest
from hypothesis import given
from hypothesis import strategies as st

from scistream.dataplane import InvalidRoute, TlsMode, TlsRole, Tuning
from scistream.keys import compat_key_bytes, key_from_stunnel_text
from scistream.s2ds.forward import ForwardError, build_tls, read_psk_file
from scistream.s2ds.knobs import KNOBS, tuning_from_options, tuning_options
from scistream.s2ds.paths import default_control_address
from scistream.s2ds.units import parse_rate, parse_size


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("1500", 1500),
        ("500k", 500_000),
        ("100M", 100_000_000),
        ("1G", 10**9),
        ("1.5G", 1_500_000_000),
        ("10Gbit", 1_250_000_000),
        ("800Mbps", 100_000_000),
        ("1MiB", 1 << 20),
        ("2Ki", 2048),
        ("100MB/s", 100_000_000),
    ],
)
def test_parse_rate(text: str, value: int) -> None:
    assert parse_rate(text) == value


@pytest.mark.parametrize("text", ["", "fast", "-1", "1X", "1GG", "0.1bit"])
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rate(text)


@pytest.mark.parametrize(
    ("text", "value"), [("4096", 4096), ("256K", 256 << 10), ("1M", 1 << 20), ("2GiB", 2 << 30)]
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@given(st.text(max_size=30))
def test_parsers_raise_only_value_error(text: str) -> None:
    for parse in (parse_rate, parse_size):
        try:
            assert parse(text) >= 0
        except ValueError as exc:
            assert str(exc)


def test_psk_file_stunnel_format(tmp_path: Path) -> None:
    f = tmp_path / "psk.txt"
    hex_key = "00112233445566778899AABBCCDDEEFF"
    f.write_text(f"# comment\n\nfirst:a text key, not hex\nsecond:with:colons-in-the-key\nhexed:{hex_key}\n")
    f.chmod(0o600)
    assert read_psk_file(f) == ("first", b"a text key, not hex")
    assert read_psk_file(f, "second") == ("second", b"with:colons-in-the-key")
    assert read_psk_file(f, "hexed") == ("hexed", bytes.fromhex(hex_key))  # as stunnel decodes it
    with pytest.raises(ForwardError, match="no identity"):
        read_psk_file(f, "third")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("", "holds no"),
        ("no-colon-here\n", "not IDENTITY:KEY"),
        ("id:short\n", "shorter than 16"),
        ("id:00112233445566778899aabbccddee\n", "shorter than 16"),
        (":0123456789abcdef\n", "not IDENTITY:KEY"),
    ],
)
def test_psk_file_errors(tmp_path: Path, content: str, needle: str) -> None:
    f = tmp_path / "psk.txt"
    f.write_text(content)
    with pytest.raises(ForwardError, match=needle):
        read_psk_file(f)


def test_build_tls_modes(tmp_path: Path) -> None:
    assert build_tls(None, None) is None
    uid = "2b6a1b7e-8c1f-4d7e-9a51-0f0e2f6b9c11"
    compat = build_tls("client", None, psk_from_uid=uid)
    assert compat is not None
    assert (compat.role, compat.mode, compat.psk_identity, compat.psk_key) == (
        TlsRole.CLIENT,
        TlsMode.COMPAT,
        "client1",
        bytes.fromhex(uid.replace("-", "")),  # what a 1.x stunnel makes of the uid
    )
    upgraded = build_tls("server", "psk", psk_from_uid=uid)
    assert upgraded is not None and upgraded.mode is TlsMode.PSK
    f = tmp_path / "psk"
    f.write_text("id1:" + "k" * 32 + "\n")
    psk = build_tls("server", None, psk_file=str(f))
    assert psk is not None and (psk.mode, psk.psk_identity) == (TlsMode.PSK, "id1")
    cert = build_tls("client", None, ca="/etc/ssl/ca.pem")
    assert cert is not None and cert.mode is TlsMode.CERT
    with pytest.raises(ForwardError):
        build_tls(None, None, psk_file=str(f))
    with pytest.raises(ForwardError):
        build_tls("server", None, psk_file=str(f), psk_from_uid=uid)
    with pytest.raises(ForwardError):
        build_tls("server", "psk")
    with pytest.raises(InvalidRoute):
        build_tls("server", "cert", ca="/etc/ssl/ca.pem")  # a cert-mode server needs cert and key


def test_knobs_cover_every_tuning_field() -> None:
    names = {decl.split("/")[0][2:].replace("-", "_") for decl, _, _ in KNOBS}
    assert names == {f.name for f in fields(Tuning)}


def test_tuning_from_options() -> None:
    @click.command()
    @tuning_options
    def cmd(**kw: object) -> None:
        tuning = tuning_from_options(dict(kw))
        click.echo(repr(tuning))

    from click.testing import CliRunner

    out = CliRunner().invoke(
        cmd, ["--workers", "3", "--pipe-size", "4M", "--no-nodelay", "--congestion", "bbr"]
    )
    assert out.exit_code == 0, out.output
    expected = Tuning(workers=3, pipe_size=4 << 20, nodelay=False, congestion="bbr")
    assert out.output.strip() == repr(expected)
    bad = CliRunner().invoke(cmd, ["--connect-timeout", "0"])
    assert bad.exit_code == 2 and "connect_timeout" in bad.output


def test_default_control_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCISTREAM_STATE_DIR", str(tmp_path))
    assert default_control_address() == f"ipc://{tmp_path}/s2ds.sock"
    assert default_control_address("/srv/x") == "ipc:///srv/x/s2ds.sock"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("00ff", b"\x00\xff"),
        ("00FFaa", b"\x00\xff\xaa"),
        ("abc", b"abc"),  # odd number of hex digits: raw text
        ("not hex at all", b"not hex at all"),
        ("4f8583bca4d311ee9fd6034d1fcbd7c3", bytes.fromhex("4f8583bca4d311ee9fd6034d1fcbd7c3")),
    ],
)
def test_stunnel_key_bytes(text: str, key: bytes) -> None:
    assert key_from_stunnel_text(text) == key
    assert compat_key_bytes(text.encode()) == key
    assert compat_key_bytes(b"\xff\xfe raw bytes") == b"\xff\xfe raw bytes"
