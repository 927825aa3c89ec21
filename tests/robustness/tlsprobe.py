"""TLS scanning for RELIABILITY 20: sslscan (Debian) run and read from its --xml report, what
counts as a finding (medium or worse), and a raw ClientHello probe.

The raw probe exists because sslscan enumerates TLS 1.2 cipher suites through OpenSSL, and
an OpenSSL client never offers a PSK suite without a key: sslscan cannot see what a PSK
listener (our compat mode) accepts, nor prove SSLv3 off when its OpenSSL lacks SSLv3. The
probe writes ClientHello bytes itself, offering any suite IDs at any version, and reads
which suite the ServerHello picks, if one comes at all.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from scistream.endpoints import parse_endpoint

SSLV3, TLS10, TLS11, TLS12 = 0x0300, 0x0301, 0x0302, 0x0303
VERSION_NAMES = {SSLV3: "SSLv3", TLS10: "TLSv1.0", TLS11: "TLSv1.1", TLS12: "TLSv1.2"}
OLD_PROTOCOLS = ("SSLv2", "SSLv3", "TLSv1.0", "TLSv1.1")

#: Every TLS <= 1.2 cipher suite code point in use (IANA registry ranges), minus the
#: signalling values (renegotiation SCSV 0x00FF, fallback SCSV 0x5600).
ALL_SUITES = (
    [i for i in range(0x0001, 0x0100) if i != 0x00FF]
    + list(range(0xC001, 0xC100))
    + list(range(0xCCA8, 0xCCAF))
    + list(range(0xD001, 0xD006))
)
#: Anonymous (no authentication at all) suites, among them AECDH-NULL-SHA, what a 1.x
#: stunnel with ``ciphers = eNULL`` negotiates (PROTOCOL.md).
ANON_SUITES = (
    0x0018,
    0x001B,
    0x0034,
    0x003A,
    0x006C,
    0x006D,
    0x00A6,
    0x00A7,
    0xC015,
    0xC016,
    0xC017,
    0xC018,
    0xC019,
)
#: Names sslscan gives suites that are weak whatever its strength column says.
WEAK_NAME = re.compile(r"NULL|EXP|RC4|RC2|(^|-)DES-|DES-CBC3|3DES|IDEA|SEED|MD5|ADH|AECDH|anon", re.I)


# ---- sslscan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cipher:
    version: str  # "TLSv1.2"
    name: str
    id: int
    bits: int
    strength: str  # sslscan's word: null, anonymous, weak, medium, strong, acceptable
    dhebits: int = 0  # finite-field DHE key size, 0 if none
    ecdhebits: int = 0


@dataclass
class Scan:
    """What one sslscan run reported."""

    protocols: dict[str, bool] = field(default_factory=dict)  # "TLSv1.2" -> enabled
    ciphers: list[Cipher] = field(default_factory=list)
    groups: list[tuple[str, str, int]] = field(default_factory=list)  # (version, name, bits)
    heartbleed: list[tuple[str, bool]] = field(default_factory=list)
    renegotiation: tuple[bool, bool] = (False, False)  # (supported, secure)
    compression: bool = False
    certificates: list[dict[str, str]] = field(default_factory=list)
    raw: str = ""

    def enabled(self) -> set[str]:
        return {name for name, on in self.protocols.items() if on}


def run_sslscan(address: str, out: Path, timeout: float = 120) -> Scan:
    """Run ``sslscan --xml`` against ``address`` and read its report."""
    host, port = parse_endpoint(address)
    report = out / f"sslscan-{port}.xml"
    proc = subprocess.run(
        ["sslscan", "--no-colour", f"--xml={report}", f"{host}:{port}"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0 and report.exists(), f"sslscan failed ({proc.returncode}): {proc.stderr}"
    return parse_sslscan(report.read_text())


def parse_sslscan(text: str) -> Scan:
    root = ET.fromstring(text)
    test = root.find("ssltest")
    assert test is not None, f"no <ssltest> in sslscan's report: {text[:500]}"
    scan = Scan(raw=text)
    for p in test.iter("protocol"):
        name = ("SSLv" if p.get("type") == "ssl" else "TLSv") + (p.get("version") or "?")
        scan.protocols[name] = p.get("enabled") == "1"
    for c in test.iter("cipher"):
        scan.ciphers.append(
            Cipher(
                version=c.get("sslversion", ""),
                name=c.get("cipher", ""),
                id=int(c.get("id", "0"), 16),
                bits=int(c.get("bits", "0")),
                strength=c.get("strength", ""),
                dhebits=int(c.get("dhebits", "0")),
                ecdhebits=int(c.get("ecdhebits", "0")),
            )
        )
    for g in test.iter("group"):
        scan.groups.append((g.get("sslversion", ""), g.get("name", ""), int(g.get("bits", "0"))))
    for h in test.iter("heartbleed"):
        scan.heartbleed.append((h.get("sslversion", ""), h.get("vulnerable") == "1"))
    reneg = test.find("renegotiation")
    if reneg is not None:
        scan.renegotiation = (reneg.get("supported") == "1", reneg.get("secure") == "1")
    comp = test.find("compression")
    scan.compression = comp is not None and comp.get("supported") == "1"
    for cert in test.iter("certificate"):
        pk = cert.find("pk")
        scan.certificates.append(
            {
                "signature": (cert.findtext("signature-algorithm") or "").strip(),
                "pk_type": pk.get("type", "") if pk is not None else "",
                "pk_bits": pk.get("bits", "0") if pk is not None else "0",
                "expired": (cert.findtext("expired") or "").strip(),
            }
        )
    return scan


def findings(scan: Scan, allowed: tuple[str, ...] = ()) -> list[str]:
    """Everything in ``scan`` rated medium or worse; cipher names in ``allowed`` pass."""
    out = [f"{p} enabled" for p in OLD_PROTOCOLS if scan.protocols.get(p)]
    for c in scan.ciphers:
        if c.name in allowed:
            continue
        if c.strength not in ("strong", "acceptable") or WEAK_NAME.search(c.name) or c.bits < 128:
            out.append(f"{c.version} {c.name} ({c.bits} bits, {c.strength})")
        if c.dhebits and c.dhebits < 2048:
            out.append(f"{c.version} {c.name}: DHE {c.dhebits} bits")
        if c.ecdhebits and c.ecdhebits < 224:
            out.append(f"{c.version} {c.name}: ECDHE {c.ecdhebits} bits")
    out += [f"{v} group {name} ({bits} bits)" for v, name, bits in scan.groups if bits < 112]
    out += [f"{v} vulnerable to heartbleed" for v, vulnerable in scan.heartbleed if vulnerable]
    if scan.renegotiation[0] and not scan.renegotiation[1]:
        out.append("insecure renegotiation")
    if scan.compression:
        out.append("TLS compression (CRIME)")
    for cert in scan.certificates:
        sig = cert["signature"].lower()
        if "md5" in sig or "sha1" in sig:
            out.append(f"certificate signed with {cert['signature']}")
        if cert["pk_type"] == "RSA" and int(cert["pk_bits"]) < 2048:
            out.append(f"RSA key of {cert['pk_bits']} bits")
        if cert["expired"] == "true":
            out.append("certificate expired")
    return out


# ---- raw ClientHello probe ----------------------------------------------------------------


def _ext(kind: int, body: bytes) -> bytes:
    return struct.pack("!HH", kind, len(body)) + body


def client_hello(version: int, suites: list[int] | tuple[int, ...]) -> bytes:
    """A ClientHello record offering ``suites`` at ``version`` (TLS <= 1.2 semantics), with
    the extensions an ECDHE suite needs."""
    groups = (0x001D, 0x0017, 0x0018, 0x0019, 0x001E, 0x0100, 0x0101)
    sigalgs = (0x0403, 0x0503, 0x0603, 0x0804, 0x0805, 0x0806, 0x0401, 0x0501, 0x0601, 0x0201, 0x0203)
    exts = b""
    if version >= TLS10:
        exts = (
            _ext(0x000A, struct.pack("!H", 2 * len(groups)) + struct.pack(f"!{len(groups)}H", *groups))
            + _ext(0x000B, b"\x01\x00")
            + _ext(0x000D, struct.pack("!H", 2 * len(sigalgs)) + struct.pack(f"!{len(sigalgs)}H", *sigalgs))
            + _ext(0xFF01, b"\x00")  # renegotiation_info, empty
        )
    body = (
        struct.pack("!H", version)
        + os.urandom(32)
        + b"\x00"
        + struct.pack("!H", 2 * len(suites))
        + struct.pack(f"!{len(suites)}H", *suites)
        + b"\x01\x00"
        + (struct.pack("!H", len(exts)) + exts if exts else b"")
    )
    handshake = b"\x01" + struct.pack("!I", len(body))[1:] + body
    return b"\x16" + struct.pack("!HH", min(version, TLS10), len(handshake)) + handshake


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def server_choice(
    address: str, version: int, suites: list[int] | tuple[int, ...], timeout: float = 5.0
) -> tuple[int, int] | None:
    """Offer ``suites`` at ``version``; the (version, suite) of the ServerHello, or None when
    the server answers with an alert or closes."""
    with socket.create_connection(parse_endpoint(address), timeout=timeout) as sock:
        sock.sendall(client_hello(version, suites))
        try:
            header = _read_exact(sock, 5)
            if len(header) < 5 or header[0] != 0x16:
                return None  # an alert (0x15), EOF or something that is no handshake
            body = _read_exact(sock, struct.unpack("!H", header[3:5])[0])
        except (ConnectionError, TimeoutError):
            return None
        finally:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
    if len(body) < 39 or body[0] != 0x02:
        return None
    chosen_version = struct.unpack("!H", body[4:6])[0]
    sid_len = body[38]
    suite = struct.unpack("!H", body[39 + sid_len : 41 + sid_len])[0]
    return chosen_version, suite


def accepted_suites(
    address: str, version: int, offer: list[int] | tuple[int, ...] = tuple(ALL_SUITES)
) -> set[int]:
    """Every suite of ``offer`` the server picks at ``version``: offer all, take away the one
    picked, again, until the server refuses what is left (as sslscan and testssl.sh do)."""
    left = list(offer)
    picked: set[int] = set()
    for _ in range(len(left) + 1):
        choice = server_choice(address, version, left)
        if choice is None:
            return picked
        chosen_version, suite = choice
        assert chosen_version == version, f"offered {version:#06x}, the server answered {chosen_version:#06x}"
        assert suite in left, f"the server picked {suite:#06x}, which was not offered"
        picked.add(suite)
        left.remove(suite)
    return picked
